"""The NVIDIA DALI backend: tar shards -> JPEG decode (on the GPU with device "cuda") -> crops -> NCHW floats.

DALI 2.4 notes that shaped this file:
- CPU-only pipelines need ``device_id=None``; any "mixed"/"gpu" operator then fails, so the decoder
  device follows the requested torch device.
- ``.cls`` payloads have different lengths ("7" vs "12"), which the iterator cannot batch; they are
  zero-padded to ``LABEL_WIDTH`` bytes in the pipeline and parsed in torch (no Python callback).
- ``reader_name`` + ``pad_last_batch=True`` make the iterator count batches per rank; DROP (train)
  stops every rank after the smallest part's full batches, PARTIAL (eval) trims the padding DALI adds.
- The checkpoint from ``iterator.checkpoints()`` is a binary protobuf (bytes); it is stored base64.
- Which samples a batch holds: ``fn.get_property(..., key="source_info")`` gives ``<tar>:<offset>:<member>``
  per sample, the offset being the image component's in the index file; it maps to the global index.
- A reader fed an index file that lists only some of a tar's samples reads only those: a remainder
  epoch (``loader_base``) is an ordinary reader over index files written for this rank's slice.
- A reader built with ``shard_id=(rank + e) % world_size`` starts at epoch ``e``'s part and moves on
  from there, so a pipeline rebuilt at an epoch boundary stays on the splitting rule.
- RRC: ``fn.decoders.image_random_crop`` (decodes only the crop window; CPU and "mixed") + resize.
- RandAugment: ``nvidia.dali.auto_aug.rand_augment`` works with CPU operators in DALI 2.4 (checked:
  warp_affine, rotate, filter, equalize, reductions all have CPU kernels). It selects ops per sample
  with DALI conditionals, which need ``pipeline_def(enable_conditionals=True)`` (AutoGraph), hence the
  decorator instead of ``with pipe:``.
"""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from .loader_base import (
    CROP_PADDING,
    LABEL_WIDTH,
    RANDAUGMENT_BINS,
    RANDAUGMENT_FILL,
    RANDAUGMENT_M,
    RANDAUGMENT_N,
    RRC_ATTEMPTS,
    RRC_RATIO,
    RRC_SCALE,
    Loader,
    LoaderConfig,
    labels_from_padded_ascii,
)
from .shards import DALI_INDEX_VERSION, IMAGE_EXT, LABEL_EXT

READER_NAME = "reader"
_OUTPUTS = ["images", "labels", "sources"]


def pipeline_seed(seed: int, rank: int, base_epoch: int = 0, remainder: bool = False) -> int:
    # Distinct augmentation streams per rank (and per rebuilt pipeline); DALI wants a non-negative seed
    # below 2**31. A pipeline built at epoch 0 keeps the seed runs have always had.
    return (seed * 1_000_003 + rank * 7919 + 1 + base_epoch * 104_729 + remainder * 15_485_863) % (2**31 - 1)


def _decoder_device(config: LoaderConfig) -> str:
    return "mixed" if config.device.type == "cuda" else "cpu"


def _decoded_square_images(jpegs: Any, config: LoaderConfig) -> Any:
    """Decode, then scale the shorter side to ``config.resize_shorter`` (a no-op for shards stored at
    that size); the centre crop follows in ``_to_normalised_chw``."""
    images = fn.decoders.image(jpegs, device=_decoder_device(config), output_type=types.RGB)
    return fn.resize(
        images,
        resize_shorter=config.resize_shorter,
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )


def _random_crop_windows(jpegs: Any, config: LoaderConfig) -> Any:
    """Decode only a random window of each image (area fraction RRC_SCALE, aspect RRC_RATIO)."""
    return fn.decoders.image_random_crop(
        jpegs,
        device=_decoder_device(config),
        output_type=types.RGB,
        random_area=list(RRC_SCALE),
        random_aspect_ratio=list(RRC_RATIO),
        num_attempts=RRC_ATTEMPTS,
    )


def _resized_square(images: Any, config: LoaderConfig) -> Any:
    return fn.resize(
        images,
        resize_x=config.image_size,
        resize_y=config.image_size,
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )


def _random_resized_crops(jpegs: Any, config: LoaderConfig) -> Any:
    """ImageNet RRC: decode a random window, resize it to the training size."""
    return _resized_square(_random_crop_windows(jpegs, config), config)


def _rand_augment_suite() -> list[Any]:
    """DALI's default RandAugment suite (``rand_augment.rand_augment``'s), with ``equalize`` and
    ``sharpness`` rebuilt on ``fn.equalize`` / ``fn.filter``: the suite's own versions call the
    deprecated ``fn.experimental`` aliases, whose warnings DALI forces on (``simplefilter("default")``)."""
    from nvidia.dali.auto_aug import augmentations, rand_augment
    from nvidia.dali.auto_aug.core import augmentation

    @augmentation
    def equalize(data: Any, _: Any) -> Any:
        return fn.equalize(data)

    @augmentation(
        mag_range=(0, 0.9),
        randomly_negate=True,
        mag_to_param=augmentations.sharpness_kernel,
        param_device="auto",
    )
    def sharpness(data: Any, kernel: Any) -> Any:
        return fn.filter(data, kernel)

    replacements = {"equalize": equalize, "sharpness": sharpness}
    suite = [replacements.get(aug.name, aug) for aug in rand_augment.get_rand_augment_suite(use_shape=True)]
    if {aug.name for aug in suite} & replacements.keys() != replacements.keys():
        raise RuntimeError("DALI's RandAugment suite changed: equalize/sharpness not found by name")
    return suite


def _rand_augmented(images: Any, config: LoaderConfig) -> Any:
    from nvidia.dali.auto_aug import rand_augment

    return rand_augment.apply_rand_augment(
        _rand_augment_suite(),
        images,
        n=RANDAUGMENT_N,
        m=RANDAUGMENT_M,
        num_magnitude_bins=RANDAUGMENT_BINS,
        shape=(config.image_size, config.image_size),
        fill_value=RANDAUGMENT_FILL,
    )


def _to_normalised_chw(images: Any, config: LoaderConfig) -> Any:
    size = config.image_size
    mirror = fn.random.coin_flip(probability=0.5) if config.random_flip else 0
    if config.random_crop:
        # Zero-pad CROP_PADDING pixels per side by taking a centred window larger than the image, then
        # pick the final window at an integer offset 0..2*pad: crop_pos * (in - out) is exact here
        # because in - out = 2*pad and crop_pos = k / (2*pad) (a power of two for pad=4).
        padded = size + 2 * CROP_PADDING
        images = fn.crop(images, crop=(padded, padded), out_of_bounds_policy="pad", fill_values=0)
        offsets = [k / (2 * CROP_PADDING) for k in range(2 * CROP_PADDING + 1)]
        crop_pos_x, crop_pos_y = fn.random.uniform(values=offsets), fn.random.uniform(values=offsets)
    else:
        crop_pos_x = crop_pos_y = 0.5
    return fn.crop_mirror_normalize(
        images,
        crop=(size, size),
        crop_pos_x=crop_pos_x,
        crop_pos_y=crop_pos_y,
        mirror=mirror,
        dtype=types.FLOAT,
        output_layout="CHW",
        mean=[0.0, 0.0, 0.0],
        std=[255.0, 255.0, 255.0],
    )


def build_dali_pipeline(
    config: LoaderConfig,
    checkpoint: bytes | None = None,
    base_epoch: int = 0,
    slice_files: tuple[list[str], list[str], int] | None = None,
) -> Pipeline:
    """The pipeline of ``config``'s rank from epoch ``base_epoch`` on, or, with ``slice_files`` (tars,
    their filtered index files, samples), one that reads only a remainder slice."""
    manifest = config.manifest
    device_id = None
    if config.device.type == "cuda":
        device_id = config.device.index if config.device.index is not None else torch.cuda.current_device()
    if slice_files is None:
        paths, index_paths = manifest.tar_paths, manifest.index_paths
        shard_id, num_shards = (config.rank + base_epoch) % config.world_size, config.world_size
        smallest = manifest.total_samples // config.world_size
    else:
        paths, index_paths, smallest = slice_files
        shard_id, num_shards = 0, 1
    seed = pipeline_seed(config.seed, config.rank, base_epoch, slice_files is not None)

    @pipeline_def(enable_conditionals=config.randaugment)
    def graph() -> tuple[Any, Any, Any]:
        jpegs, cls = fn.readers.webdataset(
            paths=paths,
            index_paths=index_paths,
            ext=[IMAGE_EXT, LABEL_EXT],
            dtypes=[types.UINT8, types.UINT8],
            missing_component_behavior="error",
            shard_id=shard_id,
            num_shards=num_shards,
            random_shuffle=config.train,
            initial_fill=max(1, min(config.shuffle_buffer, smallest)),
            seed=seed,
            pad_last_batch=True,
            name=READER_NAME,
        )
        sources = fn.pad(fn.get_property(jpegs, key="source_info"), fill_value=0)
        if config.random_resized_crop:
            images = _random_resized_crops(jpegs, config)
            if config.randaugment:
                images = _rand_augmented(images, config)
        else:
            images = _decoded_square_images(jpegs, config)
        images = _to_normalised_chw(images, config)
        labels = fn.pad(cls, fill_value=0, shape=[LABEL_WIDTH])
        return images, labels, sources

    return graph(
        batch_size=config.batch_size,
        num_threads=config.num_threads,
        device_id=device_id,
        seed=seed,
        enable_checkpointing=True,
        checkpoint=checkpoint,
    )


class _SampleIndex:
    """Global sample index of a DALI ``source_info`` (tar path and image-component offset), from the
    manifest's index files, each parsed when first needed (only the offsets are kept: 8 bytes a sample)."""

    def __init__(self, config: LoaderConfig):
        manifest = config.manifest
        self._index_paths = manifest.index_paths
        self._shard_of = {path: i for i, path in enumerate(manifest.tar_paths)}
        self._starts = np.concatenate([[0], np.cumsum(manifest.shard_sizes)])
        self._offsets: dict[int, np.ndarray] = {}

    def lines(self, shard: int) -> list[str]:
        """The index file's per-sample lines of ``shard``."""
        return Path(self._index_paths[shard]).read_text().splitlines()[1:]

    def _shard_offsets(self, shard: int) -> np.ndarray:
        """Offsets of the image components (DALI's source_info of the image output names that component)."""
        if shard not in self._offsets:
            offsets = []
            for line in self.lines(shard):
                fields = line.split()  # groups of: ext offset size name
                offset_of = {fields[i]: fields[i + 1] for i in range(0, len(fields), 4)}
                offsets.append(int(offset_of[IMAGE_EXT]))
            self._offsets[shard] = np.array(offsets, dtype=np.int64)
        return self._offsets[shard]

    def global_indices(self, sources: torch.Tensor) -> np.ndarray:
        out = np.empty(len(sources), dtype=np.int64)
        for row, raw in enumerate(sources.numpy()):
            text = raw.tobytes().rstrip(b"\0").decode()
            path, offset, _member = text.rsplit(":", 2)
            shard = self._shard_of.get(path)
            offsets = self._shard_offsets(shard) if shard is not None else np.empty(0, dtype=np.int64)
            position = int(np.searchsorted(offsets, int(offset)))
            if position == len(offsets) or offsets[position] != int(offset):
                raise RuntimeError(f"DALI read a sample the manifest's index files do not list: {text}")
            out[row] = self._starts[shard] + position
        return out

    def slice_files(self, indices: np.ndarray, directory: Path) -> tuple[list[str], list[str], int]:
        """Tars and index files (written in ``directory``) that list exactly the samples ``indices``."""
        paths, index_paths = [], []
        bounds = np.searchsorted(indices, self._starts)
        for shard, tar in enumerate(self._shard_of):
            lo, hi = bounds[shard], bounds[shard + 1]
            if hi == lo:
                continue
            lines = self.lines(shard)
            keep = [lines[i - self._starts[shard]] for i in indices[lo:hi]]
            index_path = directory / f"{shard:06d}.idx"
            index_path.write_text(f"{DALI_INDEX_VERSION} {len(keep)}\n" + "\n".join(keep) + "\n")
            paths.append(tar)
            index_paths.append(str(index_path))
        return paths, index_paths, len(indices)


class DaliLoader(Loader):
    """DALI backend. In eval the last batch of a rank is trimmed to its part (possibly to 0 samples)."""

    backend = "dali"

    def __init__(self, config: LoaderConfig):
        super().__init__(config)
        self._samples = _SampleIndex(config)
        self._slice_dir: tempfile.TemporaryDirectory | None = None
        self._base_epoch = 0  # the epoch the ordinary pipeline was built at
        self._pipeline_epoch: int | None = 0  # the epoch the iterator is positioned in (None: none built)
        self._pipeline_reads_remainder = False
        self._iterator: DALIGenericIterator | None = self._make_iterator(checkpoint=None)

    def _make_iterator(self, checkpoint: bytes | None) -> DALIGenericIterator:
        slice_files = None
        if self._remainder is not None:
            self._slice_dir = tempfile.TemporaryDirectory(prefix="lipnext-remainder-")
            slice_files = self._samples.slice_files(self._remainder, Path(self._slice_dir.name))
        policy = LastBatchPolicy.DROP if self.config.train else LastBatchPolicy.PARTIAL
        iterator = DALIGenericIterator(
            [build_dali_pipeline(self.config, checkpoint, self._base_epoch, slice_files)],
            _OUTPUTS,
            reader_name=READER_NAME,
            last_batch_policy=policy,
            auto_reset=False,
        )
        if len(iterator) != self._epoch_batches:
            # Our batch count must be DALI's, or ranks would disagree with what the reader delivers.
            raise RuntimeError(
                f"DALI iterator has {len(iterator)} batches per epoch, expected {self._epoch_batches}"
            )
        self._pipeline_epoch = self._epoch
        self._pipeline_reads_remainder = slice_files is not None
        return iterator

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iterator is None:
            raise RuntimeError(f"{self._describe_batch()}: no DALI pipeline for this epoch")
        try:
            out = next(self._iterator)[0]
        except RuntimeError as exc:
            if "IsDenseTensor" in str(exc):
                raise RuntimeError(
                    f"{self._describe_batch()}: DALI could not batch the outputs; a .cls label longer than "
                    f"{LABEL_WIDTH} bytes is the likely cause"
                ) from exc
            raise
        except StopIteration:
            raise RuntimeError(f"{self._describe_batch()}: DALI ended the epoch early") from None
        labels = labels_from_padded_ascii(
            out["labels"].cpu(), self.config.manifest.num_classes, self._describe_batch()
        )
        self._mark_yielded(self._samples.global_indices(out["sources"].cpu()))
        device = self.config.device
        return out["images"].to(device), labels.to(device, non_blocking=True)

    def _begin_next_epoch(self) -> None:
        ordinary = self._iterator is not None and not self._pipeline_reads_remainder
        if ordinary and self._pipeline_epoch == self._epoch - 1:
            self._iterator.reset()
            self._pipeline_epoch = self._epoch
            return
        # After a remainder epoch, or a resharded resume at an epoch's end: an ordinary pipeline from here.
        self._drop_iterator()
        self._base_epoch = self._epoch
        self._iterator = self._make_iterator(checkpoint=None)

    def _drop_iterator(self) -> None:
        self._iterator = None
        if self._slice_dir is not None:
            self._slice_dir.cleanup()
            self._slice_dir = None

    def _backend_state(self) -> dict[str, Any]:
        if self._iterator is None:
            return {"dali_checkpoint": None, "base_epoch": self._base_epoch}
        (checkpoint,) = self._iterator.checkpoints()
        encoded = base64.b64encode(checkpoint).decode("ascii")
        return {"dali_checkpoint": encoded, "base_epoch": self._base_epoch}

    def _restore_backend_state(self, state: dict[str, Any] | None) -> None:
        self._drop_iterator()
        if state is None:  # resharded: a remainder epoch from its start, or the next epoch (built then)
            self._pipeline_epoch = None
            if self._remainder is not None and self._epoch_batches > 0:
                self._iterator = self._make_iterator(checkpoint=None)
            return
        self._base_epoch = int(state["base_epoch"])
        if state["dali_checkpoint"] is None:
            self._pipeline_epoch = None
            return
        self._iterator = self._make_iterator(checkpoint=base64.b64decode(state["dali_checkpoint"]))
