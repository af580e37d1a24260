"""What both loader backends share: configuration, the rank-splitting rule, epochs and resumable state.

Splitting rule (DALI's ``fn.readers.webdataset`` with ``shard_id``/``num_shards``, reproduced exactly by the
webdataset backend): the samples of all shards, concatenated in manifest order, are cut into
``world_size`` contiguous parts, part ``q`` being ``[floor(q*N/W), floor((q+1)*N/W))``. Rank ``r`` reads
part ``(r + epoch) % W`` in a given epoch (DALI moves every reader to the next part after each epoch,
``stick_to_shard=False``), so parts are disjoint, their union is the split, and over ``W`` epochs every
rank sees every sample.
"""

from __future__ import annotations

import hashlib
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .shards import Manifest

# Training augmentations, the same names and meaning in both backends (evaluation: see LoaderConfig):
#   none         shorter side scaled to image_size, centre crop
#   flip         + horizontal flip (p=0.5)
#   crop_flip    CIFAR-style: zero-pad CROP_PADDING per side, random image_size crop, flip
#   rrc_flip     ImageNet-style random-resized crop (area RRC_SCALE, aspect RRC_RATIO) to image_size, flip
#   randaugment  rrc_flip, then RandAugment (n=RANDAUGMENT_N ops at magnitude RANDAUGMENT_M of
#                RANDAUGMENT_BINS bins, DALI's default suite), the flip last
AUGMENTS = ("none", "flip", "crop_flip", "rrc_flip", "randaugment")
RRC_AUGMENTS = ("rrc_flip", "randaugment")
CROP_PADDING = 4  # CIFAR-style: zero-pad 4 pixels per side, then crop image_size x image_size at random
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
RRC_ATTEMPTS = 10
# Evaluation for the RRC augmentations: shorter side to floor(image_size / EVAL_CROP_FRACTION), centre crop.
EVAL_CROP_FRACTION = 0.875
RANDAUGMENT_N = 2
RANDAUGMENT_M = 9
RANDAUGMENT_BINS = 31
RANDAUGMENT_FILL = 128  # grey fill for the geometric ops (DALI's default)
DEFAULT_SHUFFLE_BUFFER = 1024
STATE_FORMAT = "lipnext_scale.loader_state/v1"
# .cls files hold an ASCII decimal label, optionally followed by whitespace. DALI must batch them, so
# they are zero-padded to this width in the pipeline; 18 digits still fit an int64 after parsing.
LABEL_WIDTH = 24
MAX_LABEL_DIGITS = 18
_WHITESPACE = (9, 10, 13, 32)


@dataclass(frozen=True)
class LoaderConfig:
    manifest: Manifest
    batch_size: int
    train: bool
    image_size: int
    augment: str
    rank: int
    world_size: int
    seed: int
    device: torch.device
    num_threads: int
    shuffle_buffer: int

    @property
    def augments_active(self) -> str:
        """The augmentation really applied: evaluation never augments."""
        return self.augment if self.train else "none"

    @property
    def random_flip(self) -> bool:
        return self.augments_active in ("flip", "crop_flip", *RRC_AUGMENTS)

    @property
    def random_crop(self) -> bool:
        """CIFAR-style pad-and-crop."""
        return self.augments_active == "crop_flip"

    @property
    def random_resized_crop(self) -> bool:
        return self.augments_active in RRC_AUGMENTS

    @property
    def randaugment(self) -> bool:
        return self.augments_active == "randaugment"

    @property
    def resize_shorter(self) -> int:
        """Shorter side the image is scaled to before the centre ``image_size`` crop (no RRC).

        ``image_size`` except when evaluating a loader configured with an RRC augmentation: the
        ImageNet convention, ``floor(image_size / 0.875)`` (256 for 224), then the centre crop.
        """
        if not self.train and self.augment in RRC_AUGMENTS:
            return eval_resize(self.image_size)
        return self.image_size


def eval_resize(image_size: int) -> int:
    return max(image_size, math.floor(image_size / EVAL_CROP_FRACTION + 1e-6))


def part_bounds(total: int, part: int, world_size: int) -> tuple[int, int]:
    """Global sample range ``[start, end)`` of part ``part`` of ``world_size`` (DALI's sharding formula)."""
    return (part * total) // world_size, ((part + 1) * total) // world_size


def part_for_epoch(rank: int, epoch: int, world_size: int) -> int:
    return (rank + epoch) % world_size


def batches_per_epoch(total: int, batch_size: int, world_size: int, train: bool) -> int:
    """The same on every rank, so collectives stay matched.

    Train drops partial batches of the *smallest* part (parts differ by at most one sample). Eval keeps
    every sample: the count covers the largest part, so a smaller part's last batch is short (and can
    even be empty when the largest part ends exactly one sample into a new batch).
    """
    smallest, largest = total // world_size, -(-total // world_size)
    return smallest // batch_size if train else math.ceil(largest / batch_size)


def labels_from_padded_ascii(padded: torch.Tensor, num_classes: int, where: str) -> torch.Tensor:
    """Parse a uint8 batch ``[B, LABEL_WIDTH]`` of zero-padded ASCII decimals into int64 labels ``[B]``."""
    codes = padded.to(torch.int64)
    digits = codes - ord("0")
    is_digit = (digits >= 0) & (digits <= 9)
    lengths = torch.cumprod(is_digit.to(torch.int64), dim=1).sum(dim=1)  # leading digits only
    positions = torch.arange(codes.shape[1])
    in_number = positions[None, :] < lengths[:, None]
    trailing_ok = in_number | (codes == 0)
    for ws in _WHITESPACE:
        trailing_ok |= codes == ws
    bad = (lengths == 0) | (lengths > MAX_LABEL_DIGITS) | ~trailing_ok.all(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        text = bytes(padded[row].tolist()).rstrip(b"\0")
        raise ValueError(
            f"{where}: sample {row} of the batch has a .cls that is not a decimal label: {text!r}"
        )
    exponents = (lengths[:, None] - 1 - positions[None, :]).clamp(min=0)
    labels = (digits.clamp(0, 9) * torch.pow(10, exponents) * in_number).sum(dim=1)
    if bool((labels >= num_classes).any()):
        raise ValueError(f"{where}: label {int(labels.max())} >= num_classes={num_classes} from the manifest")
    return labels


def default_num_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _manifest_digest(manifest: Manifest) -> str:
    digest = hashlib.sha256()
    for shard in manifest.shards:
        digest.update(f"{shard.tar}:{shard.num_samples}:{shard.sha256};".encode())
    return digest.hexdigest()[:16]


class Loader(ABC):
    """An epoch-based, resumable stream of ``(images [B,3,H,W] float32 in [0,1], labels [B] int64)``.

    Iterating yields the remaining batches of the current epoch; once an epoch has been fully yielded,
    the next ``iter()`` starts the next epoch (a fresh shuffle in training). Breaking out of a loop
    mid-epoch and iterating again continues where it stopped. ``len()`` is the number of batches per
    epoch and is identical on every rank.
    """

    backend: ClassVar[str]

    def __init__(self, config: LoaderConfig):
        self.config = config
        manifest = config.manifest
        self._num_batches = batches_per_epoch(
            manifest.total_samples, config.batch_size, config.world_size, config.train
        )
        if manifest.total_samples < config.world_size:
            raise ValueError(
                f"{manifest.path}: {manifest.total_samples} samples cannot be split over "
                f"world_size={config.world_size} ranks (a rank would get none)"
            )
        if self._num_batches == 0:
            raise ValueError(
                f"{manifest.path}: {manifest.total_samples} samples over world_size={config.world_size} "
                f"leave a rank fewer than batch_size={config.batch_size} samples"
                " (training drops partial batches)"
            )
        self._epoch = 0
        self._position = 0  # batches of the current epoch already yielded

    def __len__(self) -> int:
        return self._num_batches

    @property
    def epoch(self) -> int:
        """The epoch being read (or about to start), counting from 0."""
        return self._epoch

    @property
    def position(self) -> int:
        """Batches of the current epoch already yielded."""
        return self._position

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._position >= self._num_batches:
            self._begin_next_epoch()
            self._epoch += 1
            self._position = 0
        while self._position < self._num_batches:
            images, labels = self._next_batch()
            self._position += 1
            yield images, labels

    def _describe_batch(self) -> str:
        c = self.config
        return (
            f"{c.manifest.path} (rank {c.rank}/{c.world_size}, epoch {self._epoch}, batch {self._position})"
        )

    def _fingerprint(self) -> dict[str, Any]:
        c = self.config
        return {
            "backend": self.backend,
            "data": _manifest_digest(c.manifest),
            "batch_size": c.batch_size,
            "train": int(c.train),
            "image_size": c.image_size,
            "augment": c.augment,
            "rank": c.rank,
            "world_size": c.world_size,
            "seed": c.seed,
            "shuffle_buffer": c.shuffle_buffer,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable (str/int only) state; restoring it yields the identical next batches."""
        return {
            "format": STATE_FORMAT,
            "config": self._fingerprint(),
            "epoch": self._epoch,
            "position": self._position,
            "backend_state": self._backend_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a loader state (expected format {STATE_FORMAT!r})")
        saved, mine = state["config"], self._fingerprint()
        mismatched = [
            f"{k}: saved {saved.get(k)!r}, here {v!r}" for k, v in mine.items() if saved.get(k) != v
        ]
        if mismatched:
            raise ValueError(
                "loader state does not match this loader, so the stream cannot be resumed exactly: "
                + "; ".join(mismatched)
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if not 0 <= position <= self._num_batches:
            raise ValueError(f"loader state position {position} outside 0..{self._num_batches}")
        self._restore_backend_state(state["backend_state"], epoch, position)
        self._epoch, self._position = epoch, position

    @abstractmethod
    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    @abstractmethod
    def _begin_next_epoch(self) -> None: ...

    @abstractmethod
    def _backend_state(self) -> dict[str, Any]: ...

    @abstractmethod
    def _restore_backend_state(self, state: dict[str, Any], epoch: int, position: int) -> None: ...
