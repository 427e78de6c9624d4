"""SavedModel export of tf-iresnet models (loadable with plain ``tf.saved_model.load``)."""
