"""The sweep of ``--sweep``: training-step time and peak memory versus the series terms (plain,
Neumann and recomputed gradient), the blocks per scale and the batch size; its table and CSV.
"""

from __future__ import annotations

import csv
import dataclasses

from benchmarks.phases import BenchConfig

# The n_terms, blocks-per-scale and batch-size points of --sweep.
SWEEP_TERMS = (2, 5, 10, 20)
SWEEP_BLOCKS = (1, 2, 4)
SWEEP_BATCHES = (16, 32, 64)
# The gradients of the n_terms axis: the plain series, the Neumann gradient, and the plain
# series with every block recomputed in the backward pass.
SWEEP_GRADIENTS = {"plain": {"neumann_gradient": False, "recompute": False},
                   "neumann": {"neumann_gradient": True, "recompute": False},
                   "recompute": {"neumann_gradient": False, "recompute": True}}


def sweep(base: BenchConfig, steps: int, spawn, log=None) -> list[dict]:
    """Training-step time and peak memory versus series terms (plain, Neumann, recompute),
    blocks per scale and batch size; one row per point.

    ``spawn(phase, cfg) -> dict`` runs a phase and returns its figures (the driver's
    ``benchmarks.run._spawn_phase``: each point in its own process)."""
    points = []
    for gradient, overrides in SWEEP_GRADIENTS.items():
        for n in SWEEP_TERMS:
            points.append(("n_terms", n, {"n_terms": n, **overrides}, base.batch_size, gradient))
    n_scales = len(base.overrides.get("blocks", ())) or 3
    for b in SWEEP_BLOCKS:
        points.append(("blocks_per_scale", b, {"blocks": (b,) * n_scales}, base.batch_size,
                       "plain"))
    for batch in SWEEP_BATCHES:
        points.append(("batch_size", batch, {}, batch, "plain"))
    rows = []
    for axis, value, overrides, batch, gradient in points:
        cfg = dataclasses.replace(base, overrides={**base.overrides, **overrides},
                                  batch_size=batch, steps=steps)
        if log:
            log(f"[sweep {base.preset}] {axis}={value} gradient={gradient} ...")
        result = spawn("train", cfg)
        rows.append({
            "preset": base.preset, "xla": base.xla, "axis": axis, "value": value,
            "gradient": gradient, "batch_size": batch,
            "train_step_s": result["train_step_s"],
            "train_img_per_s": result["train_img_per_s"],
            "train_cpu_s_per_step": result["train_cpu_s_per_step"],
            "peak_rss_gb": result["train_peak_rss_gb"],
            "rss_before_gb": result["train_rss_before_gb"],
        })
    return rows


def sweep_table(rows: list[dict]) -> str:
    lines = [f"{'preset':<24} {'axis':<17} {'value':>5} {'gradient':<8} {'batch':>5} "
             f"{'step s':>8} {'cpu s':>7} {'img/s':>7} {'peak GB':>8} {'base GB':>8}"]
    for r in rows:
        lines.append(f"{r['preset']:<24} {r['axis']:<17} {r['value']:>5} {r['gradient']:<8} "
                     f"{r['batch_size']:>5} {r['train_step_s']:>8.3f} {r['train_cpu_s_per_step']:>7.2f} "
                     f"{r['train_img_per_s']:>7.1f} {r['peak_rss_gb']:>8.2f} "
                     f"{r['rss_before_gb']:>8.2f}")
    return "\n".join(lines)


def write_sweep_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
