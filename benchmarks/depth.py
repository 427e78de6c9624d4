"""The depth figures of issue #10: how the training step's peak memory grows with the number of
blocks (``--depth_sweep``), the full-depth paper models (``--full_depth``), and the summary of
every target figure against the reference's (``targets``).

The points run the ``train`` phase, each in its own process (``spawn``, the driver's
``benchmarks.run._spawn_phase``), so each peak resident memory (VmHWM) is its own.
"""

from __future__ import annotations

import dataclasses

from benchmarks.phases import BenchConfig

# Blocks per scale of the depth sweep (bench_cifar_small widths), and its backward passes.
DEPTHS = ((4, 4, 4), (16, 16, 16))
DEPTH_MEMORY = ("invertible", "stored")
# The full-depth paper models, trained with the depth-independent backward pass.
FULL_DEPTH = ("mnist_density_paper", "cifar10_density_paper")

# The official PyTorch code measured side by side with ours in one run (issue #21): a 2-core
# AMD EPYC with AVX2 and FMA but no AVX-512 (so TensorFlow ran its plain kernels), torch 2.13
# CPU, batch 64, float32; peak RSS 1.76 GiB.
REFERENCE_AVX2 = {
    "bench_cifar_small": {"train_img_per_s": 19.0, "inference_img_per_s": 394,
                          "peak_rss_gb": 1.76 * 2**30 / 1e9, "inverse_s": 1.37},
}
REFERENCE_AVX2_CPU = "2-core AMD EPYC, AVX2 only (issue #21), torch 2.13 CPU"
# REFERENCE.md section 3: the official PyTorch code on 2 CPU cores, batch 64, float32 (the CPU
# is not named).
REFERENCE = {
    "bench_cifar_small": {"train_img_per_s": 32.5, "inference_img_per_s": 670,
                          "peak_rss_gb": 1.8},
    "bench_mnist": {"train_img_per_s": 8.2, "inference_img_per_s": 171, "peak_rss_gb": 4.7},
    "bench_cifar_width512_d1": {"train_img_per_s": 15.1, "inference_img_per_s": 452,
                                "peak_rss_gb": 1.7},
}
# Issue #10's targets: training throughput (x reference), peak memory (x reference), encode
# throughput (x reference), depth growth of the peak, full-depth peaks in GB.
TARGETS = {"train_x": {"bench_cifar_small": 3.0, "bench_cifar_width512_d1": 3.0,
                       "bench_mnist": 2.5},
           "peak_memory_x": 0.7, "inference_x": 1.6, "depth_growth": 1.15,
           "full_depth_peak_gb": {"mnist_density_paper": 4.0, "cifar10_density_paper": 6.0}}


def targets_table(summary: dict) -> str:
    """The per-preset part of `targets` as text lines (x reference; ceiling in brackets)."""
    lines = []
    for preset, modes in summary.items():
        if preset in ("depth_growth", "full_depth_peak_gb"):
            continue
        for xla, per_ref in modes.items():
            kernels = per_ref.get("kernels")
            for source, figures in per_ref.items():
                if source == "kernels":
                    continue
                parts = []
                for name, f in figures.items():
                    ceiling = f" (ceiling {f['ceiling_x']:.2f}x)" if "ceiling_x" in f else ""
                    parts.append(f"{name} {f['value']:.2f}x {f['target']} "
                                 f"{'met' if f['met'] else 'NOT met'}{ceiling}")
                lines.append(f"{preset} {xla} ({kernels} kernels) vs {source}: "
                             + "; ".join(parts))
    return "\n".join(lines)


def depth_sweep(base: BenchConfig, spawn, log=None, depths=DEPTHS,
                memories=DEPTH_MEMORY) -> list[dict]:
    """One training-phase row per (backward pass, blocks per scale) of ``base``'s preset."""
    rows = []
    for memory in memories:
        for blocks in depths:
            cfg = dataclasses.replace(base, overrides={
                **base.overrides, "blocks": list(blocks), "gradient_memory": memory})
            if log:
                log(f"[depth {base.preset}] blocks={blocks} gradient_memory={memory} ...")
            result = spawn("train", cfg)
            rows.append({"preset": base.preset, "blocks": list(blocks),
                         "gradient_memory": memory, "batch_size": base.batch_size,
                         "train_img_per_s": result["train_img_per_s"], **_memory(result)})
    return rows


def _memory(result: dict) -> dict:
    """A train phase's step time and memory figures, as the rows name them."""
    return {"train_step_s": result["train_step_s"],
            "peak_rss_gb": result["train_peak_rss_gb"],
            "rss_before_gb": result["train_rss_before_gb"],
            "rss_after_gb": result["train_rss_after_gb"],
            "live_tensor_peak_gb": result["train_live_tensor_peak_gb"]}


def depth_growth(rows: list[dict]) -> dict[str, float]:
    """Per backward pass: peak memory at the deepest point over the shallowest one."""
    out = {}
    for memory in dict.fromkeys(r["gradient_memory"] for r in rows):
        mine = sorted((r for r in rows if r["gradient_memory"] == memory),
                      key=lambda r: sum(r["blocks"]))
        out[memory] = mine[-1]["peak_rss_gb"] / mine[0]["peak_rss_gb"]
    return out


def full_depth(base: BenchConfig, spawn, log=None, presets=FULL_DEPTH) -> list[dict]:
    """One training step of each full-depth preset with the depth-independent backward pass,
    after ``min(base.warmup, 1)`` untimed ones (``--warmup=0``: the first step, tracing
    included, is the only one); ``base`` gives batch, XLA and any overrides. Rows carry the
    first call's time, the timed step's (``train_step_s``, ``train_s_per_image``; None
    without a warm-up) and the memory figures."""
    rows = []
    for preset in presets:
        warmup = min(base.warmup, 1)
        cfg = dataclasses.replace(base, preset=preset, steps=1, warmup=warmup, overrides={
            "gradient_memory": "invertible", **base.overrides})
        if log:
            log(f"[full depth] {preset} gradient_memory={cfg.overrides['gradient_memory']} ...")
        result = spawn("train", cfg)
        step_s = result["train_step_s"] if warmup else None
        rows.append({"preset": preset, "gradient_memory": cfg.overrides["gradient_memory"],
                     "batch_size": base.batch_size, **_memory(result),
                     "train_first_call_s": result["train_first_call_s"],
                     "train_step_s": step_s,
                     "train_s_per_image": None if step_s is None else step_s / base.batch_size})
    return rows


def _references(preset: str, side_by_side: dict | None) -> list[tuple[str, dict]]:
    """The reference figures a preset is compared with, the closest match first: a
    side-by-side run on this machine (``--reference``), the AVX2 run of issue #21, then
    REFERENCE.md's."""
    out = []
    if side_by_side and preset in side_by_side:
        out.append(("side by side on this machine", side_by_side[preset]))
    if preset in REFERENCE_AVX2:
        out.append((REFERENCE_AVX2_CPU, REFERENCE_AVX2[preset]))
    if preset in REFERENCE:
        out.append(("REFERENCE.md section 3", REFERENCE[preset]))
    return out


def targets(records: list[dict], depth_rows: list[dict], full_rows: list[dict],
            side_by_side: dict | None = None) -> dict:
    """Every target figure that was measured against every reference available for it.

    Per preset and XLA setting (``xla_off``, ``xla_on``) and per reference (see
    `_references`): ``value`` (x the reference), ``target``, ``met``, and, where the
    ``roofline`` phase ran, ``ceiling_x``: the ratio this machine's convolutions alone allow.
    Throughputs count only after a warm-up call (a first call also traces the step).
    """
    out = {}
    for r in records:
        settings = r.get("settings", {})
        refs = _references(r["preset"], side_by_side)
        if not refs:
            continue
        warm = settings.get("warmup", 1) >= 1
        ceilings = r.get("roofline", {}) if isinstance(r.get("roofline"), dict) else {}
        per_ref = {}
        for source, ref in refs:
            figures = {}
            train_goal = TARGETS["train_x"].get(r["preset"], 3.0)
            checks = [
                ("train_x", "train_img_per_s", ">=", train_goal, warm,
                 ceilings.get("train_step", {}).get("img_per_s_isolated_convs")),
                ("inference_x", "inference_img_per_s", ">=", TARGETS["inference_x"], warm,
                 ceilings.get("inference", {}).get("img_per_s_isolated_convs")),
            ]
            for name, key, op, goal, ok, ceiling in checks:
                if key in r and key in ref and ok:
                    x = r[key] / ref[key]
                    figures[name] = {"value": x, "target": f"{op} {goal}", "met": x >= goal}
                    if ceiling:
                        figures[name]["ceiling_x"] = ceiling / ref[key]
            if "train" in r.get("phase_peak_rss_gb", {}) and "peak_rss_gb" in ref:
                x = r["phase_peak_rss_gb"]["train"] / ref["peak_rss_gb"]
                goal = TARGETS["peak_memory_x"]
                figures["peak_memory_x"] = {"value": x, "target": f"<= {goal}",
                                            "met": x <= goal}
            if figures:
                per_ref[source] = figures
        xla = "xla_on" if settings.get("xla") else "xla_off"
        out.setdefault(r["preset"], {})[xla] = {
            "kernels": settings.get("kernels"), **per_ref}
    if depth_rows:
        goal = TARGETS["depth_growth"]
        out["depth_growth"] = {m: {"value": g, "target": f"<= {goal}", "met": g <= goal}
                               for m, g in depth_growth(depth_rows).items()}
    for r in full_rows:
        goal = TARGETS["full_depth_peak_gb"].get(r["preset"])
        if goal is not None:
            out.setdefault("full_depth_peak_gb", {})[r["preset"]] = {
                "value": r["peak_rss_gb"], "target": f"<= {goal}",
                "met": r["peak_rss_gb"] <= goal}
    return out
