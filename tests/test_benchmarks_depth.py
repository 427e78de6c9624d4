"""benchmarks.depth: the depth sweep, the full-depth runs and the targets summary."""

import dataclasses
import json

import pytest
from _bench import TINY, positive, tiny

from benchmarks import depth, run


def test_depth_sweep_and_full_depth_train_a_step_on_a_tiny_model():
    """Each new point is a real `train` phase in its own process: one step, no warm-up. The
    stored backward pass, the quicker to trace: the invertible one's gradients are tested in
    tests/test_invertible_gradient.py, the sweep's logic below."""
    base = dataclasses.replace(tiny(overrides={"gradient_memory": "stored"}), steps=1, warmup=0)
    rows = depth.depth_sweep(base, run._spawn_phase, depths=((2, 1, 1),), memories=("stored",))
    assert [r["blocks"] for r in rows] == [[2, 1, 1]]
    for r in rows:
        assert r["gradient_memory"] == "stored" and r["batch_size"] == 4
        assert all(positive(r[k]) for k in ("train_step_s", "train_img_per_s", "peak_rss_gb",
                                            "rss_before_gb", "rss_after_gb"))
    # The paper's MNIST model at the tiny widths and depth of `base`'s overrides.
    (full,) = depth.full_depth(base, run._spawn_phase, presets=("mnist_density_paper",))
    assert full["preset"] == "mnist_density_paper" and full["gradient_memory"] == "stored"
    assert positive(full["peak_rss_gb"]) and positive(full["train_first_call_s"])
    # No warm-up: the first step (tracing included) is the only one, so no step time is given.
    assert full["train_step_s"] is None and full["train_s_per_image"] is None


def _fake_spawn(calls):
    def spawn(phase, cfg, timeout=None):
        calls.append((phase, cfg))
        blocks = sum(cfg.overrides.get("blocks", [1]))
        peak = 1.0 + (0.01 if cfg.overrides.get("gradient_memory") == "invertible" else 0.1) \
            * blocks
        return {"train_step_s": 0.5, "train_img_per_s": 8.0 * blocks, "train_first_call_s": 2.0,
                "train_peak_rss_gb": peak, "train_rss_before_gb": 0.9,
                "train_rss_after_gb": peak - 0.05, "train_live_tensor_peak_gb": peak - 0.8, "kernels": "plain",
                "load_average_1min": {phase: [0.1, 0.1]}, "inference_img_per_s": 1200.0}
    return spawn


def test_cli_reports_depth_rows_and_every_target(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(run, "_spawn_phase", _fake_spawn(calls))
    run.main(["--preset=bench_mnist", "--xla=off", "--phases=train", "--depth_sweep",
              "--depth_blocks=1,1,1;4,4,4", "--full_depth=mnist_density_paper",
              *[f"--override={k}={json.dumps(v)}" for k, v in TINY.items()]])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    assert [next(iter(line)) for line in lines] == (
        ["preset"] + ["depth_sweep"] * 4 + ["full_depth", "targets"])
    sweep = [line["depth_sweep"] for line in lines if "depth_sweep" in line]
    assert {(r["gradient_memory"], tuple(r["blocks"])) for r in sweep} == {
        (m, b) for m in ("invertible", "stored") for b in ((1, 1, 1), (4, 4, 4))}
    assert calls[-1][1].preset == "mnist_density_paper" and calls[-1][1].steps == 1
    assert calls[-1][1].warmup == 1  # the CLI's default warm-up of 2, capped at 1
    (full,) = [line["full_depth"] for line in lines if "full_depth" in line]
    assert full["train_step_s"] == 0.5
    assert full["train_s_per_image"] == pytest.approx(0.5 / full["batch_size"])
    targets = lines[-1]["targets"]
    # 12 blocks against 3: invertible 1.12 / 1.03, stored 2.2 / 1.3.
    assert targets["depth_growth"]["invertible"]["value"] == pytest.approx(1.12 / 1.03)
    assert targets["depth_growth"]["invertible"]["met"]
    assert not targets["depth_growth"]["stored"]["met"]
    assert targets["full_depth_peak_gb"]["mnist_density_paper"]["met"]  # 1.03 GB <= 4
    # bench_mnist: 24 img/s against the reference's 8.2 (2.93x >= 2.5), peak 1.3 / 4.7.
    mnist = targets["bench_mnist"]["xla_off"]["REFERENCE.md section 3"]
    assert mnist["train_x"]["value"] == pytest.approx(24 / 8.2) and mnist["train_x"]["met"]
    assert mnist["peak_memory_x"]["value"] == pytest.approx(1.3 / 4.7)


def test_targets_compare_each_xla_setting_with_every_reference():
    records = [
        {"preset": "bench_cifar_small", "settings": {"xla": True, "kernels": "plain"},
         "train_img_per_s": 38.0},
        {"preset": "digits_density", "settings": {"xla": False}, "train_img_per_s": 1.0},
        {"preset": "bench_cifar_small", "settings": {"xla": False, "kernels": "plain"},
         "train_img_per_s": 65.0, "inference_img_per_s": 1000.0,
         "phase_peak_rss_gb": {"train": 1.5},
         "roofline": {"train_step": {"img_per_s_isolated_convs": 130.0},
                      "inference": {"img_per_s_isolated_convs": 1340.0}}},
    ]
    cold = {"preset": "bench_mnist", "settings": {"xla": False, "warmup": 0},
            "train_img_per_s": 0.1, "phase_peak_rss_gb": {"train": 2.0}}
    here = {"bench_cifar_small": {"train_img_per_s": 26.0, "inference_img_per_s": 800.0}}
    out = depth.targets(records + [cold], [], [], side_by_side=here)
    mnist = out.pop("bench_mnist")["xla_off"]["REFERENCE.md section 3"]
    assert set(mnist) == {"peak_memory_x"}  # no throughput from a cold call
    assert set(out) == {"bench_cifar_small"}  # digits has no reference
    small = out["bench_cifar_small"]
    assert set(small) == {"xla_on", "xla_off"}
    off = small["xla_off"]
    assert off["kernels"] == "plain"
    assert list(off)[1:] == ["side by side on this machine", depth.REFERENCE_AVX2_CPU,
                             "REFERENCE.md section 3"]  # the closest match first
    mine = off["side by side on this machine"]
    assert mine["train_x"] == {"value": pytest.approx(2.5), "target": ">= 3.0", "met": False,
                               "ceiling_x": pytest.approx(5.0)}
    assert mine["inference_x"]["value"] == pytest.approx(1.25)
    assert "peak_memory_x" not in mine  # that run gave no memory figure
    avx2 = off[depth.REFERENCE_AVX2_CPU]
    assert avx2["train_x"]["value"] == pytest.approx(65 / 19.0) and avx2["train_x"]["met"]
    assert avx2["inference_x"]["ceiling_x"] == pytest.approx(1340 / 394)
    assert avx2["peak_memory_x"]["value"] == pytest.approx(1.5 / (1.76 * 2**30 / 1e9))
    figures = off["REFERENCE.md section 3"]
    assert figures["inference_x"]["value"] == pytest.approx(1000 / 670)
    assert not figures["inference_x"]["met"]  # 1.49x < 1.6x
    assert figures["peak_memory_x"]["value"] == pytest.approx(1.5 / 1.8)
    assert not figures["peak_memory_x"]["met"]  # 0.83x > 0.7x
    assert small["xla_on"][depth.REFERENCE_AVX2_CPU]["train_x"]["value"] == pytest.approx(2.0)
    table = depth.targets_table(out)
    assert "bench_cifar_small xla_on (plain kernels) vs side by side" in table
    assert "train_x 2.50x >= 3.0 NOT met (ceiling 5.00x)" in table
