"""Where a checkpoint's files are: a local folder, a Hugging Face hub cache snapshot, or a hub repo id.

A hub cache snapshot (``<cache>/models--org--name/snapshots/<revision>/``) holds
symlinks into the same cached repo's ``blobs/``; its files may resolve there and
nowhere else. Names in an index stay relative, without ``..``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Union

from ..errors import CheckpointError

PathLike = Union[str, os.PathLike]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_checkpoint(checkpoint: PathLike) -> Path:
    """The local folder of ``checkpoint``: an existing folder, else a hub repo id resolved by huggingface_hub.

    A repo id is looked up in the local hub cache first (``HF_HUB_CACHE``); it is
    downloaded (safetensors, index and config only) only where the network allows.
    """
    folder = Path(checkpoint)
    if folder.is_dir():
        return folder
    text = str(checkpoint)
    if not _REPO_ID.match(text) or folder.exists():
        raise CheckpointError(f"checkpoint folder {text!r} does not exist or is not a directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    patterns = ["*.json", "*.safetensors"]
    try:
        return Path(snapshot_download(text, allow_patterns=patterns, local_files_only=True))
    except HFValidationError as exc:
        raise CheckpointError(f"checkpoint {text!r} is neither a folder nor a valid hub repo id: {exc}") from exc
    except Exception as cached_exc:  # noqa: BLE001 - not in the cache: try the network where allowed
        try:
            return Path(snapshot_download(text, allow_patterns=patterns))
        except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated: say which
            raise CheckpointError(
                f"checkpoint {text!r} is not a folder, not in the hub cache ({type(cached_exc).__name__}) "
                f"and cannot be downloaded: {type(exc).__name__}: {exc}"
            ) from exc


def allowed_roots(folder: Path) -> tuple[Path, ...]:
    """Folders a checkpoint's files may resolve into: the folder itself, and for a hub
    cache snapshot also the cached repo's ``blobs/``."""
    root = folder.resolve()
    lexical = Path(os.path.abspath(folder))
    snapshots = lexical.parent
    repo = snapshots.parent
    if snapshots.name == "snapshots" and repo.name.startswith(("models--", "datasets--")) and (repo / "blobs").is_dir():
        return root, (repo / "blobs").resolve()
    return (root,)


def checked_path(folder: Path, roots: tuple[Path, ...], file: str) -> Path:
    """Resolve a weight-map file name; it must be a regular file inside ``roots``."""
    rel = Path(file)
    if rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(
            f"weight map entry {file!r} is absolute or contains '..'; it must stay in {str(roots[0])!r}"
        )
    path = (folder / rel).resolve()
    if not any(path.is_relative_to(r) for r in roots):
        raise CheckpointError(
            f"weight map entry {file!r} resolves to {str(path)!r}, outside {' and '.join(str(r) for r in roots)}"
        )
    if not path.is_file():
        raise CheckpointError(f"shard file {file!r} named by the weight map is missing from {str(roots[0])!r}")
    return path
