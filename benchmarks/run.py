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
    python -m benchmarks.run --preset=bench_cifar_small --xla=off --phases=train --depth_sweep
    python -m benchmarks.run --preset=bench_mnist --xla=off --phases=train \
        --full_depth=mnist_density_paper,cifar10_density_paper

``--depth_sweep`` and ``--full_depth`` (``benchmarks.depth``) add the depth figures of issue
#10; the last line printed is ``{"targets": ...}``, every measured target figure against the
reference's (REFERENCE.md section 3).

This module is the command line and the driver; the pieces live beside it:
``benchmarks.measure`` (memory, timing, kernels), ``benchmarks.phases`` (the model, the batch
and the phases), ``benchmarks.roofline`` (the ``roofline`` phase), ``benchmarks.sweep`` (the
sweep's points, table and CSV) and ``benchmarks.chart`` (its PNG, drawn with matplotlib).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

from benchmarks import (
    depth,
    roofline,  # noqa: F401  (registers the roofline phase)
)
from benchmarks.chart import sweep_png
from benchmarks.measure import cpu_description
from benchmarks.phases import PHASE_FNS, PHASES, BenchConfig, run_phase
from benchmarks.sweep import sweep, sweep_table, write_sweep_csv

PRESETS = ("bench_cifar_small", "bench_mnist", "bench_cifar_width512_d1")
RESULT_TAG = "BENCH_PHASE_RESULT "


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
        record.setdefault("rss_after_phase_gb", {})[phase] = result.pop(f"{phase}_rss_after_gb")
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
                           "preset unless overridden; Neumann gradient unless "
                           "--override=neumann_gradient=false), Adamax, post-step power "
                           "iterations",
        "dtype": "float32",
        "kernels": record.pop("kernels", None),
        "onednn_env": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        "cpu": cpu_description(),
        "versions": _versions(),
    }
    return record


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
    p.add_argument("--depth_sweep", action="store_true",
                   help="also train at blocks 4-4-4 and 16-16-16 (the preset's widths) with "
                        "gradient_memory=invertible and stored: peak memory versus depth")
    p.add_argument("--depth_blocks", default="4,4,4;16,16,16",
                   help="the depth sweep's blocks per scale, ';'-separated")
    p.add_argument("--full_depth", default="",
                   help="comma list of full-depth presets (e.g. mnist_density_paper,"
                        "cifar10_density_paper) trained one step with gradient_memory="
                        "invertible (override it with --override=gradient_memory=...)")
    p.add_argument("--reference", default="",
                   help="JSON file of the reference code's figures measured on this machine, "
                        "{preset: {train_img_per_s, inference_img_per_s, peak_rss_gb}}; the "
                        "targets then compare with it first")
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
    unknown = set(phases) - set(PHASE_FNS)
    if unknown:
        raise SystemExit(f"Unknown phases {sorted(unknown)}; choose from {PHASES}.")
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        raise SystemExit("Need --steps >= 1, --warmup >= 0 and --batch_size >= 1.")
    xla_modes = {"on": [True], "off": [False], "both": [False, True]}[args.xla]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    records, sweep_rows, depth_rows, full_rows = [], [], [], []
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
            sweep_rows += sweep(cfg, args.sweep_steps, _spawn_phase, log=log)
        if args.depth_sweep:
            blocks = [tuple(int(b) for b in item.split(",")) for item in
                      args.depth_blocks.split(";") if item]
            depth_rows += depth.depth_sweep(dataclasses.replace(cfg, xla=xla_modes[0]),
                                            _spawn_phase, log=log, depths=blocks)
    if args.full_depth:
        full_cfg = dataclasses.replace(cfg, xla=xla_modes[0])
        full_rows = depth.full_depth(full_cfg, _spawn_phase, log=log,
                                     presets=[p for p in args.full_depth.split(",") if p])
    for rows, name in ((depth_rows, "depth_sweep"), (full_rows, "full_depth")):
        for row in rows:
            print(json.dumps({name: row}), flush=True)
    side_by_side = None
    if args.reference:
        with open(args.reference) as f:
            side_by_side = json.load(f)
    summary = depth.targets(records, depth_rows, full_rows, side_by_side)
    print(json.dumps({"targets": summary}), flush=True)
    table = depth.targets_table(summary)
    if table:
        log(table)
    if sweep_rows:
        os.makedirs(args.sweep_dir, exist_ok=True)
        log(sweep_table(sweep_rows))
        write_sweep_csv(sweep_rows, os.path.join(args.sweep_dir, "sweep.csv"))
        sweep_png(sweep_rows, os.path.join(args.sweep_dir, "sweep.png"))
        log(f"sweep written to {args.sweep_dir}/sweep.csv and sweep.png")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"records": records, "sweep": sweep_rows, "depth_sweep": depth_rows,
                       "full_depth": full_rows, "targets": summary}, f, indent=2)
    return records


if __name__ == "__main__":
    main()
