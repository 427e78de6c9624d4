"""Package layout, the part `pyproject.toml` cannot say.

The wheel ships the library `tf_iresnet` and the binaries of `train/` under the package name
`tf_iresnet_train` (run from a checkout as `python -m train.density`, installed as the
`tf-iresnet-density` and `tf-iresnet-classifier` console scripts). `benchmarks/` and `tests/`
stay in the checkout. The library never imports the binaries.
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=[
        *find_namespace_packages(include=["tf_iresnet", "tf_iresnet.*"], exclude=["*__pycache__"]),
        "tf_iresnet_train",
    ],
    package_dir={"tf_iresnet_train": "train"},
)
