#!/usr/bin/env python
"""An ImageFolder tree of ImageNet-sized JPEGs for benchmarks, without downloading anything.

    python tools/sample_photos.py OUT_DIR [--count 600] [--classes 4] [--seed 0] [--quality 90]

Random crops (400–640 × 330–427 pixels, ImageNet's typical size, half of them mirrored) of the two
photographs scikit-learn ships (`load_sample_image`: china.jpg and flower.jpg, 640 × 427), saved as
baseline JPEGs at OUT_DIR/class<k>/img<i>.JPEG, image i in class i mod --classes. The same arguments give
the same files. Feed the tree to `tools/make_shards.py folder` and the shards to `tools/bench_data.py`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lipnext_scale.data.photos import write_sample_photos


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=600)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", type=int, default=90)
    args = parser.parse_args(argv)
    if args.count < 1 or args.classes < 1 or not 1 <= args.quality <= 95:
        parser.error("--count and --classes must be ≥ 1, --quality in 1..95")
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty; sample photos go into a new or empty folder")
    written = write_sample_photos(args.out, args.count, args.classes, args.seed, args.quality)
    print(f"{len(written)} JPEGs in {args.classes} class folders under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
