"""Checkpoints and expert bundles: formats, layouts, geometry from config.json, reading, writing, fingerprints.

Names load lazily from their modules, so the pure ones (formats, layouts, geometry, hub) import without torch.
"""

from __future__ import annotations

import importlib

_MODULES = {
    "bundle": ("TORCH_DTYPES", "empty_rows", "tensor_view", "tensor_views", "to_row", "torch_dtype"),
    "fingerprints": ("fingerprint_row", "fingerprint_rows", "fingerprint_sums", "fingerprints_from_sums",
                     "weighted_bit_sums"),
    "formats": ("DTYPES", "ExpertFormat", "TensorSpec", "expert_format", "format_of"),
    "geometry": ("CONFIG_FILE", "read_config", "read_spec"),
    "hub": ("resolve_checkpoint",),
    "layouts": ("PRESETS", "Layout", "resolve_layout"),
    "reader": ("INDEX_FILE", "SINGLE_FILE", "CheckpointReader"),
    "writer": ("FAMILIES", "expected_bundle", "expected_expert", "expected_fingerprints", "expected_row", "hf_config",
               "write_checkpoint", "write_synthetic_checkpoint"),
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}
_ALIASES = {"NamingPreset": ("layouts", "Layout")}  # the name earlier releases used
__all__ = sorted([*_WHERE, *_ALIASES])


def __getattr__(name: str):
    if name in _ALIASES:
        module, attr = _ALIASES[name]
    elif name in _WHERE:
        module, attr = _WHERE[name], name
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), attr)


def __dir__() -> list[str]:
    return __all__
