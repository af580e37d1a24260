#!/usr/bin/env python
"""Images/s of the DALI loader vs the webdataset + PIL fallback on the same shards and augmentation.

    bench_data.py SHARDS_MANIFEST [--batch-size 64] [--augment rrc_flip] [--image-size N]
                  [--threads 4] [--seconds 10 | --batches N] [--warmup 5] [--device cpu]
                  [--backends dali,wds] [--stages]

Each backend runs in turn in this process through ``build_loader`` (the trainer's entry point, training
mode): ``--warmup`` batches first (pipeline start, first decodes), then a fixed time (``--seconds``)
or number of batches (``--batches``). CPU time is the process's (DALI's worker threads included), so
"img/s/core" = images / CPU-seconds and "cores" = CPU-seconds / wall-seconds. The wds backend decodes
on one thread; DALI uses ``--threads``. ``--image-size`` defaults to the manifest's
``meta.image_size`` if recorded, else 224. Run it on an otherwise idle machine.

``--stages`` (CPU, ``rrc_flip``/``randaugment``) adds where the CPU time per image goes: the JPEG
decode (DALI decodes only the crop window, PIL the whole image) and the random-resized-crop resize,
each backend's own operator timed alone on the same JPEGs; "rest" is the loader's total minus both.

The measurements live in lipnext_scale/data/bench.py; this is their command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from lipnext_scale.data import AUGMENTS, read_manifest
from lipnext_scale.data.bench import Settings, measure, stages_table, table
from lipnext_scale.data.loader import dali_available
from lipnext_scale.data.loader_base import RRC_AUGMENTS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--augment", choices=AUGMENTS, default="rrc_flip")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per backend")
    parser.add_argument(
        "--batches", type=int, default=0, help="measure this many batches instead of --seconds"
    )
    parser.add_argument("--warmup", type=int, default=5, help="batches before measuring")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for DALI's GPU decoding")
    parser.add_argument("--backends", default="dali,wds", help="comma-separated, in the order run")
    parser.add_argument("--stages", action="store_true", help="CPU time per image by stage (see above)")
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if "dali" in backends and not dali_available():
        parser.error("DALI is not installed; use --backends wds")
    if args.stages and (
        set(backends) != {"dali", "wds"} or args.device != "cpu" or args.augment not in RRC_AUGMENTS
    ):
        parser.error("--stages compares both backends on CPU with an RRC augment (rrc_flip, randaugment)")
    manifest = read_manifest(args.manifest)
    settings = Settings(
        manifest=args.manifest,
        batch_size=args.batch_size,
        augment=args.augment,
        image_size=args.image_size or int(manifest.meta.get("image_size") or 224),
        threads=args.threads,
        device=args.device,
        seconds=args.seconds,
        batches=args.batches,
        warmup=args.warmup,
    )
    torch.set_num_threads(1)  # the loaders' own threads are what is measured
    results = [measure(b, settings) for b in backends]
    print(table(results, settings))
    if args.stages:
        print(stages_table(results, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
