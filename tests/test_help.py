"""``--help`` of the installed console scripts lists the binary's own flags, and only those.

absl's ``--help`` lists the key flags of the main module, which it names by ``sys.argv[0]``; a
console script imports the binary as ``tf_iresnet_train.<binary>`` (so its flags are
registered under that name) while ``sys.argv[0]`` is the script's path. ``python -m
train.<binary>`` registers them under ``sys.argv[0]`` itself and needs nothing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

from train.flags import COMMON_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Flags of each binary beyond COMMON_FLAGS that --help must show (a floor, not the whole list:
# the whole list is what the binary itself registers, reported by the subprocess).
EXTRA = {
    "density": {"optimizer", "lr", "logdet", "probe", "neumann_gradient", "recompute",
                "gradient_memory", "eval_examples", "num_samples"},
    "classifier": {"lr", "l2_penalty", "hybrid_weight"},
}
# What the console script (pip's wrapper) does, then the flags the binary registered, as JSON.
# The package is `tf_iresnet_train` once installed (`make venv` installs it editable); a bare
# checkout imports the same module as `train`, which shows the same bug.
_SCRIPT = """\
import json, sys
from absl import flags
from {module} import run
own = {{f.name: f.help for f in flags.FLAGS.get_flags_for_module("{module}")}}
sys.argv[0] = "tf-iresnet-{binary}"
try:
    sys.exit(run())
finally:
    print("OWN_FLAGS=" + json.dumps(own))
"""


def _words(text: str) -> str:
    return re.sub(r"\s+", "", text)  # absl wraps help text at 80 columns, hyphens included


def test_console_scripts_help_lists_the_binarys_own_flags():
    package = "tf_iresnet_train" if importlib.util.find_spec("tf_iresnet_train") else "train"
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=REPO)
    procs = {  # both at once: each pays the TensorFlow import
        binary: subprocess.Popen(
            [sys.executable, "-c", _SCRIPT.format(module=f"{package}.{binary}", binary=binary),
             "--help"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for binary in EXTRA}
    for binary, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]  # absl: help, 1
        helptext, own = out.rsplit("OWN_FLAGS=", 1)
        own = json.loads(own)
        assert set(COMMON_FLAGS) | EXTRA[binary] <= set(own), sorted(own)
        assert f"USAGE: tf-iresnet-{binary} [flags]" in helptext, helptext
        # Every flag the binary defines, and nothing of absl's or TensorFlow's.
        listed = re.findall(r"^  --(?:\[no\])?(\w+):", helptext, re.MULTILINE)
        assert sorted(listed) == sorted(own), helptext
        for name, text in own.items():
            assert _words(text) in _words(helptext), (name, text)
        assert "--helpfull" in helptext  # absl's pointer to the full list stays
