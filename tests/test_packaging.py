"""The wheel: the library, the binaries as `tf_iresnet_train`, two console scripts, no more."""

from __future__ import annotations

import ast
import configparser
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {
    "tf-iresnet-density": "tf_iresnet_train.density:run",
    "tf-iresnet-classifier": "tf_iresnet_train.classifier:run",
}


def _source_files() -> list[str]:
    """The checkout's files as git sees them (tracked, or untracked and not ignored)."""
    if shutil.which("git") is None or not os.path.exists(os.path.join(REPO, ".git")):
        pytest.skip("needs a git checkout")
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout
    return [p for p in out.splitlines() if os.path.isfile(os.path.join(REPO, p))]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    # Built from a copy, so no stale build/ directory of the checkout leaks into it.
    src = tmp_path_factory.mktemp("src")
    for path in _source_files():
        os.makedirs(src / os.path.dirname(path), exist_ok=True)
        shutil.copy2(os.path.join(REPO, path), src / path)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(src)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (name,) = os.listdir(out)
    with zipfile.ZipFile(out / name) as zf:
        yield zf


def test_wheel_holds_the_library_and_the_binaries_only(wheel):
    names = wheel.namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"tf_iresnet", "tf_iresnet_train"}
    # Every package of the library is in it (models/ has no __init__.py: a namespace package).
    packages = {
        os.path.relpath(root, REPO)
        for root, _, files in os.walk(os.path.join(REPO, "tf_iresnet"))
        if "__pycache__" not in root and any(f.endswith(".py") for f in files)
    }
    assert packages <= {os.path.dirname(n) for n in names}
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    binaries = {n for n in names if n.startswith("tf_iresnet_train/")}
    expected = {f"tf_iresnet_train/{f}" for f in os.listdir(os.path.join(REPO, "train"))
                if f.endswith(".py")}
    assert binaries == expected


def test_wheel_defines_the_two_console_scripts(wheel):
    (path,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    entry_points = configparser.ConfigParser()
    entry_points.read_string(wheel.read(path).decode())
    assert dict(entry_points["console_scripts"]) == SCRIPTS
    assert set(entry_points.sections()) == {"console_scripts"}


def test_library_never_imports_the_binaries(wheel):
    for name in wheel.namelist():
        if not (name.startswith("tf_iresnet/") and name.endswith(".py")):
            continue
        for node in ast.walk(ast.parse(wheel.read(name), name)):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                assert top not in {"train", "tf_iresnet_train", "benchmarks", "tests"}, name


def test_binaries_import_each_other_relatively():
    """`train/` works as `train` in a checkout and as `tf_iresnet_train` when installed."""
    for name in os.listdir(os.path.join(REPO, "train")):
        if not name.endswith(".py"):
            continue
        path = os.path.join(REPO, "train", name)
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        absolute = [n.module for n in ast.walk(tree)
                    if isinstance(n, ast.ImportFrom) and not n.level
                    and (n.module or "").split(".")[0] == "train"]
        absolute += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                     for a in n.names if a.name.split(".")[0] == "train"]
        assert not absolute, (name, absolute)
