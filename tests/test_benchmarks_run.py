"""benchmarks.run: the command line, one JSON record per preset, each phase in a subprocess."""

import ast
import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf
from _bench import TINY, positive

from benchmarks import depth, run
from benchmarks.measure import kernels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_main_prints_one_json_record_per_preset(tmp_path, capsys):
    out = tmp_path / "bench.json"
    records = run.main([
        "--preset=bench_cifar_small", "--batch_size=4", "--steps=2", "--warmup=1", "--xla=off",
        "--phases=inference", "--threads=1,1", f"--output={out}",
        *[f"--override={k}={json.dumps(v)}" for k, v in TINY.items()]])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    # One record per preset, then the figures against the reference's targets.
    assert len(records) == 1 and lines[:-1] == records and set(lines[-1]) == {"targets"}
    off = lines[-1]["targets"]["bench_cifar_small"]["xla_off"]
    assert "inference_x" in off["REFERENCE.md section 3"]
    assert "inference_x" in off[depth.REFERENCE_AVX2_CPU]
    record = records[0]
    assert record["preset"] == "bench_cifar_small"
    assert positive(record["inference_img_per_s"]) and positive(record["peak_rss_gb"])
    settings = record["settings"]
    assert settings["xla"] is False and settings["batch_size"] == 4
    assert settings["intra_op_threads"] == 1 and settings["inter_op_threads"] == 1
    assert settings["versions"]["tensorflow"] == tf.__version__
    assert settings["kernels"] == kernels()
    assert isinstance(settings["cpu"]["vector_extensions"], list)
    assert json.loads(out.read_text())["records"] == records


def test_bad_flags():
    with pytest.raises(SystemExit):
        run.main(["--phases=nope"])
    with pytest.raises(SystemExit):
        run.main(["--threads=-1"])


def _benchmarks_imports(name: str) -> set[str]:
    """The benchmarks modules that benchmarks/<name>.py imports (anywhere in the file)."""
    with open(os.path.join(REPO, "benchmarks", f"{name}.py")) as f:
        tree = ast.parse(f.read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "benchmarks":
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names
                       if a.name.startswith("benchmarks."))
    return out


def test_modules_import_no_cycle_and_the_driver_no_tensorflow():
    # run imports the others; measure imports none; no module imports run; no cycle.
    graph = {name: _benchmarks_imports(name)
             for name in ("measure", "phases", "roofline", "sweep", "chart", "depth", "run")}
    assert graph["measure"] == set() and graph["chart"] == set()
    assert graph["roofline"] == {"measure", "phases"}
    assert {"phases", "roofline", "sweep", "chart"} <= graph["run"]

    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, (*seen, n))) for n in graph[a])

    assert not any(reaches(name, name) for name in graph)
    # The driver only spawns phases: importing it must not import TensorFlow.
    code = ("import sys, benchmarks.run; "
            "print('tensorflow' in sys.modules, 'matplotlib' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.stdout.split() == ["False", "False"], proc.stderr
