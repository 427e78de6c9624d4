"""Shared pieces of the benchmarks tests: a tiny model's config, sweep rows, a figure check."""

import math

from benchmarks.phases import BenchConfig
from benchmarks.sweep import SWEEP_BATCHES, SWEEP_BLOCKS, SWEEP_GRADIENTS, SWEEP_TERMS

TINY = {"blocks": [1, 1, 1], "hidden_channels": 4, "power_iterations": 1}


def tiny(**kwargs) -> BenchConfig:
    """bench_cifar_small shrunk to blocks 1-1-1, width 4, batch 4, two timed steps."""
    return BenchConfig(preset="bench_cifar_small", batch_size=4, steps=2, warmup=1,
                       overrides={**TINY, **kwargs.pop("overrides", {})}, **kwargs)


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def sweep_rows() -> list[dict]:
    """Made-up sweep rows on every axis; the gradients' lines are distinct, so none hides
    another in the chart."""
    rows = []
    for axis, values, gradients in (("n_terms", SWEEP_TERMS, tuple(SWEEP_GRADIENTS)),
                                    ("blocks_per_scale", SWEEP_BLOCKS, ("plain",)),
                                    ("batch_size", SWEEP_BATCHES, ("plain",))):
        for i, g in enumerate(gradients):
            for v in values:
                rows.append({"preset": "p", "xla": True, "axis": axis, "value": v,
                             "gradient": g, "batch_size": 64, "train_step_s": 0.1 * v * (i + 1),
                             "train_img_per_s": 640 / v, "train_cpu_s_per_step": 0.2 * v,
                             "peak_rss_gb": 1 + 0.01 * v * (i + 1), "rss_before_gb": 0.8})
    return rows
