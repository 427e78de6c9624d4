"""Runs a training binary (``python tests/_faults.py train.density --flags...``) as ``python -m``
would, with faults injected and presets shrunk from the environment, for the binary tests:

* ``KILL_IN_SAVE=N``: SIGKILL the process while it writes checkpoint ``ckpt-N``, after its
  shards are written into ``ckpt-N_temp/`` and before they are merged into place.
* ``PRESET_OVERRIDES='{"digits_density": {"blocks": [1, 1], "hidden_channels": 8}}'``: the
  named presets with these fields replaced (lists become tuples), so a test of what the binary
  does (flags, checkpoints, resumption, logs, export) need not train the full-size model.
"""

import dataclasses
import json
import os
import runpy
import signal
import sys

import tensorflow as tf
from tensorflow.python.ops import gen_io_ops

_merge = gen_io_ops.merge_v2_checkpoints


def _merge_then_maybe_die(checkpoint_prefixes, destination_prefix, *args, **kwargs):
    kill_at = os.environ.get("KILL_IN_SAVE")
    if kill_at and tf.executing_eagerly():
        if destination_prefix.numpy().decode().endswith(f"ckpt-{kill_at}"):
            os.kill(os.getpid(), signal.SIGKILL)
    return _merge(checkpoint_prefixes, destination_prefix, *args, **kwargs)


gen_io_ops.merge_v2_checkpoints = _merge_then_maybe_die


def _override_presets(text):
    from tf_iresnet import presets

    for name, fields in json.loads(text).items():
        registry = presets._DENSITY if name in presets._DENSITY else presets._CLASSIFIER
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        registry[name] = dataclasses.replace(registry[name], **fields)


if __name__ == "__main__":
    if os.environ.get("PRESET_OVERRIDES"):
        _override_presets(os.environ["PRESET_OVERRIDES"])
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
