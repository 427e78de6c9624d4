"""tf_iresnet.tasks.run: one RunConfig, one driver; the binaries' flag defaults are the task
configs' field defaults."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest

from tf_iresnet import presets
from tf_iresnet.tasks import run
from tf_iresnet.tasks.classifier import ClassifierTask, ClassifierTrainConfig
from tf_iresnet.tasks.density import DensityTask, DensityTrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = [f.name for f in dataclasses.fields(run.RunConfig)]

# Each binary defines its flags on absl's global FLAGS at import: one binary per process.
_FLAG_DEFAULTS = textwrap.dedent("""
    import dataclasses, importlib, json, sys
    from absl import flags
    binary = importlib.import_module("train." + sys.argv[1])
    flags.FLAGS(["prog"])
    cfg = binary.config_from_flags(flags.FLAGS)
    print("RESULT" + json.dumps({
        "flags": {k: flags.FLAGS[k].value for k in flags.FLAGS if k in sys.argv[2:]},
        "config": {k: getattr(cfg, k) for k in sys.argv[2:]}}))
""")


def _flag_defaults(binary, names):
    proc = subprocess.run(
        [sys.executable, "-c", _FLAG_DEFAULTS, binary, *names], cwd=REPO, capture_output=True,
        text=True, timeout=120,
        env=dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2",
                 PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def test_task_configs_share_one_field_list():
    for cls in (DensityTrainConfig, ClassifierTrainConfig):
        assert issubclass(cls, run.RunConfig)
        own = [f.name for f in dataclasses.fields(cls)]
        assert own[: len(SHARED)] == SHARED  # declared once, in RunConfig
    assert run.default(DensityTrainConfig, "jit_compile") is True
    assert run.default(ClassifierTrainConfig, "jit_compile") is False
    with pytest.raises(ValueError, match="no field"):
        run.default(DensityTrainConfig, "nope")
    with pytest.raises(ValueError, match="no default"):
        run.default(ClassifierTrainConfig, "model")


@pytest.mark.parametrize("binary, cls, names", [
    ("density", DensityTrainConfig,
     ["train_steps", "log_every", "eval_every", "checkpoint_every", "jit_compile", "strategy",
      "seed", "warmup_steps", "weight_decay", "eval_examples", "num_samples", "optimizer"]),
    ("classifier", ClassifierTrainConfig,
     ["log_every", "jit_compile", "strategy", "seed", "l2_penalty"]),
])
def test_flag_defaults_are_the_config_defaults(binary, cls, names):
    out = _flag_defaults(binary, names)
    for name in names:
        expected = run.default(cls, name)
        assert out["config"][name] == expected, name
        if name in out["flags"] and name != "train_steps":  # --train_steps defaults to None
            assert out["flags"][name] == expected, name


def test_task_checks_its_config_type(tmp_path):
    cfg = ClassifierTrainConfig(dataset="digits", preset="digits_classifier",
                                model=presets.config("digits_classifier"),
                                model_dir=str(tmp_path))
    with pytest.raises(TypeError, match="DensityTrainConfig"):
        DensityTask(cfg)
    with pytest.raises(TypeError, match="ClassifierTrainConfig"):
        ClassifierTask(DensityTrainConfig(model_dir=str(tmp_path)))
