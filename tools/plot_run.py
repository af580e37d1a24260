#!/usr/bin/env python
"""Plot a training run from its `metrics.jsonl`: one PNG with loss, clean/certified accuracy, learning rate,
orthogonality error (log scale) and throughput against optimizer steps.

    python tools/plot_run.py RUN_DIR [--out PNG]        (default: RUN_DIR/run.png)

Step records are the lines with a "loss"; the per-epoch `{"eval": ...}` records give clean accuracy and the
CRA at each certified radius. `data_wait_share` is drawn on a second axis when the run logged it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class RunError(ValueError):
    pass


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(step records, eval records) of RUN_DIR/metrics.jsonl; a clear error naming the file otherwise."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise RunError(f"{path}: no such file (is {run_dir} a run directory written by lipnext_scale?)")
    steps, evals = [], []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if n == len(lines):
                continue  # a run still writing its last line
            raise RunError(f"{path}:{n}: not JSON ({err})") from None
        if "eval" in record and "step" in record:
            evals.append(record)
        elif "loss" in record and "step" in record:
            steps.append(record)
    if not steps:
        raise RunError(f"{path}: no step records (lines with 'step' and 'loss'); nothing to plot")
    return _last_per_step(steps), _last_per_step(evals)


def _last_per_step(records: list[dict]) -> list[dict]:
    """One record per step, the last written, in step order: a log that an older version (or a crash
    between a checkpoint and its log line) left with repeated steps draws no loops."""
    return sorted({r["step"]: r for r in records}.values(), key=lambda r: r["step"])


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    steps, evals = read_metrics(run_dir)
    out = Path(out) if out else run_dir / "run.png"
    x = [r["step"] for r in steps]

    def series(key):
        pts = [(r["step"], r[key]) for r in steps if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(3, 2, figsize=(12, 10), dpi=100)
    ax = axes[0, 0]
    ax.plot(x, [r["loss"] for r in steps], color="tab:blue")
    ax.set_title("training loss")

    ax = axes[0, 1]
    if "acc" in steps[0]:
        ax.plot(*series("acc"), color="0.6", lw=1, label="train batch")
    if evals:
        ex = [r["step"] for r in evals]
        ax.plot(ex, [r["eval"]["clean_acc"] for r in evals], "o-", color="k", label="clean (test)")
        for i, row in enumerate(evals[-1]["eval"].get("cra", [])):
            ys = [r["eval"]["cra"][i]["cra"] if i < len(r["eval"].get("cra", [])) else None for r in evals]
            ax.plot(ex, ys, "o-", ms=3, label=f"CRA ε={row['eps']:.3f}")
    ax.set_ylim(0, 1)
    ax.set_title("accuracy")
    ax.legend(fontsize=7)

    ax = axes[1, 0]
    ax.plot(*series("lr"), color="tab:green")
    ax.set_title("learning rate")

    ax = axes[1, 1]
    xs, ys = series("orthogonality_error")
    ax.plot(xs, [max(v, 1e-300) for v in ys], color="tab:purple")
    ax.set_yscale("log")
    ax.set_title("orthogonality error max|XᵀX − I|")

    ax = axes[2, 0]
    ax.plot(*series("images_per_s"), color="tab:orange", label="images/s")
    ax.set_title("throughput")
    ax.set_ylabel("images/s")
    wx, wy = series("data_wait_share")
    if wx:
        twin = ax.twinx()
        twin.plot(wx, wy, color="tab:red", lw=1, ls="--", label="data wait share")
        twin.set_ylim(0, 1)
        twin.set_ylabel("data wait share")
        twin.legend(fontsize=7, loc="lower right")

    ax = axes[2, 1]
    ax.plot(*series("grad_norm"), color="tab:brown")
    ax.set_title("gradient norm")

    for a in axes.flat:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/run.png")
    args = ap.parse_args(argv)
    try:
        out = plot_run(args.run_dir, args.out)
    except RunError as err:
        print(f"plot_run: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
