"""tools/make_shards.py on a tiny ImageFolder tree with the awkward files ImageNet really contains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from lipnext_scale.data import build_loader, make_digits_shards, read_manifest
from lipnext_scale.data.photos import write_sample_photos
from lipnext_scale.data.sources import BadInput, folder_split, write_splits
from tests.conftest import load_tool

make_shards = load_tool("make_shards")


def test_image_folder_to_shards_reencodes_what_dali_cannot_read(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "cat").mkdir(parents=True)
    (src / "dog").mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(src / "cat" / "red.jpg")
    Image.new("CMYK", (30, 40), (0, 100, 0, 0)).save(src / "cat" / "cmyk.JPEG")
    Image.new("RGB", (36, 36), (0, 0, 200)).save(src / "dog" / "png_named.JPEG", format="PNG")
    Image.new("L", (33, 35), 90).save(src / "dog" / "grey.v2.jpg")
    (src / "dog" / "notes.txt").write_text("not an image")

    make_shards.main(["folder", str(src), str(tmp_path / "out"), "--prefix", "pets", "--workers", "1"])

    manifest = read_manifest(tmp_path / "out" / "pets.manifest.json", verify_checksums=True)
    assert manifest.class_names == ("cat", "dog") and manifest.total_samples == 4
    expected = [  # (label, mean RGB in [0, 1]) per file; keys do not come out of the loader
        (0, (200 / 255, 10 / 255, 10 / 255)),
        (0, (1.0, 155 / 255, 1.0)),  # CMYK (0, 100, 0, 0)
        (1, (0.0, 0.0, 200 / 255)),
        (1, (90 / 255,) * 3),
    ]
    for backend in ("dali", "wds"):
        loader = build_loader(
            manifest.path, batch_size=4, train=False, image_size=32, backend=backend, num_threads=1
        )
        images, labels = next(iter(loader))
        assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64
        unmatched = list(expected)
        for image, label in zip(images, labels, strict=True):
            mean = image.mean(dim=(1, 2))
            match = [
                e for e in unmatched if e[0] == int(label) and (mean - torch.tensor(e[1])).abs().max() < 0.03
            ]
            assert match, f"{backend}: label {int(label)} with mean colour {mean.tolist()} was not written"
            unmatched.remove(match[0])


def test_bench_data_compares_both_backends_on_digits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = make_digits_shards(tmp_path / "digits", image_size=16)["train"]
    bench = load_tool("bench_data")
    threads = torch.get_num_threads()
    try:
        args = [str(manifest), "--batch-size", "32", "--batches", "3", "--warmup", "1", "--threads", "1"]
        assert bench.main([*args, "--augment", "randaugment"]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert "augment=randaugment image_size=16 batch=32" in lines[0]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:4]}
    assert set(rows) == {"dali", "wds"}
    for backend, (batches, images, *_rest) in rows.items():
        assert (int(batches), int(images)) == (3, 96), backend
        assert float(_rest[1]) > 0, backend  # img/s
    assert lines[4].startswith("dali/wds: ") and "img/s per core" in lines[4]


def test_sample_photos_are_imagenet_sized_and_reproducible(tmp_path: Path) -> None:
    first = write_sample_photos(tmp_path / "a", count=6, classes=2, seed=3, quality=90)
    again = write_sample_photos(tmp_path / "b", count=6, classes=2, seed=3, quality=90)
    other = write_sample_photos(tmp_path / "c", count=6, classes=2, seed=4, quality=90)
    assert [p.relative_to(tmp_path / "a") for p in first] == [p.relative_to(tmp_path / "b") for p in again]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    assert [p.read_bytes() for p in first] != [p.read_bytes() for p in other]
    assert sorted({p.parent.name for p in first}) == ["class0", "class1"]
    for path in first:
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert 400 <= img.width <= 640 and 330 <= img.height <= 427
    with pytest.raises(SystemExit):  # the command line never mixes new photos into a folder that holds files
        load_tool("sample_photos").main([str(tmp_path / "a")])


def test_bench_data_stages_split_cpu_time_per_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's data benchmark, small: sample photos → make_shards folder → bench_data --stages."""
    load_tool("sample_photos").main([str(tmp_path / "photos"), "--count", "24", "--classes", "2"])
    make_shards.main(["folder", str(tmp_path / "photos"), str(tmp_path / "shards"), "--prefix", "photos",
                      "--workers", "1"])  # fmt: skip
    manifest = tmp_path / "shards" / "photos.manifest.json"
    bench = load_tool("bench_data")
    threads = torch.get_num_threads()
    try:
        args = [str(manifest), "--batch-size", "8", "--batches", "3", "--warmup", "1", "--threads", "1",
                "--image-size", "64"]  # fmt: skip
        assert bench.main([*args, "--augment", "rrc_flip", "--seconds", "0.2", "--stages"]) == 0
        with pytest.raises(SystemExit):
            bench.main([*args, "--augment", "flip", "--stages"])  # no resize stage to time
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("CPU ms per image"))
    stages = [line.rsplit(maxsplit=3) for line in lines[header + 1 : header + 4]]
    assert [s[0].split()[0] for s in stages] == ["JPEG", "random-resized-crop", "rest"]
    for _name, dali_ms, wds_ms, _ratio in stages[:2]:
        assert float(dali_ms) > 0 and float(wds_ms) > 0


def test_sources_from_python_write_what_the_command_line_writes(tmp_path: Path) -> None:
    """lipnext_scale.data.sources is the library behind make_shards: same arguments, same shard bytes."""
    src = tmp_path / "src"
    for name, colour in (("cat", (200, 10, 10)), ("dog", (10, 10, 200))):
        for i in range(3):
            (src / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20 + i, 20), colour).save(src / name / f"{i}.jpg")
    make_shards.main(["folder", str(src), str(tmp_path / "cli"), "--prefix", "pets", "--workers", "1"])
    [manifest] = write_splits(
        folder_split(src, prefix="pets", workers=1), tmp_path / "lib", samples_per_shard=1000
    )
    assert manifest["total_samples"] == 6 and manifest["class_names"] == ["cat", "dog"]
    cli, lib = (
        read_manifest(tmp_path / "cli" / "pets.manifest.json"),
        read_manifest(tmp_path / "lib" / "pets.manifest.json"),
    )
    assert [s.sha256 for s in cli.shards] == [s.sha256 for s in lib.shards]

    (src / "dog" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(BadInput, match="bad.jpg: not a decodable image") as info:
        write_splits(folder_split(src, prefix="pets2", workers=1), tmp_path / "lib")
    assert info.value.skippable and not list((tmp_path / "lib").glob("pets2*"))
    [skipped] = write_splits(folder_split(src, prefix="pets2", on_bad="skip", workers=1), tmp_path / "lib")
    assert skipped["total_samples"] == 6 and [Path(s["path"]).name for s in skipped["skipped"]] == ["bad.jpg"]
