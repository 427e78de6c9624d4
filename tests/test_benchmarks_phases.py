"""benchmarks.phases on a tiny model: every phase in-process (no timing asserts: the figures
only have to exist, be finite and positive)."""

import math

import numpy as np
import pytest
from _bench import positive, tiny

from benchmarks.phases import PHASES, SOLVERS, run_phase


@pytest.mark.slow  # over the CI time budget: `make test-slow`
def test_every_phase_in_process():
    cfg = tiny()
    record = {}
    for phase in PHASES:
        record.update(run_phase(phase, cfg))
    for key in ("train_img_per_s", "train_step_s", "inference_img_per_s", "eval_bpd_img_per_s",
                "inverse_s", "train_peak_rss_gb", "inverse_peak_rss_gb"):
        assert positive(record[key]), (key, record[key])
    assert math.isfinite(record["train_loss_bpd"]) and math.isfinite(record["eval_bpd"])
    assert len(record["train_step_times_s"]) == 2
    for solver in SOLVERS:
        inv = record["inverse"][solver]
        assert inv["converged"] and inv["iterations_max"] >= 1
        assert 0.0 <= inv["inverse_max_err"] < 1e-4
    assert record["eval_estimator"]["mode"] == "train"
    # The live-tensor peak exists only where the allocator keeps statistics (oneDNN on).
    assert record["kernels"] in ("oneDNN", "plain")
    if record["train_live_tensor_peak_gb"] is None:
        assert record["kernels"] == "plain"
        assert "keeps no statistics" in record["train_live_tensor_peak_unavailable"]
    else:
        assert positive(record["train_live_tensor_peak_gb"])
        assert record["train_live_tensor_peak_unavailable"] is None
    # The fused step does the Trainer's computations: same loss after the same updates.
    fused = run_phase("train", tiny(train_step="fused"))
    np.testing.assert_allclose(fused["train_loss_bpd"], record["train_loss_bpd"], rtol=1e-4)


def test_inverse_under_xla():
    # Under XLA the inverse cannot print warnings; convergence comes from the solver stats.
    record = run_phase("inverse", tiny(xla=True))
    for solver in SOLVERS:
        assert record["inverse"][solver]["converged"]
        assert positive(record["inverse"][solver]["inverse_s"])
        assert record["inverse"][solver]["inverse_max_err"] < 1e-4
