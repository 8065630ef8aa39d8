"""crossrec_jax: cross-domain recommendation with a pretrained language model, in JAX/Flax."""

__version__ = "0.1.0"
