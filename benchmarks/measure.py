"""What the benchmarks measure with: resident memory, the allocator's live-tensor peak, call
timing, which CPU kernels and CPU run, and kernel names mapped back to ops (no phase logic).

TensorFlow is imported inside the functions that need it, so that the driver (which only
spawns phases) does not import it.
"""

from __future__ import annotations

import statistics
import time


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


def trimmed_rss_gb() -> float:
    """Resident size (GB) after glibc's ``malloc_trim(0)`` hands the freed heap back to the
    system: what the process still holds once its tensors are freed (traced graphs, kernels,
    the runtime). Without glibc, the untrimmed `rss_gb`."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass
    return rss_gb()


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
