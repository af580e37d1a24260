"""WebDataset tar shards (``{key}.jpg`` + ``{key}.cls``) with DALI index files and a JSON manifest.

Layout of a shard set written by :func:`write_shards`::

    out_dir/{prefix}-000000.tar   members {key}.jpg, {key}.cls (ASCII decimal label), in this order
    out_dir/{prefix}-000000.idx   DALI index, byte-identical to what DALI's ``wds2idx`` writes
    ...
    out_dir/{prefix}.manifest.json  written last: its presence means every shard is complete

Readers (DALI, webdataset, :func:`read_manifest`) only trust files listed in the manifest. A run writes
every shard under a hidden temp name and renames them into place only after the last sample was
written, so a run that fails (a refused input, an exception, Ctrl-C) leaves the previous data set of
that prefix, if any, untouched and none of its own files behind; a crash during the final renames
leaves at worst complete but orphaned shards, never a manifest describing half a data set.

The manifest may list inputs the producer skipped (``"skipped": [{"path": ..., "reason": ...}]``).
Tar member names are data, never paths: nothing here or in the loaders extracts an archive to disk,
and shard file names in a manifest must be plain names (no directories, no ``pipe:``-style URLs).
"""

from __future__ import annotations

import hashlib
import io
import json
import operator
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

MANIFEST_FORMAT = "lipnext_scale.wds_shards/v1"
IMAGE_EXT = "jpg"
LABEL_EXT = "cls"
# The index header DALI's reader expects; wds2idx 2.x writes this version string.
DALI_INDEX_VERSION = "v1.2"
_TAR_BLOCK = 512
# A ustar member name has 100 bytes and we never use the prefix field (keys hold no '/'), so the
# longest key is 100 - len(".jpg"). Longer names would need pax/GNU long-name headers, which
# shift data offsets in ways `tar --block-num` (and hence wds2idx) reports differently.
MAX_KEY_LENGTH = 100 - 1 - max(len(IMAGE_EXT), len(LABEL_EXT))
# Only these characters: DALI and webdataset split the extension at the FIRST dot of the member name,
# '/' would create directories, and GNU tar quotes unusual characters in its listings.
_KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
# Shard file names in a manifest: no '/', no leading '.', and no ':' (webdataset would open a name like
# "pipe:cmd" by running cmd in a shell).
_SHARD_FILE_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
JPEG_CHECKS = ("none", "header", "decode")


def validate_key(key: str) -> None:
    """Raise ValueError unless ``key`` is usable as a WebDataset sample key in DALI and webdataset."""
    if not isinstance(key, str):
        raise ValueError(f"sample key must be a str, got {type(key).__name__}: {key!r}")
    if not key:
        raise ValueError(f"sample key {key!r} is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"sample key {key!r} is {len(key)} characters long; the limit is {MAX_KEY_LENGTH}")
    if _KEY_PATTERN.fullmatch(key) is None:
        bad = sorted({c for c in key if _KEY_PATTERN.fullmatch(c) is None})
        raise ValueError(
            f"sample key {key!r} contains {bad}: keys may only use letters, digits, '_' and '-' "
            "(readers split extensions at the first '.', and '/' or '..' would escape the archive)"
        )


def _validate_label(key: str, label: Any, num_classes: int | None) -> int:
    # bool is an int subclass; a True label is almost certainly a bug upstream. operator.index accepts
    # numpy integers and rejects floats, which str() would otherwise write as "3.0".
    try:
        if isinstance(label, bool):
            raise TypeError
        label = operator.index(label)
    except TypeError:
        raise ValueError(
            f"sample {key!r}: label must be an int, got {type(label).__name__}: {label!r}"
        ) from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        limit = f" < num_classes={num_classes}" if num_classes is not None else ""
        raise ValueError(f"sample {key!r}: label {label} is out of range (expected 0 <= label{limit})")
    return label


def _validate_jpeg(key: str, jpeg: bytes, check: str) -> None:
    # DALI cannot skip a sample it fails to decode (the whole pipeline stops), so catch bad images now.
    if not isinstance(jpeg, bytes | bytearray | memoryview):
        raise ValueError(f"sample {key!r}: image must be bytes, got {type(jpeg).__name__}")
    if len(jpeg) < 4 or bytes(jpeg[:2]) != b"\xff\xd8":
        raise ValueError(f"sample {key!r}: image bytes do not start with a JPEG SOI marker")
    if check == "none":
        return
    try:
        with Image.open(io.BytesIO(jpeg)) as img:
            if img.format != "JPEG":
                raise ValueError(f"format is {img.format}")
            if check == "decode":
                img.load()
    except Exception as exc:
        raise ValueError(f"sample {key!r}: image is not a readable JPEG ({exc})") from exc


@dataclass(frozen=True)
class ShardInfo:
    tar: str
    index: str
    num_samples: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A parsed ``{prefix}.manifest.json``; file names in ``shards`` are relative to ``root``."""

    path: Path
    root: Path
    shards: tuple[ShardInfo, ...]
    total_samples: int
    num_classes: int
    class_names: tuple[str, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # Inputs the producer left out, each {"path": ..., "reason": ...} (see tools/make_shards.py --on-bad).
    skipped: tuple[dict[str, str], ...] = ()

    @property
    def tar_paths(self) -> list[str]:
        return [str(self.root / s.tar) for s in self.shards]

    @property
    def index_paths(self) -> list[str]:
        return [str(self.root / s.index) for s in self.shards]

    @property
    def shard_sizes(self) -> list[int]:
        return [s.num_samples for s in self.shards]


@contextmanager
def _atomic_writer(final_path: Path) -> Iterator[BinaryIO]:
    """Write to a hidden temp file next to ``final_path`` and rename it into place only on success."""
    tmp = final_path.with_name(f".{final_path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final_path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _tar_member(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata so the same samples always give byte-identical shards (and checksums).
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> tuple[int, int]:
    """Append one regular file; return (offset of its data in the archive, size)."""
    tar.addfile(_tar_member(name, len(data)), io.BytesIO(data))
    # tar.offset is now just past the data padded to whole blocks; step back over that padding.
    padded = -(-len(data) // _TAR_BLOCK) * _TAR_BLOCK
    return tar.offset - padded, len(data)


def index_text(entries: Sequence[Sequence[tuple[str, int, int, str]]]) -> str:
    """DALI index in wds2idx's format: a header line, then per sample ``ext offset size name`` groups."""
    lines = [f"{DALI_INDEX_VERSION} {len(entries)}"]
    lines += [" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in s) for s in entries]
    return "\n".join(lines) + "\n"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _temp_path(final_path: Path) -> Path:
    return final_path.with_name(f".{final_path.name}.tmp-{os.getpid()}")


def _write_staged(final_path: Path, write: Any, staged: list[tuple[Path, Path]]) -> Path:
    """Write a file under its temp name via ``write(f)``, fsync it, and record it in ``staged``."""
    tmp = _temp_path(final_path)
    staged.append((tmp, final_path))  # recorded first, so a failure below still removes the temp file
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _write_one_shard(
    samples: Sequence[tuple[str, bytes, int]], tar_path: Path, idx_path: Path, staged: list[tuple[Path, Path]]
) -> ShardInfo:
    """Write one shard and its index under temp names (renamed into place later by the caller)."""
    entries: list[list[tuple[str, int, int, str]]] = []

    def write_tar(f: BinaryIO) -> None:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, jpeg, label in samples:
                components = []
                for ext, data in ((IMAGE_EXT, bytes(jpeg)), (LABEL_EXT, str(label).encode("ascii"))):
                    name = f"{key}.{ext}"
                    offset, size = _add_member(tar, name, data)
                    components.append((ext, offset, size, name))
                entries.append(components)

    tmp_tar = _write_staged(tar_path, write_tar, staged)
    _write_staged(idx_path, lambda f: f.write(index_text(entries).encode("ascii")), staged)
    return ShardInfo(
        tar=tar_path.name, index=idx_path.name, num_samples=len(samples), sha256=sha256_of(tmp_tar)
    )


def _validated_samples(
    samples: Iterable[tuple[str, bytes, int]], num_classes: int | None, jpeg_check: str
) -> Iterator[tuple[str, bytes, int]]:
    seen: set[str] = set()
    for position, sample in enumerate(samples):
        try:
            key, jpeg, label = sample
        except (TypeError, ValueError):
            raise ValueError(f"sample #{position} is not a (key, jpeg_bytes, label) triple") from None
        validate_key(key)
        if key in seen:
            # Duplicate keys would merge two samples in DALI's reader and break "every sample once".
            raise ValueError(f"sample key {key!r} occurs more than once (second time at sample #{position})")
        seen.add(key)
        label = _validate_label(key, label, num_classes)
        _validate_jpeg(key, jpeg, jpeg_check)
        yield key, jpeg, label


def _chunks(items: Iterable[tuple[str, bytes, int]], size: int) -> Iterator[list[tuple[str, bytes, int]]]:
    chunk: list[tuple[str, bytes, int]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def manifest_path_for(out_dir: str | os.PathLike[str], prefix: str) -> Path:
    return Path(out_dir) / f"{prefix}.manifest.json"


def _skipped_entries(skipped: Iterable[Mapping[str, Any]] | None) -> list[dict[str, str]]:
    entries = []
    for i, entry in enumerate(skipped or ()):
        if not isinstance(entry, Mapping) or not {"path", "reason"} <= entry.keys():
            raise ValueError(f"skipped[{i}] must be a mapping with 'path' and 'reason', got {entry!r}")
        entries.append({"path": str(entry["path"]), "reason": str(entry["reason"])})
    return entries


@dataclass
class StagedShards:
    """A shard set written under temp names by :func:`stage_shards`, not yet visible to readers.

    :meth:`commit` renames it into place (old manifest first removed, new manifest written last);
    :meth:`discard` deletes the temp files. Staging several sets and committing them only once all
    succeeded makes a multi-split run all-or-nothing (``tools/make_shards.py`` does that).
    """

    out_dir: Path
    prefix: str
    manifest: dict[str, Any]
    _staged: list[tuple[Path, Path]]
    _manifest_bytes: bytes

    def commit(self) -> dict[str, Any]:
        if not self._staged:
            raise RuntimeError(f"{self.out_dir / self.prefix}: already committed or discarded")
        manifest_path = manifest_path_for(self.out_dir, self.prefix)
        # The old manifest goes first: it must never vouch for a mix of old and new shards.
        manifest_path.unlink(missing_ok=True)
        for tmp, final in self._staged:
            os.replace(tmp, final)
        self._staged = []
        with _atomic_writer(manifest_path) as f:
            f.write(self._manifest_bytes)
        return self.manifest

    def discard(self) -> None:
        _remove_temp_files(self._staged)
        self._staged = []


def _remove_temp_files(staged: list[tuple[Path, Path]]) -> None:
    for tmp, _ in staged:
        tmp.unlink(missing_ok=True)


def write_shards(
    samples: Iterable[tuple[str, bytes, int]],
    out_dir: str | os.PathLike[str],
    prefix: str = "shard",
    samples_per_shard: int = 1000,
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    jpeg_check: str = "header",
    meta: Mapping[str, Any] | None = None,
    skipped: Iterable[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write ``samples`` — ``(key, jpeg_bytes, label)`` in the order given — as tar shards.

    Every sample is validated before it is written (key syntax, unique key, integer label in
    ``[0, num_classes)``, JPEG bytes: ``jpeg_check`` "header" opens the header with PIL, "decode"
    decodes fully, "none" checks only the SOI marker). All files of the run are written under hidden
    temp names in ``out_dir`` and renamed into place only once every sample has been written; the
    manifest is written last. If anything fails before that (a bad sample, an exception raised by
    ``samples``), the temp files are removed and an existing data set of the same prefix is left as
    it was. Returns the manifest dict (also written to ``{out_dir}/{prefix}.manifest.json``).
    ``num_classes`` defaults to ``len(class_names)`` or, without names, to ``max(label) + 1``.
    ``meta`` is stored verbatim (JSON-serialisable) so producers can record how the data was made.
    ``skipped`` — ``{"path", "reason"}`` mappings for inputs the producer left out — is read only
    after ``samples`` is exhausted, so a generator may append to the list it was given while yielding.
    """
    return stage_shards(
        samples,
        out_dir,
        prefix,
        samples_per_shard,
        num_classes=num_classes,
        class_names=class_names,
        jpeg_check=jpeg_check,
        meta=meta,
        skipped=skipped,
    ).commit()


def stage_shards(
    samples: Iterable[tuple[str, bytes, int]],
    out_dir: str | os.PathLike[str],
    prefix: str = "shard",
    samples_per_shard: int = 1000,
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    jpeg_check: str = "header",
    meta: Mapping[str, Any] | None = None,
    skipped: Iterable[Mapping[str, Any]] | None = None,
) -> StagedShards:
    """:func:`write_shards` without the final renames: call ``.commit()`` (or ``.discard()``)."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if jpeg_check not in JPEG_CHECKS:
        raise ValueError(f"jpeg_check must be one of {JPEG_CHECKS}, got {jpeg_check!r}")
    if not prefix or _KEY_PATTERN.fullmatch(prefix) is None:
        raise ValueError(f"prefix {prefix!r} may only use letters, digits, '_' and '-'")
    if class_names is not None:
        class_names = [str(n) for n in class_names]
        if num_classes is None:
            num_classes = len(class_names)
        elif num_classes != len(class_names):
            raise ValueError(f"num_classes={num_classes} but {len(class_names)} class_names were given")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    staged: list[tuple[Path, Path]] = []  # (temp name, final name) of every file this run wrote
    try:
        shards: list[ShardInfo] = []
        max_label = -1
        for i, chunk in enumerate(
            _chunks(_validated_samples(samples, num_classes, jpeg_check), samples_per_shard)
        ):
            max_label = max(max_label, *(label for _, _, label in chunk))
            stem = f"{prefix}-{i:06d}"
            shards.append(_write_one_shard(chunk, out / f"{stem}.tar", out / f"{stem}.idx", staged))
        if not shards:
            raise ValueError(f"no samples were given for {out / prefix}; refusing to write an empty data set")
        manifest = {
            "format": MANIFEST_FORMAT,
            "prefix": prefix,
            "total_samples": sum(s.num_samples for s in shards),
            "num_classes": num_classes if num_classes is not None else max_label + 1,
            "class_names": class_names,
            "samples_per_shard": samples_per_shard,
            "shards": [
                {"tar": s.tar, "index": s.index, "num_samples": s.num_samples, "sha256": s.sha256}
                for s in shards
            ],
            "meta": dict(meta or {}),
            "skipped": _skipped_entries(skipped),
        }
        manifest_bytes = (json.dumps(manifest, indent=1) + "\n").encode("utf-8")
    except BaseException:
        _remove_temp_files(staged)
        raise
    return StagedShards(out, prefix, manifest, staged, manifest_bytes)


def _require(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise ValueError(f"invalid shard manifest {path}: {what}")


def read_manifest(path: str | os.PathLike[str], *, verify_checksums: bool = False) -> Manifest:
    """Parse and check a manifest written by :func:`write_shards`.

    Checks the structure, that the counts add up and that every listed tar and index file exists;
    with ``verify_checksums`` also re-hashes every tar (slow for big data sets).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shard manifest {path} does not exist")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"invalid shard manifest {path}: not valid JSON ({exc})") from exc
    _require(isinstance(raw, dict), path, "top level is not an object")
    _require(
        raw.get("format") == MANIFEST_FORMAT,
        path,
        f"format is {raw.get('format')!r}, not {MANIFEST_FORMAT!r}",
    )
    for name in ("shards", "total_samples", "num_classes"):
        _require(name in raw, path, f"missing field {name!r}")
    _require(isinstance(raw["shards"], list) and raw["shards"], path, "'shards' must be a non-empty list")

    root = path.parent
    shards = []
    for i, entry in enumerate(raw["shards"]):
        _require(isinstance(entry, dict), path, f"shards[{i}] is not an object")
        missing = {"tar", "index", "num_samples", "sha256"} - entry.keys()
        _require(not missing, path, f"shards[{i}] lacks {sorted(missing)}")
        shard = ShardInfo(
            str(entry["tar"]), str(entry["index"]), int(entry["num_samples"]), str(entry["sha256"])
        )
        _require(
            shard.num_samples > 0, path, f"shards[{i}] ({shard.tar}) has num_samples={shard.num_samples}"
        )
        for name in (shard.tar, shard.index):
            _require(
                _SHARD_FILE_PATTERN.fullmatch(name) is not None,
                path,
                f"shards[{i}] file name {name!r} is not a plain file name ([A-Za-z0-9_.-], no leading '.')",
            )
            if not (root / name).is_file():
                raise FileNotFoundError(f"shard file {root / name} listed in manifest {path} does not exist")
        if verify_checksums:
            actual = sha256_of(root / shard.tar)
            _require(
                actual == shard.sha256,
                path,
                f"sha256 of {shard.tar} is {actual}, manifest says {shard.sha256}",
            )
        shards.append(shard)

    total = sum(s.num_samples for s in shards)
    _require(
        total == raw["total_samples"],
        path,
        f"shard sizes sum to {total}, total_samples={raw['total_samples']}",
    )
    num_classes = int(raw["num_classes"])
    _require(num_classes > 0, path, f"num_classes={num_classes}")
    names = raw.get("class_names")
    if names is not None:
        _require(len(names) == num_classes, path, f"{len(names)} class_names for num_classes={num_classes}")
        names = tuple(str(n) for n in names)
    skipped = raw.get("skipped") or []
    _require(isinstance(skipped, list), path, "'skipped' must be a list")
    try:
        skipped_entries = tuple(_skipped_entries(skipped))
    except ValueError as exc:
        raise ValueError(f"invalid shard manifest {path}: {exc}") from None
    return Manifest(
        path=path,
        root=root,
        shards=tuple(shards),
        total_samples=total,
        num_classes=num_classes,
        class_names=names,
        meta=dict(raw.get("meta") or {}),
        skipped=skipped_entries,
    )
