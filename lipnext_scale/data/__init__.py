"""Data layer: WebDataset shards with DALI indexes, the digits test set, and DALI/webdataset loaders."""

from .digits import make_digits_shards
from .loader import build_loader
from .loader_base import AUGMENTS, Loader
from .shards import Manifest, read_manifest, stage_shards, write_shards

__all__ = [
    "AUGMENTS",
    "Loader",
    "Manifest",
    "build_loader",
    "make_digits_shards",
    "read_manifest",
    "stage_shards",
    "write_shards",
]
