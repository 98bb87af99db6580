"""genemamba-jax: GeneMamba (bidirectional Mamba single-cell foundation model) in JAX/Flax."""

__version__ = "0.1.0"
