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

The readers live in lipnext_scale/data/sources.py; this is their command line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lipnext_scale.data import make_digits_shards
from lipnext_scale.data.shards import manifest_path_for
from lipnext_scale.data.sources import (
    CIFAR_LAYOUTS,
    BadInput,
    Stats,
    cifar_splits,
    folder_split,
    tinyimagenet_splits,
    write_splits,
)

EXIT_BAD_INPUT = 2


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
    logging.basicConfig(format="make_shards: %(message)s", level=logging.WARNING, stream=sys.stderr)
    stats = Stats()
    common = {"shuffle_seed": args.shuffle_seed, "on_bad": args.on_bad}
    try:
        if args.source == "folder":
            if args.no_shuffle:
                common["shuffle_seed"] = None
            splits = folder_split(
                args.src_dir,
                prefix=args.prefix,
                classes_from=args.classes_from,
                workers=args.workers,
                stats=stats,
                **common,
            )
        elif args.source in CIFAR_LAYOUTS:
            splits = cifar_splits(args.source, args.src_dir, prefix=args.prefix, **common)
        else:
            splits = tinyimagenet_splits(
                args.src_dir, prefix=args.prefix, workers=args.workers, stats=stats, **common
            )
        manifests = write_splits(splits, args.out_dir, args.samples_per_shard)
    except (BadInput, ValueError, OSError) as exc:
        # ValueError: the shard writer's own checks (e.g. two files mapping to one key); OSError: the output.
        print(f"make_shards: error: {exc}", file=sys.stderr)
        if isinstance(exc, BadInput) and exc.skippable:
            print(
                "make_shards: nothing was written; to leave such inputs out instead (each listed in the "
                "manifest's \"skipped\"), rerun with --on-bad skip",
                file=sys.stderr,
            )
        raise SystemExit(EXIT_BAD_INPUT) from None
    for split, manifest in zip(splits, manifests, strict=True):
        print(
            f"{split.prefix}: {manifest['total_samples']} samples, {manifest['num_classes']} classes, "
            f"{len(manifest['shards'])} shards, {len(manifest['skipped'])} skipped "
            f"-> {manifest_path_for(args.out_dir, split.prefix)}"
        )
    print(f"({stats.reencoded} images re-encoded, {stats.ignored} non-image files ignored)")


if __name__ == "__main__":
    main()
