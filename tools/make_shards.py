#!/usr/bin/env python
"""Write WebDataset shards (+ DALI indexes + manifest) for the lipnext_scale loaders.

    make_shards.py digits OUT_DIR [--image-size 32]
    make_shards.py folder SRC_DIR OUT_DIR --prefix P [--classes-from TRAIN_MANIFEST] [--no-shuffle]
    make_shards.py cifar10 SRC_DIR OUT_DIR [--prefix cifar10]         -> cifar10-train, cifar10-test
    make_shards.py cifar100 SRC_DIR OUT_DIR [--prefix cifar100]       -> cifar100-train, cifar100-test
    make_shards.py tinyimagenet SRC_DIR OUT_DIR [--prefix tinyimagenet] -> tinyimagenet-train, -val
  common: [--samples-per-shard 1000] [--shuffle-seed 0] [--on-bad refuse|skip] [--workers 4]

Sources:
  folder        an ImageFolder tree, one split per call: SRC_DIR/<class>/<image> (e.g. ImageNet's
                train/ or a val/ sorted into class folders). Classes are the sub-directories in sorted
                order, or with --classes-from the class names and order of an existing manifest (use
                the train manifest for val: a class folder it does not list is refused). Files whose
                suffix is not an image suffix are ignored (and counted).
  cifar10/100   the python pickle batches (cifar-10-batches-py: data_batch_1..5, test_batch,
                batches.meta; cifar-100-python: train, test, meta with fine labels). Pixels are
                encoded as JPEG quality 95, 4:4:4. The pickles are loaded with an unpickler that only
                admits numpy arrays, so a tampered file cannot run code.
  tinyimagenet  tiny-imagenet-200: wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG with
                labels from val/val_annotations.txt. Classes are the wnids in sorted order.

Training splits are written shuffled (DALI's shuffle is only a buffer over a sequential read);
evaluation splits keep their source order (folder: pass --no-shuffle). Every image is fully decoded
once. Plain RGB/greyscale JPEGs are copied byte for byte; anything else DALI might not decode, or
would decode differently from PIL (PNG, CMYK, EXIF-rotated, ...), is re-encoded as an RGB JPEG.

Bad inputs — a corrupt or non-image file, an unreadable file, an image without a label (or with a
label outside the class list) — are reported with their path and, by --on-bad:
  refuse (default)  stop, exit status 2, nothing of this run is left (every split of the run is
                    written under temp names and renamed into place only when all splits succeeded,
                    so existing shards of the same prefixes stay as they were);
  skip              leave the sample out and list it in the manifest: "skipped": [{"path", "reason"}].
Structural problems (a missing batch file or wnids.txt, an unknown class folder, a malformed
annotation line) always stop with exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import pickle
import random
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lipnext_scale.data import make_digits_shards, read_manifest, stage_shards  # noqa: E402
from lipnext_scale.data.shards import MAX_KEY_LENGTH, StagedShards, manifest_path_for  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
JPEG_QUALITY = 95  # re-encoded files and CIFAR pixels; 4:4:4 chroma for the CIFAR pixels
_EXIF_ORIENTATION = 0x0112
EXIT_BAD_INPUT = 2


class BadInput(Exception):
    """An input the run cannot use; ``str()`` names the path first."""

    def __init__(self, path: object, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


@dataclass
class Problems:
    """Applies --on-bad to the bad inputs of one split."""

    on_bad: str
    skipped: list[dict[str, str]] = field(default_factory=list)

    def report(self, path: object, reason: str) -> None:
        if self.on_bad == "refuse":
            raise BadInput(path, reason)
        print(f"make_shards: skipping {path}: {reason}", file=sys.stderr)
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


# ----------------------------------------------------------------------------- sources


@dataclass
class Split:
    """One split to write: its prefix, class names, samples (lazy) and bad-input bookkeeping."""

    prefix: str
    class_names: list[str]
    samples: Callable[[], Iterator[tuple[str, bytes, int]]]
    problems: Problems
    meta: dict[str, Any]


def folder_split(args: argparse.Namespace, stats: Stats) -> list[Split]:
    root: Path = args.src_dir
    if not root.is_dir():
        raise BadInput(root, "is not a directory")
    dirs = sorted(p.name for p in root.iterdir() if p.is_dir())
    if args.classes_from is not None:
        train = read_manifest(args.classes_from)
        if train.class_names is None:
            raise BadInput(args.classes_from, "manifest has no class_names to take the classes from")
        classes = list(train.class_names)
        unknown = [d for d in dirs if d not in set(classes)]
        if unknown:
            raise BadInput(
                root / unknown[0],
                f"class folder not in the class list of {args.classes_from} "
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
    seed = None if args.no_shuffle else args.shuffle_seed
    problems = Problems(args.on_bad)
    return [
        Split(
            prefix=args.prefix,
            class_names=classes,
            samples=lambda: file_samples(_shuffled(items, seed), args.workers, problems, stats),
            problems=problems,
            # "source" stays the resolved folder path, as before.
            meta={"source": str(root.resolve()), "shuffle_seed": seed, "on_bad": args.on_bad},
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


def cifar_splits(args: argparse.Namespace, stats: Stats) -> list[Split]:
    subdir, meta_file, names_field, labels_field, split_files = CIFAR_LAYOUTS[args.source]
    root: Path = args.src_dir
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
        seed = args.shuffle_seed if split == "train" else None
        order = _shuffled(list(range(len(pixels))), seed)
        problems = Problems(args.on_bad)
        splits.append(
            Split(
                prefix=f"{args.prefix}-{split}",
                class_names=classes,
                samples=_cifar_samples_factory(
                    pixels, labels, origins, order, len(classes), f"{args.prefix}-{split}", problems
                ),
                problems=problems,
                meta={
                    "source": args.source,
                    "src_dir": str(root.resolve()),
                    "split": split,
                    "jpeg_quality": JPEG_QUALITY,
                    "chroma_subsampling": "4:4:4",
                    "shuffle_seed": seed,
                    "on_bad": args.on_bad,
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


def tinyimagenet_splits(args: argparse.Namespace, stats: Stats) -> list[Split]:
    root: Path = args.src_dir
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

    val_problems = Problems(args.on_bad)
    val_items = _tinyimagenet_val_items(root / "val", label_of, val_problems, stats)
    train_problems = Problems(args.on_bad)
    seed = args.shuffle_seed
    common = {"source": "tinyimagenet", "src_dir": str(root.resolve()), "on_bad": args.on_bad}
    return [
        Split(
            prefix=f"{args.prefix}-train",
            class_names=classes,
            samples=lambda: file_samples(_shuffled(train_items, seed), args.workers, train_problems, stats),
            problems=train_problems,
            meta={**common, "split": "train", "shuffle_seed": seed},
        ),
        Split(
            prefix=f"{args.prefix}-val",
            class_names=classes,
            samples=lambda: file_samples(val_items, args.workers, val_problems, stats),
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


# ----------------------------------------------------------------------------- main


def _write_all(splits: list[Split], args: argparse.Namespace, stats: Stats) -> None:
    """Stage every split, then commit them all: a refused input leaves nothing of this run behind."""
    staged: list[StagedShards] = []
    try:
        for split in splits:
            staged.append(
                stage_shards(
                    split.samples(),
                    args.out_dir,
                    prefix=split.prefix,
                    samples_per_shard=args.samples_per_shard,
                    class_names=split.class_names,
                    meta=split.meta,
                    skipped=split.problems.skipped,
                )
            )
    except BaseException:
        for s in staged:
            s.discard()
        raise
    for s in staged:
        manifest = s.commit()
        print(
            f"{s.prefix}: {manifest['total_samples']} samples, {manifest['num_classes']} classes, "
            f"{len(manifest['shards'])} shards, {len(manifest['skipped'])} skipped "
            f"-> {manifest_path_for(args.out_dir, s.prefix)}"
        )
    print(f"({stats.reencoded} images re-encoded, {stats.ignored} non-image files ignored)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="source", required=True)
    digits = sub.add_parser("digits", help="scikit-learn digits, train and test splits")
    digits.add_argument("out_dir", type=Path)
    digits.add_argument("--image-size", type=int, default=32)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("src_dir", type=Path)
    common.add_argument("out_dir", type=Path)
    common.add_argument("--samples-per-shard", type=int, default=1000)
    common.add_argument("--shuffle-seed", type=int, default=0, help="shuffle of the training split")
    common.add_argument(
        "--on-bad",
        choices=("refuse", "skip"),
        default="refuse",
        help="a bad input stops the run (exit 2) or is left out and listed in the manifest",
    )
    common.add_argument("--workers", type=int, default=4, help="decoding processes (file sources)")

    folder = sub.add_parser("folder", parents=[common], help="an ImageFolder tree, one split per call")
    folder.add_argument("--prefix", required=True, help="shard name prefix, e.g. imagenet-train")
    folder.add_argument("--no-shuffle", action="store_true", help="keep sorted order (evaluation splits)")
    folder.add_argument(
        "--classes-from",
        type=Path,
        metavar="MANIFEST",
        help="take class names and order from this manifest (the train split's, for val)",
    )
    for name, default in (("cifar10", "cifar10"), ("cifar100", "cifar100"), ("tinyimagenet", "tinyimagenet")):
        p = sub.add_parser(name, parents=[common], help=f"{name}: train and evaluation splits")
        p.add_argument(
            "--prefix", default=default, help=f"shards are named PREFIX-train / PREFIX-... ({default})"
        )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.source == "digits":
        for split, path in make_digits_shards(args.out_dir, image_size=args.image_size).items():
            print(f"{split}: {path}")
        return
    if args.samples_per_shard < 1:
        raise SystemExit("make_shards: error: --samples-per-shard must be >= 1")
    stats = Stats()
    try:
        if args.source == "folder":
            splits = folder_split(args, stats)
        elif args.source in CIFAR_LAYOUTS:
            splits = cifar_splits(args, stats)
        else:
            splits = tinyimagenet_splits(args, stats)
        _write_all(splits, args, stats)
    except (BadInput, ValueError, OSError) as exc:
        # ValueError: write_shards' own checks (e.g. two files mapping to one key); OSError: the output.
        print(f"make_shards: error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None


if __name__ == "__main__":
    main()
