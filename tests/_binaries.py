"""The training binaries in the test process, and in the background.

A binary defines its flags on absl's global ``flags.FLAGS`` when it is imported, so two
binaries cannot be imported into one process the ordinary way (the second raises
`flags.DuplicateFlagError`). `binary` imports ``train.<name>`` while ``flags.FLAGS`` is a
scratch `FlagValues`, so that its import-time ``define_flags()`` lands there; tests then parse
flags into their own `FlagValues` with ``define_flags(fv)`` and ``config_from_flags(fv)``, the
functions the binary runs on ``flags.FLAGS``.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

from absl import flags


def binary(name: str):
    """The module ``train.<name>`` (``"density"`` or ``"classifier"``)."""
    module = f"train.{name}"
    if module in sys.modules:
        return sys.modules[module]
    real = flags.FLAGS
    flags.FLAGS = flags.FlagValues()  # read by the binary's defaults at import
    try:
        return importlib.import_module(module)
    finally:
        flags.FLAGS = real


def parse(name: str, args) -> flags.FlagValues:
    """A fresh `FlagValues` with the binary's flags, parsed from ``args`` (no program name).

    Raises:
      flags.Error: a flag the binary refuses (what it prints as a usage error, exit 1).
    """
    fv = flags.FlagValues()
    binary(name).define_flags(fv)
    fv([f"train.{name}", *args])
    return fv


def config(name: str, args):
    """The task config the binary resolves from ``args`` (`parse`, then
    ``config_from_flags``)."""
    return binary(name).config_from_flags(parse(name, args))


class Background:
    """A command started in the background (its output in files, so it never blocks on a
    full pipe); `wait` returns its `subprocess.CompletedProcess`. Lets a test run a binary
    while it does other work, e.g. two independent runs side by side."""

    def __init__(self, args, *, out_dir, timeout=300, **kwargs):
        os.makedirs(out_dir, exist_ok=True)
        self._paths = [os.path.join(out_dir, name) for name in ("stdout", "stderr")]
        self._files = [open(p, "w+") for p in self._paths]
        self._timeout = timeout
        self._done = None
        self.proc = subprocess.Popen(args, stdout=self._files[0], stderr=self._files[1],
                                     text=True, **kwargs)

    def wait(self) -> subprocess.CompletedProcess:
        if self._done is None:
            try:
                self.proc.wait(timeout=self._timeout)
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait()
            out, err = (open(p).read() for p in self._paths)
            for f in self._files:
                f.close()
            self._done = subprocess.CompletedProcess(self.proc.args, self.proc.returncode,
                                                     out, err)
        return self._done
