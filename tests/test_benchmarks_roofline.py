"""benchmarks.roofline: the FLOPs counted from the traced graphs of a tiny model."""

import pytest
from _bench import TINY, positive

from benchmarks import roofline
from benchmarks.phases import BenchConfig, run_phase


def _forward_conv_flops(model, batch):
    """2 B H W kh kw Ci Co summed over the model's (stride-1, SAME) convolutions."""
    from tf_iresnet import SpectralNormalization

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
    from tf_iresnet import presets

    cfg = BenchConfig(preset="bench_cifar_small", batch_size=4, steps=1, warmup=1,
                          overrides={**TINY, "n_terms": n_terms, "neumann_gradient": False})
    record = run_phase("roofline", cfg)["roofline"]
    model = presets.build("bench_cifar_small", blocks=(1, 1, 1), hidden_channels=4)
    per_pass = _forward_conv_flops(model, 4)
    # encode: every convolution once on the batch, plus once on the batch-1 power-iteration
    # vector v of its spectral norm (sigma = <u, A v>).
    assert record["inference"]["gflop"] == pytest.approx(per_pass * 5 / 4, rel=1e-9)
    # The step (plain series gradient): forward 1, n vector-Jacobian products, their backward 2 each, the forward's
    # backward 2: 3 + 3n passes (a little less: nothing needs the gradient of the probe).
    # Counting dead ops too (the filter gradients a tape builds for each product) gives ~2x.
    passes = record["train_step"]["gflop"] / per_pass
    assert 3 + 3 * n_terms - 1.5 <= passes <= 3 + 3 * n_terms + 0.5, passes
    # Every product is counted: convolutions, and the matrix products that replace some of
    # their gradients (filter gradients; on plain kernels the input gradients are forward
    # convolutions with the adjoint kernel, so Conv2DBackpropInput may not occur at all).
    types = set(record["train_step"]["by_type"])
    assert {"Conv2D"} <= types <= set(roofline.CONV_TYPES) | set(roofline.MATMUL_TYPES), types
    for part in ("train_step", "inference"):
        figures = record[part]
        assert positive(figures["isolated_convs_s"]) and figures["isolated_conv_shapes"] >= 3
        assert figures["costliest_conv_shapes"][0]["count"] >= 1
        assert figures["img_per_s_at_matmul_peak"] == pytest.approx(
            4 * record["matmul_gflop_per_s"] / figures["gflop"])
    assert positive(record["matmul_gflop_per_s"]) and positive(record["power_iterations_gflop"])


@pytest.mark.parametrize("n_terms", [2, 5])
def test_roofline_counts_the_neumann_loop_trips(n_terms):
    # The Neumann gradient: forward 1, n vector-Jacobian products (n - 1 in the loop, whose
    # body counts once per trip, and the surrogate's), the surrogate's backward 2, the
    # forward's backward 2: n + 5 passes (and a little for the batch-1 sigma products).
    from tf_iresnet import presets

    cfg = BenchConfig(preset="bench_cifar_small", batch_size=4, steps=1, warmup=1,
                      overrides={**TINY, "n_terms": n_terms, "neumann_gradient": True})
    record = run_phase("roofline", cfg)["roofline"]
    model = presets.build("bench_cifar_small", blocks=(1, 1, 1), hidden_channels=4)
    passes = record["train_step"]["gflop"] / _forward_conv_flops(model, 4)
    assert n_terms + 5 <= passes <= n_terms + 5.25, passes
