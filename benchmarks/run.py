"""Speed and memory benchmarks of the density presets (issue #5).

Measures, per preset and XLA setting, on synthetic dequantized data of the preset's shape:

* ``train``: one full training step as ``tf_iresnet.tasks.density`` runs it (the
  ``Trainer``'s step: forward, log-det with the *training* estimator, backward, Adamax update,
  then the post-step power iterations), images per second;
* ``inference``: ``encode`` (forward without log-det), images per second;
* ``eval_bpd``: forward with log-det, no gradient, with the training estimator (default) or
  the evaluation one (``--eval_estimator=eval``), images per second;
* ``inverse``: ``decode(encode(x))`` to a per-block fixed-point tolerance (``--inverse_atol``,
  default 1e-5) with the plain fixed-point and the Anderson solvers: seconds per batch (decode
  only), the largest ``|x - x_rec|`` and the iterations used.

Every phase runs in its own subprocess so that its peak resident memory (``VmHWM``, read at
the end of the phase) is its own; the resident size after importing TensorFlow and building
the model (before the phase) is reported next to it. Timings are medians over ``--steps``
calls after ``--warmup`` untimed calls; each call ends with a host read of its result.

One JSON object per preset and XLA setting goes to stdout (one line each); ``--output``
also writes them (and the sweep) to a file. ``--sweep`` adds how the training step's time and
peak memory grow with the number of series terms (plain, Neumann and recomputed gradient),
the blocks per scale and the batch size: a table on stderr, a CSV and a PNG chart.

Examples::

    python -m benchmarks.run --preset=bench_cifar_small --xla=both
    python -m benchmarks.run --preset=bench_cifar_small,bench_cifar_width512_d1 --output=b.json
    python -m benchmarks.run --preset=bench_cifar_small --sweep --sweep_dir=/tmp/sweep
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PRESETS = ("bench_cifar_small", "bench_mnist", "bench_cifar_width512_d1")
PHASES = ("train", "inference", "eval_bpd", "inverse")
SOLVERS = ("fixed_point", "anderson")
RESULT_TAG = "BENCH_PHASE_RESULT "

# The n_terms, blocks-per-scale and batch-size points of --sweep.
SWEEP_TERMS = (2, 5, 10, 20)
SWEEP_BLOCKS = (1, 2, 4)
SWEEP_BATCHES = (16, 32, 64)
# The gradients of the n_terms axis: the plain series, the Neumann gradient, and the plain
# series with every block recomputed in the backward pass.
SWEEP_GRADIENTS = {"plain": {"neumann_gradient": False, "recompute": False},
                   "neumann": {"neumann_gradient": True, "recompute": False},
                   "recompute": {"neumann_gradient": False, "recompute": True}}


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


# ------------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (0 when unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far, in GB (1e9 bytes)."""
    kb = _status_kb("VmHWM")
    if not kb:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    return kb * 1024 / 1e9


def rss_gb() -> float:
    """Current resident set size of this process, in GB."""
    return _status_kb("VmRSS") * 1024 / 1e9


# ------------------------------------------------------------------------------- phases
# Everything below runs inside a phase subprocess (TensorFlow is imported there only).


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


def _live_tensor_peak_gb(fn) -> tuple[float | None, float | None, str | None]:
    """``(live before, peak during one call of fn, None)`` of TensorFlow's CPU allocator, in
    GB: the tensors themselves, without the runtime, oneDNN's primitive caches and the memory
    the C allocator keeps after a free (which the resident size includes).

    Only an allocator that keeps statistics can answer (TF 2.21 on CPU: with oneDNN on, not
    with TF's plain kernels); otherwise fn still runs once and the result is
    ``(None, None, reason)``.
    """
    import tensorflow as tf

    try:
        tf.config.experimental.reset_memory_stats("CPU:0")
        before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    except ValueError as err:
        float(fn())
        return None, None, f"the CPU allocator keeps no statistics ({kernels()}): {err}"
    float(fn())
    return before / 1e9, tf.config.experimental.get_memory_info("CPU:0")["peak"] / 1e9, None


def kernels() -> str:
    """Which CPU kernels TensorFlow runs in this process: ``"oneDNN"`` or ``"plain"``."""
    from tensorflow.python.util import _pywrap_util_port

    return "oneDNN" if _pywrap_util_port.IsMklEnabled() else "plain"


def cpu_description() -> dict:
    """The CPU's model name and the vector extensions TensorFlow's kernels care about (from
    ``/proc/cpuinfo``; empty where it does not exist)."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model is None:
                    model = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16",
              "amx_tile", "asimd", "sve")
    return {"model": model, "vector_extensions": [f for f in wanted if f in flags]}


def _time_calls(fn, steps: int, warmup: int) -> tuple[float, list[float], float]:
    """``(median seconds, all timed seconds, seconds of the first call)``; every call's
    result is read back to the host, so the time includes the whole computation. The median
    process CPU time per call (all threads) is kept in ``_LAST_CPU_S``: unlike wall time it
    hardly grows when other processes compete for the cores."""
    import tensorflow as tf

    def run():
        out = fn()
        for t in tf.nest.flatten(out):
            t.numpy()
        return out

    times, cpu, first = [], [], None
    for i in range(warmup + steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        elapsed = time.perf_counter() - start
        if i == 0:
            first = elapsed
        if i >= warmup:
            times.append(elapsed)
            cpu.append(time.process_time() - start_cpu)
    _LAST_CPU_S[0] = statistics.median(cpu)
    return statistics.median(times), times, first


_LAST_CPU_S = [0.0]


def _phase_train(cfg: BenchConfig, model, x) -> dict:
    import tensorflow as tf

    from tf_iresnet.spectral_norm import update_spectral_norms
    from tf_iresnet.tasks.density import (
        DensityTrainConfig,
        make_optimizer,
        make_train_step,
        power_iteration_step,
    )
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
            step_var = trainer.step_var

            def fused():
                with tf.GradientTape() as tape:
                    loss, _ = step_fn(model, x, step_var.read_value())
                grads = tape.gradient(loss, variables)
                optimizer.apply_gradients(zip(grads, variables, strict=True))
                update_spectral_norms(model)
                step_var.assign_add(1)
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
        log_pz, logdet = model.log_prob_parts(x, mode=cfg.eval_estimator, seed=(cfg.seed, 1),
                                              data_init=False)
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

    from tf_iresnet import fixed_point
    from tf_iresnet.fixed_point import InverseConfig
    from tf_iresnet.spectral_norm import converge_spectral_norms

    # As after loading a trained model: converged norm estimates, so every block is a
    # contraction with Lip(g) <= coeff^3 (not timed).
    converge_spectral_norms(model)
    encode = tf.function(model.encode, jit_compile=cfg.xla)
    z = encode(x)
    out = {}
    for solver in SOLVERS:
        def decode(z, solver=solver):
            with fixed_point.collect_inverse_stats() as stats:
                x_rec = model.decode(z, inverse=InverseConfig(
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

    from tf_iresnet.spectral_norm import update_spectral_norms

    variables = model.trainable_variables
    optimizer = keras.optimizers.Adamax(3e-3)
    optimizer.build(variables)
    seed = tf.constant([cfg.seed, 7], tf.int32)

    def loss_fn(mode):
        log_pz, logdet = model.log_prob_parts(x, mode=mode, seed=seed, data_init=False)
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
        power_iteration_step,
    )
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


def op_family(op_type: str) -> str:
    """The TensorFlow op a kernel name stands for: oneDNN's graph rewrite renames ops
    (``_MklNativeConv2D``, ``_MklFusedConv2D``, ``_FusedConv2D``, ``_MklNativeFusedMatMul``),
    so that profiles of the two kernel sets only compare once these names are mapped back."""
    for prefix in ("_MklNative", "_Mkl"):
        if op_type.startswith(prefix):
            op_type = op_type[len(prefix):]
            break
    op_type = op_type.removeprefix("_") if op_type.startswith("_Fused") else op_type
    if op_type.startswith("Fused") and op_type[len("Fused"):].startswith(("Conv", "MatMul")):
        op_type = op_type[len("Fused"):]
    return op_type


def _phase_roofline(cfg: BenchConfig, model, x) -> dict:
    """FLOPs of the step and of ``encode``, the matmul peak, the convolutions timed alone
    (`benchmarks.roofline`)."""
    import tensorflow as tf

    from benchmarks.roofline import roofline
    from tf_iresnet.tasks.density import DensityTrainConfig, make_train_step

    step_fn = make_train_step(DensityTrainConfig(preset=cfg.preset, batch_size=cfg.batch_size,
                                                 seed=cfg.seed))
    step = tf.constant(0, tf.int64)
    return {"roofline": roofline(model, x, lambda t: step_fn(model, t, step)[0],
                                 loop_trips=model.config.n_terms, calls=cfg.steps)}


_PHASE_FNS = {"train": _phase_train, "inference": _phase_inference,
              "eval_bpd": _phase_eval_bpd, "inverse": _phase_inverse,
              "breakdown": _phase_breakdown, "profile": _phase_profile,
              "roofline": _phase_roofline}


def run_phase(phase: str, cfg: BenchConfig) -> dict:
    """Runs one phase in this process; returns its figures and peak memory."""
    model, x = _setup(cfg)
    base = rss_gb()
    load = os.getloadavg()[0]
    result = _PHASE_FNS[phase](cfg, model, x)
    result.setdefault("load_average_1min", {})[phase] = [round(load, 2),
                                                         round(os.getloadavg()[0], 2)]
    result[f"{phase}_peak_rss_gb"] = peak_rss_gb()
    result["kernels"] = kernels()
    result[f"{phase}_rss_before_gb"] = base
    return result


def _phase_main(phase: str, cfg_json: str) -> None:
    cfg = BenchConfig(**json.loads(cfg_json))
    result = run_phase(phase, cfg)
    print(RESULT_TAG + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------- driver


def _spawn_phase(phase: str, cfg: BenchConfig, timeout: float | None = None) -> dict:
    """Runs ``phase`` in a fresh Python process; returns its figures."""
    cmd = [sys.executable, "-m", "benchmarks.run", f"--phase={phase}",
           f"--phase_config={json.dumps(dataclasses.asdict(cfg))}"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=root)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f"Benchmark phase {phase!r} of {cfg.preset} failed "
                       f"(exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def _versions() -> dict:
    """Library versions (read from package metadata: no TensorFlow import in the driver)."""
    from importlib import metadata

    out = {}
    for name in ("tensorflow", "keras", "tensorflow-probability"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def benchmark(cfg: BenchConfig, phases=PHASES, log=None) -> dict:
    """All ``phases`` of one preset and XLA setting, each in its own process; one record."""
    record = {"preset": cfg.preset}
    peaks = {}
    for phase in phases:
        if log:
            log(f"[{cfg.preset} xla={'on' if cfg.xla else 'off'}] {phase} ...")
        start = time.perf_counter()
        result = _spawn_phase(phase, cfg)
        peaks[phase] = result.pop(f"{phase}_peak_rss_gb")
        record.setdefault("rss_before_phase_gb", {})[phase] = result.pop(f"{phase}_rss_before_gb")
        record.setdefault("load_average_1min", {}).update(result.pop("load_average_1min"))
        record.update(result)
        if log:
            log(f"    done in {time.perf_counter() - start:.0f} s")
    record["peak_rss_gb"] = max(peaks.values())
    record["phase_peak_rss_gb"] = peaks
    record["settings"] = {
        "xla": cfg.xla,
        "train_step": cfg.train_step,
        "intra_op_threads": cfg.intra_threads or f"default ({os.cpu_count()} cores)",
        "inter_op_threads": cfg.inter_threads or f"default ({os.cpu_count()} cores)",
        "batch_size": cfg.batch_size,
        "steps": cfg.steps,
        "warmup": cfg.warmup,
        "overrides": cfg.overrides,
        "train_estimator": "preset's training estimator (series, n_terms/n_samples of the "
                           "preset unless overridden), Adamax, post-step power iterations",
        "dtype": "float32",
        "kernels": record.pop("kernels", None),
        "onednn_env": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        "cpu": cpu_description(),
        "versions": _versions(),
    }
    return record


def sweep(base: BenchConfig, steps: int, log=None) -> list[dict]:
    """Training-step time and peak memory versus series terms (plain, Neumann, recompute),
    blocks per scale and batch size; one row per point."""
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
        result = _spawn_phase("train", cfg)
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


# ------------------------------------------------------------------------------- the chart
# A tiny rasterizer (matplotlib is not a dependency): panels with axes, lines, markers and
# numeric tick labels in a 3x5 pixel font, encoded with tf.io.encode_png.

_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001001001001", "8": "111101111101111",
    "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
}
COLORS = {"plain": (31, 119, 180), "neumann": (255, 127, 14), "recompute": (44, 160, 44)}


def _text(img, x: int, y: int, s: str, scale: int = 2, color=(0, 0, 0)) -> None:
    for ch in s:
        glyph = _GLYPHS.get(ch)
        if glyph is not None:
            for i, bit in enumerate(glyph):
                if bit == "1":
                    r, c = divmod(i, 3)
                    img[y + r * scale:y + (r + 1) * scale, x + c * scale:x + (c + 1) * scale] = color
        x += 4 * scale


def _line(img, p0, p1, color, width: int = 2) -> None:
    n = int(max(abs(p1[0] - p0[0]), abs(p1[1] - p0[1]))) + 1
    for t in range(n + 1):
        x = round(p0[0] + (p1[0] - p0[0]) * t / n)
        y = round(p0[1] + (p1[1] - p0[1]) * t / n)
        img[max(y - width // 2, 0):y + (width + 1) // 2, max(x - width // 2, 0):x + (width + 1) // 2] = color


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _panel(img, left: int, top: int, w: int, h: int, series: dict) -> None:
    """Draws ``series`` ({name: [(x, y), ...]}) in the box at (left, top), size w x h."""
    import numpy as np

    pad_l, pad_b, pad_t, pad_r = 60, 30, 10, 10
    x0, y0, x1, y1 = left + pad_l, top + pad_t, left + w - pad_r, top + h - pad_b
    img[y0:y1, x0] = 0
    img[y1, x0:x1] = 0
    xs = [p[0] for pts in series.values() for p in pts]
    ys = [p[1] for pts in series.values() for p in pts]
    if not xs:
        return
    xmin, xmax = min(xs), max(xs)
    ymax = max(ys) * 1.1 or 1.0

    def px(v):
        return x0 + 5 + (v - xmin) / (xmax - xmin or 1) * (x1 - x0 - 15)

    def py(v):
        return y1 - v / ymax * (y1 - y0)

    for tick in np.linspace(0, ymax, 5):
        y = round(py(tick))
        img[y, x0 - 4:x0] = 0
        _text(img, left + 2, y - 5, _fmt(tick))
    for v in sorted(set(xs)):
        x = round(px(v))
        img[y1:y1 + 4, x] = 0
        _text(img, x - 6, y1 + 8, _fmt(v))
    for name, pts in series.items():
        color = COLORS.get(name, (0, 0, 0))
        pts = sorted(pts)
        for a, b in zip(pts[:-1], pts[1:], strict=True):
            _line(img, (px(a[0]), py(a[1])), (px(b[0]), py(b[1])), color)
        for a in pts:
            cx, cy = round(px(a[0])), round(py(a[1]))
            img[cy - 3:cy + 4, cx - 3:cx + 4] = color


def sweep_png(rows: list[dict], path: str) -> None:
    """Writes a 2 x 3 grid of line charts: rows = step seconds, peak RSS GB; columns = series
    terms (blue plain, orange Neumann, green recompute), blocks per scale, batch size."""
    import numpy as np
    import tensorflow as tf

    axes = ("n_terms", "blocks_per_scale", "batch_size")
    metrics = ("train_step_s", "peak_rss_gb")
    pw, ph = 320, 220
    img = np.full((ph * len(metrics), pw * len(axes), 3), 255, np.uint8)
    for i, metric in enumerate(metrics):
        for j, axis in enumerate(axes):
            series: dict = {}
            for r in rows:
                if r["axis"] == axis:
                    series.setdefault(r["gradient"], []).append((r["value"], r[metric]))
            _panel(img, j * pw, i * ph, pw, ph, series)
    tf.io.write_file(path, tf.io.encode_png(img))


# ------------------------------------------------------------------------------- main


def _parse_threads(text: str) -> tuple[int, int]:
    parts = [int(p) for p in str(text).split(",") if p.strip()]
    if not parts or len(parts) > 2 or min(parts) < 0:
        raise argparse.ArgumentTypeError("--threads takes INTRA or INTRA,INTER (0 = default)")
    return parts[0], parts[1] if len(parts) > 1 else 0


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--preset", action="append", default=None,
                   help="preset(s); repeat the flag or give a comma list (default: "
                        "bench_cifar_small)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed calls per phase (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    p.add_argument("--xla", choices=("on", "off", "both"), default="both")
    p.add_argument("--threads", type=_parse_threads, default=(0, 0),
                   help="INTRA or INTRA,INTER op threads (0 = TensorFlow's default)")
    p.add_argument("--phases", default=",".join(PHASES),
                   help="comma list of " + ", ".join(PHASES) + " (default: all of these), "
                        "breakdown (the train step's parts timed apart), profile (tf.profiler "
                        "trace of the train step, by op type)")
    p.add_argument("--train_step", choices=("trainer", "fused"), default="trainer")
    p.add_argument("--eval_estimator", choices=("train", "eval"), default="train")
    p.add_argument("--inverse_atol", type=float, default=1e-5)
    p.add_argument("--inverse_rtol", type=float, default=0.0)
    p.add_argument("--override", action="append", default=[], metavar="FIELD=JSON",
                   help="DensityConfig override, e.g. --override=blocks=[1,1,1]")
    p.add_argument("--sweep", action="store_true",
                   help="also sweep terms (plain, Neumann, recompute), blocks and batch")
    p.add_argument("--sweep_steps", type=int, default=5, help="timed steps per sweep point")
    p.add_argument("--sweep_dir", default="benchmarks/results",
                   help="where the sweep CSV and PNG go")
    p.add_argument("--output", default="", help="JSON file for all records")
    p.add_argument("--phase", default="", help=argparse.SUPPRESS)
    p.add_argument("--phase_config", default="", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.phase:
        _phase_main(args.phase, args.phase_config)
        return []
    presets = [p for item in (args.preset or ["bench_cifar_small"]) for p in item.split(",") if p]
    phases = [p for p in args.phases.split(",") if p]
    unknown = set(phases) - set(_PHASE_FNS)
    if unknown:
        raise SystemExit(f"Unknown phases {sorted(unknown)}; choose from {PHASES}.")
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        raise SystemExit("Need --steps >= 1, --warmup >= 0 and --batch_size >= 1.")
    xla_modes = {"on": [True], "off": [False], "both": [False, True]}[args.xla]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    records, sweep_rows = [], []
    for preset in presets:
        for xla in xla_modes:
            cfg = BenchConfig(
                preset=preset, batch_size=args.batch_size, steps=args.steps,
                warmup=args.warmup, xla=xla, intra_threads=args.threads[0],
                inter_threads=args.threads[1], overrides=_parse_overrides(args.override),
                train_step=args.train_step, eval_estimator=args.eval_estimator,
                inverse_atol=args.inverse_atol, inverse_rtol=args.inverse_rtol)
            record = benchmark(cfg, phases, log=log)
            records.append(record)
            print(json.dumps(record), flush=True)
        if args.sweep:
            cfg = dataclasses.replace(cfg, xla=xla_modes[-1])
            sweep_rows += sweep(cfg, args.sweep_steps, log=log)
    if sweep_rows:
        os.makedirs(args.sweep_dir, exist_ok=True)
        log(sweep_table(sweep_rows))
        write_sweep_csv(sweep_rows, os.path.join(args.sweep_dir, "sweep.csv"))
        sweep_png(sweep_rows, os.path.join(args.sweep_dir, "sweep.png"))
        log(f"sweep written to {args.sweep_dir}/sweep.csv and sweep.png")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"records": records, "sweep": sweep_rows}, f, indent=2)
    return records


if __name__ == "__main__":
    main()
