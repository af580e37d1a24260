"""A tiny real data set for tests and smoke runs: scikit-learn's 1,797 handwritten 8x8 digits as shards.

The last 297 digits in scikit-learn's order are the test split, the first 1,500 the training split.
Keys are ``digits-{i:04d}`` with ``i`` the index in ``load_digits()``, so a test can always go back to
the source image. Everything is deterministic (fixed shuffle seed, fixed JPEG settings, fixed tar
metadata), so two processes writing the same directory produce byte-identical files.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .shards import manifest_path_for, read_manifest, write_shards

NUM_TRAIN = 1500
NUM_TEST = 297
NUM_CLASSES = 10
JPEG_QUALITY = 95
SHUFFLE_SEED = 1234
# Small shards on purpose: several shards of unequal size exercise the rank-splitting rules.
TRAIN_SAMPLES_PER_SHARD = 256
TEST_SAMPLES_PER_SHARD = 100
_MAX_PIXEL = 16.0  # load_digits() values are counts 0..16 of set pixels in 4x4 blocks


def digits_key(index: int) -> str:
    return f"digits-{index:04d}"


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 grey images in [0, 255], shape [N, 8, 8], with int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / _MAX_PIXEL)).clip(0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def render_digit(image: np.ndarray, image_size: int) -> Image.Image:
    """The RGB image that gets JPEG-encoded: bicubic upscale of the 8x8 grey digit."""
    grey = Image.fromarray(image, mode="L")
    return grey.resize((image_size, image_size), Image.Resampling.BICUBIC).convert("RGB")


def _encode_jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 chroma: the images are grey, and full-resolution chroma keeps DALI's and PIL's decodes
    # of the same file closer together (chroma upsampling is where decoders differ most).
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def _samples(
    images: np.ndarray, labels: np.ndarray, order: Sequence[int], image_size: int
) -> Iterator[tuple[str, bytes, int]]:
    for i in order:
        yield digits_key(int(i)), _encode_jpeg(render_digit(images[i], image_size)), int(labels[i])


def _split_orders() -> dict[str, list[int]]:
    train = np.random.default_rng(SHUFFLE_SEED).permutation(NUM_TRAIN)
    return {"train": [int(i) for i in train], "test": list(range(NUM_TRAIN, NUM_TRAIN + NUM_TEST))}


def _meta(split: str, image_size: int) -> dict[str, object]:
    return {
        "source": "sklearn.datasets.load_digits",
        "split": split,
        "image_size": image_size,
        "jpeg_quality": JPEG_QUALITY,
        "shuffle_seed": SHUFFLE_SEED if split == "train" else None,
    }


def _is_reusable(manifest_path: Path, expected_meta: dict[str, object], expected_count: int) -> bool:
    try:
        manifest = read_manifest(manifest_path, verify_checksums=True)
    except (OSError, ValueError):
        return False
    return manifest.meta == expected_meta and manifest.total_samples == expected_count


def make_digits_shards(out_dir: str | os.PathLike[str], image_size: int = 32) -> dict[str, Path]:
    """Write (or reuse) the digits train/test shards in ``out_dir``; return their manifest paths.

    Existing manifests are reused when their checksums verify and they were made with the same
    settings; otherwise the split is rewritten. Safe to call from several ranks at once (identical
    bytes are renamed over each other), though calling it on one rank and then a barrier is cheaper.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (the digits are 8x8), got {image_size}")
    out = Path(out_dir)
    orders = _split_orders()
    images = labels = None
    paths: dict[str, Path] = {}
    for split, order in orders.items():
        prefix = f"digits-{split}"
        manifest_path = manifest_path_for(out, prefix)
        meta = _meta(split, image_size)
        if not _is_reusable(manifest_path, meta, len(order)):
            if images is None:
                images, labels = load_digit_images()
            samples_per_shard = TRAIN_SAMPLES_PER_SHARD if split == "train" else TEST_SAMPLES_PER_SHARD
            write_shards(
                _samples(images, labels, order, image_size),
                out,
                prefix=prefix,
                samples_per_shard=samples_per_shard,
                class_names=[str(d) for d in range(NUM_CLASSES)],
                jpeg_check="decode",
                meta=meta,
            )
        paths[split] = manifest_path
    return paths
