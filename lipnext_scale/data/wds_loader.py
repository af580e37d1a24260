"""Pure-Python backend: the webdataset library reads the tars, PIL decodes, torch batches.

It reads exactly DALI's part of the data on every rank and epoch (see ``loader_base``) and yields the
same number of batches. Evaluation order is identical to DALI's (sequential); training order is not,
because the shuffle buffer and augmentation random streams are our own — the *set* of samples each
rank reads per epoch is the same. Everything random derives from ``(seed, rank, epoch, position)``
(and, in a remainder epoch, the slice read), so resuming replays the epoch's stream without decoding the
skipped images. RRC and RandAugment are
PIL re-implementations of DALI's definitions (``pil_augment``): same distribution, other random draws.
The tars are opened with ``open()`` and read as streams; member names are never used as paths.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from .loader_base import (
    CROP_PADDING,
    RANDAUGMENT_BINS,
    RANDAUGMENT_FILL,
    RANDAUGMENT_M,
    RANDAUGMENT_N,
    Loader,
    LoaderConfig,
)
from .pil_augment import rand_augment, random_resized_crop
from .shards import IMAGE_EXT, LABEL_EXT

RawSample = tuple[int, str, bytes, bytes]  # global index, key, jpeg bytes, cls bytes


def _read_indices(config: LoaderConfig, wanted: np.ndarray) -> Iterator[RawSample]:
    """The samples at the ascending global indices ``wanted`` of the concatenated shards, in that order,
    reading only the tars they fall in (an epoch's part is one contiguous run of them)."""
    if len(wanted) == 0:
        return
    manifest = config.manifest
    shard_start = 0
    for tar_path, shard in zip(manifest.tar_paths, manifest.shards, strict=True):
        shard_end = shard_start + shard.num_samples
        lo, hi = np.searchsorted(wanted, [shard_start, shard_end])
        if hi > lo:
            local = set((wanted[lo:hi] - shard_start).tolist())
            last = int(wanted[hi - 1]) - shard_start
            for index, key, jpeg, cls in _read_shard(tar_path, shard.num_samples, last):
                if index in local:
                    yield shard_start + index, key, jpeg, cls
        shard_start = shard_end


def _read_shard(tar_path: str, expected: int, last: int) -> Iterator[RawSample]:
    """(index in the shard, key, jpeg, cls) up to index ``last``; the count is checked when read whole."""
    # We open the file ourselves: webdataset's own opener (gopen) treats names like "pipe:..." as shell
    # commands. Member names only become dictionary keys; nothing is extracted to disk.
    with open(tar_path, "rb") as f:
        stream = wds.tariterators.group_by_keys(
            wds.tariterators.tar_file_expander([{"url": tar_path, "stream": f}])
        )
        count = 0
        for count, sample in enumerate(stream, start=1):
            index = count - 1
            if index > last:
                return
            key = sample["__key__"]
            missing = [ext for ext in (IMAGE_EXT, LABEL_EXT) if ext not in sample]
            if missing:
                raise ValueError(f"{tar_path}: sample {key!r} has no {missing} member")
            yield index, key, sample[IMAGE_EXT], sample[LABEL_EXT]
    if count != expected:
        raise ValueError(f"{tar_path}: holds {count} samples, the manifest says {expected}")


def _buffer_shuffled(
    samples: Iterator[RawSample], buffer_size: int, rng: random.Random
) -> Iterator[RawSample]:
    """Shuffle a stream with a fixed-size buffer: one sequential read, bounded memory (like DALI's)."""
    buffer: list[RawSample] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


def _parse_label(cls: bytes, key: str, num_classes: int) -> int:
    try:
        label = int(cls.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"sample {key!r}: .cls is not a decimal label: {cls[:32]!r}") from None
    if not 0 <= label < num_classes:
        raise ValueError(f"sample {key!r}: label {label} outside [0, {num_classes}) from the manifest")
    return label


def _decode(jpeg: bytes, key: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(jpeg)) as img:
            return img.convert("RGB")
    except Exception as exc:
        raise ValueError(f"sample {key!r}: cannot decode image ({exc})") from exc


def _resized_shorter(img: Image.Image, size: int) -> Image.Image:
    """The shorter side scaled to ``size`` (bilinear + antialias, like DALI's resize)."""
    w, h = img.size
    if min(w, h) != size:
        scale = size / min(w, h)
        img = img.resize(
            (max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BILINEAR
        )
    return img


def _to_chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def _window(image: torch.Tensor, size: int, dy: int, dx: int) -> torch.Tensor:
    """``size x size`` window of a CHW image whose top-left is (dy, dx) from the centred window.

    Pixels outside the image are zero, which makes this the classic pad-then-random-crop.
    """
    _, h, w = image.shape
    # Centre rounded half up; DALI may round an odd excess the other way (1 px, non-square inputs only).
    top, left = (h - size + 1) // 2 + dy, (w - size + 1) // 2 + dx
    pad = (max(0, -left), max(0, left + size - w), max(0, -top), max(0, top + size - h))
    if any(pad):
        image = F.pad(image, pad)
        top, left = top + pad[2], left + pad[0]
    return image[:, top : top + size, left : left + size]


class WdsLoader(Loader):
    """webdataset + PIL backend; same parts, batch counts and eval order as :class:`DaliLoader`."""

    backend = "wds"

    def __init__(self, config: LoaderConfig):
        super().__init__(config)
        self._stream: Iterator[tuple[int, RawSample]] | None = None

    def _epoch_samples(self) -> Iterator[RawSample]:
        c = self.config
        samples = _read_indices(c, self.epoch_indices())
        if c.train:
            tag = "" if self._remainder is None else "/remainder"
            rng = random.Random(f"shuffle/{c.seed}/{c.rank}/{self._epoch}{tag}")
            samples = _buffer_shuffled(samples, c.shuffle_buffer, rng)
        return samples

    def _open_stream(self, skip_batches: int) -> Iterator[tuple[int, RawSample]]:
        stream = enumerate(self._epoch_samples())
        for _ in range(skip_batches * self.config.batch_size):
            next(stream, None)
        return stream

    def _augmented(self, img: Image.Image, index: int) -> torch.Tensor:
        """The sample's CHW uint8 tensor; all randomness from (seed, rank, epoch, index in the epoch)."""
        c = self.config
        rng = random.Random(f"augment/{c.seed}/{c.rank}/{self._epoch}/{index}")
        if c.random_resized_crop:
            img = random_resized_crop(img, c.image_size, rng)
            if c.randaugment:
                img = rand_augment(
                    img, rng, n=RANDAUGMENT_N, m=RANDAUGMENT_M, bins=RANDAUGMENT_BINS, fill=RANDAUGMENT_FILL
                )
            image = _to_chw(img)
        else:
            dy = dx = 0
            if c.random_crop:
                dy, dx = rng.randint(-CROP_PADDING, CROP_PADDING), rng.randint(-CROP_PADDING, CROP_PADDING)
            image = _window(_to_chw(_resized_shorter(img, c.resize_shorter)), c.image_size, dy, dx)
        flip = c.random_flip and rng.random() < 0.5
        return image.flip(-1) if flip else image

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        if self._stream is None:
            self._stream = self._open_stream(self._position)
        images, labels, indices = [], [], []
        for index, (global_index, key, jpeg, cls) in self._stream:
            indices.append(global_index)
            labels.append(_parse_label(cls, key, c.manifest.num_classes))
            images.append(self._augmented(_decode(jpeg, key), index))
            if len(images) == c.batch_size:
                break
        if c.train and len(images) < c.batch_size:
            raise RuntimeError(f"{self._describe_batch()}: the rank's part ran out of samples mid-epoch")
        batch = (
            torch.stack(images)
            if images
            else torch.empty(0, 3, c.image_size, c.image_size, dtype=torch.uint8)
        )
        labels = torch.tensor(labels, dtype=torch.int64)
        self._mark_yielded(np.asarray(indices, dtype=np.int64))
        if torch.device(c.device).type != "cpu":  # pinned: the copies then do not wait for the GPU
            batch, labels = batch.pin_memory(), labels.pin_memory()
        return (
            batch.to(c.device, non_blocking=True).float().div_(255.0),
            labels.to(c.device, non_blocking=True),
        )

    def _begin_next_epoch(self) -> None:
        self._stream = None

    def _backend_state(self) -> dict[str, Any]:
        return {}

    def _restore_backend_state(self, state: dict[str, Any] | None) -> None:
        self._stream = None  # reopened lazily at (epoch, position) by _next_batch
