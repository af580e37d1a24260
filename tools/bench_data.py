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
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lipnext_scale.data import AUGMENTS, build_loader, read_manifest  # noqa: E402
from lipnext_scale.data.loader import dali_available  # noqa: E402
from lipnext_scale.data.loader_base import RRC_AUGMENTS  # noqa: E402


@dataclass
class Result:
    backend: str
    batches: int
    images: int
    wall_s: float
    cpu_s: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def cores(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def images_per_core_s(self) -> float:
        return self.images / self.cpu_s if self.cpu_s > 0 else float("nan")


def _endless(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:  # epoch after epoch
        yield from loader


def measure(backend: str, args: argparse.Namespace, image_size: int) -> Result:
    loader = build_loader(
        args.manifest,
        batch_size=args.batch_size,
        train=True,
        image_size=image_size,
        augment=args.augment,
        backend=backend,
        device=args.device,
        num_threads=args.threads,
        seed=0,
    )
    batches = _endless(loader)
    for _ in range(args.warmup):
        next(batches)
    count = images = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    while (count < args.batches) if args.batches else (time.perf_counter() - wall0 < args.seconds):
        x, _ = next(batches)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        images += x.shape[0]
        count += 1
    return Result(backend, count, images, time.perf_counter() - wall0, time.process_time() - cpu0)


def _cpu_ms_per_image(run_once, images_per_run: int, seconds: float) -> float:
    """CPU milliseconds per image of ``run_once`` (after one warm-up call), over about ``seconds``."""
    run_once()
    images, cpu0, wall0 = 0, time.process_time(), time.perf_counter()
    while images == 0 or time.perf_counter() - wall0 < seconds:
        run_once()
        images += images_per_run
    return 1000 * (time.process_time() - cpu0) / images


def _dali_stage_ms(manifest, image_size: int, args: argparse.Namespace) -> dict[str, float]:
    from nvidia.dali import fn, pipeline_def, types

    from lipnext_scale.data.dali_loader import _random_crop_windows, _resized_square
    from lipnext_scale.data.loader_base import DEFAULT_SHUFFLE_BUFFER, LoaderConfig
    from lipnext_scale.data.shards import IMAGE_EXT

    config = LoaderConfig(
        manifest=manifest,
        batch_size=args.batch_size,
        train=True,
        image_size=image_size,
        augment=args.augment,
        rank=0,
        world_size=1,
        seed=0,
        device=torch.device("cpu"),
        num_threads=args.threads,
        shuffle_buffer=DEFAULT_SHUFFLE_BUFFER,
    )

    def pipeline(resize: bool):
        @pipeline_def(batch_size=args.batch_size, num_threads=args.threads, device_id=None, seed=0)
        def graph():
            jpegs = fn.readers.webdataset(
                paths=manifest.tar_paths,
                index_paths=manifest.index_paths,
                ext=[IMAGE_EXT],
                dtypes=[types.UINT8],
                random_shuffle=True,
            )
            windows = _random_crop_windows(jpegs, config)
            return _resized_square(windows, config) if resize else windows

        pipe = graph()
        pipe.build()
        return pipe

    seconds = args.seconds / 2
    read_decode = _cpu_ms_per_image(pipeline(False).run, args.batch_size, seconds)
    with_resize = _cpu_ms_per_image(pipeline(True).run, args.batch_size, seconds)
    return {"decode": read_decode, "resize": with_resize - read_decode}


def _pil_stage_ms(manifest, image_size: int, args: argparse.Namespace) -> dict[str, float]:
    from lipnext_scale.data.pil_augment import random_resized_crop
    from lipnext_scale.data.shards import IMAGE_EXT
    from lipnext_scale.data.wds_loader import _decode

    with tarfile.open(manifest.tar_paths[0]) as tar:
        jpegs = [tar.extractfile(m).read() for m in tar if m.name.endswith("." + IMAGE_EXT)]
    rng = random.Random(0)
    decoded = [_decode(jpeg, "bench") for jpeg in jpegs]
    seconds = args.seconds / 2
    decode = _cpu_ms_per_image(lambda: [_decode(j, "bench") for j in jpegs], len(jpegs), seconds)
    resize = _cpu_ms_per_image(
        lambda: [random_resized_crop(img, image_size, rng) for img in decoded], len(jpegs), seconds
    )
    return {"decode": decode, "resize": resize}


def stages_table(results: list[Result], manifest, image_size: int, args: argparse.Namespace) -> str:
    by = {r.backend: r for r in results}
    stages = {
        "dali": _dali_stage_ms(manifest, image_size, args),
        "wds": _pil_stage_ms(manifest, image_size, args),
    }
    for backend, ms in stages.items():
        ms["rest"] = 1000 / by[backend].images_per_core_s - ms["decode"] - ms["resize"]
    names = {
        "decode": "JPEG decode (dali: crop window only)",
        "resize": "random-resized-crop resize",
        "rest": "rest (flip, float CHW, batching, reading)",
    }
    lines = [f"{'CPU ms per image':42} {'dali':>6} {'wds':>6} {'wds/dali':>8}"]
    for stage, name in names.items():
        d, w = stages["dali"][stage], stages["wds"][stage]
        lines.append(f"{name:42} {d:6.2f} {w:6.2f} {w / d:8.2f}")
    return "\n".join(lines)


def table(results: list[Result], args: argparse.Namespace, image_size: int) -> str:
    columns = (("batches", 7), ("images", 7), ("wall_s", 7), ("img/s", 9), ("cores", 6), ("img/s/core", 10))
    head = f"{'backend':8} " + " ".join(f"{name:>{width}}" for name, width in columns)
    rows = [
        f"{r.backend:8} {r.batches:7d} {r.images:7d} {r.wall_s:7.2f} {r.images_per_s:9.1f} "
        f"{r.cores:6.2f} {r.images_per_core_s:10.1f}"
        for r in results
    ]
    lines = [
        f"{args.manifest} | augment={args.augment} image_size={image_size} batch={args.batch_size} "
        f"threads={args.threads} device={args.device} | {os.cpu_count()} CPUs visible",
        head,
        *rows,
    ]
    by = {r.backend: r for r in results}
    if {"dali", "wds"} <= by.keys():
        d, w = by["dali"], by["wds"]
        lines.append(
            f"dali/wds: {d.images_per_s / w.images_per_s:.2f}x img/s, "
            f"{d.images_per_core_s / w.images_per_core_s:.2f}x img/s per core"
        )
    return "\n".join(lines)


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
    image_size = args.image_size or int(manifest.meta.get("image_size") or 224)
    torch.set_num_threads(1)  # the loaders' own threads are what is measured
    results = [measure(b, args, image_size) for b in backends]
    print(table(results, args, image_size))
    if args.stages:
        print(stages_table(results, manifest, image_size, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
