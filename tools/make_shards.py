#!/usr/bin/env python
"""Write WebDataset shards (+ DALI indexes + manifest) for the lipnext_scale loaders.

    python tools/make_shards.py digits OUT_DIR [--image-size 32]
    python tools/make_shards.py folder SRC_DIR OUT_DIR --prefix imagenet-train [--shuffle-seed 0]

``folder`` reads an ImageFolder tree (``SRC_DIR/<class>/<image>``, classes in sorted order, as
torchvision does). Samples are written pre-shuffled (DALI's shuffle is only a buffer over a
sequential read); pass ``--no-shuffle`` for evaluation splits. Files that are not baseline-decodable
RGB/greyscale JPEGs (ImageNet holds a PNG and some CMYK files named .JPEG) are re-encoded as RGB
JPEG, because DALI stops on a sample it cannot decode.
"""

from __future__ import annotations

import argparse
import io
import random
import re
import sys
from collections.abc import Iterator
from multiprocessing import Pool
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lipnext_scale.data import make_digits_shards, write_shards  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
REENCODE_QUALITY = 95


def sanitized_key(class_name: str, stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{class_name}_{stem}")


def list_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise SystemExit(f"{root}: no class directories found")
    files = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    return classes, files


def jpeg_payload(path: Path) -> tuple[bytes, bool]:
    """The file's bytes if it is a plain RGB/greyscale JPEG, else an RGB JPEG re-encoding (and True)."""
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG" and img.mode in ("RGB", "L"):
                return data, False
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="JPEG", quality=REENCODE_QUALITY)
            return buf.getvalue(), True
    except Exception as exc:
        raise SystemExit(f"{path}: cannot read image ({exc})") from exc


def _load(item: tuple[Path, int, str]) -> tuple[str, bytes, int, bool]:
    path, label, class_name = item
    payload, reencoded = jpeg_payload(path)
    return sanitized_key(class_name, path.stem), payload, label, reencoded


def folder_samples(
    files: list[tuple[Path, int]], classes: list[str], workers: int, stats: dict[str, int]
) -> Iterator[tuple[str, bytes, int]]:
    items = [(path, label, classes[label]) for path, label in files]
    if workers <= 1:
        loaded: Iterator[tuple[str, bytes, int, bool]] = map(_load, items)
        yield from _counting_reencoded(loaded, stats)
        return
    with Pool(workers) as pool:
        # imap keeps the order, so the shards are reproducible whatever the worker count.
        yield from _counting_reencoded(pool.imap(_load, items, chunksize=64), stats)


def _counting_reencoded(
    loaded: Iterator[tuple[str, bytes, int, bool]], stats: dict[str, int]
) -> Iterator[tuple[str, bytes, int]]:
    for key, payload, label, reencoded in loaded:
        stats["reencoded"] += reencoded
        yield key, payload, label


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="source", required=True)
    digits = sub.add_parser("digits", help="scikit-learn digits, train and test splits")
    digits.add_argument("out_dir", type=Path)
    digits.add_argument("--image-size", type=int, default=32)
    folder = sub.add_parser("folder", help="an ImageFolder tree, one split per call")
    folder.add_argument("src_dir", type=Path)
    folder.add_argument("out_dir", type=Path)
    folder.add_argument("--prefix", required=True, help="shard name prefix, e.g. imagenet-train")
    folder.add_argument("--samples-per-shard", type=int, default=1000)
    folder.add_argument("--shuffle-seed", type=int, default=0)
    folder.add_argument("--no-shuffle", action="store_true", help="keep sorted order (evaluation splits)")
    folder.add_argument("--workers", type=int, default=4)
    args = parser.parse_args(argv)

    if args.source == "digits":
        for split, path in make_digits_shards(args.out_dir, image_size=args.image_size).items():
            print(f"{split}: {path}")
        return

    classes, files = list_image_folder(args.src_dir)
    if not args.no_shuffle:
        random.Random(args.shuffle_seed).shuffle(files)
    stats = {"reencoded": 0}
    manifest = write_shards(
        folder_samples(files, classes, args.workers, stats),
        args.out_dir,
        prefix=args.prefix,
        samples_per_shard=args.samples_per_shard,
        class_names=classes,
        meta={
            "source": str(args.src_dir.resolve()),
            "shuffle_seed": None if args.no_shuffle else args.shuffle_seed,
        },
    )
    print(
        f"{manifest['total_samples']} samples, {len(classes)} classes, {len(manifest['shards'])} shards "
        f"({stats['reencoded']} re-encoded) -> {args.out_dir / (args.prefix + '.manifest.json')}"
    )


if __name__ == "__main__":
    main()
