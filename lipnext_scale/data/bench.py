"""Images/s of the DALI loader vs the webdataset + PIL fallback on the same shards and augmentation.

``tools/bench_data.py`` is the command line; its ``--help`` says what is measured and how.
"""

from __future__ import annotations

import os
import random
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .loader import build_loader
from .loader_base import DEFAULT_SHUFFLE_BUFFER, LoaderConfig
from .pil_augment import random_resized_crop
from .shards import IMAGE_EXT, Manifest, read_manifest
from .wds_loader import _decode


@dataclass(frozen=True)
class Settings:
    """What one benchmark measures: a fixed time (``seconds``) or a number of ``batches`` per backend."""

    manifest: Path
    batch_size: int = 64
    augment: str = "rrc_flip"
    image_size: int = 224
    threads: int = 4
    device: str = "cpu"
    seconds: float = 10.0
    batches: int = 0
    warmup: int = 5


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


def measure(backend: str, settings: Settings) -> Result:
    """Images/s of ``backend`` through ``build_loader`` (training mode), after the warm-up batches."""
    s = settings
    loader = build_loader(
        s.manifest,
        batch_size=s.batch_size,
        train=True,
        image_size=s.image_size,
        augment=s.augment,
        backend=backend,
        device=s.device,
        num_threads=s.threads,
        seed=0,
    )
    batches = _endless(loader)
    for _ in range(s.warmup):
        next(batches)
    count = images = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    while (count < s.batches) if s.batches else (time.perf_counter() - wall0 < s.seconds):
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


def _dali_stage_ms(manifest: Manifest, s: Settings) -> dict[str, float]:
    from nvidia.dali import fn, pipeline_def, types

    from .dali_loader import _random_crop_windows, _resized_square

    config = LoaderConfig(
        manifest=manifest,
        batch_size=s.batch_size,
        train=True,
        image_size=s.image_size,
        augment=s.augment,
        rank=0,
        world_size=1,
        seed=0,
        device=torch.device("cpu"),
        num_threads=s.threads,
        shuffle_buffer=DEFAULT_SHUFFLE_BUFFER,
    )

    def pipeline(resize: bool):
        @pipeline_def(batch_size=s.batch_size, num_threads=s.threads, device_id=None, seed=0)
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

    seconds = s.seconds / 2
    read_decode = _cpu_ms_per_image(pipeline(False).run, s.batch_size, seconds)
    with_resize = _cpu_ms_per_image(pipeline(True).run, s.batch_size, seconds)
    return {"decode": read_decode, "resize": with_resize - read_decode}


def _pil_stage_ms(manifest: Manifest, s: Settings) -> dict[str, float]:

    with tarfile.open(manifest.tar_paths[0]) as tar:
        jpegs = [tar.extractfile(m).read() for m in tar if m.name.endswith("." + IMAGE_EXT)]
    rng = random.Random(0)
    decoded = [_decode(jpeg, "bench") for jpeg in jpegs]
    seconds = s.seconds / 2
    decode = _cpu_ms_per_image(lambda: [_decode(j, "bench") for j in jpegs], len(jpegs), seconds)
    resize = _cpu_ms_per_image(
        lambda: [random_resized_crop(img, s.image_size, rng) for img in decoded], len(jpegs), seconds
    )
    return {"decode": decode, "resize": resize}


def stages_table(results: list[Result], s: Settings) -> str:
    """CPU ms per image by stage (JPEG decode, RRC resize, rest) for both backends, as a table."""
    manifest = read_manifest(s.manifest)
    by = {r.backend: r for r in results}
    stages = {"dali": _dali_stage_ms(manifest, s), "wds": _pil_stage_ms(manifest, s)}
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


def table(results: list[Result], s: Settings) -> str:
    """The throughput table (and the dali/wds ratios when both ran)."""
    columns = (("batches", 7), ("images", 7), ("wall_s", 7), ("img/s", 9), ("cores", 6), ("img/s/core", 10))
    head = f"{'backend':8} " + " ".join(f"{name:>{width}}" for name, width in columns)
    rows = [
        f"{r.backend:8} {r.batches:7d} {r.images:7d} {r.wall_s:7.2f} {r.images_per_s:9.1f} "
        f"{r.cores:6.2f} {r.images_per_core_s:10.1f}"
        for r in results
    ]
    lines = [
        f"{s.manifest} | augment={s.augment} image_size={s.image_size} batch={s.batch_size} "
        f"threads={s.threads} device={s.device} | {os.cpu_count()} CPUs visible",
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
