"""What both loader backends share: configuration, the rank-splitting rule, epochs and resumable state.

Splitting rule (DALI's ``fn.readers.webdataset`` with ``shard_id``/``num_shards``, reproduced exactly by the
webdataset backend): the samples of all shards, concatenated in manifest order, are cut into
``world_size`` contiguous parts, part ``q`` being ``[floor(q*N/W), floor((q+1)*N/W))``. Rank ``r`` reads
part ``(r + epoch) % W`` in a given epoch (DALI moves every reader to the next part after each epoch,
``stick_to_shard=False``), so parts are disjoint, their union is the split, and over ``W`` epochs every
rank sees every sample.

Resuming on another number of ranks (``load_resharded``) keeps the position sample-exact: every rank's
state records which samples of the epoch it has yielded, and the new ranks finish that epoch on what no
old rank yielded (a *remainder epoch*: the unread samples in ascending order, cut into equal contiguous
slices, one per new rank; the fewer than ``world_size`` left over and the last partial batch are dropped,
as every training epoch drops its partial batch). The next epoch is an ordinary one at the new size.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
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
STATE_FORMAT = "lipnext_scale.loader_state/v2"
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


def _pack(mask: np.ndarray) -> str:
    """A boolean mask as compressed base64 text: loader states stay JSON (a few KiB per rank)."""
    return base64.b64encode(zlib.compress(np.packbits(mask).tobytes())).decode("ascii")


def _unpack(text: str, total: int) -> np.ndarray:
    bits = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.uint8)
    return np.unpackbits(bits, count=total).astype(bool)


# Fingerprint entries that may differ when a state is resumed on another number of ranks.
_PER_RANK = ("rank", "world_size", "batch_size")  # batch_size: the per-rank micro-batch


class Loader(ABC):
    """An epoch-based, resumable stream of ``(images [B,3,H,W] float32 in [0,1], labels [B] int64)``.

    Iterating yields the remaining batches of the current epoch; once an epoch has been fully yielded,
    the next ``iter()`` starts the next epoch (a fresh shuffle in training). Breaking out of a loop
    mid-epoch and iterating again continues where it stopped. ``len()`` is the number of batches per
    epoch and is identical on every rank; ``batches_in_epoch`` differs from it only in a remainder epoch.
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
        self._epoch_batches = self._num_batches
        # Ascending global indices this rank reads in a remainder epoch; None in an ordinary epoch.
        self._remainder: np.ndarray | None = None
        self._yielded = np.zeros(manifest.total_samples, dtype=bool)  # this epoch's, by global index

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

    @property
    def batches_in_epoch(self) -> int:
        """Batches of the current epoch: ``len()``, or fewer in a remainder epoch (see the module doc)."""
        return self._epoch_batches

    @property
    def epoch_complete(self) -> bool:
        return self._position >= self._epoch_batches

    def epoch_indices(self) -> np.ndarray:
        """Ascending global indices of the samples this rank reads in the current epoch."""
        if self._remainder is not None:
            return self._remainder
        c = self.config
        start, end = part_bounds(
            c.manifest.total_samples, part_for_epoch(c.rank, self._epoch, c.world_size), c.world_size
        )
        return np.arange(start, end)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.epoch_complete:
            self._epoch += 1
            self._position = 0
            self._epoch_batches = self._num_batches
            self._remainder = None
            self._yielded[:] = False
            self._begin_next_epoch()
        while self._position < self._epoch_batches:
            images, labels = self._next_batch()
            self._position += 1
            yield images, labels

    def _mark_yielded(self, indices: np.ndarray) -> None:
        """Record the global indices of a batch about to be yielded (backends call this per batch)."""
        if self.config.train and self._yielded[indices].any():
            raise RuntimeError(f"{self._describe_batch()}: a sample was read twice in one epoch")
        self._yielded[indices] = True

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
        """JSON-serialisable state; restoring it yields the identical next batches, and the states of all
        ranks together say which samples of the epoch are still unread (for ``load_resharded``)."""
        remainder = None
        if self._remainder is not None:
            mask = np.zeros_like(self._yielded)
            mask[self._remainder] = True
            remainder = _pack(mask)
        return {
            "format": STATE_FORMAT,
            "config": self._fingerprint(),
            "epoch": self._epoch,
            "position": self._position,
            "epoch_batches": self._epoch_batches,
            "yielded": _pack(self._yielded),
            "remainder": remainder,
            "backend_state": self._backend_state(),
        }

    def _check_state(self, state: dict[str, Any], ignore: tuple[str, ...] = ()) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"not a loader state of this version (expected format {STATE_FORMAT!r}, found "
                f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r})"
            )
        saved, mine = state["config"], self._fingerprint()
        mismatched = [
            f"{k}: saved {saved.get(k)!r}, here {v!r}"
            for k, v in mine.items()
            if k not in ignore and saved.get(k) != v
        ]
        if mismatched:
            raise ValueError(
                "loader state does not match this loader, so the stream cannot be resumed exactly: "
                + "; ".join(mismatched)
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume this rank's own stream (same number of ranks) exactly."""
        self._check_state(state)
        total = self.config.manifest.total_samples
        epoch, position, batches = int(state["epoch"]), int(state["position"]), int(state["epoch_batches"])
        remainder = None if state["remainder"] is None else np.flatnonzero(_unpack(state["remainder"], total))
        expected = self._num_batches if remainder is None else self._remainder_batches(len(remainder))
        if batches != expected or not 0 <= position <= batches:
            raise ValueError(f"loader state: position {position} of {batches} batches; expected {expected}")
        self._epoch, self._position, self._epoch_batches = epoch, position, batches
        self._remainder, self._yielded = remainder, _unpack(state["yielded"], total)
        self._restore_backend_state(state["backend_state"])

    def load_resharded(self, states: list[dict[str, Any]]) -> None:
        """Continue the epoch of ``states`` (every old rank's, in rank order, any number of ranks) on this
        rank: a remainder epoch over the samples no old rank yielded (see the module doc)."""
        if not self.config.train:
            raise ValueError("only a training stream resumes mid-epoch")
        for state in states:
            self._check_state(state, ignore=_PER_RANK)
        c, total = self.config, self.config.manifest.total_samples
        old_world = len(states)
        epochs = {int(s["epoch"]) for s in states}
        if len(epochs) != 1 or any(int(s["config"]["world_size"]) != old_world for s in states):
            raise ValueError(f"loader states of {old_world} ranks disagree on the epoch or the world size")
        (epoch,) = epochs
        self._epoch, self._position, self._yielded = epoch, 0, np.zeros(total, dtype=bool)
        if all(int(s["position"]) >= int(s["epoch_batches"]) for s in states):  # the epoch had ended
            self._remainder, self._epoch_batches = None, self._num_batches
            self._position = self._num_batches
        else:
            unread = np.zeros(total, dtype=bool)
            for old_rank, state in enumerate(states):
                if state["remainder"] is None:
                    start, end = part_bounds(total, part_for_epoch(old_rank, epoch, old_world), old_world)
                    assigned = np.zeros(total, dtype=bool)
                    assigned[start:end] = True
                else:
                    assigned = _unpack(state["remainder"], total)
                unread |= assigned & ~_unpack(state["yielded"], total)
            remaining = np.flatnonzero(unread)
            share = len(remaining) // c.world_size
            self._remainder = remaining[c.rank * share : (c.rank + 1) * share]
            self._epoch_batches = self._remainder_batches(share)
        self._restore_backend_state(None)

    def _remainder_batches(self, share: int) -> int:
        return share // self.config.batch_size

    @abstractmethod
    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    @abstractmethod
    def _begin_next_epoch(self) -> None:
        """Called once the base class has moved to the next (ordinary) epoch."""

    @abstractmethod
    def _backend_state(self) -> dict[str, Any]: ...

    @abstractmethod
    def _restore_backend_state(self, state: dict[str, Any] | None) -> None:
        """Reposition at the (already restored) epoch and position; ``state`` is None after
        ``load_resharded`` (the remainder epoch, or the end of an epoch, starts afresh)."""
