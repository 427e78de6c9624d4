"""The PNG chart of the sweep, drawn with matplotlib (Agg backend: no display needed)."""

from __future__ import annotations

# One color per gradient of the n_terms axis (matplotlib's default cycle: blue, orange, green).
COLORS = {"plain": "#1f77b4", "neumann": "#ff7f0e", "recompute": "#2ca02c"}
AXES = {"n_terms": "series terms", "blocks_per_scale": "blocks per scale",
        "batch_size": "batch size"}
METRICS = {"train_step_s": "train step (s)", "peak_rss_gb": "peak RSS (GB)"}
# The PNG's size in pixels (width, height) and its resolution.
SIZE, DPI = (960, 440), 100


def sweep_png(rows: list[dict], path: str) -> None:
    """Writes a 2 x 3 grid of line charts: rows = step seconds, peak RSS GB; columns = series
    terms (blue plain, orange Neumann, green recompute), blocks per scale, batch size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A figure of its own on the Agg canvas: no pyplot state, no display, whatever backend
    # the calling process has chosen.
    fig = Figure(figsize=(SIZE[0] / DPI, SIZE[1] / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(len(METRICS), len(AXES), squeeze=False)
    for i, (metric, metric_label) in enumerate(METRICS.items()):
        for j, (axis, axis_label) in enumerate(AXES.items()):
            ax = grid[i][j]
            series: dict = {}
            for r in rows:
                if r["axis"] == axis:
                    series.setdefault(r["gradient"], []).append((r["value"], r[metric]))
            for name, points in series.items():
                xs, ys = zip(*sorted(points), strict=True)
                ax.plot(xs, ys, marker="o", markersize=4, color=COLORS.get(name, "black"),
                        label=name)
            top = max((y for pts in series.values() for _, y in pts), default=0.0)
            ax.set_ylim(0, top * 1.1 or 1.0)
            ax.set_xticks(sorted({x for pts in series.values() for x, _ in pts}))
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if i == len(METRICS) - 1:
                ax.set_xlabel(axis_label, fontsize=8)
            if j == 0:
                ax.set_ylabel(metric_label, fontsize=8)
            if len(series) > 1:
                ax.legend(fontsize=7)
    fig.savefig(path, format="png", dpi=DPI)
