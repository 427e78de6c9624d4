"""Tests of tf_iresnet.datasets: offline only (sklearn digits, generated toys, tfds mock data)."""

import math

import numpy as np
import pytest
import tensorflow as tf

from tf_iresnet import datasets
from tf_iresnet.datasets import images as images_lib

TFDS_NAMES = [
    "mnist",
    "fashion_mnist",
    "cifar10",
    "cifar100",
    "svhn_cropped",
    "celeb_a",
    "celeb_a_64",
]
DIGITS_LEVELS = 17


def _all(ds):
    """Concatenates a finite dataset of batches (or (x, y) batches) into numpy arrays."""
    batches = list(ds.as_numpy_iterator())
    if isinstance(batches[0], tuple):
        return tuple(np.concatenate(parts) for parts in zip(*batches, strict=True))
    return np.concatenate(batches)


def _take(ds, n):
    return [b for b in ds.take(n).as_numpy_iterator()]


@pytest.fixture
def mock_tfds(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    # mock_data serves random examples with the real features; it ignores the split name and
    # slicing, and always yields num_examples examples.
    with tfds.testing.mock_data(num_examples=6):
        yield str(tmp_path)


# ----------------------------------------------------------------------------- registry


def test_names_and_specs():
    expected = {"digits", *TFDS_NAMES, *datasets.TOY_NAMES}
    assert set(datasets.names()) == expected
    assert len(datasets.names()) == len(expected)
    for name in datasets.names():
        s = datasets.spec(name)
        assert s.name == name
        assert s.train_split in s.splits and s.test_split in s.splits
        if s.modality == "image":
            assert len(s.shape) == 3 and s.num_levels in (17, 256)
        else:
            assert s.modality == "vector" and s.shape == (2,) and s.num_levels is None
            assert s.source == "generated" and s.num_classes is None
    digits = datasets.spec("digits")
    assert (digits.shape, digits.num_levels, digits.num_classes, digits.source) == (
        (8, 8, 1),
        17,
        10,
        "sklearn",
    )
    assert datasets.spec("celeb_a").shape == (datasets.CELEB_A_SIZE, datasets.CELEB_A_SIZE, 3)
    assert datasets.spec("celeb_a").splits == ("train", "validation", "test")
    assert datasets.spec("cifar100").num_classes == 100
    assert datasets.spec("cifar10").event_size == 3072


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError, match="Unknown dataset 'cifar11'.*cifar10.*8gaussians"):
        datasets.spec("cifar11")
    with pytest.raises(ValueError, match="Unknown dataset"):
        datasets.load("imagenet", batch_size=4)


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_range_and_labels():
    x, y = next(iter(datasets.load("digits", batch_size=32, with_labels=True)))
    assert x.shape == (32, 8, 8, 1) and x.dtype == tf.float32
    assert y.shape == (32,) and y.dtype == tf.int32
    x, y = x.numpy(), y.numpy()
    assert x.min() >= 0.0 and x.max() < 1.0
    assert set(y) <= set(range(10))
    x_only = next(iter(datasets.load("digits", batch_size=32)))
    assert isinstance(x_only, tf.Tensor) and x_only.shape == (32, 8, 8, 1)


def test_digits_split_is_fixed_partition():
    from sklearn.datasets import load_digits

    kw = dict(batch_size=500, shuffle=False, repeat=False, dequantize=False, drop_remainder=False)
    train_x, train_y = _all(datasets.load("digits", "train", with_labels=True, **kw))
    test_x, test_y = _all(datasets.load("digits", "test", with_labels=True, **kw))
    assert len(train_x) == 1500 and len(test_x) == 297

    def levels(x):
        return np.rint(x * DIGITS_LEVELS - 0.5).astype(np.int64).reshape(len(x), -1)

    # Train + test is exactly the bundled set (as a multiset of (image, label) rows), so the
    # split neither drops nor duplicates an example: no overlap even if images repeat.
    ours = np.concatenate(
        [
            np.c_[levels(train_x), train_y],
            np.c_[levels(test_x), test_y],
        ]
    )
    bunch = load_digits()
    theirs = np.c_[bunch.images.reshape(len(bunch.images), -1).astype(np.int64), bunch.target]
    assert np.array_equal(ours[np.lexsort(ours.T)], theirs[np.lexsort(theirs.T)])
    # Fixed: a second load (other seed) gives the same split.
    again_x, _ = _all(datasets.load("digits", "test", with_labels=True, seed=7, **kw))
    assert np.array_equal(again_x, test_x)


def test_dequantization_stays_in_level_bins():
    kw = dict(batch_size=300, shuffle=False, repeat=False, drop_remainder=False)
    centres = _all(datasets.load("digits", "test", dequantize=False, **kw))
    noisy = _all(datasets.load("digits", "test", dequantize=True, **kw))
    levels = centres * DIGITS_LEVELS - 0.5
    # dequantize=False gives exact bin centres (v + 0.5) / L.
    np.testing.assert_allclose(levels, np.rint(levels), atol=1e-4)
    levels = np.rint(levels)
    assert levels.min() == 0 and levels.max() == DIGITS_LEVELS - 1
    # dequantize=True: (v + u) / L with u in [0, 1), so floor(x * L) recovers v exactly.
    np.testing.assert_array_equal(np.floor(noisy * DIGITS_LEVELS), levels)
    frac = noisy * DIGITS_LEVELS - levels
    assert abs(frac.mean() - 0.5) < 0.01 and frac.std() > 0.25  # ~U[0, 1): mean 1/2, std 0.29


def test_uniform_dequantize_8bit_edges():
    # Level 255 with u near 1 must not round up to 1.0 in float32.
    v = tf.fill([64, 64], tf.constant(255, tf.uint8))
    x = images_lib.uniform_dequantize(tf.constant([1, 2], tf.int64), v, 256).numpy()
    assert x.max() < 1.0
    np.testing.assert_array_equal(np.floor(x * 256), 255)
    x0 = images_lib.uniform_dequantize(tf.constant([3, 4], tf.int64), v * 0, 256).numpy()
    assert x0.min() > 0.0 and np.all(np.floor(x0 * 256) == 0)


def test_digits_pipeline_is_deterministic_given_seed():
    def first(seed):
        return next(iter(datasets.load("digits", batch_size=16, seed=seed))).numpy()

    np.testing.assert_array_equal(first(3), first(3))
    assert not np.array_equal(first(3), first(4))


def test_drop_remainder_and_num_examples():
    kw = dict(batch_size=100, shuffle=False, repeat=False)
    assert [b.shape[0] for b in datasets.load("digits", "test", **kw)] == [100, 100]
    sizes = [b.shape[0] for b in datasets.load("digits", "test", drop_remainder=False, **kw)]
    assert sizes == [100, 100, 97]
    limited = _all(datasets.load("digits", "test", num_examples=50, drop_remainder=False, **kw))
    assert limited.shape == (50, 8, 8, 1)
    # repeat=True keeps going past the end of the (limited) split.
    assert len(_take(datasets.load("digits", batch_size=20, num_examples=30), 5)) == 5


def test_augment_is_a_noop_for_digits():
    kw = dict(batch_size=64, with_labels=True, seed=1)
    a, _ = next(iter(datasets.load("digits", augment=True, **kw)))
    b, _ = next(iter(datasets.load("digits", augment=False, **kw)))
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def _assert_resumes(load, starts=(1, 3, 7), n=4):
    """Batch k of `load(s)` must equal batch s + k of `load(0)`, bit for bit (x and labels)."""
    def batches(start, count):
        return [b if isinstance(b, tuple) else (b,) for b in _take(load(start), count)]

    stream = batches(0, max(starts) + n)
    assert not np.array_equal(stream[0][0], stream[n][0])  # else the check below is void
    for s in starts:
        for k, batch in enumerate(batches(s, n)):
            for got, want in zip(batch, stream[s + k], strict=True):
                np.testing.assert_array_equal(got, want, err_msg=f"start_step={s}, batch {k}")


@pytest.mark.parametrize("kw", [
    dict(),  # dequantized, shuffled: a pass is 30 examples, so batches straddle passes
    dict(with_labels=True, dequantize=False),
])
def test_start_step_resumes_the_digits_stream(kw):
    def load(start):
        return datasets.load("digits", batch_size=8, num_examples=30, seed=4, start_step=start,
                             **kw)

    _assert_resumes(load)


# ----------------------------------------------------------------------------- toy 2-D


@pytest.mark.parametrize("name", datasets.TOY_NAMES)
def test_toy_train_stream(name):
    batches = _take(datasets.load(name, batch_size=256, seed=5), 3)
    assert all(b.shape == (256, 2) and b.dtype == np.float32 for b in batches)
    points = np.concatenate(batches)
    assert np.all(np.isfinite(points))
    assert not np.array_equal(batches[0], batches[1])  # a stream, not one batch repeated
    # Roughly [-4, 4]^2 and not collapsed.
    assert np.percentile(np.abs(points), 99) < 4.5
    assert 0.7 < points.std() < 3.0
    # Deterministic given the seed, different for another seed.
    again = _take(datasets.load(name, batch_size=256, seed=5), 3)
    np.testing.assert_array_equal(points, np.concatenate(again))
    other = _take(datasets.load(name, batch_size=256, seed=6), 1)[0]
    assert not np.array_equal(batches[0], other)


@pytest.mark.parametrize("name", datasets.TOY_NAMES)
def test_toy_test_split_is_finite_and_fixed(name):
    kw = dict(batch_size=4096, shuffle=False, repeat=False, drop_remainder=False)
    test = _all(datasets.load(name, "test", seed=0, **kw))
    assert test.shape == (datasets.TOY_TEST_SIZE, 2) and test.dtype == np.float32
    assert np.all(np.isfinite(test))
    np.testing.assert_array_equal(test, _all(datasets.load(name, "test", seed=9, **kw)))
    train = _take(datasets.load(name, batch_size=4096, seed=0), 1)[0]
    assert not np.array_equal(train, test[:4096])
    # Shuffling the test split permutes the same points.
    shuffled = _all(datasets.load(name, "test", seed=0, **{**kw, "shuffle": True}))
    assert not np.array_equal(shuffled, test)
    np.testing.assert_array_equal(np.sort(shuffled, axis=0), np.sort(test, axis=0))
    limited = _all(datasets.load(name, "test", num_examples=100, **kw))
    np.testing.assert_array_equal(limited, test[:100])


def test_toy_finite_train_sample_and_helper():
    finite = _all(
        datasets.load("moons", batch_size=64, num_examples=200, repeat=False, drop_remainder=False)
    )
    assert finite.shape == (200, 2)
    sample = datasets.sample_toy2d("moons", 200, seed=0)
    np.testing.assert_array_equal(np.sort(finite, axis=0), np.sort(sample, axis=0))
    assert sample.shape == (200, 2) and sample.dtype == np.float32
    np.testing.assert_array_equal(sample, datasets.sample_toy2d("moons", 200, seed=0))
    assert not np.array_equal(sample, datasets.sample_toy2d("moons", 200, seed=1))
    with pytest.raises(ValueError, match="Unknown toy dataset"):
        datasets.sample_toy2d("moon", 10, seed=0)
    with pytest.raises(ValueError, match="positive"):
        datasets.sample_toy2d("moons", 0, seed=0)


@pytest.mark.parametrize("num_examples", [None, 20])  # the infinite stream, a finite sample
def test_start_step_resumes_the_toy_stream(num_examples):
    _assert_resumes(lambda start: datasets.load(
        "moons", batch_size=8, seed=2, num_examples=num_examples, start_step=start))


# ----------------------------------------------------------------------------- tfds (mocked)


@pytest.mark.parametrize("name", TFDS_NAMES)
def test_tfds_sets_under_mock_data(mock_tfds, name):
    s = datasets.spec(name)
    assert s.source == "tfds" and s.num_levels == 256
    x = next(iter(datasets.load(name, batch_size=4, data_dir=mock_tfds)))
    assert x.shape == (4, *s.shape) and x.dtype == tf.float32
    assert 0.0 <= x.numpy().min() and x.numpy().max() < 1.0
    centres = next(
        iter(datasets.load(name, "test", batch_size=4, dequantize=False, data_dir=mock_tfds))
    ).numpy()
    levels = centres * 256 - 0.5
    np.testing.assert_allclose(levels, np.rint(levels), atol=1e-3)
    # num_examples (6 mock examples -> 5) and drop_remainder on a finite pass.
    finite = datasets.load(
        name, batch_size=2, repeat=False, drop_remainder=False, num_examples=5, data_dir=mock_tfds
    )
    assert [b.shape[0] for b in finite] == [2, 2, 1]
    if s.num_classes is None:
        with pytest.raises(ValueError, match="no labels"):
            datasets.load(name, batch_size=4, with_labels=True, data_dir=mock_tfds)
    else:
        x, y = next(iter(datasets.load(name, batch_size=4, with_labels=True, data_dir=mock_tfds)))
        assert x.shape == (4, *s.shape) and y.shape == (4,) and y.dtype == tf.int32
        assert np.all((y.numpy() >= 0) & (y.numpy() < s.num_classes))


def test_tfds_split_names(mock_tfds):
    for split in ("train", "test", "train[:10%]", "train[:3]+test"):
        datasets.load("cifar10", split, batch_size=2, data_dir=mock_tfds)
    datasets.load("celeb_a", "validation", batch_size=2, data_dir=mock_tfds)
    for bad in ("validation", "trian", "train[:3]+dev", ""):
        with pytest.raises(ValueError, match="split"):
            datasets.load("cifar10", bad, batch_size=2, data_dir=mock_tfds)


@pytest.mark.parametrize("name", ["cifar10", "svhn_cropped"])
def test_augmentation_changes_images_keeps_shape_and_range(mock_tfds, name):
    kw = dict(batch_size=6, with_labels=True, shuffle=False, dequantize=False, data_dir=mock_tfds)
    plain, y_plain = next(iter(datasets.load(name, augment=False, **kw)))
    aug, y_aug = next(iter(datasets.load(name, augment=True, **kw)))
    assert aug.shape == plain.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(y_aug.numpy(), y_plain.numpy())
    aug = aug.numpy()
    assert 0.0 < aug.min() and aug.max() < 1.0
    assert not np.array_equal(aug, plain.numpy())
    levels = aug * 256 - 0.5  # still bin centres of valid levels (zero padding is level 0)
    np.testing.assert_allclose(levels, np.rint(levels), atol=1e-3)
    again, _ = next(iter(datasets.load(name, augment=True, **kw)))
    np.testing.assert_array_equal(aug, again.numpy())  # deterministic given the seed


def test_start_step_resumes_augmented_cifar10(mock_tfds):
    # 6 mock examples, batches of 4: every batch after the first straddles two passes, each
    # with its own shuffle and its own crops and flips.
    _assert_resumes(lambda start: datasets.load(
        "cifar10", batch_size=4, with_labels=True, augment=True, seed=3, data_dir=mock_tfds,
        start_step=start))


def test_celeb_a_centre_crop_resize():
    # A vertical ramp over the 218x178 photo; the crop keeps the central 148 rows.
    column = np.linspace(0, 255, 218).astype(np.uint8)
    photo = tf.constant(np.broadcast_to(column[:, None, None], (218, 178, 3)))
    small = images_lib.centre_crop_resize(photo, 148, 32).numpy()
    assert small.shape == (32, 32, 3) and small.dtype == np.uint8
    top, bottom = int(column[35]), int(column[35 + 147])
    assert abs(int(small[0, 0, 0]) - top) <= 5 and abs(int(small[-1, 0, 0]) - bottom) <= 5
    assert np.all(np.diff(small[:, 0, 0].astype(int)) >= 0)


# ----------------------------------------------------------------------------- bits/dim


def test_bits_per_dim_hand_computed():
    # A uniform density on [0, 1]^D has log p = 0: exactly log2(L) bits/dim.
    assert datasets.bits_per_dim(0.0, 3072, 256) == pytest.approx(8.0)
    assert datasets.bits_per_dim(0.0, datasets.spec("digits")) == pytest.approx(math.log2(17))
    # -log p = 1000 nats over D = 3072 dims, 256 levels.
    expected = 1000.0 / (3072 * math.log(2.0)) + 8.0
    assert datasets.bits_per_dim(-1000.0, datasets.spec("cifar10")) == pytest.approx(expected)
    assert datasets.bits_per_dim(-1000.0, (32, 32, 3), 256) == pytest.approx(expected)
    # Vectors: nats -> bits per dim only. Standard normal in 2-D at the origin: log p = -log 2pi.
    log_p = -math.log(2.0 * math.pi)
    assert datasets.bits_per_dim(log_p, 2, None) == pytest.approx(math.log2(2.0 * math.pi) / 2)
    assert datasets.bits_per_dim(log_p, datasets.spec("moons")) == pytest.approx(
        math.log2(2.0 * math.pi) / 2
    )
    # Tensors stay tensors, batched elementwise.
    out = datasets.bits_per_dim(tf.constant([0.0, -64.0 * math.log(2.0)]), 64, 17)
    assert isinstance(out, tf.Tensor)
    np.testing.assert_allclose(out.numpy(), [math.log2(17), math.log2(17) + 1.0], rtol=1e-6)


def test_bits_per_dim_bad_arguments():
    with pytest.raises(ValueError, match="disagrees"):
        datasets.bits_per_dim(0.0, datasets.spec("digits"), 256)
    with pytest.raises(ValueError, match="event size"):
        datasets.bits_per_dim(0.0, 0, 256)
    with pytest.raises(ValueError, match="num_levels"):
        datasets.bits_per_dim(0.0, 10, 0)


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("digits", dict(split="validation"), "Unknown split"),
        ("digits", dict(split="train[:10]"), "Unknown split"),
        ("moons", dict(split="valid"), "Unknown split"),
        ("digits", dict(batch_size=0), "batch_size"),
        ("digits", dict(batch_size=-3), "batch_size"),
        ("digits", dict(batch_size=2.5), "batch_size"),
        ("digits", dict(num_examples=0), "num_examples"),
        ("moons", dict(augment=True), "image datasets"),
        ("moons", dict(with_labels=True), "no labels"),
        ("celeb_a", dict(with_labels=True), "no labels"),
        ("cifar10", dict(augment=True), "classifiers"),
        ("8gaussians", dict(repeat=False), "infinite"),
    ],
)
def test_bad_arguments_raise_clear_errors(name, kwargs, match):
    kwargs = {"batch_size": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        datasets.load(name, **kwargs)
