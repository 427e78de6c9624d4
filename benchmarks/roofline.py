"""Arithmetic bounds of the training step and the forward pass (``--phases=roofline``).

What limits a step that is made of dense float32 kernels is how many floating-point
operations it has to do and how fast this machine can do them. This module measures both:

* ``train_step``/``inference``: the FLOPs of one training step (forward, log-det, backward of
  both, per the preset's training estimator; the optimizer and the post-step power iterations
  are listed separately) and of one ``encode`` call, counted from the ops of the traced
  TensorFlow graphs and their static shapes (2 FLOPs per multiply-add; convolutions, their two
  gradients and matrix products: the elementwise ops are not counted);
* ``matmul_gflop_per_s``: the rate of a large float32 matrix product on all cores, the
  practical peak of the dense kernels here;
* ``isolated_convs_s``: every convolution of the step (or forward) run alone, one distinct
  shape at a time, at the batch's shape and with the graph's attributes, summed over the
  step's instances: the time the step's convolutions take without anything else.

From them: ``floor_s_at_matmul_peak`` (FLOPs / peak) and the throughput ceilings
``img_per_s_at_matmul_peak`` and ``img_per_s_isolated_convs``. A target above the first
ceiling cannot be met by any implementation that does these FLOPs in float32 on this machine.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

import numpy as np

from benchmarks.measure import _time_calls
from benchmarks.phases import BenchConfig, register_phase

if TYPE_CHECKING:
    import tensorflow as tf

CONV_TYPES = ("Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter")
MATMUL_TYPES = ("MatMul", "BatchMatMulV2", "BatchMatMulV3")
# Function-valued attributes of control-flow ops; a While body runs `loop_trips` times.
_BRANCH_ATTRS = ("then_branch", "else_branch", "f", "body", "cond")


def _shape(tensor) -> list[int]:
    dims = tensor.shape.as_list()
    if any(d is None for d in dims):
        raise ValueError(f"{tensor.name} has a dynamic shape {dims}; trace with static shapes.")
    return dims


def op_flops(op) -> float:
    """FLOPs of one convolution or matrix-product op (2 per multiply-add), 0 for other ops.

    The three convolution ops cost the same multiply-adds, ``N Ho Wo Co kh kw Ci``: the
    forward computes the output ``[N, Ho, Wo, Co]``, the two gradients contract the output's
    gradient of that shape with the input or the filter ``[kh, kw, Ci, Co]``.
    """
    if op.type in CONV_TYPES:
        filt = (op.inputs[1] if op.type != "Conv2DBackpropFilter" else op.outputs[0])
        out = op.outputs[0] if op.type == "Conv2D" else op.inputs[2]
        kh, kw, ci, _ = _shape(filt)
        return 2.0 * float(np.prod(_shape(out))) * kh * kw * ci
    if op.type in MATMUL_TYPES:
        a = _shape(op.inputs[0])
        adj_a = op.get_attr("transpose_a" if op.type == "MatMul" else "adj_x")
        k = a[-2] if adj_a else a[-1]
        return 2.0 * float(np.prod(_shape(op.outputs[0]))) * k
    return 0.0


def _live_ops(graph) -> list:
    """The ops the graph's outputs depend on (data or control), in graph order: what is left
    after dead-code elimination (a tape's gradient, e.g., also builds the filter gradients of
    a vector-Jacobian product, which nothing uses and Grappler removes before running)."""
    roots = [t.op for t in graph.outputs] + list(getattr(graph, "control_outputs", []))
    live, stack = set(), roots
    while stack:
        op = stack.pop()
        if op in live:
            continue
        live.add(op)
        stack.extend(t.op for t in op.inputs)
        stack.extend(op.control_inputs)
    return [op for op in graph.get_operations() if op in live]


def graph_ops(graph, loop_trips: int = 1, _scale: int = 1):
    """Yields ``(op, times executed)`` over the live ops of a graph and of the function graphs
    it calls."""
    for op in _live_ops(graph):
        yield op, _scale
        for attr in _BRANCH_ATTRS:
            try:
                fn = op.get_attr(attr)
            except ValueError:
                continue
            name = getattr(fn, "name", None)
            if name is None or name not in graph._functions:  # noqa: SLF001
                continue
            body = graph._functions[name].graph  # noqa: SLF001
            trips = loop_trips if (op.type in ("While", "StatelessWhile") and attr == "body") else 1
            yield from graph_ops(body, loop_trips, _scale * trips)


def count_flops(concrete_fn, loop_trips: int = 1) -> dict:
    """``{"gflop": total, "by_type": {op type: {"count", "gflop"}}, "convs": [(op, n)]}``."""
    by_type = collections.defaultdict(lambda: {"count": 0, "gflop": 0.0})
    convs = []
    for op, times in graph_ops(concrete_fn.graph, loop_trips):
        flops = op_flops(op)
        if not flops:
            continue
        by_type[op.type]["count"] += times
        by_type[op.type]["gflop"] += times * flops / 1e9
        if op.type in CONV_TYPES:
            convs.append((op, times))
    return {"gflop": sum(v["gflop"] for v in by_type.values()), "by_type": dict(by_type),
            "convs": convs}


def _median_seconds(fn, calls: int) -> float:
    """Median wall time of ``calls`` calls after one untimed (tracing) call."""
    return _time_calls(fn, calls, warmup=1)[0]


def matmul_gflop_per_s(n: int = 2048, calls: int = 10) -> float:
    """float32 ``[n, n] x [n, n]`` products per second on all cores, in GFLOP/s."""
    import tensorflow as tf

    # Variables, not constants: Grappler would fold a product of constants away.
    a = tf.Variable(tf.random.stateless_normal([n, n], seed=[1, 2]))
    b = tf.Variable(tf.random.stateless_normal([n, n], seed=[3, 4]))
    fn = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)[:1, :1]))
    return 2.0 * n**3 / _median_seconds(fn, calls) / 1e9


def _conv_attrs(op) -> dict:
    names = ("strides", "padding", "explicit_paddings", "data_format", "dilations")
    return {k: op.get_attr(k) for k in names if k in op.node_def.attr}


def _isolated_fn(op, repeats: int):
    """A function running ``op`` ``repeats`` times, alone, on distinct random inputs of its
    static shapes (several per call so that the function-call overhead does not count; the
    executor may run two at once, as it does in the step)."""
    import tensorflow as tf

    attrs = _conv_attrs(op)
    raw = getattr(tf.raw_ops, op.type)
    seeds = iter(range(1, 4 * repeats + 1))

    def rand(tensor):  # a variable: Grappler would fold a convolution of constants away
        return tf.Variable(tf.random.stateless_normal(_shape(tensor), seed=[next(seeds), 0]))

    calls = []
    for _ in range(repeats):
        if op.type == "Conv2D":
            args = dict(input=rand(op.inputs[0]), filter=rand(op.inputs[1]))
        elif op.type == "Conv2DBackpropInput":
            args = dict(input_sizes=tf.constant(_shape(op.outputs[0])), filter=rand(op.inputs[1]),
                        out_backprop=rand(op.inputs[2]))
        else:
            args = dict(input=rand(op.inputs[0]), filter_sizes=tf.constant(_shape(op.outputs[0])),
                        out_backprop=rand(op.inputs[2]))
        calls.append(args)

    def run():
        return tf.add_n([tf.reduce_sum(raw(**args, **attrs)[:1, :1]) for args in calls])

    return tf.function(run)


def isolated_convs(convs, calls: int = 5, repeats: int = 8) -> dict:
    """The listed convolution instances timed alone: each distinct (type, shapes, attributes)
    runs ``repeats`` times per call, the median of ``calls`` calls over ``repeats`` is its
    time, counted as often as the graph runs it.

    Returns ``{"s": total seconds, "shapes": [...]}``, the shapes sorted by their share of the
    total, each with its count, seconds per run and GFLOP/s.
    """
    groups = {}
    for op, times in convs:
        key = (op.type, tuple(tuple(_shape(t)) for t in (*op.inputs, *op.outputs)),
               repr(sorted(_conv_attrs(op).items())))
        if key not in groups:
            groups[key] = [op, 0]
        groups[key][1] += times
    rows = []
    for (op_type, shapes, _), (op, count) in groups.items():
        seconds = _median_seconds(_isolated_fn(op, repeats), calls) / repeats
        filt = shapes[1] if op_type != "Conv2DBackpropFilter" else shapes[-1]
        rows.append({"type": op_type, "filter": list(filt),
                     "output": list(shapes[-1] if op_type == "Conv2D" else shapes[2]),
                     "count": count, "s_each": seconds, "s_total": count * seconds,
                     "gflop_per_s": op_flops(op) / seconds / 1e9})
    rows.sort(key=lambda r: -r["s_total"])
    return {"s": sum(r["s_total"] for r in rows), "shapes": rows}


def summary(counted: dict, batch: int, peak: float, isolated: dict, top: int = 8) -> dict:
    """The JSON figures of one counted function (the ``top`` costliest conv shapes)."""
    return {
        "gflop": counted["gflop"],
        "by_type": counted["by_type"],
        "floor_s_at_matmul_peak": counted["gflop"] / peak,
        "img_per_s_at_matmul_peak": batch * peak / counted["gflop"],
        "isolated_convs_s": isolated["s"],
        "isolated_convs_gflop_per_s": counted["gflop"] / isolated["s"],
        "img_per_s_isolated_convs": batch / isolated["s"],
        "isolated_conv_shapes": len(isolated["shapes"]),
        "costliest_conv_shapes": isolated["shapes"][:top],
    }


def roofline(model, x: tf.Tensor, loss_fn, *, loop_trips: int, calls: int = 5) -> dict:
    """The figures of the module docstring for ``model`` on the batch ``x``.

    Args:
      model: a built ``IResNetFlow``.
      x: the batch, static shape ``[B, *input_shape]``.
      loss_fn: ``loss_fn(x) -> scalar`` of the training step (forward and log-det).
      loop_trips: trips of a ``tf.while_loop`` body (``n_terms - 1`` for the Neumann-gradient
        series, whose last product is the surrogate's).
      calls: timed calls per isolated convolution shape and of the matmul (medians).
    """
    import tensorflow as tf

    from tf_iresnet import update_spectral_norms

    variables = model.trainable_variables

    def grads():
        with tf.GradientTape() as tape:
            loss = loss_fn(x)
        return tape.gradient(loss, variables)

    batch = int(x.shape[0])
    peak = matmul_gflop_per_s(calls=calls)
    out = {"matmul_gflop_per_s": peak, "matmul_shape": [2048, 2048, 2048]}
    for name, fn in (("train_step", grads), ("inference", lambda: model.encode(x))):
        counted = count_flops(tf.function(fn).get_concrete_function(), loop_trips)
        out[name] = summary(counted, batch, peak, isolated_convs(counted["convs"], calls))

    def power():
        update_spectral_norms(model)
        return tf.constant(0.0)

    out["power_iterations_gflop"] = count_flops(tf.function(power).get_concrete_function())[
        "gflop"]
    return out


@register_phase("roofline")
def _phase_roofline(cfg: BenchConfig, model, x) -> dict:
    """FLOPs of the step and of ``encode``, the matmul peak, the convolutions timed alone."""
    import tensorflow as tf

    from tf_iresnet.tasks.density import DensityTrainConfig, make_train_step

    step_fn = make_train_step(DensityTrainConfig(preset=cfg.preset, batch_size=cfg.batch_size,
                                                 seed=cfg.seed))
    step = tf.constant(0, tf.int64)
    # The Neumann series' loop runs n_terms - 1 products; the last comes with the surrogate.
    trips = model.config.n_terms - 1 if model.config.neumann_gradient else model.config.n_terms
    return {"roofline": roofline(model, x, lambda t: step_fn(model, t, step)[0],
                                 loop_trips=trips, calls=cfg.steps)}
