"""Does the Neumann-series gradient train as well as the plain one? (issue #10, section 1)

Trains the digits density preset with each gradient estimator (``--neumann_gradient`` and
``--noneumann_gradient`` of ``train.density``, the same seeds, everything else the binary's
defaults) and reports per estimator:

* the final test bits/dim of every seed, their mean and spread (sample standard deviation);
* the noise of the gradient itself, at each run's final weights and on one fixed batch of
  training images: the training loss's gradient is drawn ``--probes`` times (one Hutchinson
  probe each, the training estimator), for *both* estimators on the same weights. Reported:
  the mean and variance of the gradient's global norm and the relative variance
  ``E|g - E g|^2 / |E g|^2``. Both estimators have the same expectation over the probe (tested
  in tests/test_neumann_gradient.py), so what differs is this noise, and the final fit.

    python -m benchmarks.neumann_study --steps=2000 --seeds=0,1,2 --out_dir=/tmp/neumann_study

Each training run is a subprocess of the binary; ``--out_dir/<estimator>_seed<k>/`` keeps its
run directory (a rerun of the study resumes or reuses finished runs). The last line printed is
one JSON object with every figure; a table goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ESTIMATORS = {"neumann": "--neumann_gradient", "plain": "--noneumann_gradient"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(out_dir: str, estimator: str, seed: int, steps: int, extra: list[str]) -> dict:
    """Runs (or resumes) one training run; returns its ``results.json`` and wall time."""
    model_dir = os.path.join(out_dir, f"{estimator}_seed{seed}")
    cmd = [sys.executable, "-m", "train.density", "--dataset=digits", "--preset=digits_density",
           f"--model_dir={model_dir}", "--export_dir=", f"--train_steps={steps}",
           f"--seed={seed}", ESTIMATORS[estimator], "--eval_every=0",
           f"--checkpoint_every={steps}", "--num_samples=16", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    with open(os.path.join(model_dir, "results.json")) as f:
        results = json.load(f)
    return {"model_dir": model_dir, "wall_s": time.perf_counter() - start,
            "test_bits_per_dim": results["test_bits_per_dim"]}


def gradient_noise(model_dir: str, probes: int, batch_size: int = 64) -> dict:
    """Gradient statistics of both estimators at the final weights of ``model_dir``'s run."""
    import numpy as np
    import tensorflow as tf

    from tf_iresnet import datasets
    from tf_iresnet.models.density import DensityConfig, IResNetFlow
    from tf_iresnet.tasks.density import DensityTrainConfig, make_train_step
    from tf_iresnet.training import read_config

    saved = read_config(model_dir)  # the run's fields and, under "model", the model's config
    cfg = DensityTrainConfig(dataset=saved["dataset"], preset=saved["preset"],
                             seed=saved["seed"])
    x = next(iter(datasets.load(cfg.dataset, "train", batch_size=batch_size, seed=12345)))
    out = {}
    for estimator in ESTIMATORS:
        model_cfg = DensityConfig(**{
            **{k: tuple(v) if isinstance(v, list) else v for k, v in saved["model"].items()},
            "neumann_gradient": estimator == "neumann"})
        model = IResNetFlow(model_cfg, name=cfg.preset)
        tf.train.Checkpoint(model=model).restore(
            tf.train.latest_checkpoint(model_dir)).expect_partial().assert_existing_objects_matched()
        step_fn = make_train_step(cfg)

        @tf.function
        def flat_gradient(step, model=model, step_fn=step_fn):
            with tf.GradientTape() as tape:
                loss, _ = step_fn(model, x, step)
            grads = tape.gradient(loss, model.trainable_variables)
            return tf.concat([tf.reshape(g, [-1]) for g in grads], 0)

        # Step numbers past the run's end: probes it never drew in training.
        draws = np.stack([flat_gradient(tf.constant(10**6 + i, tf.int64)).numpy()
                          for i in range(probes)]).astype(np.float64)
        norms = np.linalg.norm(draws, axis=1)
        mean = draws.mean(axis=0)
        out[estimator] = {
            "grad_norm_mean": float(norms.mean()),
            "grad_norm_variance": float(norms.var(ddof=1)),
            "relative_variance": float(((draws - mean) ** 2).sum(axis=1).mean()
                                       / (mean ** 2).sum()),
        }
    return out


def _summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}


def study(out_dir: str, steps: int, seeds: list[int], probes: int, extra: list[str],
          log=None) -> dict:
    """Every run and figure of the study (see the module docstring)."""
    runs = {e: [] for e in ESTIMATORS}
    for seed in seeds:
        for estimator in ESTIMATORS:
            if log:
                log(f"[neumann study] train {estimator} seed {seed} ({steps} steps) ...")
            run = train(out_dir, estimator, seed, steps, extra)
            if log:
                log(f"    test bits/dim {run['test_bits_per_dim']:.4f} in {run['wall_s']:.0f} s")
            run["gradient_noise"] = gradient_noise(run["model_dir"], probes)
            runs[estimator].append(run)
    out = {"steps": steps, "seeds": seeds, "probes": probes, "extra_flags": extra}
    for estimator, mine in runs.items():
        noise = {at: {k: _summary([r["gradient_noise"][at][k] for r in mine])
                      for k in ("grad_norm_mean", "grad_norm_variance", "relative_variance")}
                 for at in ESTIMATORS}
        out[estimator] = {
            "test_bits_per_dim": _summary([r["test_bits_per_dim"] for r in mine]),
            "train_wall_s": _summary([r["wall_s"] for r in mine]),
            # gradient noise of each estimator, measured at this estimator's final weights
            "gradient_noise_at_final_weights": noise,
        }
    return out


def table(result: dict) -> str:
    """A plain-text table of ``study``'s result."""
    lines = [f"digits_density, {result['steps']} steps, seeds {result['seeds']}, "
             f"{result['probes']} probe draws per gradient",
             "trained with | test bpd mean +- std | wall s | noise of: grad-norm mean, "
             "grad-norm var, relative var"]
    for estimator in ESTIMATORS:
        r = result[estimator]
        bpd, wall = r["test_bits_per_dim"], r["train_wall_s"]
        for at, noise in r["gradient_noise_at_final_weights"].items():
            lines.append(
                f"{estimator:>8} | {bpd['mean']:.4f} +- {bpd['std']:.4f} | {wall['mean']:.0f} | "
                f"{at}: {noise['grad_norm_mean']['mean']:.4g}, "
                f"{noise['grad_norm_variance']['mean']:.3g}, "
                f"{noise['relative_variance']['mean']:.3g}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000, help="training steps per run")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    p.add_argument("--probes", type=int, default=32,
                   help="gradient draws per estimator for the noise figures (>= 2)")
    p.add_argument("--out_dir", default="neumann_study", help="where the run directories go")
    p.add_argument("--train_flag", action="append", default=[],
                   help="extra flag for train.density (repeatable), e.g. --train_flag=--batch_size=32")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.steps < 1 or args.probes < 2 or not seeds:
        raise SystemExit("Need --steps >= 1, --probes >= 2 and at least one seed.")
    os.makedirs(args.out_dir, exist_ok=True)
    result = study(args.out_dir, args.steps, seeds, args.probes, args.train_flag,
                   log=lambda m: print(m, file=sys.stderr, flush=True))
    print(table(result), file=sys.stderr, flush=True)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
