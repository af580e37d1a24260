#!/usr/bin/env python
"""Merge a sharded training checkpoint into one fp32 `model.safetensors` that `load_pretrained` reads.

    python tools/consolidate_ckpt.py CHECKPOINT_DIR OUTPUT.safetensors [--tag TAG]

CHECKPOINT_DIR is `<run.output_dir>/checkpoints` (its `latest` is used unless --tag names another) or one
`global_step*` directory. The weights are the owners' fp32 masters, not the bf16 compute copies. The output
is streamed tensor by tensor, so a 2B model never needs more than one tensor in memory; it is written to a
temporary name and renamed, and an incomplete checkpoint is refused with the missing rank files named.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from pathlib import Path

from safetensors import safe_open

from lipnext_scale.checkpoint import FORMAT, IncompleteCheckpoint, resolve_checkpoint
from lipnext_scale.pretrained import RECIPE_KEY

DTYPE_BYTES = {"F32": 4}


def master_sources(tag_dir: Path, manifest: dict) -> dict[str, tuple[Path, str]]:
    """{parameter name: (rank file, tensor key)} for every parameter's fp32 master."""
    # Format v2 keys each state object's tensors by its name ("optimizer/…"); v1 files had none.
    prefix = "optimizer/" if manifest.get("format") == FORMAT else ""
    return {name: (tag_dir / file, f"{prefix}{name}/master") for name, file in manifest["owners"].items()}


def stream_safetensors(sources: dict[str, tuple[Path, str]], output: Path, metadata: dict[str, str]) -> None:
    """Write the safetensors format by hand: header first (from shapes alone), then each tensor's bytes."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, (file, key) in sources.items():
        with safe_open(str(file), framework="pt") as f:
            piece = f.get_slice(key)
            dtype, shape = piece.get_dtype(), piece.get_shape()
        if dtype != "F32":
            raise ValueError(f"{file}: {key} is {dtype}, expected F32 masters")
        size = DTYPE_BYTES[dtype]
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data section to 8 bytes
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for _name, (file, key) in sources.items():
            with safe_open(str(file), framework="pt") as f:
                out.write(f.get_tensor(key).contiguous().numpy().tobytes())
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint_dir", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--tag", help="checkpoint tag, e.g. global_step1000 (default: the one in `latest`)")
    args = parser.parse_args(argv)
    try:
        tag_dir, manifest = resolve_checkpoint(args.checkpoint_dir, args.tag)
        sources = master_sources(tag_dir, manifest)
        stream_safetensors(sources, args.output, {RECIPE_KEY: json.dumps(manifest["recipe"])})
    except (IncompleteCheckpoint, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {len(sources)} fp32 tensors from {tag_dir} (step {manifest['step']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
