"""tools/make_shards.py sources (folder train/val, CIFAR-10/100 pickles, Tiny-ImageNet) and
tools/verify_shards.py, on tiny inputs in the real formats: real pickles of numpy arrays, real JPEGs.

Bad inputs (corrupt, truncated, non-image, empty, unreadable, label-less) must give their documented
outcome: --on-bad refuse stops with exit status 2 naming the path and leaves nothing of the run behind;
--on-bad skip leaves the sample out and lists it in the manifest.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from lipnext_scale.data import build_loader, read_manifest
from lipnext_scale.data.shards import MAX_KEY_LENGTH, index_text
from lipnext_scale.data.verify import VerifyError, verify
from tests.conftest import TOOLS, load_tool

# JPEG q95 4:4:4 vs the source pixels of the strongly textured test images below: measured max 9/255.
JPEG_TOLERANCE = 12 / 255


# The command lines themselves (exit codes, messages); the checks are lipnext_scale.data.verify's.
make_shards = load_tool("make_shards")
verify_shards = load_tool("verify_shards")


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def run_make(*args: object) -> None:
    make_shards.main([str(a) for a in args])


def refused(capsys: pytest.CaptureFixture[str], *args: object) -> str:
    """Run make_shards expecting exit status 2; return its error message."""
    with pytest.raises(SystemExit) as info:
        run_make(*args)
    assert info.value.code == 2
    return capsys.readouterr().err


def verified(manifest: Path, decode: bool = True) -> str:
    summary = verify(manifest, decode=decode)
    return summary.line()


def shard_samples(manifest_path: Path) -> list[tuple[str, bytes, int]]:
    """(key, jpeg, label) of every sample in shard order (standard library reader, no extraction)."""
    out: list[tuple[str, bytes, int]] = []
    for tar_path in read_manifest(manifest_path).tar_paths:
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        keys = list(dict.fromkeys(name.split(".", 1)[0] for name in members))
        out += [(k, members[f"{k}.jpg"], int(members[f"{k}.cls"])) for k in keys]
    return out


def decode(jpeg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpeg)) as img:
        return np.asarray(img.convert("RGB")).astype(np.float64) / 255


def only_run_files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()} if directory.exists() else set()


def smooth_images(n: int, seed: int) -> np.ndarray:
    """[n, 32, 32, 3] uint8 images with low-frequency content (JPEG q95 keeps them within a few levels)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(20, 236, size=(n, 4, 4, 3), dtype=np.uint8)
    return np.stack(
        [np.asarray(Image.fromarray(c).resize((32, 32), Image.Resampling.BICUBIC)) for c in coarse]
    )


def jpeg_file(
    path: Path, color: tuple[int, ...], size: tuple[int, int] = (40, 30), mode: str = "RGB"
) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format="JPEG", quality=90)
    return path.read_bytes()


# ----------------------------------------------------------------------------- CIFAR


def write_cifar10(root: Path, per_batch: int = 6, test: int = 5, bytes_keys: bool = True) -> dict[str, tuple]:
    """cifar-10-batches-py with tiny batches; returns {split: (images [N,32,32,3], labels)} in file order."""
    k = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    root.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({k("label_names"): [k(n) for n in names], k("num_vis"): 3072}, f, protocol=2)
    source = {}
    for split, files, n in (
        ("train", [f"data_batch_{i}" for i in range(1, 6)], per_batch),
        ("test", ["test_batch"], test),
    ):
        all_images, all_labels = [], []
        for j, name in enumerate(files):
            images = smooth_images(n, seed=hash(name) % 1000 + j)
            labels = [int(x) for x in np.random.default_rng(j).integers(0, 10, n)]
            batch = {
                k("batch_label"): k(f"{name} of 5"),
                k("labels"): labels,
                k("data"): images.transpose(0, 3, 1, 2).reshape(n, 3072),  # rows: R plane, G, B
                k("filenames"): [k(f"img_{j}_{i}.png") for i in range(n)],
            }
            with open(root / name, "wb") as f:
                pickle.dump(batch, f, protocol=2)
            all_images.append(images)
            all_labels += labels
        source[split] = (np.concatenate(all_images), all_labels)
    return source


def test_cifar10_round_trip(tmp_path: Path) -> None:
    source = write_cifar10(tmp_path / "src" / "cifar-10-batches-py")
    run_make("cifar10", tmp_path / "src", tmp_path / "out", "--samples-per-shard", 7)  # finds the subdir
    for split, count in (("train", 30), ("test", 5)):
        path = tmp_path / "out" / f"cifar10-{split}.manifest.json"
        manifest = read_manifest(path, verify_checksums=True)
        assert manifest.total_samples == count and manifest.class_names[:2] == ("airplane", "automobile")
        assert manifest.meta["split"] == split and manifest.skipped == ()
        samples = shard_samples(path)
        indices = [int(key.rsplit("-", 1)[1]) for key, _, _ in samples]
        assert [key for key, _, _ in samples] == [f"cifar10-{split}-{i:05d}" for i in indices]
        assert sorted(indices) == list(range(count))
        assert (indices != sorted(indices)) == (split == "train")  # train shuffled, test in file order
        images, labels = source[split]
        for (_key, jpeg, label), i in zip(samples, indices, strict=True):
            assert label == labels[i]
            with Image.open(io.BytesIO(jpeg)) as img:
                assert img.format == "JPEG" and JpegImagePlugin.get_sampling(img) == 0  # 4:4:4
            error = np.abs(decode(jpeg) - images[i] / 255)
            assert error.max() <= JPEG_TOLERANCE and error.mean() < 2 / 255
        assert "OK" in verified(path)
        for tar, idx in zip(manifest.tar_paths, manifest.index_paths, strict=True):
            ref = tmp_path / "ref.idx"
            subprocess.run([sys.executable, "-m", "wds2idx", tar, str(ref)], check=True, capture_output=True)
            assert Path(idx).read_bytes() == ref.read_bytes()

    # The DALI loader yields the source pixels and labels of the test split, in file order.
    images, labels = next(
        iter(
            build_loader(
                tmp_path / "out" / "cifar10-test.manifest.json",
                batch_size=5,
                train=False,
                image_size=32,
                backend="dali",
                num_threads=1,
            )
        )
    )
    assert labels.tolist() == source["test"][1]
    expected = torch.from_numpy(source["test"][0]).permute(0, 3, 1, 2).float() / 255
    assert float((images - expected).abs().max()) <= JPEG_TOLERANCE


def test_cifar100_round_trip_with_fine_labels(tmp_path: Path) -> None:
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    fine = [f"class{i:02d}" for i in range(100)]
    with open(root / "meta", "wb") as f:  # Python 3 style: str keys
        pickle.dump({"fine_label_names": fine, "coarse_label_names": [f"super{i}" for i in range(20)]}, f)
    source = {}
    for split, n in (("train", 12), ("test", 4)):
        images = smooth_images(n, seed=n)
        fine_labels = [(7 * i + 3) % 100 for i in range(n)]
        with open(root / split, "wb") as f:
            pickle.dump(
                {
                    "data": images.transpose(0, 3, 1, 2).reshape(n, 3072),
                    "fine_labels": fine_labels,
                    "coarse_labels": [label // 5 for label in fine_labels],
                },
                f,
            )
        source[split] = (images, fine_labels)
    run_make("cifar100", root, tmp_path / "out", "--prefix", "c100")
    for split in ("train", "test"):
        path = tmp_path / "out" / f"c100-{split}.manifest.json"
        manifest = read_manifest(path)
        assert manifest.class_names == tuple(fine) and manifest.total_samples == len(source[split][1])
        for key, jpeg, label in shard_samples(path):
            i = int(key.rsplit("-", 1)[1])
            assert label == source[split][1][i]
            assert np.abs(decode(jpeg) - source[split][0][i] / 255).max() <= JPEG_TOLERANCE


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_that_would_run_code_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_cifar10(tmp_path / "src")
    marker = tmp_path / "pwned"
    with open(tmp_path / "src" / "data_batch_2", "wb") as f:
        pickle.dump({b"data": _Exploit(marker), b"labels": []}, f, protocol=2)
    err = refused(capsys, "cifar10", tmp_path / "src", tmp_path / "out")
    assert "data_batch_2: cannot unpickle" in err and "posix.system" in err
    assert not marker.exists() and only_run_files(tmp_path / "out") == set()


def test_cifar_images_without_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_cifar10(tmp_path / "src")
    path = tmp_path / "src" / "data_batch_3"
    with open(path, "rb") as f:
        batch = pickle.load(f)
    batch[b"labels"] = batch[b"labels"][:4]  # images 4 and 5 of this batch have no label
    batch[b"labels"][1] = 10  # and image 1 a label outside the 10 classes
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)

    # Small shards: several are complete (staged) before the first bad sample comes up in the shuffle.
    err = refused(capsys, "cifar10", tmp_path / "src", tmp_path / "out", "--samples-per-shard", 2)
    assert f"{path}[" in err and ("has no label" in err or "not a class index" in err)
    assert only_run_files(tmp_path / "out") == set()

    run_make("cifar10", tmp_path / "src", tmp_path / "out", "--on-bad", "skip")
    manifest = read_manifest(tmp_path / "out" / "cifar10-train.manifest.json", verify_checksums=True)
    assert manifest.total_samples == 27
    assert sorted(s["path"] for s in manifest.skipped) == [f"{path}[1]", f"{path}[4]", f"{path}[5]"]
    assert read_manifest(tmp_path / "out" / "cifar10-test.manifest.json").total_samples == 5


def test_cifar_batch_of_the_wrong_shape_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_cifar10(tmp_path / "src")
    with open(tmp_path / "src" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((5, 1024), np.uint8), b"labels": [0] * 5}, f, protocol=2)
    err = refused(capsys, "cifar10", tmp_path / "src", tmp_path / "out", "--on-bad", "skip")
    assert "test_batch: 'data' must be a uint8 array [N, 3072]" in err
    assert only_run_files(tmp_path / "out") == set()  # the train split was not committed either


# ----------------------------------------------------------------------------- Tiny-ImageNet


def write_tinyimagenet(root: Path) -> dict[str, dict[str, tuple[bytes, str]]]:
    """tiny-imagenet-200 with 3 classes; returns {split: {file name: (bytes, wnid)}}."""
    wnids = ["n09999999", "n01443537", "n02000000"]  # not sorted, as in the real file
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in wnids))
    files: dict[str, dict[str, tuple[bytes, str]]] = {"train": {}, "val": {}}
    for c, wnid in enumerate(wnids):
        for i in range(3):
            name = f"{wnid}_{i}.JPEG"
            mode, color = ("L", (40 * i + 20,)) if i == 2 else ("RGB", (60 * c + 20, 30 * i + 10, 100))
            files["train"][name] = (
                jpeg_file(root / "train" / wnid / "images" / name, color, (64, 64), mode),
                wnid,
            )
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t10\t10\n")
    lines = []
    for i in range(5):
        wnid = wnids[i % 3]
        name = f"val_{i}.JPEG"
        files["val"][name] = (jpeg_file(root / "val" / "images" / name, (10 * i, 200, 30), (64, 64)), wnid)
        lines.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "test" / "images").mkdir(parents=True)
    jpeg_file(root / "test" / "images" / "test_0.JPEG", (1, 2, 3), (64, 64))  # unlabelled: ignored
    return files


def test_tinyimagenet_round_trip(tmp_path: Path) -> None:
    files = write_tinyimagenet(tmp_path / "tiny-imagenet-200")
    run_make("tinyimagenet", tmp_path, tmp_path / "out", "--samples-per-shard", 4, "--workers", 2)
    classes = ("n01443537", "n02000000", "n09999999")
    for split in ("train", "val"):
        path = tmp_path / "out" / f"tinyimagenet-{split}.manifest.json"
        manifest = read_manifest(path, verify_checksums=True)
        assert manifest.class_names == classes and manifest.meta["split"] == split
        samples = shard_samples(path)
        assert len(samples) == len(files[split]) == manifest.total_samples
        for key, jpeg, label in samples:
            data, wnid = files[split][f"{key}.JPEG"]
            assert jpeg == data and classes[label] == wnid  # plain JPEGs are stored byte for byte
        if split == "val":
            assert [k for k, _, _ in samples] == [f"val_{i}" for i in range(5)]  # annotation order
        assert "every JPEG decoded" in verified(path)


def test_tinyimagenet_val_image_without_annotation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "tiny"
    write_tinyimagenet(root)
    orphan = root / "val" / "images" / "val_9.JPEG"
    jpeg_file(orphan, (5, 5, 5), (64, 64))
    out = tmp_path / "out"
    run_make("folder", root / "train" / "n01443537", out, "--prefix", "other")  # unrelated set in OUT
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    err = refused(capsys, "tinyimagenet", root, out)
    assert f"{orphan}: no label" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no train, no val, no temp files

    run_make("tinyimagenet", root, out, "--on-bad", "skip")
    manifest = read_manifest(out / "tinyimagenet-val.manifest.json")
    assert manifest.total_samples == 5
    assert [s["path"] for s in manifest.skipped] == [str(orphan)]
    assert "val_annotations.txt" in manifest.skipped[0]["reason"]
    assert read_manifest(out / "tinyimagenet-train.manifest.json").skipped == ()


def test_tinyimagenet_corrupt_val_image_undoes_the_train_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, out = tmp_path / "tiny", tmp_path / "out"
    write_tinyimagenet(root)
    corrupt = root / "val" / "images" / "val_3.JPEG"
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # truncated: found only when decoded, after train
    err = refused(capsys, "tinyimagenet", root, out, "--samples-per-shard", 2)
    assert f"{corrupt}: not a decodable image" in err
    assert only_run_files(out) == set()  # the complete train split of this run was not committed


def test_tinyimagenet_annotation_names_are_not_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "tiny"
    write_tinyimagenet(root)
    annotations = root / "val" / "val_annotations.txt"
    annotations.write_text(
        annotations.read_text() + "../../train/n01443537/images/n01443537_0.JPEG\tn01443537\n"
    )
    err = refused(capsys, "tinyimagenet", root, tmp_path / "out", "--on-bad", "skip")
    assert "val_annotations.txt:6" in err and "not a plain file name" in err


# ----------------------------------------------------------------------------- ImageFolder train/val


def test_folder_val_takes_the_train_class_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train, val, out = tmp_path / "train", tmp_path / "val", tmp_path / "out"
    for c, name in enumerate(["ant", "bee", "cat"]):
        for i in range(2):
            jpeg_file(train / name / f"{name}{i}.JPEG", (80 * c, 50, 50))
    jpeg_file(val / "cat" / "v0.JPEG", (160, 50, 50))  # val lacks "ant" and "bee": labels must not shift
    jpeg_file(val / "bee" / "v1.JPEG", (80, 50, 50))
    run_make("folder", train, out, "--prefix", "t-train")
    train_manifest = out / "t-train.manifest.json"
    run_make("folder", val, out, "--prefix", "t-val", "--no-shuffle", "--classes-from", train_manifest)
    manifest = read_manifest(out / "t-val.manifest.json")
    assert manifest.class_names == ("ant", "bee", "cat") and manifest.num_classes == 3
    assert [(k, label) for k, _, label in shard_samples(manifest.path)] == [("bee_v1", 1), ("cat_v0", 2)]

    jpeg_file(val / "dog" / "v2.JPEG", (1, 1, 1))
    err = refused(capsys, "folder", val, out, "--prefix", "t-val2", "--classes-from", train_manifest)
    assert f"{val / 'dog'}: class folder not in the class list" in err
    assert not (out / "t-val2.manifest.json").exists()


def write_bad_folder(src: Path) -> dict[str, Path]:
    good = jpeg_file(src / "a" / "good.JPEG", (200, 20, 20))
    jpeg_file(src / "b" / "fine.jpg", (20, 200, 20))
    bad = {
        "corrupt": src / "a" / "corrupt.JPEG",
        "truncated": src / "a" / "truncated.JPEG",
        "text": src / "b" / "text.jpg",
        "empty": src / "b" / "empty.jpeg",
        "dangling": src / "b" / "dangling.JPEG",
        "directory": src / "b" / "directory.JPEG",
    }
    bad["corrupt"].write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(big, "JPEG")
    bad["truncated"].write_bytes(big.getvalue()[: len(big.getvalue()) // 2])
    bad["text"].write_text("not an image at all")
    bad["empty"].write_bytes(b"")
    bad["dangling"].symlink_to(src / "nowhere.JPEG")
    bad["directory"].mkdir()
    (src / "b" / "README.txt").write_text("ignored: not an image suffix")
    assert good
    return bad


@pytest.mark.parametrize("workers", [1, 2])
def test_folder_bad_files_refuse_or_skip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: int
) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    bad = write_bad_folder(src)
    # A previous good data set with the same prefix must survive a refused run.
    run_make("folder", _tiny_folder(tmp_path / "old"), out, "--prefix", "pets")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    err = refused(capsys, "folder", src, out, "--prefix", "pets", "--no-shuffle", "--workers", workers)
    assert f"{bad['corrupt']}: not a decodable image" in err  # the first bad file in sorted order
    assert "rerun with --on-bad skip" in err  # the refusal says how to go on
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    run_make("folder", src, out, "--prefix", "pets", "--on-bad", "skip", "--workers", workers)
    manifest = read_manifest(out / "pets.manifest.json", verify_checksums=True)
    assert manifest.total_samples == 2
    reasons = {Path(s["path"]).name: s["reason"] for s in manifest.skipped}
    assert set(reasons) == {p.name for p in bad.values()}
    assert (
        reasons["truncated.JPEG"].startswith("not a decodable image")
        and "truncated" in reasons["truncated.JPEG"]
    )
    assert reasons["empty.jpeg"] == "empty file"
    assert reasons["dangling.JPEG"].startswith("cannot read file (FileNotFoundError")
    assert reasons["directory.JPEG"].startswith("cannot read file (IsADirectoryError")
    assert reasons["text.jpg"].startswith("not a decodable image (UnidentifiedImageError")
    assert "2 shards" in verified(manifest.path) or "1 shards" in verified(manifest.path)
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_folder_keys_stay_unique_and_valid(tmp_path: Path) -> None:
    src = tmp_path / "src"
    jpeg_file(src / "c" / "x y.JPEG", (1, 2, 3))
    jpeg_file(src / "c" / "x_y.JPEG", (4, 5, 6))
    Image.new("RGB", (8, 8)).save(src / "c" / "x_y.png")  # same stem, other suffix: its own key
    jpeg_file(src / "c" / ("long" * 40 + ".jpg"), (7, 8, 9))
    run_make("folder", src, tmp_path / "out", "--prefix", "k", "--no-shuffle")
    keys = [k for k, _, _ in shard_samples(tmp_path / "out" / "k.manifest.json")]
    assert len(set(keys)) == 4 and "c_x_y" in keys and all(len(k) <= MAX_KEY_LENGTH for k in keys)


# ----------------------------------------------------------------------------- verify_shards


def hand_made_set(
    directory: Path, shards: list[list[tuple[str, bytes]]], num_classes: int = 3, symlink: str | None = None
) -> Path:
    """A shard set written member by member (so it can hold defects write_shards refuses), with a
    consistent index, sha256 and manifest; ``symlink`` adds a symlink member of that name."""
    directory.mkdir(parents=True, exist_ok=True)
    entries_out = []
    for s, members in enumerate(shards):
        tar_path = directory / f"h-{s:06d}.tar"
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            if symlink is not None:
                info = tarfile.TarInfo(symlink)
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
        entries: list[list[tuple[str, int, int, str]]] = []
        last = None
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if not m.isreg():
                    continue
                base, ext = m.name.split(".", 1) if "." in m.name else (m.name, "")
                if base != last:
                    entries.append([])
                    last = base
                entries[-1].append((ext, m.offset_data, m.size, m.name))
        (directory / f"h-{s:06d}.idx").write_text(index_text(entries))
        import hashlib

        entries_out.append(
            {
                "tar": tar_path.name,
                "index": f"h-{s:06d}.idx",
                "num_samples": len(entries),
                "sha256": hashlib.sha256(tar_path.read_bytes()).hexdigest(),
            }
        )
    manifest = {
        "format": "lipnext_scale.wds_shards/v1",
        "prefix": "h",
        "total_samples": sum(e["num_samples"] for e in entries_out),
        "num_classes": num_classes,
        "class_names": None,
        "shards": entries_out,
        "meta": {},
    }
    path = directory / "h.manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def small_jpeg(value: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 0, 0)).save(buf, "JPEG")
    return buf.getvalue()


def sample(key: str, label: bytes = b"1", jpeg: bytes | None = None) -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", small_jpeg() if jpeg is None else jpeg), (f"{key}.cls", label)]


def test_verify_accepts_a_good_set_and_its_index_is_wds2idx(tmp_path: Path) -> None:
    path = hand_made_set(tmp_path / "h", [sample("a") + sample("b", b"2"), sample("c", b"0\n")])
    assert verify_shards.main([str(path), "--decode"]) == 0
    for tar in read_manifest(path).tar_paths:
        ref = tmp_path / "ref.idx"
        subprocess.run([sys.executable, "-m", "wds2idx", tar, str(ref)], check=True, capture_output=True)
        assert Path(tar).with_suffix(".idx").read_bytes() == ref.read_bytes()


@pytest.mark.parametrize(
    ("shards", "kwargs", "message"),
    [
        ([sample("a", b"3")], {}, "h-000000.tar: sample 'a': label 3 >= num_classes=3"),
        ([sample("a", b"x1")], {}, "sample 'a': .cls is not a decimal label"),
        ([sample("a", b"1" * 30)], {}, "sample 'a': .cls is 30 bytes"),
        ([sample("a")[:1]], {}, "sample 'a': has no .cls member"),
        ([sample("a"), sample("a")], {}, "key 'a' occurs in more than one sample"),
        (
            [sample("a") + sample("b")[1:] + sample("b")[:1] + sample("b")[1:]],
            {},
            "'b.cls': duplicate member",
        ),
        ([sample("a"), [("../escape.jpg", small_jpeg()), ("../escape.cls", b"1")]], {}, "'../escape.jpg'"),
        ([[("a.png", small_jpeg()), ("a.cls", b"1")]], {}, "'a.png': extension must be"),
        ([sample("a")], {"symlink": "b.jpg"}, "'b.jpg': is not a regular file"),
        ([sample("a", jpeg=b"GIF89a....")], {}, "sample 'a': .jpg does not start with a JPEG SOI"),
        ([sample("a", jpeg=small_jpeg()[:40])], {"decode": True}, "sample 'a': .jpg does not decode"),
    ],
)
def test_verify_names_the_first_bad_sample(tmp_path: Path, shards: list, kwargs: dict, message: str) -> None:
    decode_flag = kwargs.pop("decode", False)
    path = hand_made_set(tmp_path / "h", shards, **kwargs)
    with pytest.raises(VerifyError, match=message.replace("(", r"\(").replace(".", r"\.")):
        verify(path, decode=decode_flag)


def test_verify_without_decode_only_checks_the_jpeg_header(tmp_path: Path) -> None:
    path = hand_made_set(tmp_path / "h", [sample("a", jpeg=small_jpeg()[:40])])
    assert verify_shards.main([str(path)]) == 0
    assert verify_shards.main([str(path), "--decode"]) == 2


def test_verify_catches_stale_index_checksum_and_count(tmp_path: Path) -> None:
    out = tmp_path / "s"
    run_make("folder", _tiny_folder(tmp_path / "src"), out, "--prefix", "s", "--samples-per-shard", 2)
    path = out / "s.manifest.json"
    assert verify_shards.main([str(path)]) == 0

    idx = out / "s-000001.idx"
    original_idx = idx.read_bytes()
    assert b"cls 2048 1 " in original_idx
    idx.write_bytes(original_idx.replace(b"cls 2048 1 ", b"cls 2560 1 ", 1))
    result = subprocess.run(
        [sys.executable, str(TOOLS / "verify_shards.py"), str(path)], capture_output=True, text=True
    )
    assert (
        result.returncode == 2
        and result.stdout.startswith("BAD ")
        and "s-000001.idx: differs" in result.stdout
    )
    idx.write_bytes(original_idx)

    tar = out / "s-000000.tar"
    data = bytearray(tar.read_bytes())
    data[1500] ^= 0xFF  # inside the first JPEG's entropy-coded data
    tar.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match="s-000000.tar: sha256 is"):
        verify(path)
    data[1500] ^= 0xFF
    tar.write_bytes(bytes(data))

    raw = json.loads(path.read_text())
    raw["shards"][0]["num_samples"] += 1
    raw["total_samples"] += 1
    path.write_text(json.dumps(raw))
    with pytest.raises(VerifyError, match="s-000000.tar: holds 2 samples, the manifest says 3"):
        verify(path)


def _tiny_folder(src: Path) -> Path:
    for c in range(2):
        for i in range(2):
            jpeg_file(src / f"c{c}" / f"i{i}.JPEG", (100 * c, 20 * i, 50), (24, 24))
    return src


def test_manifest_shard_names_cannot_be_urls_or_paths(tmp_path: Path) -> None:
    path = hand_made_set(tmp_path / "h", [sample("a")])
    raw = json.loads(path.read_text())
    marker = tmp_path / "pwned"
    for name in (f"pipe:touch {marker}", "../h/h-000000.tar", ".hidden.tar"):
        raw["shards"][0]["tar"] = name
        path.write_text(json.dumps(raw))
        with pytest.raises(ValueError, match="is not a plain file name"):
            read_manifest(path)
    assert not marker.exists()


def test_exif_rotated_jpegs_are_stored_upright(tmp_path: Path) -> None:
    # DALI's decoder applies EXIF orientation and PIL's does not (checked: a 40x20 JPEG tagged
    # "rotate 90" decodes as 20 wide in DALI, 40 in PIL); stored upright, both backends agree.
    src = tmp_path / "src" / "c"
    src.mkdir(parents=True)
    img = Image.new("RGB", (40, 20), (200, 0, 0))
    img.paste((0, 0, 200), (0, 0, 10, 20))  # blue on the left
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    img.save(src / "rotated.JPEG", exif=exif, quality=95)
    run_make("folder", tmp_path / "src", tmp_path / "out", "--prefix", "r")
    ((_, jpeg, _),) = shard_samples(tmp_path / "out" / "r.manifest.json")
    with Image.open(io.BytesIO(jpeg)) as stored:
        assert stored.size == (20, 40) and stored.getexif().get(0x0112, 1) == 1
        top = np.asarray(stored.convert("RGB"))[:8].mean(axis=(0, 1))
    assert top[2] > 150 and top[0] < 60  # the blue left edge is now on top
