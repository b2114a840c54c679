"""PNG plot of a `moe-ep bench` sweep: latency vs tokens per rank, one line per backend.

One row of panels per shape (hidden, experts, top-k, dtype, world size); columns are
dispatch, combine and total latency. Both axes are logarithmic because tokens are swept in
powers of two and latencies span orders of magnitude between backends; the shaded band is
the p10-p90 spread of the repetitions. matplotlib is imported here only (an optional
dependency: `pip install moe-ep[bench]`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_PHASES = (
    ("dispatch_us", "dispatch"),
    ("combine_us", "combine"),
    ("total_us", "dispatch + combine"),
)
_MAX_SHAPES = 6  # more rows of panels stop being readable; the JSON has every point


def _plain(value: float, _pos: object = None) -> str:
    return f"{value:,.0f}" if value >= 1 else f"{value:g}"


def shape_key(row: Mapping[str, Any]) -> tuple:
    return (row["hidden"], row["num_experts"], row["topk"], row["dtype"], row["world_size"])


def plot_latency(rows: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Write the plot of the measured rows (status "ok") of a sweep to `path` (PNG).

    rows: dicts as written to results.json (`backend`, `tokens_per_rank`, `hidden`,
    `num_experts`, `topk`, `dtype`, `world_size`, and `{dispatch,combine,total}_us` each
    `{median, p10, p90}` in microseconds). Raises ValueError when no row was measured.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        raise ValueError("plot_latency: no measured rows (status 'ok') to plot")
    shapes = sorted({shape_key(r) for r in ok})[:_MAX_SHAPES]
    backends = sorted({r["backend"] for r in ok})
    colors = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(backends)}
    markers = dict(zip(backends, "osD^vP*Xh<>", strict=False))

    legend_in, row_in = 0.7, 3.9  # figure height: a row of panels each, plus the legend
    height = row_in * len(shapes) + legend_in
    fig, axes = plt.subplots(len(shapes), len(_PHASES), squeeze=False,
                             figsize=(5.2 * len(_PHASES), height))
    for i, shape in enumerate(shapes):
        hidden, experts, topk, dtype, world = shape
        for j, (key, label) in enumerate(_PHASES):
            ax = axes[i][j]
            for backend in backends:
                pts = sorted((r for r in ok if r["backend"] == backend and shape_key(r) == shape),
                             key=lambda r: r["tokens_per_rank"])
                if not pts:
                    continue
                x = [r["tokens_per_rank"] for r in pts]
                med = [r[key]["median"] for r in pts]
                ax.fill_between(x, [r[key]["p10"] for r in pts], [r[key]["p90"] for r in pts],
                                color=colors[backend], alpha=0.15, linewidth=0)
                ax.plot(x, med, marker=markers.get(backend, "o"), markersize=4,
                        color=colors[backend], label=backend)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="major", alpha=0.35)
            ax.grid(True, which="minor", alpha=0.12)
            ax.set_title(f"{label}\nH={hidden}, E={experts}, top-{topk}, {dtype}, "
                         f"{world} ranks", fontsize=10)
            ax.set_xlabel("tokens per rank")
            ax.set_ylabel("latency per call (µs)")
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            # Label 1-2-5 steps, not only decades: latencies of one backend often stay within
            # one decade, which would leave the axis with a single label.
            ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(_plain))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    handles, labels = axes[0][0].get_legend_handles_labels()
    for row in axes:
        for ax in row:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), frameon=False,
               title="backend (line: median; band: p10-p90)")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, legend_in / height, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
