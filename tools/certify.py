#!/usr/bin/env python
"""Certify a saved LipNeXt on a shard set: clean accuracy, CRA, per-class figures, radii, a CRA curve.

    python tools/certify.py RUN_DIR_OR_WEIGHTS --data MANIFEST [--eps 36/255 72/255 108/255 1]
        [--sound | --cascade] [--out DIR] [--audit K] [--batch-size N] [--device cpu|cuda] [--offload]

Writes certify.json and cra_curve.png to --out (default: <run dir>/certify-<data name>). The work is
`lipnext_scale.certify_run.certify_model_file`; this file only reads the command line. A point counts as
certified at ε when its radius > ε. Exit 2: a request that cannot be honoured (message says why);
exit 3: the audit found a violation.
"""

from __future__ import annotations

import argparse
import sys
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lipnext_scale.audit import APGD_INSTALL  # noqa: E402
from lipnext_scale.certify import DEFAULT_EPS, exact_fp32_matmuls  # noqa: E402
from lipnext_scale.certify_run import CertifyError, certify_model_file  # noqa: E402

EXIT_VIOLATION = 3


def parse_eps(text: str) -> float:
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        msg = f"not a radius: {text!r} (a number or a fraction such as 36/255)"
        raise argparse.ArgumentTypeError(msg) from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"radius must be positive, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("weights", type=Path, help="a run directory (with model.safetensors) or a model file")
    ap.add_argument("--data", type=Path, required=True, help="manifest of the evaluation shard set")
    ap.add_argument(
        "--eps",
        type=parse_eps,
        nargs="+",
        default=list(DEFAULT_EPS),
        metavar="EPS",
        help="L2 radii in [0,1] pixel space at which to report CRA; fractions allowed "
        "(default: 36/255 72/255 108/255 1)",
    )
    how = ap.add_mutually_exclusive_group()
    how.add_argument(
        "--sound",
        action="store_const",
        const="sound",
        dest="mode",
        default="fp32",
        help="certify the float64 classifier with its rounding error bounded (docs/soundness.md); "
        "default: fp32 mode, forward-pass rounding not covered",
    )
    how.add_argument(
        "--cascade",
        action="store_const",
        const="cascade",
        dest="mode",
        help="fp32 first, then re-check in sound mode the points fp32 certifies; reports both counts",
    )
    ap.add_argument("--batch-size", type=int, default=None, help="default: the recipe's certify.batch_size")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for certify.json and cra_curve.png (default: <run dir>/certify-<data name>)",
    )
    ap.add_argument(
        "--audit",
        type=int,
        default=0,
        metavar="K",
        help="attack the first K certified points: PGD-L2 and APGD-L2 at 0.999·radius, then a float32 "
        "rounding search at the radius; any prediction change inside a radius is a violation (exit 3)",
    )
    ap.add_argument("--audit-steps", type=int, default=100, help="attack iterations (default 100)")
    ap.add_argument("--audit-restarts", type=int, default=3, help="PGD restarts (default 3)")
    ap.add_argument(
        "--no-apgd",
        action="store_true",
        help=f"audit without APGD (otherwise it needs torchattacks: {APGD_INSTALL})",
    )
    ap.add_argument("--limit", type=int, default=None, metavar="N", help="certify only the first N images")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument(
        "--offload", action="store_true", help="stream the weights in (accelerate), no second copy"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    return ap


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = parser()
    args = ap.parse_args(argv)
    if args.audit < 0:
        ap.error("--audit K needs K >= 0")
    if args.audit and not args.no_apgd:
        try:
            import torchattacks  # noqa: F401
        except ImportError:
            ap.error(f"--audit runs APGD, which needs torchattacks: {APGD_INSTALL} (or pass --no-apgd)")
    previous = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with exact_fp32_matmuls():  # every forward here, the audit's included, in IEEE fp32
            result = certify_model_file(
                args.weights,
                args.data,
                eps_list=list(args.eps),
                out=args.out,
                batch_size=args.batch_size,
                mode=args.mode,
                audit_points=args.audit,
                audit_steps=args.audit_steps,
                audit_restarts=args.audit_restarts,
                apgd=not args.no_apgd,
                limit=args.limit,
                device=args.device,
                offload=args.offload,
            )
    except CertifyError as e:
        ap.error(str(e))
    finally:
        torch.set_num_threads(previous)
    print(
        f"[{result['mode']}] clean {100 * result['clean_acc']:.2f}%  "
        + "  ".join(f"CRA@{r['eps']:.4f} {100 * r['cra']:.2f}%" for r in result["cra"])
        + f"  (L = {result['lipschitz_bound']:.9f}, n = {result['num_samples']})"
    )
    for mode, counts in result["certified_per_mode"].items():
        print(f"  certified by {mode}: " + ", ".join(f"{c} @ {float(e):.4f}" for e, c in counts.items()))
    print(
        "  time: "
        + ", ".join(
            f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in result["timing"].items()
        )
    )
    print(f"wrote {result['certify_json']} and {result['cra_curve_png']}")
    if args.audit:
        a = result["audit"]
        print(
            f"audit ({a['mode']}): {a['num_points']} points, attacks {a['attacks']}, "
            f"{len(a['violations'])} violations (rate {a['violation_rate']:.3f})"
        )
        if a["violations"]:
            return EXIT_VIOLATION
    return 0


if __name__ == "__main__":
    sys.exit(main())
