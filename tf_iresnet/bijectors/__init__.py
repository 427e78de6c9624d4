"""TFP bijectors of tf-iresnet (views over Keras-owned weights where they have any)."""

from tf_iresnet.bijectors.actnorm import ActNorm, ActNormState, data_dependent_init
from tf_iresnet.bijectors.iresblock import InvertibleResidualBlock
from tf_iresnet.bijectors.preprocessing import centering, logit_preprocessing
from tf_iresnet.bijectors.squeeze import Squeeze
from tf_iresnet.bijectors.zero_pad import ZeroChannelPad

__all__ = [
    "ActNorm",
    "ActNormState",
    "InvertibleResidualBlock",
    "Squeeze",
    "ZeroChannelPad",
    "centering",
    "data_dependent_init",
    "logit_preprocessing",
]
