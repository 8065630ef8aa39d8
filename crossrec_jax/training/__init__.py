"""Training: the loop, the optimizer, adversarial terms, inputs and the encoder modes."""
