"""Named model configurations (the paper's experiments, benchmarks and small demos).

``names()`` lists them, ``config(name)`` returns the (frozen dataclass) configuration and
``build(name, **overrides)`` a built Keras model. A preset is data, not code: every model class
takes its config, so a new experiment is a new entry here.
"""

from __future__ import annotations

import dataclasses

from tf_iresnet.models.classifier import ClassifierConfig, build_classifier_model
from tf_iresnet.models.density import DensityConfig, build_density_model

# --- density models ---------------------------------------------------------------------------
# REFERENCE.md section 2; paper settings: coeff 0.9, 5 series terms, 1 probe, 5 power iterations,
# ELU, ActNorm, learned prior, inputs centred by -0.5 (no logit).
_DENSITY = {
    "cifar10_density_paper": DensityConfig(
        input_shape=(32, 32, 3), num_levels=256, initial_squeeze=True,
        blocks=(16, 16, 16), hidden_channels=512, strides=(1, 2, 2)),
    "mnist_density_paper": DensityConfig(
        input_shape=(28, 28, 1), num_levels=256, initial_squeeze=True,
        blocks=(16, 16, 16), hidden_channels=512, strides=(1, 2, 1)),
    "bench_cifar_small": DensityConfig(
        input_shape=(32, 32, 3), num_levels=256, initial_squeeze=True,
        blocks=(4, 4, 4), hidden_channels=128, strides=(1, 2, 2)),
    "bench_mnist": DensityConfig(
        input_shape=(28, 28, 1), num_levels=256, initial_squeeze=True,
        blocks=(4, 4, 4), hidden_channels=512, strides=(1, 2, 1)),
    "bench_cifar_width512_d1": DensityConfig(
        input_shape=(32, 32, 3), num_levels=256, initial_squeeze=True,
        blocks=(1, 1, 1), hidden_channels=512, strides=(1, 2, 2)),
    "digits_density": DensityConfig(
        input_shape=(8, 8, 1), num_levels=17, initial_squeeze=True,
        blocks=(4, 4), hidden_channels=64, strides=(1, 2), eval_logdet="exact"),
    "toy2d_density": DensityConfig(
        input_shape=(2,), num_levels=None, architecture="dense", blocks=(10,), hidden_channels=64,
        activation="lipswish", preprocessing="none", eval_logdet="exact", prior="fixed"),
}

# --- classifiers --------------------------------------------------------------------------------
# REFERENCE.md section 2, the official classifier script: 7-7-7 blocks of widths 32/64/128,
# strides 1-2-2 (squeeze at the start of stages 2 and 3), 13 zero channels (16 x 32 x 32), c 0.9,
# 1 power iteration, ELU, ActNorm per block, head BN-ReLU-avgpool-linear. 4,873,152 trainable
# parameters (0.67% below the official 4,905,946, most of it the official network's unused
# learned prior, 2 x 16,384; see tf_iresnet/models/classifier.py). MNIST: the paper's 21
# blocks, laid out as for CIFAR (15 zero channels: 16 x 28 x 28 -> 64 x 14 x 14 -> 256 x 7 x 7).
_CIFAR_CLASSIFIER = ClassifierConfig(
    input_shape=(32, 32, 3), num_classes=10, num_levels=256, pad_channels=13,
    blocks=(7, 7, 7), hidden_channels=(32, 64, 128), strides=(1, 2, 2))
_CLASSIFIER: dict = {
    "cifar10_classifier_paper": _CIFAR_CLASSIFIER,
    "cifar100_classifier_paper": dataclasses.replace(_CIFAR_CLASSIFIER, num_classes=100),
    "mnist_classifier_paper": dataclasses.replace(
        _CIFAR_CLASSIFIER, input_shape=(28, 28, 1), pad_channels=15),
    # Small and fast (the `make demo` classifier): 8 x 8 x 8 -> 4 x 4 x 32 -> 2 x 2 x 128.
    "digits_classifier": ClassifierConfig(
        input_shape=(8, 8, 1), num_classes=10, num_levels=17, pad_channels=7,
        blocks=(2, 2, 2), hidden_channels=(32, 64, 64), strides=(1, 2, 2)),
    # Hybrid: no padding, so log p is the density of the 8 x 8 images themselves;
    # 4 x 4 x 4 -> 2 x 2 x 16, exact log-det for evaluation (64 dimensions).
    "digits_hybrid": ClassifierConfig(
        input_shape=(8, 8, 1), num_classes=10, num_levels=17, pad_channels=0,
        blocks=(4, 4), hidden_channels=(64, 64), strides=(2, 2), hybrid_weight=1.0,
        eval_logdet="exact"),
}


def names() -> list[str]:
    """All preset names."""
    return sorted({**_DENSITY, **_CLASSIFIER})


def config(name: str):
    """The configuration dataclass of a preset."""
    presets = {**_DENSITY, **_CLASSIFIER}
    if name not in presets:
        raise ValueError(f"Unknown preset {name!r}; known presets: {', '.join(names())}.")
    return presets[name]


def task(name: str) -> str:
    """``"density"`` or ``"classifier"``."""
    return "density" if isinstance(config(name), DensityConfig) else "classifier"


def build(name: str, **overrides):
    """Builds the preset's Keras model; ``overrides`` replace config fields (e.g. ``coeff``)."""
    cfg = config(name)
    if overrides:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cfg)}
        if unknown:
            raise ValueError(f"Unknown config fields for {name!r}: {sorted(unknown)}.")
        cfg = dataclasses.replace(cfg, **overrides)
    if isinstance(cfg, DensityConfig):
        return build_density_model(cfg, name=name)
    if isinstance(cfg, ClassifierConfig):
        return build_classifier_model(cfg, name=name)
    raise AssertionError(f"no builder for {type(cfg).__name__}")  # pragma: no cover
