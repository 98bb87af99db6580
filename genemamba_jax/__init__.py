"""genemamba-jax: GeneMamba (bidirectional Mamba single-cell foundation model) in JAX/Flax.

From Python (README, "From Python"):

    import genemamba_jax as gm
    model = gm.load("runs/demo")                 # any run directory
    X = model.embed(adata)                       # adata.obsm["X_genemamba"], [cells, d] float32
    pred = model.predict(adata)                  # fine-tuned runs: prediction, confidence

`import genemamba_jax` stays cheap: JAX and the model load on the first `gm.load`.
"""

from __future__ import annotations

import dataclasses

__version__ = "0.1.0"
__all__ = ["DataError", "Model", "load", "settings"]


@dataclasses.dataclass
class Settings:
  """What the Python API does by default (the commands take flags instead)."""
  progress: bool = True  # progress bars while tokenizing, embedding, predicting, perturbing
  batch_size: int = 64  # cells per forward pass; results do not depend on it


settings = Settings()


def __getattr__(name: str):
  # Lazy: the API module imports JAX, which takes seconds; only a call that needs it pays.
  if name in ("load", "Model"):
    from genemamba_jax import api  # pylint: disable=g-import-not-at-top
    return getattr(api, name)
  if name == "DataError":
    from genemamba_jax.errors import DataError  # pylint: disable=g-import-not-at-top
    return DataError
  raise AttributeError(f"module 'genemamba_jax' has no attribute {name!r}")
