"""tools/make_shards.py on a tiny ImageFolder tree with the awkward files ImageNet really contains."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from PIL import Image

from lipnext_scale.data import build_loader, read_manifest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "make_shards.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("make_shards", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # worker processes unpickle its functions by module name
    spec.loader.exec_module(module)
    return module


def test_image_folder_to_shards_reencodes_what_dali_cannot_read(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "cat").mkdir(parents=True)
    (src / "dog").mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(src / "cat" / "red.jpg")
    Image.new("CMYK", (30, 40), (0, 100, 0, 0)).save(src / "cat" / "cmyk.JPEG")
    Image.new("RGB", (36, 36), (0, 0, 200)).save(src / "dog" / "png_named.JPEG", format="PNG")
    Image.new("L", (33, 35), 90).save(src / "dog" / "grey.v2.jpg")
    (src / "dog" / "notes.txt").write_text("not an image")

    load_tool().main(["folder", str(src), str(tmp_path / "out"), "--prefix", "pets", "--workers", "1"])

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
