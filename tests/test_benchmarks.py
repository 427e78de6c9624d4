"""benchmarks.run on a tiny model: every phase, the JSON record, the sweep chart (no timing
asserts: the figures only have to exist, be finite and positive)."""

import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf

from benchmarks import run

TINY = {"blocks": [1, 1, 1], "hidden_channels": 4, "power_iterations": 1}


def _tiny(**kwargs):
    return run.BenchConfig(preset="bench_cifar_small", batch_size=4, steps=2, warmup=1,
                           overrides=TINY, **kwargs)


def _positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_every_phase_in_process():
    cfg = _tiny()
    record = {}
    for phase in run.PHASES:
        record.update(run.run_phase(phase, cfg))
    for key in ("train_img_per_s", "train_step_s", "inference_img_per_s", "eval_bpd_img_per_s",
                "inverse_s", "train_peak_rss_gb", "inverse_peak_rss_gb"):
        assert _positive(record[key]), (key, record[key])
    assert math.isfinite(record["train_loss_bpd"]) and math.isfinite(record["eval_bpd"])
    assert len(record["train_step_times_s"]) == 2
    for solver in run.SOLVERS:
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
        assert _positive(record["train_live_tensor_peak_gb"])
        assert record["train_live_tensor_peak_unavailable"] is None
    # The fused step does the Trainer's computations: same loss after the same updates.
    fused = run.run_phase("train", _tiny(train_step="fused"))
    np.testing.assert_allclose(fused["train_loss_bpd"], record["train_loss_bpd"], rtol=1e-4)


def test_inverse_under_xla():
    # Under XLA the inverse cannot print warnings; convergence comes from the solver stats.
    record = run.run_phase("inverse", _tiny(xla=True))
    for solver in run.SOLVERS:
        assert record["inverse"][solver]["converged"]
        assert _positive(record["inverse"][solver]["inverse_s"])
        assert record["inverse"][solver]["inverse_max_err"] < 1e-4


def test_main_prints_one_json_record_per_preset(tmp_path, capsys):
    out = tmp_path / "bench.json"
    records = run.main([
        "--preset=bench_cifar_small", "--batch_size=4", "--steps=2", "--warmup=1", "--xla=off",
        "--phases=inference", "--threads=1,1", f"--output={out}",
        *[f"--override={k}={json.dumps(v)}" for k, v in TINY.items()]])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    assert len(records) == 1 and lines == records
    record = records[0]
    assert record["preset"] == "bench_cifar_small"
    assert _positive(record["inference_img_per_s"]) and _positive(record["peak_rss_gb"])
    settings = record["settings"]
    assert settings["xla"] is False and settings["batch_size"] == 4
    assert settings["intra_op_threads"] == 1 and settings["inter_op_threads"] == 1
    assert settings["versions"]["tensorflow"] == tf.__version__
    assert settings["kernels"] == run.kernels()
    assert isinstance(settings["cpu"]["vector_extensions"], list)
    assert json.loads(out.read_text())["records"] == records


def test_sweep_outputs(tmp_path):
    rows = []
    for axis, values, gradients in (("n_terms", run.SWEEP_TERMS, tuple(run.SWEEP_GRADIENTS)),
                                    ("blocks_per_scale", run.SWEEP_BLOCKS, ("plain",)),
                                    ("batch_size", run.SWEEP_BATCHES, ("plain",))):
        for i, g in enumerate(gradients):  # distinct lines, so none hides another
            for v in values:
                rows.append({"preset": "p", "xla": True, "axis": axis, "value": v,
                             "gradient": g, "batch_size": 64, "train_step_s": 0.1 * v * (i + 1),
                             "train_img_per_s": 640 / v, "train_cpu_s_per_step": 0.2 * v,
                             "peak_rss_gb": 1 + 0.01 * v * (i + 1), "rss_before_gb": 0.8})
    png = tmp_path / "sweep.png"
    run.sweep_png(rows, str(png))
    run.write_sweep_csv(rows, str(tmp_path / "sweep.csv"))
    image = tf.io.decode_png(tf.io.read_file(str(png)))
    assert image.shape == (440, 960, 3)
    assert len(np.unique(image.numpy().reshape(-1, 3), axis=0)) >= 5  # axes and text, 3 lines
    assert "n_terms" in run.sweep_table(rows)
    assert os.path.getsize(tmp_path / "sweep.csv") > 0


def test_bad_flags():
    with pytest.raises(SystemExit):
        run.main(["--phases=nope"])
    with pytest.raises(SystemExit):
        run.main(["--threads=-1"])


def _forward_conv_flops(model, batch):
    """2 B H W kh kw Ci Co summed over the model's (stride-1, SAME) convolutions."""
    from tf_iresnet.lipschitz import SpectralNormalization

    total = 0.0
    for branch in model.branches:
        for layer in branch.layers:
            if isinstance(layer, SpectralNormalization):
                kh, kw, ci, co = layer.layer.kernel.shape
                h, w = layer._input_hw
                total += 2.0 * batch * h * w * kh * kw * ci * co
    return total / 1e9


@pytest.mark.parametrize("n_terms", [2, 5])
def test_roofline_counts_the_flops_of_the_graph(n_terms):
    from benchmarks import roofline
    from tf_iresnet import presets

    cfg = run.BenchConfig(preset="bench_cifar_small", batch_size=4, steps=1, warmup=1,
                          overrides={**TINY, "n_terms": n_terms})
    record = run.run_phase("roofline", cfg)["roofline"]
    model = presets.build("bench_cifar_small", blocks=(1, 1, 1), hidden_channels=4)
    per_pass = _forward_conv_flops(model, 4)
    # encode: every convolution once on the batch, plus once on the batch-1 power-iteration
    # vector v of its spectral norm (sigma = <u, A v>).
    assert record["inference"]["gflop"] == pytest.approx(per_pass * 5 / 4, rel=1e-9)
    # The step: forward 1, n vector-Jacobian products, their backward 2 each, the forward's
    # backward 2: 3 + 3n passes (a little less: nothing needs the gradient of the probe).
    # Counting dead ops too (the filter gradients a tape builds for each product) gives ~2x.
    passes = record["train_step"]["gflop"] / per_pass
    assert 3 + 3 * n_terms - 1.5 <= passes <= 3 + 3 * n_terms + 0.5, passes
    assert set(record["train_step"]["by_type"]) == set(roofline.CONV_TYPES)
    for part in ("train_step", "inference"):
        figures = record[part]
        assert _positive(figures["isolated_convs_s"]) and figures["isolated_conv_shapes"] >= 3
        assert figures["costliest_conv_shapes"][0]["count"] >= 1
        assert figures["img_per_s_at_matmul_peak"] == pytest.approx(
            4 * record["matmul_gflop_per_s"] / figures["gflop"])
    assert _positive(record["matmul_gflop_per_s"]) and _positive(record["power_iterations_gflop"])


def test_op_family_maps_onednn_kernel_names_back():
    assert run.op_family("_MklNativeConv2D") == "Conv2D"
    assert run.op_family("_MklConv2DBackpropInput") == "Conv2DBackpropInput"
    assert run.op_family("_MklNativeFusedConv2D") == "Conv2D"
    assert run.op_family("_FusedConv2D") == "Conv2D"
    assert run.op_family("_MklFusedMatMul") == "MatMul"
    assert run.op_family("Conv2D") == "Conv2D"
    assert run.op_family("FusedBatchNormV3") == "FusedBatchNormV3"
    assert run.op_family("_Retval") == "_Retval"
