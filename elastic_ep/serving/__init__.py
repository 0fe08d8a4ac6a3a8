"""Serving tokens through the held experts: dispatch planning (pure), expert compute, the client."""
