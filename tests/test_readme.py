"""The README's library example runs as written (it is the first thing a user copies)."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _section_code(title: str) -> str:
    text = open(README).read()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"no python example under '## {title}'"
    return blocks[0]


def test_library_example_runs():
    import tf_iresnet

    code = _section_code("The library")
    scope: dict = {}
    exec(compile(code, README, "exec"), scope)  # the README's own example
    # What the example claims: the block inverts, and its branch is certified contractive.
    x, x_back = scope["x"].numpy(), scope["x_back"].numpy()
    assert abs(x - x_back).max() < 1e-4
    blocks = tf_iresnet.lipschitz_report(scope["g"])["blocks"]
    assert blocks and all(b["upper_bound"] < 1.0 for b in blocks)


@pytest.mark.slow  # about 30 s on 2 loaded cores: tracing the sampling step and its gradient
def test_reverse_kl_example_decreases_the_kl():
    code = _section_code("Fitting a flow through its samples (reverse KL)")
    assert "steps = 300" in code
    scope: dict = {}
    code = code.replace("steps = 300", "steps = 25").replace("range(10)", "range(3)")
    exec(compile(code, README, "exec"), scope)
    assert scope["kl_end"] < scope["kl_start"] - 0.02, (scope["kl_start"], scope["kl_end"])
