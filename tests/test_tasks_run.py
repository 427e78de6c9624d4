"""tf_iresnet.tasks.run: one RunConfig, one driver; the binaries' flag defaults are the task
configs' field defaults."""

import dataclasses

import pytest
from _binaries import binary, parse

from tf_iresnet import presets
from tf_iresnet.tasks import run
from tf_iresnet.tasks.classifier import ClassifierTask, ClassifierTrainConfig
from tf_iresnet.tasks.density import DensityTask, DensityTrainConfig

SHARED = [f.name for f in dataclasses.fields(run.RunConfig)]


def _flag_defaults(name, names):
    # The binary's flags in a FlagValues of their own (tests/_binaries.py), parsed from an
    # empty command line, and the config the binary resolves from them.
    fv = parse(name, [])
    cfg = binary(name).config_from_flags(fv)
    return {"flags": {k: fv[k].value for k in fv if k in names},
            "config": {k: getattr(cfg, k) for k in names}}


def test_task_configs_share_one_field_list():
    for cls in (DensityTrainConfig, ClassifierTrainConfig):
        assert issubclass(cls, run.RunConfig)
        own = [f.name for f in dataclasses.fields(cls)]
        assert own[: len(SHARED)] == SHARED  # declared once, in RunConfig
    # None: the Trainer times XLA on and off on the first batch and keeps the faster.
    assert run.default(DensityTrainConfig, "jit_compile") is None
    assert run.default(ClassifierTrainConfig, "jit_compile") is None
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
