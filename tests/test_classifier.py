"""IResNetClassifier: architecture, invertibility, log-det, hybrid objective and the SavedModel."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_iresnet import InverseNotConvergedError, datasets, presets
from tf_iresnet.export.classifier import export_classifier
from tf_iresnet.models.classifier import (
    ClassifierConfig,
    build_classifier_model,
    classifier_objective,
)

# Small models: two stages, one block each; the plain one pads, the hybrid one cannot.
TINY = ClassifierConfig(input_shape=(8, 8, 1), num_classes=10, num_levels=17, pad_channels=3,
                        blocks=(1, 1), hidden_channels=(16, 16), strides=(1, 2))
TINY_HYBRID = ClassifierConfig(input_shape=(8, 8, 1), num_classes=10, num_levels=17,
                               blocks=(1, 1), hidden_channels=(16, 16), strides=(2, 2),
                               hybrid_weight=1.0, eval_logdet="exact")

OFFICIAL_CIFAR10_PARAMETERS = 4_905_946


def _digits(n=64, split="train", dequantize=False, seed=0):
    ds = datasets.load("digits", split, batch_size=n, with_labels=True, shuffle=False,
                       dequantize=dequantize, seed=seed)
    return next(iter(ds))


def _model(cfg, seed=0):
    keras.utils.set_random_seed(seed)
    model = build_classifier_model(cfg)
    model.initialize(_digits()[0])
    return model


def test_paper_preset_matches_the_official_parameter_count():
    model = presets.build("cifar10_classifier_paper")
    count = model.num_trainable_parameters
    # The official count includes an unused 2 x 16 x 32 x 32 learned prior (see the module).
    assert count == 4_873_152
    assert abs(count - OFFICIAL_CIFAR10_PARAMETERS) / OFFICIAL_CIFAR10_PARAMETERS < 0.01
    cfg = model.config
    assert cfg.padded_shape == (32, 32, 16) and cfg.feature_shape == (8, 8, 256)
    assert [s for s, _, _ in cfg.block_shapes()].count(True) == 2  # squeezes open stages 2, 3
    assert len(model.branches) == 21 and len(model.actnorm_states) == 21
    assert model(tf.zeros([2, 32, 32, 3])).shape == (2, 10)


def test_other_presets():
    mnist = presets.config("mnist_classifier_paper")
    assert sum(mnist.blocks) == 21 and mnist.input_shape == (28, 28, 1)
    assert presets.config("cifar100_classifier_paper").num_classes == 100
    hybrid = presets.config("digits_hybrid")
    assert hybrid.hybrid and hybrid.pad_channels == 0
    assert presets.task("digits_classifier") == "classifier"
    assert isinstance(presets.build("digits_classifier"), keras.Model)


def test_features_and_invert_round_trip():
    model = _model(TINY)
    x, _ = _digits(32, "test")
    z = model.features(x)
    assert z.shape == (32, *TINY.feature_shape) == (32, 4, 4, 16)
    np.testing.assert_allclose(model.invert(z).numpy(), x.numpy(), atol=1e-5)
    # Also traced (the inverse is a while loop with a run-time convergence check).
    reconstruct = tf.function(lambda t: model.invert(model.features(t)))
    np.testing.assert_allclose(reconstruct(x).numpy(), x.numpy(), atol=1e-5)
    # Logits are the head applied to the features.
    np.testing.assert_allclose(model(x).numpy(), model.head(z).numpy(), atol=1e-6)


def test_invert_reports_a_missed_tolerance():
    model = _model(TINY)
    z = model.features(_digits(8)[0])
    with pytest.raises(InverseNotConvergedError, match="did not converge"):
        model.invert(z, inverse_max_iter=2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="did not converge"):
        tf.function(lambda t: model.invert(t, inverse_max_iter=2))(z)


def test_log_det_is_that_of_the_jacobian():
    model = _model(TINY_HYBRID)
    x, _ = _digits(4, "test")
    log_det = model.flow(logdet="exact").forward_log_det_jacobian(x, event_ndims=3)
    # Same input tensor as above: the model must not hand back results cached outside the tape.
    with tf.GradientTape() as tape:
        tape.watch(x)
        z = model.features(x)
    jac = tf.reshape(tape.batch_jacobian(z, x), [4, 64, 64])
    _, expected = tf.linalg.slogdet(tf.cast(jac, tf.float64))
    np.testing.assert_allclose(log_det.numpy(), expected.numpy(), rtol=1e-4, atol=1e-3)
    # The series estimator is close on average over probes.
    series = [model.flow(logdet="series", n_terms=10, seed=tf.constant([s, 0]))
              .forward_log_det_jacobian(tf.identity(x), event_ndims=3) for s in range(8)]
    np.testing.assert_allclose(np.mean(series, axis=0), expected.numpy(), rtol=0.05)
    lp = model.log_prob(x)
    z2 = tf.reshape(model.features(x), [4, -1])
    prior = -0.5 * tf.reduce_sum(z2**2, 1) - 32.0 * np.log(2 * np.pi)
    np.testing.assert_allclose(lp.numpy(), (prior + log_det).numpy(), rtol=1e-5)
    bpd = model.bits_per_dim(x).numpy()
    np.testing.assert_allclose(bpd, -lp.numpy() / (64 * np.log(2)) + np.log2(17), rtol=1e-5)


@pytest.mark.parametrize("changes, message", [
    (dict(pad_channels=3, hybrid_weight=1.0), "needs pad_channels=0"),
    (dict(strides=(1, 3)), "strides must be 1 or 2"),
    (dict(input_shape=(6, 6, 1), strides=(2, 2)), "divisible by 4"),
    (dict(blocks=(1,)), "one entry per stage"),
    (dict(coeff=1.0), "coeff must be in"),
    (dict(eval_logdet="none"), "eval_logdet must be"),
])
def test_config_validation(changes, message):
    fields = {**TINY.__dict__, **changes}
    with pytest.raises(ValueError, match=message):
        ClassifierConfig(**fields)


def test_hybrid_objective_trains():
    keras.utils.set_random_seed(1)
    model = build_classifier_model(TINY_HYBRID)
    train = datasets.load("digits", "train", batch_size=64, with_labels=True, dequantize=True,
                          seed=3)
    it = iter(train)
    model.initialize(next(it)[0])
    optimizer = keras.optimizers.SGD(0.05, momentum=0.9)

    @tf.function
    def step(x, y, i):
        with tf.GradientTape() as tape:
            loss, metrics = classifier_objective(model, x, y, training=True,
                                                 seed=tf.stack([i, 0]))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss, metrics

    history = []
    for i in range(40):
        x, y = next(it)
        loss, metrics = step(x, y, tf.constant(i))
        history.append((float(loss), float(metrics["bits_per_dim"]), float(metrics["xent"])))
    history = np.array(history)
    first, last = history[:5].mean(0), history[-5:].mean(0)
    assert np.isfinite(history).all()
    assert last[0] < first[0] - 0.5  # the hybrid loss
    assert last[1] < first[1] and last[2] < first[2]  # both of its parts


def test_export_needs_an_initialized_model(tmp_path):
    model = build_classifier_model(TINY)
    with pytest.raises(ValueError, match="not initialized"):
        export_classifier(model, str(tmp_path / "export"))


# A fresh interpreter without the project: `-I -S` skips site-packages' .pth files (among them
# the project's editable install) and the script adds only site-packages back.
_LOAD_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.append(sys.argv[1])
    try:
        import tf_iresnet
        importable = True
    except ImportError:
        importable = False
    import numpy as np
    import tensorflow as tf
    out = {"project_importable": importable, "exports": {}}
    x = tf.constant(np.load(sys.argv[2]))
    for name, path in json.loads(sys.argv[3]).items():
        m = tf.saved_model.load(path)
        res = {"signatures": {k: sorted(f.structured_outputs)
                              for k, f in m.signatures.items()}}
        serve = m.serving_default(x)
        res.update({k: v.numpy().tolist() for k, v in serve.items()})
        res["features"] = m.features(x).numpy().tolist()
        res["reconstruct_err"] = float(tf.reduce_max(tf.abs(m.reconstruct(x) - x)))
        if hasattr(m, "log_prob"):
            res["log_prob"] = m.log_prob(x).numpy().tolist()
            res["bits_per_dim"] = m.bits_per_dim(x).numpy().tolist()
        errors = {}
        bad = {"shape": tf.zeros([2, 8, 8, 3]), "rank": tf.zeros([8, 8, 1]),
               "range": x + 2.0, "nan": x * float("nan"), "dtype": tf.cast(x, tf.float64)}
        for key, value in bad.items():
            try:
                m.serving_default(value)
                errors[key] = "no error"
            except Exception as e:
                errors[key] = type(e).__name__ + ": " + str(e)
        res["errors"] = errors
        # Through the signatures too (they do not check shapes themselves), and empty batches.
        res["signature_errors"] = {}
        for key in ("shape", "rank"):
            try:
                m.signatures["serving_default"](images=bad[key])
                res["signature_errors"][key] = "no error"
            except Exception as e:
                res["signature_errors"][key] = type(e).__name__ + ": " + str(e)
        empty = tf.zeros([0, 8, 8, 1])
        res["empty"] = {k: {o: v.shape.as_list() for o, v in f(images=empty).items()}
                        for k, f in m.signatures.items()}
        out["exports"][name] = res
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny plain and hybrid models and their SavedModel directories."""
    root = tmp_path_factory.mktemp("exports")
    models = {"plain": _model(TINY), "hybrid": _model(TINY_HYBRID)}
    paths = {name: export_classifier(m, str(root / name)) for name, m in models.items()}
    return models, paths


def test_export_reloads_without_the_project(exported, tmp_path):
    (plain, hybrid), paths = exported[0].values(), exported[1]
    x, _ = _digits(16, "test", dequantize=True)
    np.save(tmp_path / "x.npy", x.numpy())
    site_packages = os.path.dirname(os.path.dirname(tf.__file__))
    script = tmp_path / "load.py"
    script.write_text(_LOAD_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run(
        [sys.executable, "-I", "-S", str(script), site_packages, str(tmp_path / "x.npy"),
         json.dumps(paths)],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert not out["project_importable"]

    for name, model in (("plain", plain), ("hybrid", hybrid)):
        res = out["exports"][name]
        signatures = res["signatures"]
        assert signatures["serving_default"] == ["classes", "logits", "probabilities"]
        expected = {"serving_default", "features", "reconstruct"}
        if name == "hybrid":
            expected |= {"log_prob", "bits_per_dim"}
        assert set(signatures) == expected
        logits = model(x).numpy()
        np.testing.assert_allclose(res["logits"], logits, atol=1e-5)
        assert res["classes"] == np.argmax(logits, -1).tolist()
        np.testing.assert_allclose(np.sum(res["probabilities"], -1), 1.0, atol=1e-5)
        np.testing.assert_allclose(res["features"], model.features(x).numpy(), atol=1e-5)
        assert res["reconstruct_err"] < 1e-4
        errors = res["errors"]
        # The signature fixes the rank: TF's binding error names the expected spec.
        assert "TensorSpec(shape=(None, 8, 8, 1), dtype=tf.float32" in errors["rank"]
        assert "TensorSpec(shape=(None, 8, 8, 1), dtype=tf.float32" in errors["shape"]
        for key in ("shape", "rank"):
            assert "must have shape [batch, 8, 8, 1]" in res["signature_errors"][key]
        assert set(res["empty"]) == expected
        for outputs in res["empty"].values():
            assert all(shape[0] == 0 for shape in outputs.values()), res["empty"]
        assert "values must lie in [0, 1]" in errors["range"]
        assert "must be finite" in errors["nan"]
        assert "float32" in errors["dtype"]
    hybrid_res = out["exports"]["hybrid"]
    np.testing.assert_allclose(hybrid_res["log_prob"], hybrid.log_prob(x).numpy(), rtol=1e-4)
    np.testing.assert_allclose(hybrid_res["bits_per_dim"],
                               -np.array(hybrid_res["log_prob"]) / (64 * np.log(2))
                               + np.log2(17), rtol=1e-5)


def test_saved_model_cli_lists_the_signatures(exported):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    if not os.path.exists(cli):
        pytest.skip("saved_model_cli is not installed next to this interpreter")
    proc = subprocess.run([cli, "show", "--dir", exported[1]["hybrid"], "--all"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("serving_default", "features", "reconstruct", "log_prob", "bits_per_dim"):
        assert f"signature_def['{name}']" in proc.stdout
    for output in ("logits", "probabilities", "classes"):
        assert f"outputs['{output}']" in proc.stdout
    # Fully typed: a serving user sees what to send.
    assert "shape: (-1, 8, 8, 1)" in proc.stdout and "(-1, -1, -1, -1)" not in proc.stdout


@pytest.mark.parametrize("cfg", [TINY, TINY_HYBRID], ids=["plain", "hybrid"])
def test_forward_passes_assign_nothing_power_iterations_run_after_the_step(cfg):
    """Pure views: the training objective (eager and compiled) leaves every variable but the
    head's BatchNorm statistics as it was; the post-step moves the power-iteration state."""
    from tf_iresnet.tasks.run import power_iteration_step

    model = _model(cfg)
    x, y = _digits(16, dequantize=cfg.hybrid)
    before = {v.path: v.numpy().copy() for v in model.weights}
    step = tf.function(lambda a, b: classifier_objective(model, a, b, training=True,
                                                         seed=tf.constant([1, 2]))[0])
    classifier_objective(model, x, y, training=True, seed=tf.constant([1, 2]))
    step(x, y)
    now = {w.path: w.numpy() for w in model.weights}
    changed = [p for p, v in before.items() if not np.array_equal(v, now[p])]
    assert all("head_norm" in p for p in changed), changed
    power_iteration_step(model, tf.constant(0))
    after = {w.path: w.numpy() for w in model.weights}
    moved = [p for p in before if not np.array_equal(before[p], after[p])
             and "head_norm" not in p]
    assert moved and all(p.endswith(("/u", "/v")) for p in moved), moved
