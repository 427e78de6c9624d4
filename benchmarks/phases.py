"""The benchmark phases: one preset's model and synthetic batch (``_setup``), then one phase
function per measurement, each returning its figures (``run_phase``).

Everything here runs inside a phase subprocess (TensorFlow is imported there only). The
phases ``train``, ``inference``, ``eval_bpd``, ``inverse``, ``breakdown`` and ``profile`` are
defined here; ``roofline`` is defined and registered in ``benchmarks.roofline`` (import it to
have it in ``PHASE_FNS``).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

from benchmarks.measure import (
    _LAST_CPU_S,
    _live_tensor_peak_gb,
    _time_calls,
    kernels,
    op_family,
    peak_rss_gb,
    rss_gb,
    trimmed_rss_gb,
)

# The phases run by default.
PHASES = ("train", "inference", "eval_bpd", "inverse")
SOLVERS = ("fixed_point", "anderson")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmark run (one preset, one XLA setting).

    Attributes:
      preset: a density preset of ``tf_iresnet.presets``.
      batch_size: images per batch.
      steps: timed calls per phase (the median is reported).
      warmup: untimed calls before timing (tracing, XLA compilation, allocator warm-up).
      xla: ``jit_compile`` the timed functions (the train step's forward and backward pass, as
        ``Trainer(jit_compile=True)`` does; the whole step with ``train_step="fused"``).
      intra_threads, inter_threads: ``tf.config.threading`` settings (0: TensorFlow's default).
      overrides: ``DensityConfig`` fields replaced in the preset (e.g. ``n_terms``, ``blocks``).
      train_step: ``"trainer"`` (the project's ``Trainer`` step) or ``"fused"`` (the same
        computations in one function, XLA-compiled as a whole when ``xla``).
      eval_estimator: ``"train"`` or ``"eval"``, the log-det estimator of ``eval_bpd``.
      inverse_atol, inverse_rtol: per-block fixed-point tolerance of the inverse.
      inverse_max_iter: budget of g evaluations per block for the inverse.
      seed: seeds the weights, the data and the estimator probes.
    """

    preset: str = "bench_cifar_small"
    batch_size: int = 64
    steps: int = 10
    warmup: int = 2
    xla: bool = False
    intra_threads: int = 0
    inter_threads: int = 0
    overrides: dict = dataclasses.field(default_factory=dict)
    train_step: str = "trainer"
    eval_estimator: str = "train"
    inverse_atol: float = 1e-5
    inverse_rtol: float = 0.0
    inverse_max_iter: int = 200
    seed: int = 0


def _setup(cfg: BenchConfig):
    """Threads, seeds, the model (ActNorms initialized on the batch) and the batch."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    from tf_iresnet import presets

    if cfg.intra_threads or cfg.inter_threads:  # must precede TensorFlow's initialization
        tf.config.threading.set_intra_op_parallelism_threads(cfg.intra_threads)
        tf.config.threading.set_inter_op_parallelism_threads(cfg.inter_threads)
    keras.utils.set_random_seed(cfg.seed)
    overrides = dict(cfg.overrides)
    if "blocks" in overrides:
        overrides["blocks"] = tuple(overrides["blocks"])
    model = presets.build(cfg.preset, **overrides)
    # Synthetic 8-bit images, uniformly dequantized: (v + u) / 256.
    rng = np.random.default_rng(cfg.seed)
    shape = (cfg.batch_size, *model.config.input_shape)
    levels = model.config.num_levels or 256
    v = rng.integers(0, levels, size=shape)
    x = tf.constant(((v + rng.uniform(size=shape)) / levels).astype("float32"))
    model.initialize(x)
    return model, x


def _phase_train(cfg: BenchConfig, model, x) -> dict:
    import tensorflow as tf

    from tf_iresnet import update_spectral_norms
    from tf_iresnet.tasks.density import (
        DensityTrainConfig,
        make_optimizer,
        make_train_step,
    )
    from tf_iresnet.tasks.run import power_iteration_step
    from tf_iresnet.training import Trainer

    task_cfg = DensityTrainConfig(preset=cfg.preset, batch_size=cfg.batch_size, seed=cfg.seed,
                                  jit_compile=cfg.xla)
    optimizer = make_optimizer(task_cfg)
    step_fn = make_train_step(task_cfg)
    with tempfile.TemporaryDirectory() as model_dir:
        trainer = Trainer(
            strategy=tf.distribute.get_strategy(), model=model, optimizer=optimizer,
            train_step_fn=step_fn, model_dir=model_dir, total_steps=1 << 30,
            post_step_fn=power_iteration_step, jit_compile=cfg.xla, progress=False)
        if cfg.train_step == "trainer":
            def call():
                loss, _, _ = trainer.train_step(x)
                return loss
        else:
            variables = model.trainable_variables

            def fused():
                # The step of this update, as the Trainer passes it (apply_gradients counts).
                step = tf.convert_to_tensor(optimizer.iterations)
                with tf.GradientTape() as tape:
                    loss, _ = step_fn(model, x, step)
                grads = tape.gradient(loss, variables)
                optimizer.apply_gradients(zip(grads, variables, strict=True))
                update_spectral_norms(model)
                return loss

            call = tf.function(fused, jit_compile=cfg.xla)
        median, times, first = _time_calls(call, cfg.steps, cfg.warmup)
        base, live, why_not = _live_tensor_peak_gb(call)
        loss = float(call())
    return {"train_step_s": median, "train_img_per_s": cfg.batch_size / median,
            "train_live_tensors_before_gb": base, "train_live_tensor_peak_gb": live,
            "train_live_tensor_peak_unavailable": why_not,
            "train_cpu_s_per_step": _LAST_CPU_S[0],
            "train_step_times_s": times, "train_first_call_s": first, "train_loss_bpd": loss}


def _phase_inference(cfg: BenchConfig, model, x) -> dict:
    import tensorflow as tf

    encode = tf.function(model.encode, jit_compile=cfg.xla)
    median, times, first = _time_calls(lambda: encode(x), cfg.steps, cfg.warmup)
    return {"inference_s": median, "inference_img_per_s": cfg.batch_size / median,
            "inference_cpu_s": _LAST_CPU_S[0],
            "inference_times_s": times, "inference_first_call_s": first}


def _phase_eval_bpd(cfg: BenchConfig, model, x) -> dict:
    import tensorflow as tf

    def log_prob():
        log_pz, logdet = model.log_prob_parts(x, mode=cfg.eval_estimator, seed=(cfg.seed, 1))
        return tf.reduce_mean(model.bits_per_dim(log_pz + logdet))

    fn = tf.function(log_prob, jit_compile=cfg.xla)
    median, times, first = _time_calls(fn, cfg.steps, cfg.warmup)
    c = model.config
    if cfg.eval_estimator == "train":
        est = dict(logdet=c.logdet, n_terms=c.n_terms, n_samples=c.n_samples)
    else:
        est = dict(logdet=c.eval_logdet, n_terms=c.eval_n_terms, n_samples=c.eval_n_samples)
    return {"eval_bpd_s": median, "eval_bpd_img_per_s": cfg.batch_size / median,
            "eval_bpd_cpu_s": _LAST_CPU_S[0],
            "eval_bpd_times_s": times, "eval_bpd": float(fn()),
            "eval_estimator": {"mode": cfg.eval_estimator, **est}}


def _phase_inverse(cfg: BenchConfig, model, x) -> dict:
    import tensorflow as tf

    from tf_iresnet import converge_spectral_norms, fixed_point

    # As after loading a trained model: converged norm estimates, so every block is a
    # contraction with Lip(g) <= coeff^3 (not timed).
    converge_spectral_norms(model)
    encode = tf.function(model.encode, jit_compile=cfg.xla)
    z = encode(x)
    out = {}
    for solver in SOLVERS:
        def decode(z, solver=solver):
            with fixed_point.collect_inverse_stats() as stats:
                x_rec = model.decode(z, inverse=fixed_point.InverseConfig(
                    solver=solver, atol=cfg.inverse_atol, rtol=cfg.inverse_rtol,
                    max_iter=cfg.inverse_max_iter,
                    # A tf.print warning cannot be XLA-compiled; XLA drops the assertion of
                    # "raise" instead. Convergence is reported from the solver stats.
                    on_failure="raise" if cfg.xla else "warn"))
            iterations = tf.stack([s.iterations for s in stats])
            converged = tf.reduce_all(tf.stack([s.converged for s in stats]))
            return x_rec, iterations, converged

        fn = tf.function(decode, jit_compile=cfg.xla)
        median, times, _ = _time_calls(lambda fn=fn: fn(z), cfg.steps, cfg.warmup)
        x_rec, iterations, converged = fn(z)
        iterations = iterations.numpy()
        out[solver] = {
            "inverse_s": median,
            "inverse_cpu_s": _LAST_CPU_S[0],
            "inverse_max_err": float(tf.reduce_max(tf.abs(x - x_rec))),
            "iterations_max": int(iterations.max()),
            "iterations_mean": float(iterations.mean()),
            "g_evaluations": int(iterations.sum()),
            "converged": bool(converged),
            "inverse_times_s": times,
        }
    return {"inverse": out, "inverse_s": out["fixed_point"]["inverse_s"],
            "inverse_max_err": out["fixed_point"]["inverse_max_err"],
            "inverse_tolerance": {"atol": cfg.inverse_atol, "rtol": cfg.inverse_rtol,
                                  "max_iter": cfg.inverse_max_iter}}


def _phase_breakdown(cfg: BenchConfig, model, x) -> dict:
    """Times the parts of a training step separately (each its own ``tf.function``)."""
    import keras
    import tensorflow as tf

    from tf_iresnet import update_spectral_norms

    variables = model.trainable_variables
    optimizer = keras.optimizers.Adamax(3e-3)
    optimizer.build(variables)
    seed = tf.constant([cfg.seed, 7], tf.int32)

    def loss_fn(mode):
        log_pz, logdet = model.log_prob_parts(x, mode=mode, seed=seed)
        return -tf.reduce_mean(log_pz + (0.0 if logdet is None else logdet))

    def grads(mode):
        with tf.GradientTape() as tape:
            loss = loss_fn(mode)
        return tape.gradient(loss, variables)

    def prior_only():  # forward and backward without log-det: log p(z) only
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(model.prior().log_prob(model.encode(x)))
        return tape.gradient(loss, variables)

    zeros = [tf.zeros_like(v) for v in variables]

    def apply():
        optimizer.apply_gradients(zip(zeros, variables, strict=True))
        return tf.constant(0.0)

    def power():
        update_spectral_norms(model)
        return tf.constant(0.0)

    parts = {
        "encode (forward, no log-det)": lambda: model.encode(x),
        "forward + log-det (train estimator), no gradient": lambda: loss_fn("train"),
        "forward + backward without log-det": prior_only,
        "forward + log-det + backward": lambda: grads("train"),
        "Adamax update": apply,
        "power iterations (post-step)": power,
    }
    out, cpu = {}, {}
    for name, fn in parts.items():
        compiled = tf.function(fn, jit_compile=cfg.xla and "Adamax" not in name)
        out[name] = _time_calls(compiled, cfg.steps, cfg.warmup)[0]
        cpu[name] = _LAST_CPU_S[0]
    return {"breakdown_s": out, "breakdown_cpu_s": cpu}


def _phase_profile(cfg: BenchConfig, model, x) -> dict:
    """A ``tf.profiler`` trace of ``steps`` training steps (the Trainer's), aggregated by op
    type: the ops where the step spends its time (host CPU thread time, all threads)."""
    import collections
    import glob

    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    from tf_iresnet.tasks.density import (
        DensityTrainConfig,
        make_optimizer,
        make_train_step,
    )
    from tf_iresnet.tasks.run import power_iteration_step
    from tf_iresnet.training import Trainer

    task_cfg = DensityTrainConfig(preset=cfg.preset, batch_size=cfg.batch_size, seed=cfg.seed)
    with tempfile.TemporaryDirectory() as model_dir:
        trainer = Trainer(
            strategy=tf.distribute.get_strategy(), model=model,
            optimizer=make_optimizer(task_cfg), train_step_fn=make_train_step(task_cfg),
            model_dir=model_dir, total_steps=1 << 30, post_step_fn=power_iteration_step,
            jit_compile=cfg.xla, progress=False)
        for _ in range(max(cfg.warmup, 1)):
            float(trainer.train_step(x)[0])
        logdir = os.path.join(model_dir, "profile")
        tf.profiler.experimental.start(logdir)
        for _ in range(cfg.steps):
            float(trainer.train_step(x)[0])
        tf.profiler.experimental.stop()
        (path,) = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
    by_type = collections.Counter()
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        names = {k: m.name for k, m in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = names.get(event.metadata_id, "")
                if ":" not in name:  # "op_name:OpType" events are TensorFlow (or XLA) ops
                    continue
                op_type = name.rsplit(":", 1)[1].strip()
                # Containers (the function call, the executor's run) would count ops twice.
                if op_type in ("Process", "Run") or op_type.startswith("__inference"):
                    continue
                by_type[op_type] += event.duration_ps * 1e-12
    total = sum(by_type.values()) or 1.0
    by_family = collections.Counter()
    for op_type, seconds in by_type.items():
        by_family[op_family(op_type)] += seconds
    top = {k: {"s_per_step": v / cfg.steps, "share": v / total}
           for k, v in by_family.most_common(15)}
    raw = {k: v / cfg.steps for k, v in by_type.most_common(15)}
    return {"profile_op_types": top, "profile_kernel_names_s_per_step": raw,
            "profile_op_s_per_step": total / cfg.steps}


PHASE_FNS = {"train": _phase_train, "inference": _phase_inference,
             "eval_bpd": _phase_eval_bpd, "inverse": _phase_inverse,
             "breakdown": _phase_breakdown, "profile": _phase_profile}


def register_phase(name: str):
    """Decorator: adds ``fn(cfg, model, x) -> dict`` to ``PHASE_FNS`` as phase ``name``."""

    def register(fn):
        PHASE_FNS[name] = fn
        return fn

    return register


def run_phase(phase: str, cfg: BenchConfig) -> dict:
    """Runs one phase in this process; returns its figures and peak memory."""
    model, x = _setup(cfg)
    base = rss_gb()
    load = os.getloadavg()[0]
    result = PHASE_FNS[phase](cfg, model, x)
    result.setdefault("load_average_1min", {})[phase] = [round(load, 2),
                                                         round(os.getloadavg()[0], 2)]
    result[f"{phase}_peak_rss_gb"] = peak_rss_gb()
    result[f"{phase}_rss_after_gb"] = trimmed_rss_gb()
    result["kernels"] = kernels()
    result[f"{phase}_rss_before_gb"] = base
    return result
