"""Test configuration: quiet TensorFlow, Keras on the TensorFlow backend, two logical CPUs."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Split the host CPU into two logical devices once, before any op runs, so MirroredStrategy
# tests have two replicas; single-device code is unaffected.
_cpus = tf.config.list_physical_devices("CPU")
if _cpus:
    try:
        tf.config.set_logical_device_configuration(
            _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
        )
    except RuntimeError:
        pass


@pytest.fixture
def keras_seed():
    """Seeds Keras, NumPy and Python's RNGs; a module opts in with
    ``pytestmark = pytest.mark.usefixtures("keras_seed")``."""
    import keras  # here, not at the top: the CPU split above comes before anything else

    keras.utils.set_random_seed(1234)
