"""benchmarks.sweep: the points it runs, its table and its CSV."""

import csv

from _bench import sweep_rows, tiny

from benchmarks.sweep import (
    SWEEP_BATCHES,
    SWEEP_BLOCKS,
    SWEEP_GRADIENTS,
    SWEEP_TERMS,
    sweep,
    sweep_table,
    write_sweep_csv,
)


def test_sweep_table_and_csv(tmp_path):
    rows = sweep_rows()
    assert "n_terms" in sweep_table(rows)
    path = tmp_path / "sweep.csv"
    write_sweep_csv(rows, str(path))
    with open(path, newline="") as f:
        read = list(csv.DictReader(f))
    assert len(read) == len(rows) and list(read[0]) == list(rows[0])


def test_sweep_spawns_one_train_phase_per_point():
    seen = []

    def spawn(phase, cfg):  # stands in for the driver's subprocess
        seen.append((phase, cfg))
        return {"train_step_s": 0.5, "train_img_per_s": cfg.batch_size / 0.5,
                "train_cpu_s_per_step": 1.0, "train_peak_rss_gb": 2.0,
                "train_rss_before_gb": 1.0}

    base = tiny()
    rows = sweep(base, steps=3, spawn=spawn)
    assert len(rows) == len(seen) == (len(SWEEP_GRADIENTS) * len(SWEEP_TERMS)
                                      + len(SWEEP_BLOCKS) + len(SWEEP_BATCHES))
    assert {phase for phase, _ in seen} == {"train"}
    assert all(cfg.steps == 3 for _, cfg in seen)
    recompute = [cfg for (_, cfg), r in zip(seen, rows, strict=True)
                 if r["gradient"] == "recompute"]
    assert [c.overrides["n_terms"] for c in recompute] == list(SWEEP_TERMS)
    assert all(c.overrides["recompute"] and c.overrides["hidden_channels"] == 4
               for c in recompute)
    assert [r["batch_size"] for r in rows if r["axis"] == "batch_size"] == list(SWEEP_BATCHES)
    assert rows[0]["peak_rss_gb"] == 2.0
