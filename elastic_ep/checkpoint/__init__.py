"""Checkpoints and expert bundles: formats, layouts, geometry from config.json, reading, writing, fingerprints."""

from .bundle import TORCH_DTYPES, empty_rows, tensor_view, tensor_views, to_row, torch_dtype
from .fingerprints import (fingerprint_row, fingerprint_rows, fingerprint_sums, fingerprints_from_sums,
                           weighted_bit_sums)
from .formats import DTYPES, ExpertFormat, TensorSpec, expert_format, format_of
from .geometry import CONFIG_FILE, read_config, read_spec
from .hub import resolve_checkpoint
from .layouts import PRESETS, Layout, resolve_layout
from .reader import INDEX_FILE, SINGLE_FILE, CheckpointReader
from .writer import (FAMILIES, expected_bundle, expected_expert, expected_fingerprints, expected_row, hf_config,
                     write_checkpoint, write_synthetic_checkpoint)

NamingPreset = Layout  # the name earlier releases used

__all__ = [
    "CONFIG_FILE", "DTYPES", "FAMILIES", "INDEX_FILE", "PRESETS", "SINGLE_FILE", "TORCH_DTYPES", "CheckpointReader",
    "ExpertFormat", "Layout", "NamingPreset", "TensorSpec", "empty_rows", "expected_bundle", "expected_expert",
    "expected_fingerprints", "expected_row", "expert_format", "fingerprint_row", "fingerprint_rows",
    "fingerprint_sums", "fingerprints_from_sums", "format_of", "hf_config", "read_config", "read_spec",
    "resolve_checkpoint", "resolve_layout", "tensor_view", "tensor_views", "to_row", "torch_dtype",
    "weighted_bit_sums", "write_checkpoint", "write_synthetic_checkpoint",
]
