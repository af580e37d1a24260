#!/usr/bin/env python
"""Re-check a shard set against its manifest.

    verify_shards.py MANIFEST [--decode]

Checks, shard by shard: the manifest's structure; that each tar holds only regular-file members named
``{key}.jpg`` / ``{key}.cls`` (valid keys, each sample exactly one of each, keys unique over the whole
set); that every ``.cls`` is a decimal label in ``[0, num_classes)`` short enough for the DALI
loader; that every ``.jpg`` starts like a JPEG (with ``--decode``: decodes completely with PIL as RGB
or greyscale); the sample count; that the ``.idx`` file is byte-identical to the index DALI's
``wds2idx`` produces for that tar; the tar's sha256; and the ``skipped`` list.

The archives are only read: member names are checked as data, never used as paths.

Exit status 0 with a one-line summary, or 2 with a line naming the first bad shard (and sample).
The checks live in lipnext_scale/data/verify.py; this is their command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lipnext_scale.data.verify import VerifyError, verify

EXIT_BAD = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--decode", action="store_true", help="also decode every JPEG completely (slow)")
    args = parser.parse_args(argv)
    try:
        summary = verify(args.manifest, decode=args.decode)
    except VerifyError as exc:
        print(f"BAD {exc}")
        return EXIT_BAD
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
