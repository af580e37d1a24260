"""Readers that turn a dataset on disk into samples for :func:`~lipnext_scale.data.shards.stage_shards`.

Each reader returns one :class:`Split` per split it finds (prefix, class names, a lazy sample iterator,
its bad-input bookkeeping and manifest metadata); :func:`write_splits` stages them all and commits them
together. ``tools/make_shards.py`` is the command line over these (its ``--help`` describes the layouts).

    folder_split(src_dir, prefix=...)             an ImageFolder tree, one split
    cifar_splits("cifar10" | "cifar100", src_dir)  the python pickle batches: -train, -test
    tinyimagenet_splits(src_dir)                   tiny-imagenet-200: -train, -val

Every image is fully decoded once. Plain RGB/greyscale JPEGs are copied byte for byte; anything else DALI
might not decode, or would decode differently from PIL (PNG, CMYK, EXIF-rotated, ...), is re-encoded as
an RGB JPEG. A bad input (corrupt, unreadable, unlabelled) is refused (:class:`BadInput`, naming its path)
or, with ``on_bad="skip"``, left out and listed in the manifest. Structural problems (a missing batch file,
an unknown class folder, a malformed annotation line) always raise :class:`BadInput`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .shards import MAX_KEY_LENGTH, StagedShards, read_manifest, stage_shards

ON_BAD = ("refuse", "skip")
log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
JPEG_QUALITY = 95  # re-encoded files and CIFAR pixels; 4:4:4 chroma for the CIFAR pixels
_EXIF_ORIENTATION = 0x0112


class BadInput(Exception):
    """An input the run cannot use; ``str()`` names the path first. ``skippable``: a bad sample that
    ``on_bad="skip"`` would have left out (as opposed to a structural problem, which always stops)."""

    def __init__(self, path: object, reason: str, skippable: bool = False):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason, self.skippable = str(path), reason, skippable


@dataclass
class Problems:
    """Applies ``on_bad`` ("refuse" or "skip") to the bad inputs of one split."""

    on_bad: str
    skipped: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.on_bad not in ON_BAD:
            raise ValueError(f"on_bad must be one of {ON_BAD}, got {self.on_bad!r}")

    def report(self, path: object, reason: str) -> None:
        if self.on_bad == "refuse":
            raise BadInput(path, reason, skippable=True)
        log.warning("skipping %s: %s", path, reason)
        self.skipped.append({"path": str(path), "reason": reason})


# ----------------------------------------------------------------------------- keys and images


def sample_key(*parts: str) -> str:
    """A valid, deterministic sample key from name parts ("n01440764", "n01440764_10026").

    Clean names are used as they are; a name with other characters, or too long, is sanitised and
    gets a hash of the original so that two different names can never map to the same key.
    """
    raw = "_".join(parts)
    key = re.sub(r"[^A-Za-z0-9_-]", "_", raw)
    if key != raw or len(key) > MAX_KEY_LENGTH:
        digest = hashlib.sha1(raw.encode("utf-8", "surrogateescape")).hexdigest()[:10]
        key = f"{key[: MAX_KEY_LENGTH - len(digest) - 1]}-{digest}"
    return key


def _stem(path: Path) -> str:
    """File name without a .jpg/.jpeg suffix (other suffixes stay part of the key, so "a.png" and
    "a.jpg" in one folder get different keys)."""
    return path.stem if path.suffix.lower() in (".jpg", ".jpeg") else path.name


def _encode_jpeg(img: Image.Image, subsampling: int = -1) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=subsampling)
    return buf.getvalue()


def jpeg_payload(data: bytes) -> tuple[bytes, bool]:
    """Decode ``data`` fully; return it unchanged if it is a plain RGB/greyscale JPEG, else an RGB JPEG
    re-encoding (and True). Raises on anything PIL cannot decode completely (corrupt, truncated)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # the full decode: a truncated or corrupt file fails here, not in DALI
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        if img.format == "JPEG" and img.mode in ("RGB", "L") and orientation in (1, None):
            return data, False
        # DALI applies EXIF orientation when decoding, PIL does not: bake it in so both agree.
        return _encode_jpeg(ImageOps.exif_transpose(img).convert("RGB")), True


@dataclass(frozen=True)
class LoadFailure:
    path: str
    reason: str


def load_image(item: tuple[str, str, int]) -> tuple[str, bytes, int, bool] | LoadFailure:
    """Worker: (path, key, label) -> (key, jpeg, label, re-encoded) or a LoadFailure naming the path."""
    path, key, label = item
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return LoadFailure(path, f"cannot read file ({type(exc).__name__}: {exc.strerror or exc})")
    if not data:
        return LoadFailure(path, "empty file")
    try:
        payload, reencoded = jpeg_payload(data)
    except Exception as exc:  # PIL raises many types for bad data
        # PIL's UnidentifiedImageError message holds an object address; keep the manifest reproducible.
        detail = "not a recognised image format" if isinstance(exc, UnidentifiedImageError) else str(exc)
        return LoadFailure(path, f"not a decodable image ({type(exc).__name__}: {detail})")
    return key, payload, label, reencoded


@dataclass
class Stats:
    reencoded: int = 0
    ignored: int = 0


def file_samples(
    items: Sequence[tuple[str, str, int]], workers: int, problems: Problems, stats: Stats
) -> Iterator[tuple[str, bytes, int]]:
    """Decode ``items`` (path, key, label) in order in ``workers`` processes; bad files go to ``problems``."""

    def consume(
        results: Iterable[tuple[str, bytes, int, bool] | LoadFailure],
    ) -> Iterator[tuple[str, bytes, int]]:
        for result in results:
            if isinstance(result, LoadFailure):
                problems.report(result.path, result.reason)
                continue
            key, payload, label, reencoded = result
            stats.reencoded += reencoded
            yield key, payload, label

    if workers <= 1 or len(items) < 2:
        yield from consume(map(load_image, items))
        return
    with Pool(workers) as pool:
        # imap keeps the order, so the shards are the same whatever the worker count.
        yield from consume(pool.imap(load_image, items, chunksize=16))


def _image_files(directory: Path, stats: Stats) -> list[Path]:
    try:
        entries = sorted(directory.iterdir())
    except OSError as exc:
        raise BadInput(directory, f"cannot list directory ({exc.strerror or exc})") from exc
    files = []
    for path in entries:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            files.append(path)  # a directory or dangling link with an image name fails when loaded
        elif not path.is_dir():
            stats.ignored += 1
    return files


def _shuffled(items: list[Any], seed: int | None) -> list[Any]:
    if seed is not None:
        random.Random(seed).shuffle(items)
    return items


# ----------------------------------------------------------------------------- readers


@dataclass
class Split:
    """One split to write: its prefix, class names, samples (lazy) and bad-input bookkeeping."""

    prefix: str
    class_names: list[str]
    samples: Callable[[], Iterator[tuple[str, bytes, int]]]
    problems: Problems
    meta: dict[str, Any]


def folder_split(
    src_dir: str | Path,
    *,
    prefix: str,
    classes_from: str | Path | None = None,
    shuffle_seed: int | None = 0,
    on_bad: str = "refuse",
    workers: int = 4,
    stats: Stats | None = None,
) -> list[Split]:
    """An ImageFolder tree ``src_dir/<class>/<image>`` as one split named ``prefix``.

    Classes are the sub-directories in sorted order, or the class names and order of the manifest
    ``classes_from`` (the train split's, for val: a class folder it does not list is refused). Files
    whose suffix is not an image suffix are ignored and counted in ``stats``. ``shuffle_seed=None``
    keeps the sorted order (evaluation splits).
    """
    stats = Stats() if stats is None else stats
    root = Path(src_dir)
    if not root.is_dir():
        raise BadInput(root, "is not a directory")
    dirs = sorted(p.name for p in root.iterdir() if p.is_dir())
    if classes_from is not None:
        train = read_manifest(classes_from)
        if train.class_names is None:
            raise BadInput(classes_from, "manifest has no class_names to take the classes from")
        classes = list(train.class_names)
        unknown = [d for d in dirs if d not in set(classes)]
        if unknown:
            raise BadInput(
                root / unknown[0],
                f"class folder not in the class list of {classes_from} "
                f"({len(unknown)} unknown: {unknown[:5]})",
            )
    else:
        classes = dirs
    if not dirs:
        raise BadInput(root, "no class directories found")
    label_of = {name: i for i, name in enumerate(classes)}
    for path in root.iterdir():
        if not path.is_dir():
            stats.ignored += 1
    items = [
        (str(path), sample_key(name, _stem(path)), label_of[name])
        for name in dirs
        for path in _image_files(root / name, stats)
    ]
    seed = shuffle_seed
    problems = Problems(on_bad)
    return [
        Split(
            prefix=prefix,
            class_names=classes,
            samples=lambda: file_samples(_shuffled(items, seed), workers, problems, stats),
            problems=problems,
            meta={"source": str(root.resolve()), "shuffle_seed": seed, "on_bad": on_bad},
        )
    ]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what a pickled numpy array (and py2 str/bytes) needs: no arbitrary callables."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays allowed)")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BadInput(path, "missing (expected a CIFAR python pickle batch)")
    try:
        with open(path, "rb") as f:
            # latin1: the official batches were pickled by Python 2 (numpy buffers are str there).
            raw = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except Exception as exc:
        raise BadInput(path, f"cannot unpickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(raw, dict):
        raise BadInput(path, f"holds a {type(raw).__name__}, expected a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in raw.items()}


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


CIFAR_LAYOUTS = {
    # variant: (directory name inside SRC_DIR, meta file, names field, labels field, {split: files})
    "cifar10": (
        "cifar-10-batches-py",
        "batches.meta",
        "label_names",
        "labels",
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
    ),
    "cifar100": (
        "cifar-100-python",
        "meta",
        "fine_label_names",
        "fine_labels",
        {"train": ["train"], "test": ["test"]},
    ),
}


def cifar_splits(
    variant: str,
    src_dir: str | Path,
    *,
    prefix: str | None = None,
    shuffle_seed: int | None = 0,
    on_bad: str = "refuse",
) -> list[Split]:
    """CIFAR-10/100's python pickle batches (``variant`` "cifar10" or "cifar100") as ``PREFIX-train``
    (shuffled by ``shuffle_seed``) and ``PREFIX-test`` (file order); ``prefix`` defaults to ``variant``.

    ``src_dir`` is the batch folder (cifar-10-batches-py, cifar-100-python) or the folder holding it.
    Pixels are encoded as JPEG quality 95, 4:4:4. The pickles are loaded with an unpickler that only
    admits numpy arrays, so a tampered file cannot run code.
    """
    if variant not in CIFAR_LAYOUTS:
        raise ValueError(f"variant must be one of {sorted(CIFAR_LAYOUTS)}, got {variant!r}")
    prefix = variant if prefix is None else prefix
    subdir, meta_file, names_field, labels_field, split_files = CIFAR_LAYOUTS[variant]
    root = Path(src_dir)
    if not (root / meta_file).exists() and (root / subdir).is_dir():
        root = root / subdir
    meta_raw = _load_pickle(root / meta_file)
    if names_field not in meta_raw:
        raise BadInput(root / meta_file, f"has no {names_field!r} field")
    classes = [_text(n) for n in meta_raw[names_field]]
    splits = []
    for split, files in split_files.items():
        images, labels, origins = [], [], []
        for name in files:
            path = root / name
            batch = _load_pickle(path)
            data = batch.get("data")
            if (
                not isinstance(data, np.ndarray)
                or data.dtype != np.uint8
                or data.ndim != 2
                or data.shape[1] != 3072
            ):
                shape = getattr(data, "shape", None)
                raise BadInput(
                    path, f"'data' must be a uint8 array [N, 3072], got {type(data).__name__} {shape}"
                )
            batch_labels = list(batch.get(labels_field, []))
            if len(batch_labels) > len(data):
                raise BadInput(path, f"{len(batch_labels)} {labels_field} for {len(data)} images")
            images.append(data)
            labels += batch_labels + [None] * (len(data) - len(batch_labels))
            origins += [(path, i) for i in range(len(data))]
        pixels = np.concatenate(images)
        seed = shuffle_seed if split == "train" else None
        order = _shuffled(list(range(len(pixels))), seed)
        problems = Problems(on_bad)
        splits.append(
            Split(
                prefix=f"{prefix}-{split}",
                class_names=classes,
                samples=_cifar_samples_factory(
                    pixels, labels, origins, order, len(classes), f"{prefix}-{split}", problems
                ),
                problems=problems,
                meta={
                    "source": variant,
                    "src_dir": str(root.resolve()),
                    "split": split,
                    "jpeg_quality": JPEG_QUALITY,
                    "chroma_subsampling": "4:4:4",
                    "shuffle_seed": seed,
                    "on_bad": on_bad,
                },
            )
        )
    return splits


def _cifar_samples_factory(
    pixels: np.ndarray,
    labels: list[Any],
    origins: list[tuple[Path, int]],
    order: list[int],
    num_classes: int,
    key_prefix: str,
    problems: Problems,
) -> Callable[[], Iterator[tuple[str, bytes, int]]]:
    def samples() -> Iterator[tuple[str, bytes, int]]:
        for i in order:
            path, row = origins[i]
            label = labels[i]
            if label is None:
                problems.report(f"{path}[{row}]", "image has no label")
                continue
            if (
                isinstance(label, bool)
                or not isinstance(label, int | np.integer)
                or not 0 <= label < num_classes
            ):
                problems.report(
                    f"{path}[{row}]", f"label {label!r} is not a class index in [0, {num_classes})"
                )
                continue
            rgb = pixels[i].reshape(3, 32, 32).transpose(1, 2, 0)
            yield (
                f"{key_prefix}-{i:05d}",
                _encode_jpeg(Image.fromarray(rgb, mode="RGB"), subsampling=0),
                int(label),
            )

    return samples


def tinyimagenet_splits(
    src_dir: str | Path,
    *,
    prefix: str = "tinyimagenet",
    shuffle_seed: int | None = 0,
    on_bad: str = "refuse",
    workers: int = 4,
    stats: Stats | None = None,
) -> list[Split]:
    """tiny-imagenet-200 (``src_dir`` or the folder holding it) as ``PREFIX-train`` (shuffled) and
    ``PREFIX-val``: wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG labelled by
    val/val_annotations.txt. Classes are the wnids in sorted order."""
    stats = Stats() if stats is None else stats
    root = Path(src_dir)
    if not (root / "wnids.txt").exists() and (root / "tiny-imagenet-200").is_dir():
        root = root / "tiny-imagenet-200"
    wnids_path = root / "wnids.txt"
    try:
        wnids = [line.strip() for line in wnids_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(wnids_path, f"cannot read ({exc})") from exc
    if not wnids or len(set(wnids)) != len(wnids):
        raise BadInput(wnids_path, "must list distinct class ids, one per line")
    classes = sorted(wnids)
    label_of = {wnid: i for i, wnid in enumerate(classes)}

    train_dir = root / "train"
    if not train_dir.is_dir():
        raise BadInput(train_dir, "missing")
    unknown = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and p.name not in label_of)
    if unknown:
        raise BadInput(train_dir / unknown[0], f"class folder not listed in {wnids_path}")
    train_items = []
    for wnid in classes:
        images_dir = train_dir / wnid / "images"
        if not images_dir.is_dir():
            raise BadInput(images_dir, f"missing (class {wnid} from {wnids_path} has no training images)")
        train_items += [
            (str(p), sample_key(_stem(p)), label_of[wnid]) for p in _image_files(images_dir, stats)
        ]

    val_problems = Problems(on_bad)
    val_items = _tinyimagenet_val_items(root / "val", label_of, val_problems, stats)
    train_problems = Problems(on_bad)
    seed = shuffle_seed
    common = {"source": "tinyimagenet", "src_dir": str(root.resolve()), "on_bad": on_bad}
    return [
        Split(
            prefix=f"{prefix}-train",
            class_names=classes,
            samples=lambda: file_samples(_shuffled(train_items, seed), workers, train_problems, stats),
            problems=train_problems,
            meta={**common, "split": "train", "shuffle_seed": seed},
        ),
        Split(
            prefix=f"{prefix}-val",
            class_names=classes,
            samples=lambda: file_samples(val_items, workers, val_problems, stats),
            problems=val_problems,
            meta={**common, "split": "val", "shuffle_seed": None},
        ),
    ]


def _tinyimagenet_val_items(
    val_dir: Path, label_of: dict[str, int], problems: Problems, stats: Stats
) -> list[tuple[str, str, int]]:
    """(path, key, label) for val/images, labels from val_annotations.txt, in annotation order."""
    images_dir, annotations = val_dir / "images", val_dir / "val_annotations.txt"
    if not images_dir.is_dir():
        raise BadInput(images_dir, "missing")
    try:
        lines = annotations.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(annotations, f"cannot read ({exc})") from exc
    wnid_of: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) < 2:
            raise BadInput(f"{annotations}:{number}", f"expected 'FILE<TAB>WNID[...]', got {line!r}")
        name, wnid = fields[0].strip(), fields[1].strip()
        # The name is joined to images/: it must be a plain file name, never a path.
        if not name or Path(name).name != name or name in (".", ".."):
            raise BadInput(f"{annotations}:{number}", f"{name!r} is not a plain file name")
        if wnid_of.setdefault(name, wnid) != wnid:
            raise BadInput(
                f"{annotations}:{number}", f"{name} is annotated twice, as {wnid_of[name]} and {wnid}"
            )
    present = {p.name: p for p in _image_files(images_dir, stats)}
    items = []
    for name, wnid in wnid_of.items():
        path = images_dir / name
        if name not in present:
            problems.report(path, f"listed in {annotations.name} but missing")
        elif wnid not in label_of:
            problems.report(path, f"class {wnid!r} from {annotations.name} is not in wnids.txt")
        else:
            items.append((str(path), sample_key(_stem(path)), label_of[wnid]))
    for name in sorted(set(present) - set(wnid_of)):
        problems.report(present[name], f"no label: not listed in {annotations}")
    return items


# ----------------------------------------------------------------------------- writing


def write_splits(splits: Sequence[Split], out_dir: str | Path, samples_per_shard: int = 1000) -> list[dict]:
    """Stage every split, then commit them all; returns their manifests (as dicts), in order.

    All-or-nothing: a refused input (or any exception) discards every staged split, so nothing of this
    call is left and existing shards of the same prefixes stay as they were.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    staged: list[StagedShards] = []
    try:
        for split in splits:
            staged.append(
                stage_shards(
                    split.samples(),
                    out_dir,
                    prefix=split.prefix,
                    samples_per_shard=samples_per_shard,
                    class_names=split.class_names,
                    meta=split.meta,
                    skipped=split.problems.skipped,
                )
            )
    except BaseException:
        for s in staged:
            s.discard()
        raise
    return [s.commit() for s in staged]
