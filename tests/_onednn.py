"""Prints 1 if TensorFlow uses its oneDNN kernels in this environment (``TF_ENABLE_ONEDNN_OPTS``
and the CPU decide), else 0: for ``make test-other-kernels``.

TensorFlow's own check (``_pywrap_util_port.IsMklEnabled``), loaded without importing the
``tensorflow`` package (0.3 s instead of about 5 s); if that fails, through the package.
"""

import importlib.util
import os


def onednn_enabled() -> bool:
    try:
        package = os.path.dirname(importlib.util.find_spec("tensorflow").origin)
        path = os.path.join(package, "python", "util", "_pywrap_util_port.so")
        spec = importlib.util.spec_from_file_location("_pywrap_util_port", path)
        port = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(port)
    except (ImportError, OSError, AttributeError, TypeError):
        from tensorflow.python.util import _pywrap_util_port as port
    return bool(port.IsMklEnabled())


if __name__ == "__main__":
    print(int(onednn_enabled()))
