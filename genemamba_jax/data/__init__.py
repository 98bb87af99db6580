"""Data: gene vocabularies, tokenization and the training input pipeline."""

# records imports only numpy and the standard library, so this stays cheap.
from genemamba_jax.data.records import read_tokenized

__all__ = ["read_tokenized"]
