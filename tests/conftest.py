"""Test configuration: quiet TensorFlow, Keras on the TensorFlow backend, two logical CPUs."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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
