"""``build_loader``: the one entry point the trainer uses to stream a shard set."""

from __future__ import annotations

import importlib.util
import os

import torch

from .loader_base import AUGMENTS, DEFAULT_SHUFFLE_BUFFER, Loader, LoaderConfig, default_num_threads
from .shards import read_manifest

BACKENDS = ("dali", "wds", "auto")

__all__ = ["AUGMENTS", "BACKENDS", "Loader", "build_loader", "dali_available"]


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "dali" if dali_available() else "wds"
    return backend


def _check_arguments(batch_size: int, image_size: int, augment: str, rank: int, world_size: int) -> None:
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def build_loader(
    manifest_path: str | os.PathLike[str],
    *,
    batch_size: int,
    train: bool,
    image_size: int,
    augment: str = "none",
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    backend: str = "auto",
    device: str = "cpu",
    num_threads: int | None = None,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
) -> Loader:
    """Stream the shard set of ``manifest_path`` as ``(images, labels)`` batches for one rank.

    images: float32 ``[B, 3, image_size, image_size]`` in [0, 1] on ``device``; labels: int64 ``[B]``.
    Every image is scaled so its shorter side is ``image_size`` and centre-cropped to a square (shards
    stored at ``image_size`` pass through unchanged). ``augment`` (one of ``AUGMENTS``), in training:
    "none", "flip" (horizontal, p=0.5), "crop_flip" (CIFAR-style: zero-pad 4, random ``image_size``
    crop, flip), "rrc_flip" (ImageNet random-resized crop, area (0.08, 1), aspect (3/4, 4/3), resized
    to ``image_size``, flip) or "randaugment" (rrc_flip + RandAugment n=2, m=9 of 31 bins, DALI's
    suite). Evaluation never augments; but an eval loader given "rrc_flip" or "randaugment" uses the
    ImageNet eval transform — shorter side to ``floor(image_size / 0.875)``, centre ``image_size``
    crop — so pass the training recipe's ``augment`` to the eval loader too.

    Ranks: the samples are cut into ``world_size`` contiguous disjoint parts (DALI's rule, see
    ``loader_base``); each epoch rank ``r`` reads part ``(r + epoch) % world_size``.

    Batches per epoch (``len(loader)``) are the same on every rank:
    - train: shuffled with a ``shuffle_buffer``-sample buffer (the shards are written pre-shuffled);
      only full batches, ``(N // world_size) // batch_size`` of them.
    - eval: every sample of the split exactly once over all ranks, in shard order, never padded or
      repeated: ``ceil(ceil(N / world_size) / batch_size)`` batches, the last one trimmed to the
      rank's part. It is short, and on a rank whose part is one sample smaller than the largest it
      can be EMPTY (0 samples) — sum metrics over batches rather than averaging per batch.

    ``backend``: "dali" (NVIDIA DALI; "mixed" GPU decoding when ``device`` is CUDA), "wds" (webdataset +
    PIL; same parts, counts and eval order, a different training shuffle and random crops) or "auto"
    (DALI when importable). ``state_dict()`` / ``load_state_dict()`` resume the exact stream, random
    augmentation included, for the same backend and arguments.
    """
    _check_arguments(batch_size, image_size, augment, rank, world_size)
    chosen = _resolve_backend(backend)
    config = LoaderConfig(
        manifest=read_manifest(manifest_path),
        batch_size=batch_size,
        train=train,
        image_size=image_size,
        augment=augment,
        rank=rank,
        world_size=world_size,
        seed=seed,
        device=torch.device(device),
        num_threads=num_threads if num_threads is not None else default_num_threads(),
        shuffle_buffer=shuffle_buffer,
    )
    if chosen == "dali":
        from .dali_loader import DaliLoader

        return DaliLoader(config)
    from .wds_loader import WdsLoader

    return WdsLoader(config)
