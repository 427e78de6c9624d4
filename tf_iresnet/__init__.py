"""tf-iresnet: Invertible Residual Networks (Behrmann et al., ICML 2019) for Keras 3 and TFP.

Keras layers own every weight (spectral-normalized residual branches, ActNorm states); the TFP
bijectors and distributions built from them are stateless views, rebuilt on each call.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from tf_iresnet.activations import ELU, LipSwish  # noqa: E402
from tf_iresnet.bijectors import (  # noqa: E402
    ActNorm,
    ActNormState,
    InvertibleResidualBlock,
    Squeeze,
    ZeroChannelPad,
    centering,
    logit_preprocessing,
)
from tf_iresnet.fixed_point import (  # noqa: E402
    InverseConfig,
    InverseNotConvergedError,
    solve_fixed_point,
)
from tf_iresnet.lipschitz import (  # noqa: E402
    SpectralNormalization,
    converge_spectral_norms,
    lipschitz_report,
    update_spectral_norms,
)
from tf_iresnet.logdet import LogDetConfig  # noqa: E402
from tf_iresnet.recompute import recompute_gradient  # noqa: E402
from tf_iresnet.residual import conv_branch, dense_branch  # noqa: E402

__all__ = [
    "ActNorm",
    "ActNormState",
    "ELU",
    "InverseConfig",
    "InverseNotConvergedError",
    "InvertibleResidualBlock",
    "LipSwish",
    "LogDetConfig",
    "SpectralNormalization",
    "Squeeze",
    "ZeroChannelPad",
    "centering",
    "conv_branch",
    "converge_spectral_norms",
    "dense_branch",
    "lipschitz_report",
    "logit_preprocessing",
    "recompute_gradient",
    "solve_fixed_point",
    "update_spectral_norms",
]

__version__ = "0.1.0"
