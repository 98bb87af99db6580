"""Embeddings, gene contexts, token predictions and a fine-tuned classifier's predictions on
4 host devices vs 1; run by
test_inference_devices.py in its own process (the devices must exist before JAX starts):

  XLA_FLAGS=--xla_force_host_platform_device_count=4 \
    python tests/downstream/inference_devices_check.py

Prints one JSON object: the largest difference of each output, and how many devices the
rows of a batch were split over.
"""

import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

# pylint: disable=wrong-import-position
import jax
import numpy as np
from flax import nnx

from genemamba_jax import inference
from genemamba_jax.finetune.head import CellTypeClassifier, ClassifierHead
from genemamba_jax.finetune.predict import Classifier, make_predict_step, predict_batches
from genemamba_jax.model import GeneMamba, GeneMambaConfig

# pylint: enable=wrong-import-position


def main() -> None:
  assert jax.local_device_count() == 4, jax.devices()
  config = GeneMambaConfig(vocab_size=50, d_model=16, n_layers=2, mixer="mamba2", headdim=8,
                           d_state=8, scan_backend="sequential", streams="separate")
  model = GeneMamba(config, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  # 13 cells of 3..20 tokens, <cls> (2) first: batches of 5 (-> 8 on 4 devices) and a short last.
  sentences = [np.concatenate([[2], rng.integers(3, 50, n)]).astype(np.int32)
               for n in rng.integers(2, 20, 13)]
  out = {}
  for name, devices in (("one", jax.local_devices()[:1]), ("all", None)):
    emb = inference.embed_sentences(model, sentences, poolings=("cls", "mean"), batch_size=5,
                                    gene_context=True, special_ids=(2,), desc=None,
                                    devices=devices)
    tokens = {p: inference.predict_tokens(model, sentences, protocol=p, batch_size=5,
                                          devices=devices)
              for p in ("same_position", "next_gene")}
    out[name] = (emb, tokens)
  step = inference.batch_step(inference.embedding_fn(("cls",), 50), model)
  cells, _ = step(np.full((3, 8), 2, np.int32), np.ones((3, 8), bool), None)  # 3 rows -> 4
  whole, _ = step(np.full((8, 8), 2, np.int32), np.ones((8, 8), bool), None)
  # The fine-tuned classifier (the original's MLP head, BatchNorm in eval mode): `Classifier`
  # splits rows over the 4 devices; the trainer's jitted step runs on one.
  classifier = CellTypeClassifier(model, ClassifierHead(16, 3, (8,), rngs=nnx.Rngs(1)), "mean")
  classifier.eval()
  every_p, every_e = Classifier(classifier, ["a", "b", "c"], None).predict_sentences(sentences, 5)
  graphdef, state = nnx.split(classifier)
  one_p, one_e = predict_batches(make_predict_step(graphdef), state, sentences, 5, 0)
  (one, one_tokens), (every, every_tokens) = out["one"], out["all"]
  print(json.dumps({
      "rows": len(every.cells["cls"]),
      "cells": {p: float(np.max(np.abs(one.cells[p] - every.cells[p]))) for p in one.cells},
      "gene_sums": float(np.max(np.abs(one.gene_sums - every.gene_sums))),
      "gene_counts_equal": bool(np.array_equal(one.gene_counts, every.gene_counts)),
      "tokens_equal": all(all(np.array_equal(a, b) for a, b in zip(one_tokens[p],
                                                                   every_tokens[p]))
                          for p in one_tokens),
      "classifier": [float(np.max(np.abs(one_p - every_p))),
                     float(np.max(np.abs(one_e - every_e))), len(every_p)],
      "split_over": len(step.mesh.devices.flat), "padded_rows": int(cells["cls"].shape[0]),
      "output_devices": len(whole["cls"].sharding.device_set)}))


if __name__ == "__main__":
  main()
