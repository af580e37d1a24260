"""Re-check a shard set against its manifest (``tools/verify_shards.py`` is the command line).

Checks, shard by shard: the manifest's structure; that each tar holds only regular-file members named
``{key}.jpg`` / ``{key}.cls`` (valid keys, each sample exactly one of each, keys unique over the whole
set); that every ``.cls`` is a decimal label in ``[0, num_classes)`` short enough for the DALI
loader; that every ``.jpg`` starts like a JPEG (with ``decode=True``: decodes completely with PIL as RGB
or greyscale); the sample count; that the ``.idx`` file is byte-identical to the index DALI's
``wds2idx`` produces for that tar; the tar's sha256; and the ``skipped`` list.
The archives are only read: member names are checked as data, never used as paths.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .loader_base import LABEL_WIDTH, MAX_LABEL_DIGITS
from .shards import IMAGE_EXT, LABEL_EXT, Manifest, index_text, read_manifest, sha256_of, validate_key


class VerifyError(Exception):
    """The first problem found; ``str()`` names the shard (and sample) first."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")


@dataclass
class Summary:
    manifest: Path
    shards: int
    samples: int
    num_classes: int
    skipped: int
    decoded: bool

    def line(self) -> str:
        checked = "keys, labels, index files and sha256 verified" + (
            ", every JPEG decoded" if self.decoded else ""
        )
        return (
            f"OK {self.manifest}: {self.shards} shards, {self.samples} samples, {self.num_classes} classes, "
            f"{self.skipped} skipped at write time; {checked}"
        )


def _members(tar: tarfile.TarFile, where: str) -> Iterator[tarfile.TarInfo]:
    try:
        yield from tar
    except tarfile.TarError as exc:
        raise VerifyError(where, f"not a readable tar archive ({exc})") from exc


def _check_label(data: bytes, num_classes: int, where: str) -> int:
    if len(data) > LABEL_WIDTH:
        raise VerifyError(where, f".cls is {len(data)} bytes; the DALI loader handles at most {LABEL_WIDTH}")
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        text = ""
    if not text.isdigit() or len(text) > MAX_LABEL_DIGITS:
        raise VerifyError(where, f".cls is not a decimal label: {data[:32]!r}")
    label = int(text)
    if label >= num_classes:
        raise VerifyError(where, f"label {label} >= num_classes={num_classes} from the manifest")
    return label


def _check_image(data: bytes, decode: bool, where: str) -> None:
    if data[:2] != b"\xff\xd8":
        raise VerifyError(where, ".jpg does not start with a JPEG SOI marker")
    if not decode:
        return
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            fmt, mode = img.format, img.mode
    except Exception as exc:
        raise VerifyError(where, f".jpg does not decode ({type(exc).__name__}: {exc})") from exc
    if fmt != "JPEG" or mode not in ("RGB", "L"):
        raise VerifyError(where, f".jpg is a {fmt} image in mode {mode}, expected an RGB or greyscale JPEG")


def verify_shard(
    tar_path: Path, index_path: Path, expected: int, num_classes: int, decode: bool, seen: set[str]
) -> int:
    """Check one shard; returns its sample count. ``seen`` collects keys over the whole set."""
    entries: list[list[tuple[str, int, int, str]]] = []
    current: dict[str, bytes] = {}
    key_of_current: str | None = None

    def finish_sample() -> None:
        if key_of_current is None:
            return
        where = f"{tar_path}: sample {key_of_current!r}"
        missing = [ext for ext in (IMAGE_EXT, LABEL_EXT) if ext not in current]
        if missing:
            raise VerifyError(where, f"has no .{missing[0]} member")
        _check_label(current[LABEL_EXT], num_classes, where)
        _check_image(current[IMAGE_EXT], decode, where)

    try:
        tar = tarfile.open(tar_path, mode="r:")  # uncompressed only, as DALI requires
    except (tarfile.TarError, OSError) as exc:
        raise VerifyError(str(tar_path), f"not a readable uncompressed tar archive ({exc})") from exc
    with tar:
        for member in _members(tar, str(tar_path)):
            where = f"{tar_path}: member {member.name!r}"
            if not member.isreg():
                raise VerifyError(where, "is not a regular file (links, directories and devices are refused)")
            key, dot, ext = member.name.partition(".")
            try:
                validate_key(key)
            except ValueError as exc:
                raise VerifyError(where, str(exc)) from None
            if not dot or ext not in (IMAGE_EXT, LABEL_EXT):
                raise VerifyError(where, f"extension must be .{IMAGE_EXT} or .{LABEL_EXT}")
            if key != key_of_current:
                finish_sample()
                if key in seen:
                    raise VerifyError(where, f"key {key!r} occurs in more than one sample")
                seen.add(key)
                key_of_current, current = key, {}
                entries.append([])
            elif ext in current:
                raise VerifyError(where, "duplicate member in one sample")
            extracted = tar.extractfile(member)  # an in-archive file object; nothing touches the disk
            try:
                current[ext] = extracted.read() if extracted is not None else b""
            except (tarfile.TarError, OSError) as exc:
                raise VerifyError(where, f"cannot read its data (truncated archive?): {exc}") from exc
            entries[-1].append((ext, member.offset_data, member.size, member.name))
        finish_sample()
    if len(entries) != expected:
        raise VerifyError(str(tar_path), f"holds {len(entries)} samples, the manifest says {expected}")
    try:
        index_bytes = index_path.read_bytes()
    except OSError as exc:
        raise VerifyError(str(index_path), f"cannot read ({exc})") from exc
    if index_bytes != index_text(entries).encode("ascii"):
        raise VerifyError(
            str(index_path), f"differs from the index wds2idx gives for {tar_path.name} (stale?)"
        )
    return len(entries)


def verify(manifest_path: str | Path, decode: bool = False) -> Summary:
    """Check the whole set; raises :class:`VerifyError` at the first problem."""
    try:
        manifest: Manifest = read_manifest(manifest_path)
    except (OSError, ValueError) as exc:
        raise VerifyError(str(manifest_path), str(exc)) from exc
    seen: set[str] = set()
    for shard, tar_path, index_path in zip(
        manifest.shards, manifest.tar_paths, manifest.index_paths, strict=True
    ):
        verify_shard(Path(tar_path), Path(index_path), shard.num_samples, manifest.num_classes, decode, seen)
        actual = sha256_of(Path(tar_path))
        if actual != shard.sha256:
            raise VerifyError(tar_path, f"sha256 is {actual}, the manifest says {shard.sha256}")
    return Summary(
        manifest=Path(manifest_path),
        shards=len(manifest.shards),
        samples=manifest.total_samples,
        num_classes=manifest.num_classes,
        skipped=len(manifest.skipped),
        decoded=decode,
    )
