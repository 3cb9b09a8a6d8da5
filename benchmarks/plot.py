#!/usr/bin/env python3
"""Turn a results JSONL (from bench.py) into one PNG: our speed relative to FA3, per case.

    python3 benchmarks/plot.py results.jsonl -o kernels_vs_fa3.png

Left panel: kernel cases, bars = speed relative to FA3 (FA3 time / provider time; right of the
1.0 line is faster than FA3). Where a run had no FA3, the bars show the fraction of the measured
roofline instead, and the axis says so. Right panel (when e2e rows exist): end-to-end output
tokens/s relative to FLASH_ATTN per workload. For every (case, provider) the newest row wins.
Exits 0 without a plot when matplotlib is missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

COLORS = {
    "portable": "#1f77b4",
    "portable_grouped": "#9467bd",
    "CUSTOM": "#1f77b4",
    "triton_attn": "#ff7f0e",
    "TRITON_ATTN": "#ff7f0e",
    "flashinfer": "#2ca02c",
    "FLASHINFER": "#2ca02c",
    "fa3": "#7f7f7f",
    "FLASH_ATTN": "#7f7f7f",
}


def newest(rows: list[dict[str, Any]], key: tuple[str, ...], metric: str) -> list[dict[str, Any]]:
    """The newest row per key among rows that have ``metric`` (file order breaks ties)."""
    best: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in rows:
        if r.get(metric) is None:
            continue
        k = tuple(r.get(x) for x in key)
        if k not in best or str(r.get("ts", "")) >= str(best[k].get("ts", "")):
            best[k] = r
    return list(best.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="JSONL written by bench.py / e2e_check.py")
    ap.add_argument("-o", "--output", default="kernels_vs_fa3.png")
    ap.add_argument(
        "--providers",
        default="portable,portable_grouped,triton_attn,flashinfer",
        help="kernel providers to draw (FA3 is the 1.0 line)",
    )
    args = ap.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is not installed; no plot written")
        return 0

    if not Path(args.results).is_file():
        print(f"plot: {args.results} does not exist; no plot written")
        return 0
    rows = C.read_jsonl(args.results)
    kern = [r for r in rows if r.get("kind") == "kernel"]
    providers = [p for p in args.providers.split(",") if p]
    metric, xlabel = "speed_vs_fa3", "speed relative to FA3 (>1 = faster than FA3)"
    sel = newest(kern, ("case", "provider"), metric)
    if not sel:
        metric, xlabel = "frac_roofline", "fraction of the measured roofline (no FA3 in run)"
        sel = newest(kern, ("case", "provider"), metric)
    sel = [r for r in sel if r["provider"] in providers]
    e2e = [
        r
        for r in newest(
            [r for r in rows if r.get("kind") == "e2e"], ("backend", "workload", "quick"), "vs_fa3"
        )
    ]
    if not sel and not e2e:
        print(f"plot: no kernel or e2e rows with speed data in {args.results}")
        return 0

    # Case order: as first seen in the file (bench.py writes the baseline order).
    order: list[str] = []
    for r in kern:
        if r["case"] not in order and any(s["case"] == r["case"] for s in sel):
            order.append(r["case"])
    n_panels = 2 if e2e else 1
    height = max(3.0, 0.42 * len(order) + 1.5)
    fig, axes = plt.subplots(
        1,
        n_panels,
        figsize=(7.5 * n_panels, height),
        squeeze=False,
        gridspec_kw={"width_ratios": [2, 1][:n_panels]},
    )
    ax = axes[0][0]
    if sel:
        provs = [p for p in providers if any(r["provider"] == p for r in sel)]
        bar_h = 0.8 / max(len(provs), 1)
        for j, p in enumerate(provs):
            ys, xs = [], []
            for i, case in enumerate(order):
                match = [r for r in sel if r["case"] == case and r["provider"] == p]
                if match:
                    ys.append(i + (j - (len(provs) - 1) / 2) * bar_h)
                    xs.append(float(match[0][metric]))
            bars = ax.barh(ys, xs, height=bar_h, color=COLORS.get(p), label=p)
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
        ax.set_yticks(range(len(order)), order, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", lw=1, label="FA3 = 1" if metric == "speed_vs_fa3" else None)
        ax.set_xlabel(xlabel)
        # Below the axes: inside, it would cover the last case's bars.
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=4, fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    info = next((r for r in reversed(sel or e2e) if r.get("gpu")), {})
    title = f"{info.get('gpu', '?')}  commit {str(info.get('git_commit') or '?')[:10]}"
    ax.set_title("kernels: " + title, fontsize=9)
    if e2e:
        ax2 = axes[0][1]
        wls = sorted({r["workload"] for r in e2e})
        bes = [
            b
            for b in ("CUSTOM", "TRITON_ATTN", "FLASHINFER")
            if any(r["backend"] == b for r in e2e)
        ]
        bh = 0.8 / max(len(bes), 1)
        for j, b in enumerate(bes):
            ys, xs = [], []
            for i, w in enumerate(wls):
                m = [r for r in e2e if r["backend"] == b and r["workload"] == w]
                if m:
                    ys.append(i + (j - (len(bes) - 1) / 2) * bh)
                    xs.append(float(m[0]["vs_fa3"]))
            bars = ax2.barh(ys, xs, height=bh, color=COLORS.get(b), label=b)
            ax2.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
        ax2.set_yticks(range(len(wls)), wls, fontsize=8)
        ax2.invert_yaxis()
        ax2.axvline(1.0, color="black", lw=1, label="FLASH_ATTN = 1")
        ax2.set_xlabel("end-to-end out tok/s relative to FLASH_ATTN")
        ax2.legend(loc="lower right", fontsize=8)
        ax2.grid(axis="x", alpha=0.3)
        ax2.set_title("vLLM LLM.generate", fontsize=9)
    fig.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=120)
    print(f"plot: wrote {args.output} ({len(sel)} kernel bars, {len(e2e)} e2e bars)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
