"""Pretraining that starts from trained weights (`init_checkpoint`): ours or a converted original.

The model's architecture comes from the run directory; the config's run-time
model keys (dtype, scan backend, remat, ...) still apply, and the objective
sets the streams. The corpus must use the run's vocabulary: tokenize it with
`prepare tokenize --vocab RUN_DIR/vocab`. A corpus vocabulary that only
appends special tokens (e.g. `prepare import-geneformer`'s <cls> and <eos> after
Geneformer's ids) is accepted: their rows start at the mean gene row.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
from flax import nnx

from genemamba_jax import rundir
from genemamba_jax.data import vocab as vocab_lib
from genemamba_jax.errors import DataError
from genemamba_jax.model import GeneMamba, GeneMambaConfig
from genemamba_jax.model.convert import flatten
from genemamba_jax.train import config as config_lib

_log = logging.getLogger(__name__)
# Model keys that change how the model runs, not its parameters: taken from the config.
RUN_TIME_KEYS = ("dtype", "scan_backend", "scan_chunk_size", "remat", "remat_policy")


def load_init(c: ml_collections.ConfigDict, corpus_vocab: Mapping[str, int], streams: str
              ) -> tuple[GeneMambaConfig, dict]:
  """(model config, parameters as a pure dict of numpy arrays) to start training from."""
  loaded = rundir.load_pretrained(c.init_checkpoint)
  where = f"init_checkpoint {loaded.checkpoint.run_dir}"
  ours = loaded.vocab.token_to_id
  extra = {t: i for t, i in corpus_vocab.items() if t not in ours}
  shared_differ = [t for t, i in ours.items() if corpus_vocab.get(t) != i]
  if shared_differ or any(not vocab_lib.is_special(t) or i < len(ours) for t, i in extra.items()):
    token = (shared_differ or sorted(extra))[0]
    raise DataError(f"data.path: its vocabulary differs from {where}'s (token {token}: id "
                    f"{corpus_vocab.get(token)} vs {ours.get(token)}); tokenize the corpus with "
                    f"`prepare tokenize --vocab {loaded.checkpoint.run_dir}/vocab`")
  if extra:
    loaded = rundir.add_tokens(loaded, sorted(extra, key=extra.get))
  requested = config_lib.model_config(c, len(corpus_vocab), streams)
  config = loaded.config.replace(
      streams=streams, **{k: getattr(requested, k) for k in RUN_TIME_KEYS})
  ignored = [f"model.{f.name}={getattr(requested, f.name)!r}"
             for f in dataclasses.fields(GeneMambaConfig)
             if f.name not in RUN_TIME_KEYS + ("streams", "vocab_size")
             and getattr(requested, f.name) != getattr(config, f.name)]
  if ignored:
    _log.warning("%s: the model is the run's (%s); these config keys do not apply: %s", where,
                 f"{config.n_layers} layers, d_model {config.d_model}, {config.mixer}",
                 ", ".join(ignored))
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param)))
  target = nnx.eval_shape(lambda: GeneMamba(config, rngs=nnx.Rngs(0)))
  missing = sorted(set(flatten(nnx.to_pure_dict(nnx.state(target, nnx.Param))))
                   - set(flatten(params)))
  if missing:  # e.g. per-layer combine weights, which separate streams do not have
    raise DataError(f"{where}: the objective {c.objective!r} needs parameter {missing[0]}, which "
                    f"the run does not have (it was trained with streams={loaded.config.streams}"
                    f"); use an objective that keeps them (next_gene_faithful or mlm)")
  return config, params
