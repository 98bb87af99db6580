"""The Python API: one loaded run that embeds cells and genes, predicts, transfers labels, perturbs.

    import genemamba_jax as gm
    model = gm.load("runs/demo")          # a run directory: pretrained, fine-tuned or converted
    X = model.embed(adata)                # [cells, d] float32, also adata.obsm["X_genemamba"]
    genes = model.gene_embeddings()       # DataFrame [vocabulary genes, d]
    pred = model.predict(adata)           # fine-tuned runs: DataFrame prediction, confidence
    model.label_transfer(reference, query, label_column="cell_type")
    model.perturb(adata, ["ISG15"], mode="overexpress")

Each method runs the function its command runs (`embed`, `predict`, `label_transfer`,
`perturb`) with the command's defaults, so it gives the numbers the command writes. Cells
are an AnnData object (in memory or backed) or a path (.h5ad, 10x folder or .h5); the
results follow the input's cell order. Bad input raises `DataError` (the commands print it
and exit 2). `gm.settings.progress = False` hides the progress bars; `gm.settings.batch_size`
sets the cells per forward pass. Nothing here starts worker processes, so a plain script
needs no `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

import genemamba_jax
from genemamba_jax import cell_inputs, embed as embed_lib, predict as predict_lib, rundir
from genemamba_jax import label_transfer as label_transfer_lib
from genemamba_jax import perturb as perturb_lib
from genemamba_jax.errors import DataError

GeneMap = str | os.PathLike | Mapping[str, str] | None


def load(path: str | os.PathLike) -> "Model":
  """A run directory (its latest checkpoint) or one checkpoints/<step> directory -> `Model`.

  Fine-tuned runs (the --workdir of `finetune`) come with their classifier.
  """
  if predict_lib.is_finetuned(path):
    classifier = predict_lib.load_classifier(path)
    return Model(classifier.run, classifier)
  return Model(rundir.load_pretrained(path))


def _is_anndata(cells) -> bool:
  return hasattr(cells, "obs_names") and hasattr(cells, "obsm")


def _batch_size(batch_size: int | None) -> int:
  size = genemamba_jax.settings.batch_size if batch_size is None else batch_size
  if size < 1:
    raise DataError(f"batch_size={size} must be >= 1")
  return size


class Model:
  """A loaded GeneMamba run; `load` makes one.

  Attributes:
    run: the loaded run (`rundir.Pretrained`: model, vocabulary, medians, tokenize settings).
    classifier: the fine-tuned classifier, or None for a pretrained-only run.
  """

  def __init__(self, run: rundir.Pretrained, classifier=None):
    self.run, self.classifier = run, classifier

  @property
  def classes(self) -> list[str] | None:
    """The cell types a fine-tuned run predicts (None: pretrained only)."""
    return None if self.classifier is None else list(self.classifier.classes)

  def __repr__(self) -> str:
    kind = (f"fine-tuned, {len(self.classes)} cell types" if self.classifier is not None
            else "pretrained")
    c = self.run.config
    return (f"<genemamba_jax.Model {self.run.checkpoint.run_dir} step {self.run.checkpoint.step}: "
            f"{kind}; d_model {c.d_model}, {c.n_layers} layers, {len(self.run.vocab.gene_ids):,} "
            "genes>")

  def _source(self, cells, name: str, layer: str | None, gene_column: str | None):
    return cell_inputs.as_source(cells, name, layer, gene_column)

  def embed(self, adata, key_added: str | None = embed_lib.OBSM_KEY, *,
            pooling: str | None = None, batch_size: int | None = None,
            max_len: int | None = None, layer: str | None = None,
            gene_column: str | None = None, gene_map: GeneMap = None) -> np.ndarray:
    """Cell embeddings [cells, d_model] float32, in input order (`embed`'s numbers).

    Args:
      adata: AnnData or a path; an AnnData gets the matrix as obsm[key_added] (None: not stored).
      pooling: "cls" or "mean" (default: cls if the run was trained with <cls>, else mean).
      layer, gene_column, gene_map: where the counts and gene ids are (as `embed`'s flags);
        gene_map is a table's path or a symbol -> vocabulary id dict.
    """
    batch_size = _batch_size(batch_size)  # refused before the cells are read
    pooling = pooling or embed_lib.default_pooling(self.run)
    result = embed_lib.embed_source(
        self.run, self._source(adata, "adata", layer, gene_column), poolings=(pooling,),
        batch_size=batch_size, max_len=max_len,
        gene_map=cell_inputs.as_gene_map(gene_map), progress=genemamba_jax.settings.progress)
    matrix = result.cells[pooling]
    if key_added and _is_anndata(adata):
      adata.obsm[key_added] = matrix
    return matrix

  def gene_embeddings(self, adata=None, *, batch_size: int | None = None,
                      max_len: int | None = None, layer: str | None = None,
                      gene_column: str | None = None, gene_map: GeneMap = None) -> pd.DataFrame:
    """Gene embeddings: DataFrame [genes, d_model] float32 indexed by gene id.

    Without `adata`: the input embedding table, one row per vocabulary gene (`embed
    --genes-output`'s `input`). With cells: the final hidden state averaged over every
    occurrence of the gene in them, one row per gene seen (its `context`).
    """
    batch_size = _batch_size(batch_size)
    if adata is None:
      vocab = self.run.vocab
      table = np.asarray(self.run.model.embeddings.embedding[...], np.float32)
      return pd.DataFrame(table[vocab.gene_token_ids(vocab.gene_ids)],
                          index=pd.Index(np.asarray(vocab.gene_ids, dtype=str), name="gene_id"))
    result = embed_lib.embed_source(
        self.run, self._source(adata, "adata", layer, gene_column),
        poolings=(embed_lib.default_pooling(self.run),), batch_size=batch_size,
        max_len=max_len, gene_context=True, gene_map=cell_inputs.as_gene_map(gene_map),
        progress=genemamba_jax.settings.progress)
    return pd.DataFrame(result.gene_context,
                        index=pd.Index(result.context_gene_ids.astype(str), name="gene_id"))

  def predict(self, adata, key_added: str | None = predict_lib.OBSM_KEY, *,
              batch_size: int | None = None, max_len: int | None = None,
              layer: str | None = None, gene_column: str | None = None,
              gene_map: GeneMap = None) -> pd.DataFrame:
    """Cell types from a fine-tuned run (`predict`'s numbers).

    Returns a DataFrame indexed by obs name (input order): `prediction` (the cell type) and
    `confidence` (its probability). An AnnData also gets obs['genemamba_prediction'],
    obs['genemamba_confidence'] and the fine-tuned embeddings as obsm[key_added].
    """
    if self.classifier is None:
      raise DataError(f"{self.run.checkpoint.run_dir}: a pretrained run, without a classifier; "
                      "predict needs a fine-tuned run (the --workdir of genemamba_jax.finetune), "
                      "gm.load that; embed and label_transfer work on this one")
    batch_size = _batch_size(batch_size)
    result = predict_lib.predict_source(
        self.classifier, self._source(adata, "adata", layer, gene_column),
        batch_size=batch_size, max_len=max_len,
        gene_map=cell_inputs.as_gene_map(gene_map), progress=genemamba_jax.settings.progress)
    if _is_anndata(adata):
      adata.obs[predict_lib.PREDICTION] = pd.Categorical(result.prediction.astype(str))
      adata.obs[predict_lib.CONFIDENCE] = result.confidence
      if key_added:
        adata.obsm[key_added] = result.embeddings
    return result.frame()

  def label_transfer(self, reference, query, label_column: str, k: int = 15,
                     unknown_threshold: float | None = None, *, batch_size: int | None = None,
                     layer: str | None = None, gene_column: str | None = None,
                     gene_map: GeneMap = None) -> pd.DataFrame:
    """Labels of `reference` cells (obs[label_column]) carried to `query` cells by kNN in this
    run's embedding (`label_transfer`'s numbers): DataFrame indexed by the query's obs names,
    `prediction` and `confidence` (the winner's share of the k votes)."""
    batch_size = _batch_size(batch_size)
    return label_transfer_lib.label_transfer(
        self.run, reference, label_column, query, k=k, unknown_threshold=unknown_threshold,
        gene_column=gene_column, gene_map=gene_map, layer=layer,
        batch_size=batch_size, progress=genemamba_jax.settings.progress)

  def perturb(self, adata, genes: str | Sequence[str], mode: str = "delete", *,
              target_column: str | None = None, target: str | None = None,
              skip_unknown: bool = False, batch_size: int | None = None,
              layer: str | None = None, gene_column: str | None = None,
              gene_map: GeneMap = None) -> pd.DataFrame:
    """In silico deletion or overexpression of `genes` in every cell (`perturb`'s numbers):
    one row per (cell, gene), obs_name, gene, mode, shift [, toward_target]."""
    batch_size = _batch_size(batch_size)
    genes = genes.split(",") if isinstance(genes, str) else list(genes)
    return perturb_lib.perturb(
        self.run, adata, genes, mode, target_column, target, batch_size, gene_map,
        gene_column, layer, progress=genemamba_jax.settings.progress, skip_unknown=skip_unknown)
