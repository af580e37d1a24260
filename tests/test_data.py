"""Data layer tests: real shards, real DALI decoding (CPU-only), real webdataset reading.

The digits shard set (1,500 train / 297 test, 32x32 JPEGs) is built once per session. Samples coming
out of a loader are identified by matching their pixels against a PIL decode of every JPEG in the
shards, so coverage, disjointness and labels are checked per sample, not just by counts.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lipnext_scale.data import build_loader, make_digits_shards, read_manifest, write_shards
from lipnext_scale.data.digits import NUM_TEST, NUM_TRAIN, digits_key, load_digit_images, render_digit
from lipnext_scale.data.loader_base import LABEL_WIDTH, labels_from_padded_ascii

IMAGE_SIZE = 32
THREADS = 1
# DALI's CPU decoder and PIL both use libjpeg-turbo and agree bit-for-bit here; allow a little slack
# for other builds. JPEG q95 vs the source image: measured max error 5/255.
DECODER_TOLERANCE = 3 / 255
JPEG_TOLERANCE = 8 / 255


# ----------------------------------------------------------------------------- fixtures and helpers


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_digits_shards(tmp_path_factory.mktemp("digits"), image_size=IMAGE_SIZE)


def tar_samples(tar_path: str | Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: payload}) in archive order, read with the standard library only."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(tar_path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = tar.extractfile(member).read()
    return samples


def split_samples(manifest_path: Path) -> list[tuple[str, dict[str, bytes]]]:
    manifest = read_manifest(manifest_path)
    return [s for tar in manifest.tar_paths for s in tar_samples(tar)]


def pil_decode(jpeg: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(jpeg)) as img:
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="session")
def reference(digits: dict[str, Path]) -> dict[str, object]:
    """Every sample of both splits: keys, labels and PIL-decoded pixels, in shard order per split."""
    keys, labels, images = [], [], []
    for split in ("train", "test"):
        for key, payload in split_samples(digits[split]):
            keys.append(key)
            labels.append(int(payload["cls"]))
            images.append(pil_decode(payload["jpg"]))
    images = torch.stack(images)
    return {"keys": keys, "labels": torch.tensor(labels), "images": images, "signatures": _signature(images)}


def _signature(images: torch.Tensor) -> torch.Tensor:
    # 4x4 block means of one channel: the 8x8 source digit, enough to tell all 1,797 apart, and 48x
    # cheaper to search than full images (the match is then verified on every pixel).
    return images[:, 0].reshape(-1, IMAGE_SIZE // 4, 4, IMAGE_SIZE // 4, 4).mean(dim=(2, 4)).flatten(1)


def identify(images: torch.Tensor, reference: dict[str, object]) -> list[str]:
    """The key of the reference image each (un-augmented) image is, failing if none is close enough."""
    if images.shape[0] == 0:
        return []
    nearest = torch.cdist(_signature(images), reference["signatures"]).argmin(dim=1)
    max_err = (images - reference["images"][nearest]).abs().flatten(1).amax(dim=1)
    assert float(max_err.max()) <= DECODER_TOLERANCE, (
        f"an image matches no shard sample (err {max_err.max()})"
    )
    return [reference["keys"][int(i)] for i in nearest]


def label_of(reference: dict[str, object]) -> dict[str, int]:
    return dict(zip(reference["keys"], reference["labels"].tolist(), strict=True))


def epoch_keys_and_labels(loader, reference) -> tuple[list[str], list[int], list[int]]:
    """One epoch: identified keys, yielded labels, and the batch sizes."""
    keys, labels, sizes = [], [], []
    for images, batch_labels in loader:
        keys += identify(images, reference)
        labels += batch_labels.tolist()
        sizes.append(images.shape[0])
    return keys, labels, sizes


def loader(manifest: Path, **kwargs):
    kwargs.setdefault("image_size", IMAGE_SIZE)
    kwargs.setdefault("num_threads", THREADS)
    return build_loader(manifest, **kwargs)


def jpeg_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8 + seed, 8), (seed, 2 * seed, 3 * seed)).save(buf, format="JPEG")
    return buf.getvalue()


def run_wds2idx(tar: str, idx: Path) -> bytes:
    subprocess.run([sys.executable, "-m", "wds2idx", tar, str(idx)], check=True, capture_output=True)
    return idx.read_bytes()


# ----------------------------------------------------------------------------- shards and manifests


def test_digits_shards_round_trip(digits: dict[str, Path]) -> None:
    source_images, source_labels = load_digit_images()
    expected = {"train": NUM_TRAIN, "test": NUM_TEST}
    for split, manifest_path in digits.items():
        manifest = read_manifest(manifest_path, verify_checksums=True)
        samples = split_samples(manifest_path)
        assert manifest.total_samples == len(samples) == expected[split]
        assert manifest.shard_sizes == [len(tar_samples(t)) for t in manifest.tar_paths]
        assert manifest.num_classes == 10 and manifest.class_names == tuple("0123456789")
        indices = [int(key.removeprefix("digits-")) for key, _ in samples]
        if split == "test":
            assert indices == list(range(NUM_TRAIN, NUM_TRAIN + NUM_TEST))  # the last 297, in order
        else:
            assert sorted(indices) == list(range(NUM_TRAIN)) and indices != sorted(indices)  # pre-shuffled
        for (key, payload), i in zip(samples, indices, strict=True):
            assert key == digits_key(i) and set(payload) == {"jpg", "cls"}
            assert int(payload["cls"].decode("ascii")) == source_labels[i]
        decoded = torch.stack([pil_decode(p["jpg"]) for _, p in samples])
        assert decoded.shape == (len(samples), 3, IMAGE_SIZE, IMAGE_SIZE)
        # Upscaled source: 8x8 pixel blocks of the digit should dominate each 4x4 block of the JPEG.
        block_means = decoded[:, 0].reshape(-1, 8, 4, 8, 4).mean(dim=(2, 4))
        source = torch.from_numpy(source_images[indices]).float() / 255
        assert float((block_means - source).abs().mean()) < 0.06
        # And against the exact pre-JPEG rendering (bicubic upscale): JPEG error only.
        rendered = torch.stack(
            [torch.from_numpy(np.array(render_digit(source_images[i], IMAGE_SIZE))) for i in indices]
        )
        error = (decoded - rendered.permute(0, 3, 1, 2).float() / 255).abs()
        assert float(error.max()) <= JPEG_TOLERANCE and float(error.mean()) < 1 / 255


def test_make_digits_shards_reuses_valid_shards(digits: dict[str, Path]) -> None:
    out_dir = digits["train"].parent
    before = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    assert make_digits_shards(out_dir, image_size=IMAGE_SIZE) == digits
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()} == before


def test_make_digits_shards_rewrites_damaged_or_different_shards(tmp_path: Path) -> None:
    paths = make_digits_shards(tmp_path, image_size=16)
    tar = Path(read_manifest(paths["test"]).tar_paths[1])
    tar.write_bytes(tar.read_bytes()[:-1024])  # truncated, as after a crash of some other writer
    assert make_digits_shards(tmp_path, image_size=16) == paths
    read_manifest(paths["test"], verify_checksums=True)
    assert read_manifest(paths["train"]).meta["image_size"] == 16
    make_digits_shards(tmp_path, image_size=24)  # other settings: rewritten, not reused
    assert read_manifest(paths["train"], verify_checksums=True).meta["image_size"] == 24


def test_index_files_equal_wds2idx_output(digits: dict[str, Path], tmp_path: Path) -> None:
    for manifest_path in digits.values():
        manifest = read_manifest(manifest_path)
        for tar, idx in zip(manifest.tar_paths, manifest.index_paths, strict=True):
            assert Path(idx).read_bytes() == run_wds2idx(tar, tmp_path / "ref.idx"), tar
    # Multi-digit labels and keys of different lengths change member sizes and offsets.
    samples = [(f"k{'x' * (i % 5)}{i}", jpeg_bytes(i), i * 1234) for i in range(7)]
    manifest = write_shards(samples, tmp_path / "odd", "odd", samples_per_shard=3, jpeg_check="decode")
    assert [s["num_samples"] for s in manifest["shards"]] == [3, 3, 1]
    for shard in manifest["shards"]:
        tar = str(tmp_path / "odd" / shard["tar"])
        assert (tmp_path / "odd" / shard["index"]).read_bytes() == run_wds2idx(tar, tmp_path / "ref.idx")


@pytest.mark.parametrize(
    "key", ["a/b", "a.b", "..", "../x", "", "with space", "ümlaut", ".hidden", "x" * 97, "name.jpg"]
)
def test_unsafe_keys_are_rejected_by_name(tmp_path: Path, key: str) -> None:
    samples = [("good", jpeg_bytes(), 0), (key, jpeg_bytes(), 1)]
    with pytest.raises(ValueError, match="sample key") as info:
        write_shards(samples, tmp_path, "s", samples_per_shard=1)
    assert repr(key) in str(info.value)
    assert not (tmp_path / "s.manifest.json").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        ([("a", jpeg_bytes(), 0), ("a", jpeg_bytes(), 1)], "'a' occurs more than once"),
        ([("a", jpeg_bytes(), -1)], "'a': label -1 is out of range"),
        ([("a", jpeg_bytes(), 2.0)], "'a': label must be an int"),
        ([("a", jpeg_bytes(), True)], "'a': label must be an int"),
        ([("a", jpeg_bytes(), 10)], r"'a': label 10 is out of range .*num_classes=10"),
        ([("a", b"\xff\xd8 not really a jpeg", 0)], "'a': image is not a readable JPEG"),
        ([("a", b"GIF89a", 0)], "'a': image bytes do not start with a JPEG SOI"),
        ([], "no samples"),
    ],
)
def test_bad_samples_are_rejected(tmp_path: Path, samples: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_shards(samples, tmp_path, "s", num_classes=10)
    assert not (tmp_path / "s.manifest.json").exists()


def test_failure_midway_leaves_the_old_set_and_no_files_of_the_run(tmp_path: Path) -> None:
    def samples():
        for i in range(5):
            yield f"k{i}", jpeg_bytes(i), i
        raise OSError("source went away")

    old = write_shards([(f"old{i}", jpeg_bytes(i), i) for i in range(6)], tmp_path, "s", samples_per_shard=2)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(OSError, match="source went away"):
        write_shards(samples(), tmp_path, "s", samples_per_shard=2)
    # Shards 0 and 1 of the failed run were complete, but nothing was renamed into place: the old data
    # set is intact and verifies, and no temp file of the run remains.
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert read_manifest(tmp_path / "s.manifest.json", verify_checksums=True).total_samples == 6
    assert [k for k, _ in tar_samples(tmp_path / "s-000001.tar")] == ["old2", "old3"]
    assert old["skipped"] == []
    # The same for a failure before the first shard is complete, and for a fresh prefix.
    with pytest.raises(OSError, match="source went away"):
        write_shards(samples(), tmp_path, "fresh", samples_per_shard=100)
    assert {p.name for p in tmp_path.iterdir()} == set(before)


def test_read_manifest_errors_name_the_problem(tmp_path: Path) -> None:
    write_shards([(f"k{i}", jpeg_bytes(i), i) for i in range(4)], tmp_path, "s", samples_per_shard=2)
    path = tmp_path / "s.manifest.json"
    manifest = read_manifest(path, verify_checksums=True)
    assert manifest.total_samples == 4 and manifest.num_classes == 4 and manifest.shard_sizes == [2, 2]

    with pytest.raises(FileNotFoundError, match="nothing.manifest.json"):
        read_manifest(tmp_path / "nothing.manifest.json")
    raw = json.loads(path.read_text())

    def rewritten(**changes) -> Path:
        broken = tmp_path / "broken.manifest.json"
        broken.write_text(json.dumps({**raw, **changes}))
        return broken

    with pytest.raises(ValueError, match="shard sizes sum to 4, total_samples=5"):
        read_manifest(rewritten(total_samples=5))
    with pytest.raises(FileNotFoundError, match="s-000009.tar"):
        read_manifest(rewritten(shards=[{**raw["shards"][0], "tar": "s-000009.tar"}], total_samples=2))
    with pytest.raises(ValueError, match="not valid JSON"):
        (tmp_path / "garbage.manifest.json").write_text("{")
        read_manifest(tmp_path / "garbage.manifest.json")
    with open(tmp_path / "s-000001.tar", "r+b") as f:  # flip one byte of a JPEG
        f.seek(600)
        byte = f.read(1)
        f.seek(600)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ValueError, match="sha256 of s-000001.tar"):
        read_manifest(path, verify_checksums=True)


# ----------------------------------------------------------------------------- loaders


def test_ascii_label_parsing() -> None:
    texts = [b"7", b"12", b"0", b"999\n", b"42 "]
    padded = torch.zeros(len(texts), LABEL_WIDTH, dtype=torch.uint8)
    for row, text in enumerate(texts):
        padded[row, : len(text)] = torch.tensor(list(text), dtype=torch.uint8)
    assert labels_from_padded_ascii(padded, 1000, "here").tolist() == [7, 12, 0, 999, 42]
    with pytest.raises(ValueError, match=r"here: label 999 >= num_classes=100"):
        labels_from_padded_ascii(padded, 100, "here")
    padded[1, 1] = ord("x")
    with pytest.raises(ValueError, match=r"here: sample 1 .*b'1x'"):
        labels_from_padded_ascii(padded, 1000, "here")


def test_dali_train_loader_batches(digits: dict[str, Path], reference: dict[str, object]) -> None:
    train = loader(digits["train"], batch_size=64, train=True, backend="dali", augment="none")
    assert type(train).backend == "dali" and len(train) == NUM_TRAIN // 64
    truth = label_of(reference)
    keys, labels, sizes = [], [], []
    for images, batch_labels in train:
        assert images.dtype == torch.float32 and images.shape == (64, 3, IMAGE_SIZE, IMAGE_SIZE)
        assert batch_labels.dtype == torch.int64 and batch_labels.shape == (64,)
        assert images.device.type == "cpu" and 0.0 <= float(images.min()) and float(images.max()) <= 1.0
        keys += identify(images, reference)
        labels += batch_labels.tolist()
        sizes.append(len(images))
    assert len(sizes) == len(train)
    assert [truth[k] for k in keys] == labels  # every label is its image's label
    assert len(set(keys)) == len(keys) and all(int(k[-4:]) < NUM_TRAIN for k in keys)
    # Shuffled, and differently in the next epoch.
    in_shard_order = [k for k, _ in split_samples(digits["train"])][: len(keys)]
    next_keys, _, _ = epoch_keys_and_labels(train, reference)
    assert keys != in_shard_order and next_keys != keys and train.epoch == 1


@pytest.mark.parametrize("backend", ["dali", "wds"])
@pytest.mark.parametrize(("world_size", "batch_size"), [(1, 64), (2, 37), (3, 50)])
def test_eval_covers_every_sample_once(
    digits: dict[str, Path], reference: dict[str, object], backend: str, world_size: int, batch_size: int
) -> None:
    test_keys = [k for k, _ in split_samples(digits["test"])]
    truth = label_of(reference)
    seen, lengths = [], set()
    for rank in range(world_size):
        ev = loader(
            digits["test"],
            batch_size=batch_size,
            train=False,
            rank=rank,
            world_size=world_size,
            backend=backend,
        )
        keys, labels, sizes = epoch_keys_and_labels(ev, reference)
        lengths.add((len(ev), len(sizes)))
        start, end = rank * NUM_TEST // world_size, (rank + 1) * NUM_TEST // world_size
        assert keys == test_keys[start:end]  # DALI's contiguous split, in shard order
        assert labels == [truth[k] for k in keys]
        seen += keys
    assert sorted(seen) == sorted(test_keys)  # complete and no duplicates
    assert lengths == {(math.ceil(math.ceil(NUM_TEST / world_size) / batch_size),) * 2}


def test_eval_last_batch_can_be_empty_but_counts_agree(digits: dict[str, Path]) -> None:
    # 297 over 2 ranks = 148 + 149; with batch 37 rank 0 is done after 4 batches, rank 1 needs 5.
    sizes = {}
    for backend in ("dali", "wds"):
        for rank in (0, 1):
            ev = loader(digits["test"], batch_size=37, train=False, rank=rank, world_size=2, backend=backend)
            sizes[backend, rank] = [len(labels) for _, labels in ev]
    assert sizes["dali", 0] == sizes["wds", 0] == [37, 37, 37, 37, 0]
    assert sizes["dali", 1] == sizes["wds", 1] == [37, 37, 37, 37, 1]


@pytest.mark.parametrize("backend", ["dali", "wds"])
@pytest.mark.parametrize(
    ("world_size", "batch_size"),
    # 1500 = 3 x 500: 7 full batches per rank. 1500 over 7 = parts of 214 and 215, and 215 = 5 x 43:
    # the larger parts hold one more full batch, which must be dropped so that all ranks stop at 4.
    [(3, 64), (7, 43)],
)
def test_train_ranks_are_disjoint_with_equal_batch_counts(
    digits: dict[str, Path], reference: dict[str, object], backend: str, world_size: int, batch_size: int
) -> None:
    order = [k for k, _ in split_samples(digits["train"])]
    bounds = [q * NUM_TRAIN // world_size for q in range(world_size + 1)]
    parts = [set(order[bounds[q] : bounds[q + 1]]) for q in range(world_size)]
    per_epoch: dict[int, list[set[str]]] = {0: [], 1: []}
    for rank in range(world_size):
        train = loader(
            digits["train"],
            batch_size=batch_size,
            train=True,
            rank=rank,
            world_size=world_size,
            backend=backend,
        )
        assert len(train) == (NUM_TRAIN // world_size) // batch_size
        for epoch in (0, 1):
            keys, _, sizes = epoch_keys_and_labels(train, reference)
            assert sizes == [batch_size] * len(train)
            assert set(keys) <= parts[(rank + epoch) % world_size]  # the part moves on each epoch
            per_epoch[epoch].append(set(keys))
    for sets in per_epoch.values():
        assert sum(len(s) for s in sets) == len(set().union(*sets))  # disjoint across ranks


@pytest.mark.parametrize("backend", ["dali", "wds"])
def test_state_dict_resumes_identical_batches(digits: dict[str, Path], backend: str) -> None:
    def make():
        return loader(
            digits["train"], batch_size=50, train=True, augment="crop_flip", seed=7, backend=backend
        )

    original = make()
    stream = iter(original)
    for _ in range(5):
        next(stream)
    state = json.loads(json.dumps(original.state_dict()))  # must survive a JSON checkpoint
    expected = list(stream) + list(original)  # rest of epoch 0 and all of epoch 1
    end_state = original.state_dict()

    restored = make()
    restored.load_state_dict(state)
    assert (restored.epoch, restored.position) == (0, 5)
    resumed = list(restored) + list(restored)
    assert len(resumed) == len(expected) == len(original) - 5 + len(original)
    for (xa, ya), (xb, yb) in zip(expected, resumed, strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)

    # A state saved exactly at the end of an epoch resumes into the next one.
    at_end = make()
    at_end.load_state_dict(end_state)
    xa, ya = next(iter(original))
    xb, yb = next(iter(at_end))
    assert at_end.epoch == original.epoch == 2 and torch.equal(xa, xb) and torch.equal(ya, yb)


def test_state_dict_from_other_settings_is_refused(digits: dict[str, Path]) -> None:
    state = loader(digits["train"], batch_size=50, train=True, backend="dali").state_dict()
    other = loader(digits["train"], batch_size=25, train=True, backend="dali")
    with pytest.raises(ValueError, match="batch_size: saved 50, here 25"):
        other.load_state_dict(state)
    wds = loader(digits["train"], batch_size=50, train=True, backend="wds")
    with pytest.raises(ValueError, match="backend: saved 'dali', here 'wds'"):
        wds.load_state_dict(state)


@pytest.mark.parametrize("backend", ["dali", "wds"])
def test_augmentations_are_shifted_and_flipped_windows(digits: dict[str, Path], backend: str) -> None:
    common = dict(batch_size=40, train=True, seed=3, backend=backend)
    plain_images, plain_labels = next(iter(loader(digits["train"], augment="none", **common)))
    found = set()
    for augment in ("flip", "crop_flip"):
        images, labels = next(iter(loader(digits["train"], augment=augment, **common)))
        assert torch.equal(labels, plain_labels)  # the shuffle does not depend on the augmentation
        padded = torch.nn.functional.pad(plain_images, (4, 4, 4, 4))
        for i in range(len(images)):
            shifts = range(9) if augment == "crop_flip" else [4]
            matches = [
                (dy - 4, dx - 4, flip)
                for dy in shifts
                for dx in shifts
                for flip in (False, True)
                if torch.equal(
                    padded[i, :, dy : dy + IMAGE_SIZE, dx : dx + IMAGE_SIZE].flip(-1)
                    if flip
                    else padded[i, :, dy : dy + IMAGE_SIZE, dx : dx + IMAGE_SIZE],
                    images[i],
                )
            ]
            assert matches, f"{augment} image {i} is no shifted/flipped window of the original"
            found.add((augment, matches[0][2]))
            found.add((augment, "shifted" if matches[0][:2] != (0, 0) else "centred"))
    assert {("flip", True), ("flip", False), ("crop_flip", True), ("crop_flip", "shifted")} <= found
    eval_images, _ = next(iter(loader(digits["test"], augment="crop_flip", batch_size=40, train=False)))
    plain_eval, _ = next(iter(loader(digits["test"], augment="none", batch_size=40, train=False)))
    assert torch.equal(eval_images, plain_eval)  # evaluation never augments


@pytest.mark.parametrize("world_size", [1, 2])
def test_dali_and_wds_agree_on_eval(digits: dict[str, Path], world_size: int) -> None:
    for rank in range(world_size):
        batches = {
            backend: list(
                loader(
                    digits["test"],
                    batch_size=64,
                    train=False,
                    rank=rank,
                    world_size=world_size,
                    backend=backend,
                )
            )
            for backend in ("dali", "wds")
        }
        assert len(batches["dali"]) == len(batches["wds"])
        for (xd, yd), (xw, yw) in zip(batches["dali"], batches["wds"], strict=True):
            assert torch.equal(yd, yw)
            assert float((xd - xw).abs().max()) <= DECODER_TOLERANCE


def test_bad_loader_arguments(digits: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="augment must be one of"):
        loader(digits["train"], batch_size=8, train=True, augment="autoaugment")
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        loader(digits["train"], batch_size=8, train=True, rank=2, world_size=2)
    with pytest.raises(ValueError, match="backend must be one of"):
        loader(digits["train"], batch_size=8, train=True, backend="ffcv")
    with pytest.raises(ValueError, match="fewer than batch_size=1000"):
        loader(digits["train"], batch_size=1000, train=True, world_size=2)
    assert type(loader(digits["test"], batch_size=8, train=False, backend="auto")).backend == "dali"


# ----------------------------------------------------------------------------- RRC and RandAugment

# Source shapes (width, height) of the coordinate images; the label is the shape's index. 120x48 is
# wider than 4/3 at any crop of most of its area, so it also exercises the fallback.
GRADIENT_SHAPES = [(96, 64), (64, 96), (80, 80), (120, 48)]
GRADIENT_BLUE = [10, 60, 200, 250]  # never 128: a (128, 128, 128) pixel can only be RandAugment's fill


def gradient_jpeg(width: int, height: int, blue: int) -> bytes:
    """R = x / (W-1), G = y / (H-1): every pixel says where in the source it came from."""
    x = np.rint(np.linspace(0, 255, width))[None, :].repeat(height, 0)
    y = np.rint(np.linspace(0, 255, height))[:, None].repeat(width, 1)
    rgb = np.stack([x, y, np.full_like(x, blue)], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


@pytest.fixture(scope="module")
def gradients(tmp_path_factory: pytest.TempPathFactory) -> Path:
    jpegs = [gradient_jpeg(w, h, b) for (w, h), b in zip(GRADIENT_SHAPES, GRADIENT_BLUE, strict=True)]
    samples = [(f"g{i:03d}", jpegs[i % 4], i % 4) for i in range(64)]
    out = tmp_path_factory.mktemp("gradients")
    write_shards(samples, out, "grad", samples_per_shard=32, jpeg_check="decode")
    return out / "grad.manifest.json"


def crop_window(image: torch.Tensor, source: tuple[int, int]) -> tuple[float, float, float, float, bool]:
    """(left, top, width, height) in source pixels of the window an RRC output shows, and its flip."""
    width, height = source
    size = image.shape[-1]
    j = torch.arange(2, size - 2, dtype=torch.float64)  # interior: no antialiasing edge effects
    red = image[0].double().mean(dim=0)[2:-2]
    green = image[1].double().mean(dim=1)[2:-2]
    slope_x, icpt_x = np.polyfit(j.numpy(), red.numpy(), 1)
    slope_y, icpt_y = np.polyfit(j.numpy(), green.numpy(), 1)
    flipped = slope_x < 0
    w = abs(slope_x) * size * (width - 1)
    h = slope_y * size * (height - 1)
    # Source coordinate of output pixel centre j: left + (j + 0.5) * w / size - 0.5.
    x_first = icpt_x if not flipped else icpt_x + slope_x * (size - 1)  # R at the window's left edge
    left = x_first * (width - 1) + 0.5 - 0.5 * w / size
    top = icpt_y * (height - 1) + 0.5 - 0.5 * h / size
    return left, top, w, h, bool(flipped)


@pytest.mark.parametrize("backend", ["dali", "wds"])
def test_rrc_flip_outputs_are_random_resized_crops(gradients: Path, backend: str) -> None:
    ld = loader(gradients, batch_size=64, train=True, augment="rrc_flip", seed=5, backend=backend)
    images, labels = next(iter(ld))
    areas, flips = [], []
    for image, label in zip(images, labels.tolist(), strict=True):
        width, height = GRADIENT_SHAPES[label]
        left, top, w, h, flipped = crop_window(image, (width, height))
        where = f"{backend} label {label}: window {left:.1f},{top:.1f} {w:.1f}x{h:.1f}"
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1, where
        assert 0.08 * 0.85 <= w * h / (width * height) <= 1.03, where
        assert left >= -1.5 and top >= -1.5 and left + w <= width + 1.5 and top + h <= height + 1.5, where
        areas.append(w * h / (width * height))
        flips.append(flipped)
    assert min(areas) < 0.35 and max(areas) > 0.6 and 0 < sum(flips) < len(flips)
    assert not any(has_fill_corner(image) for image in images)


def has_fill_corner(image: torch.Tensor) -> bool:
    corners = image[:, [0, 0, -1, -1], [0, -1, 0, -1]]  # [3, 4]
    return bool(((corners - 128 / 255).abs().amax(dim=0) <= 3 / 255).any())


@pytest.mark.parametrize("backend", ["dali", "wds"])
def test_randaugment_adds_ops_on_top_of_rrc(gradients: Path, backend: str) -> None:
    common = dict(batch_size=64, train=True, seed=5, backend=backend)
    rrc_images, rrc_labels = next(iter(loader(gradients, augment="rrc_flip", **common)))
    ra_images, ra_labels = next(iter(loader(gradients, augment="randaugment", **common)))
    assert torch.equal(ra_labels, rrc_labels)  # the shuffle does not depend on the augmentation
    assert ra_images.shape == rrc_images.shape and ra_images.dtype == torch.float32
    assert 0.0 <= float(ra_images.min()) and float(ra_images.max()) <= 1.0
    changed = (ra_images - rrc_images).abs().flatten(1).amax(dim=1) > 4 / 255
    assert int(changed.sum()) >= 40
    # Translate/shear/rotate fill with grey 128, which no source image contains: ~1/3 of the images.
    assert sum(has_fill_corner(image) for image in ra_images) >= 5


def test_rrc_eval_is_resize_and_centre_crop(digits: dict[str, Path]) -> None:
    # 32 / 0.875 = 36.6 -> shorter side 36, centre 32x32 crop; the augmentation is not applied.
    keys = [k for k, _ in split_samples(digits["test"])][:40]
    jpegs = dict(split_samples(digits["test"])[:40])
    expected = []
    for key in keys:
        with Image.open(io.BytesIO(jpegs[key]["jpg"])) as img:
            big = np.asarray(img.convert("RGB").resize((36, 36), Image.Resampling.BILINEAR))
        expected.append(torch.from_numpy(big[2:34, 2:34].copy()).permute(2, 0, 1).float() / 255)
    expected = torch.stack(expected)
    for backend in ("dali", "wds"):
        for augment in ("rrc_flip", "randaugment"):
            ev = loader(digits["test"], batch_size=40, train=False, augment=augment, backend=backend)
            images, _ = next(iter(ev))
            assert float((images - expected).abs().max()) <= DECODER_TOLERANCE, (backend, augment)


@pytest.mark.parametrize("backend", ["dali", "wds"])
def test_randaugment_state_dict_resumes_identical_batches(gradients: Path, backend: str) -> None:
    def make():
        return loader(gradients, batch_size=8, train=True, augment="randaugment", seed=11, backend=backend)

    original = make()
    stream = iter(original)
    for _ in range(3):
        next(stream)
    state = json.loads(json.dumps(original.state_dict()))
    expected = list(stream) + list(original)
    restored = make()
    restored.load_state_dict(state)
    resumed = list(restored) + list(restored)
    assert len(resumed) == len(expected) == 2 * len(original) - 3
    for (xa, ya), (xb, yb) in zip(expected, resumed, strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_pil_rrc_boxes_follow_the_definition() -> None:
    import random

    from lipnext_scale.data.pil_augment import random_resized_crop_box

    rng = random.Random(0)
    areas = []
    for _ in range(2000):
        left, top, w, h = random_resized_crop_box(100, 60, rng)
        assert 0 <= left and left + w <= 100 and 0 <= top and top + h <= 60
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
        areas.append(w * h / 6000)
    assert 0.075 <= min(areas) < 0.1 and 0.7 < max(areas) <= 0.8  # 80x60 is the largest 4/3 window
    # No 10-attempt window fits a 200x10 strip at a legal aspect ratio: the fallback is the widest
    # 4/3 window, centred.
    assert random_resized_crop_box(200, 10, random.Random(0)) == (93, 0, 13, 10)


def test_pil_randaugment_suite_matches_dalis() -> None:
    from nvidia.dali.auto_aug import rand_augment as dali_ra

    from lipnext_scale.data.pil_augment import RAND_AUGMENT_SUITE, _op

    dali_suite = [
        (a.name, *(a.mag_range if a.mag_range is not None else (0, 0)), a.randomly_negate)
        for a in dali_ra.get_rand_augment_suite(use_shape=True)
    ]
    assert [(n, float(lo), float(hi), neg) for n, lo, hi, neg in dali_suite] == list(RAND_AUGMENT_SUITE)

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(30, 220, size=(32, 32, 3), dtype=np.uint8))
    base = np.asarray(img).astype(int)
    m = 9 / 30  # magnitude bin 9 of 31
    for name, lo, hi, _ in RAND_AUGMENT_SUITE:
        out = np.asarray(_op(name, lo + (hi - lo) * m, 128)(img)).astype(int)
        assert out.shape == base.shape, name
        assert (name == "identity") == np.array_equal(out, base), name
    posterized = np.asarray(_op("posterize", 8 - 4 * m, 128)(img))
    assert not (posterized & 1).any() and (posterized & 2).any()  # keeps 7 bits at bin 9
    shifted = np.asarray(_op("translate_x", 100 / 224 * m, 128)(img))
    assert (shifted[:, :4] == 128).all() and not (shifted[:, 5:] == 128).all()  # 4.3 px of grey fill


def _read_batches(stream, count: int, reference) -> list[str]:
    keys = []
    for _ in range(count):
        images, _ = next(stream)
        keys += identify(images, reference)
    return keys


@pytest.mark.parametrize("backend", ["dali", "wds"])
def test_resume_on_another_world_size_reads_the_unread_samples_once(
    digits: dict[str, Path], reference: dict[str, object], backend: str
) -> None:
    """3 ranks read 7 batches each; then 2 ranks, then 4, finish epoch 0 on exactly what was unread. The
    global batch stays 60, so the per-rank batch changes with the number of ranks."""

    def make(rank: int, world_size: int):
        return loader(
            digits["train"],
            batch_size=60 // world_size,
            train=True,
            rank=rank,
            world_size=world_size,
            backend=backend,
            seed=3,
        )

    def states_of(loaders) -> list[dict]:
        return [json.loads(json.dumps(ld.state_dict())) for ld in loaders]  # as a checkpoint keeps them

    old = [make(r, 3) for r in range(3)]
    seen = [_read_batches(iter(ld), 7, reference) for ld in old]
    assert all(ld.batches_in_epoch == NUM_TRAIN // 3 // 20 for ld in old)

    middle = [make(q, 2) for q in range(2)]
    for ld in middle:
        ld.load_resharded(states_of(old))
    unread_then = NUM_TRAIN - 3 * 7 * 20
    assert {ld.batches_in_epoch for ld in middle} == {(unread_then // 2) // 30}
    seen += [_read_batches(iter(ld), 4, reference) for ld in middle]

    # A same-size resume inside the remainder epoch replays it exactly (DALI: the slice is rebuilt).
    again = make(1, 2)
    again.load_state_dict(states_of(middle)[1])
    expected = [k for x, _ in middle[1] for k in identify(x, reference)]
    assert [k for x, _ in again for k in identify(x, reference)] == expected

    last = [make(q, 4) for q in range(4)]
    states = states_of([middle[0], again])  # rank 1 has finished its remainder epoch, rank 0 has not
    for ld in last:
        ld.load_resharded(states)
    tail = [[k for x, _ in ld for k in identify(x, reference)] for ld in last]
    assert all(ld.epoch == 0 and ld.epoch_complete for ld in last)

    read = [k for keys in (*seen, *tail) for k in keys] + expected
    assert len(read) == len(set(read)), "a sample was read twice in the epoch"
    # Dropped: each remainder's fewer-than-world-size leftovers and partial batches, nothing else.
    dropped = NUM_TRAIN - len(read)
    assert 0 <= dropped < 2 * (30 + 1) + 4 * (15 + 1)

    # The next epoch is an ordinary one at the new size.
    train_keys = reference["keys"][:NUM_TRAIN]
    for q, ld in enumerate(last):
        keys = [k for x, _ in ld for k in identify(x, reference)]
        part = set(train_keys[((q + 1) % 4) * NUM_TRAIN // 4 : ((q + 1) % 4 + 1) * NUM_TRAIN // 4])
        assert ld.epoch == 1 and len(keys) == len(ld) * 15 and set(keys) <= part


@pytest.mark.parametrize("backend", ["dali", "wds"])
def test_resume_on_another_world_size_at_an_epoch_end_starts_the_next(
    digits: dict[str, Path], reference: dict[str, object], backend: str
) -> None:
    old = [
        loader(digits["train"], batch_size=50, train=True, rank=r, world_size=2, backend=backend)
        for r in (0, 1)
    ]
    for ld in old:
        for _ in ld:
            pass
    states = [json.loads(json.dumps(ld.state_dict())) for ld in old]
    new = loader(digits["train"], batch_size=50, train=True, rank=2, world_size=3, backend=backend)
    new.load_resharded(states)
    keys = [k for x, _ in new for k in identify(x, reference)]
    part = set(reference["keys"][(0 % 3) * NUM_TRAIN // 3 : NUM_TRAIN // 3])  # rank 2, epoch 1: part 0
    assert new.epoch == 1 and len(keys) == len(new) * 50 and set(keys) <= part
