"""Data pipelines for i-ResNet density estimation and classification.

Image sets (float32 NHWC in [0, 1], uniformly dequantized for density training):
`digits` (scikit-learn's bundled 8x8 digits, 17 levels, works offline), and through
`tfds.load`: `mnist`, `fashion_mnist`, `cifar10`, `cifar100`, `svhn_cropped`, `celeb_a`
(32x32) and `celeb_a_64`. Toy 2-D densities (float32 [B, 2], sampled on the fly):
`checkerboard`, `moons`, `circles`, `8gaussians`, `pinwheel`, `2spirals`, `swissroll`.

#### Examples

```python
from tf_iresnet import datasets

ds = datasets.load("digits", batch_size=64)             # x: float32 [64, 8, 8, 1] in [0, 1)
d = datasets.spec("digits")
bpd = datasets.bits_per_dim(log_prob, d)                # -log p / (D ln 2) + log2(17)
test = datasets.load("8gaussians", "test", batch_size=500, repeat=False)
```

Modules: `core` (DatasetSpec, bits/dim, shared batching), `images`, `toy2d`, `registry`.
"""

from tf_iresnet.datasets.core import DatasetSpec, bits_per_dim
from tf_iresnet.datasets.images import CELEB_A_CROP, CELEB_A_SIZE
from tf_iresnet.datasets.registry import (
    DataNotFoundError,
    check_available,
    load,
    names,
    num_examples,
    spec,
)
from tf_iresnet.datasets.toy2d import TOY_NAMES, TOY_TEST_SIZE, sample_toy2d

__all__ = [
    "CELEB_A_CROP",
    "CELEB_A_SIZE",
    "TOY_NAMES",
    "TOY_TEST_SIZE",
    "DataNotFoundError",
    "DatasetSpec",
    "bits_per_dim",
    "check_available",
    "load",
    "names",
    "num_examples",
    "sample_toy2d",
    "spec",
]
