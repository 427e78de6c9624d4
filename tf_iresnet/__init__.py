"""tf-iresnet: Invertible Residual Networks for Keras 3 / TensorFlow Probability."""
