"""Gene annotations: gene tables, symbol -> Ensembl id maps, GMT gene sets, Gene2Vec pairs."""

import csv
import gzip
import io
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from genemamba_jax.data import safe_pickle
from genemamba_jax.errors import DataError

_log = logging.getLogger(__name__)

# Where users get each external file a command reads: said in docs/commands.md and in the error
# when the file is missing.
GENE_TABLE_SOURCE = ("a gene table is a tab-separated file with Ensembl id, symbol and biotype "
                     "columns: export one from Ensembl BioMart (https://www.ensembl.org/biomart; "
                     "Gene stable ID, Gene name, Gene type) or write the annotables R package's "
                     "grch38 table")
GENEFORMER_SOURCE = ("Geneformer's 30M dictionaries (gene_median_dictionary_gc30M.pkl, "
                     "token_dictionary_gc30M.pkl, gene_name_id_dict_gc30M.pkl) are in "
                     "https://huggingface.co/ctheodoris/Geneformer, folder "
                     "geneformer/gene_dictionaries_30m/")
GENE_MAP_SOURCE = ("a gene map is Geneformer's gene_name_id_dict_gc30M.pkl (" + GENEFORMER_SOURCE
                   .split(" are in ", 1)[1] + ") or a TSV of symbol and Ensembl id, such as a 10x "
                   "features.tsv")
GMT_SOURCE = ("GMT gene sets come from MSigDB (https://www.gsea-msigdb.org/gsea/msigdb, e.g. the "
              "Hallmark h.all.v7.0.symbols.gmt) or Reactome (https://reactome.org/download-data, "
              "ReactomePathways.gmt)")

# Accepted spellings of each column, canonical name first.
_ID_COLUMNS = ("ensembl_gene_id", "ensembl_id", "gene_id", "ensembl")
_SYMBOL_COLUMNS = ("symbol", "gene_name", "gene_symbol", "name", "gene")
_BIOTYPE_COLUMNS = ("biotype", "gene_biotype", "gene_type")


def _open_text(path: str | Path, source: str = "check the path") -> io.TextIOBase:
  """Opens a text file, gunzipping it when it starts with the gzip magic; `source` says where
  to get the file when it is missing."""
  try:
    with open(path, "rb") as f:
      gzipped = f.read(2) == b"\x1f\x8b"
    if gzipped:
      return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")
  except FileNotFoundError:
    raise DataError(f"{path}: file not found; {source}") from None
  except OSError as e:
    raise DataError(f"{path}: cannot read the file ({e})") from None


def _find_column(columns: Iterable[str], names: Sequence[str]) -> str | None:
  lower = {str(c).strip().lower(): c for c in columns}
  return next((lower[n] for n in names if n in lower), None)


def load_gene_table(path: str | Path) -> pd.DataFrame:
  """Reads a tab-separated gene table (gzip allowed).

  The table needs an Ensembl id column and a biotype column (any spelling in
  `_ID_COLUMNS` / `_BIOTYPE_COLUMNS`); they are renamed to `ensembl_gene_id`
  and `biotype` (and a symbol column to `symbol`). All columns are strings.

  Raises:
    DataError: the file is unreadable or a needed column is missing.
  """
  try:
    with _open_text(path, GENE_TABLE_SOURCE) as f:
      table = pd.read_csv(f, sep="\t", dtype=str)
  except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError,
          EOFError, OSError) as e:
    raise DataError(f"{path}: cannot read it as a tab-separated gene table "
                    f"({e})") from None
  renames = {}
  for names, what in ((_ID_COLUMNS, "an Ensembl gene id"),
                      (_BIOTYPE_COLUMNS, "a biotype"),
                      (_SYMBOL_COLUMNS, None)):
    found = _find_column(table.columns, names)
    if found is None and what:
      raise DataError(
          f"{path}: no {what} column (one of {', '.join(names)}); the file "
          f"has columns {', '.join(map(str, table.columns))}; it must be "
          "tab-separated with a header line")
    if found is not None:
      renames[found] = names[0]
  return table.rename(columns=renames)


def genes_with_biotypes(table: pd.DataFrame,
                        biotypes: Sequence[str] = ("protein_coding", "miRNA")
                        ) -> set[str]:
  """Ensembl ids of the genes in `table` whose biotype is in `biotypes`.

  Raises:
    DataError: `table` lacks the columns, or no gene has any of `biotypes`
      (a misspelled biotype would otherwise silently select nothing).
  """
  if isinstance(biotypes, str):
    biotypes = (biotypes,)
  missing = [c for c in ("ensembl_gene_id", "biotype") if c not in table]
  if missing:
    raise DataError(f"gene table: missing column(s) {', '.join(missing)}; it "
                    f"has {', '.join(map(str, table.columns))}; load it with "
                    "load_gene_table")
  present = set(table["biotype"].dropna())
  absent = [b for b in biotypes if b not in present]
  if len(absent) == len(biotypes):
    some = ", ".join(sorted(present)[:10])
    raise DataError(f"gene table: no gene has biotype {', '.join(absent)}; "
                    f"biotypes present include {some}")
  if absent:
    _log.warning("gene table: no gene has biotype %s", ", ".join(absent))
  ids = table.loc[table["biotype"].isin(biotypes), "ensembl_gene_id"]
  return set(ids.dropna())


def _is_ensembl(value: object) -> bool:
  return isinstance(value, str) and value.startswith("ENS")


def _read_map_rows(path: str | Path) -> list[list[str]]:
  with _open_text(path) as f:
    try:
      text = f.read()
    except (UnicodeDecodeError, EOFError, OSError) as e:
      raise DataError(f"{path}: cannot read it as text ({e})") from None
  lines = text.splitlines()
  first = next((line for line in lines if line.strip()), "")
  delimiter = "\t" if "\t" in first else ","
  return [[c.strip() for c in row]
          for row in csv.reader(lines, delimiter=delimiter)]


def _map_from_table(path: str | Path) -> dict[str, str]:
  """symbol -> Ensembl id from a TSV/CSV, with or without a header line."""
  rows = [(i + 1, r) for i, r in enumerate(_read_map_rows(path)) if any(r)]
  if not rows:
    raise DataError(f"{path}: the gene map file is empty")
  header = rows[0][1]
  named = [_find_column(header, n) for n in (_SYMBOL_COLUMNS, _ID_COLUMNS)]
  # A header has a known column name, or no Ensembl id where data rows have one.
  has_header = any(c is not None for c in named) or (
      len(rows) > 1 and not any(map(_is_ensembl, header))
      and any(map(_is_ensembl, rows[1][1])))
  if has_header:
    rows = rows[1:]
  if has_header and all(c is not None for c in named):
    sym_col, id_col = (header.index(c) for c in named)
  else:
    sym_col, id_col = 0, 1
    # Files such as 10x features.tsv put the Ensembl id first.
    head = [r for _, r in rows[:1000]]
    if (sum(_is_ensembl(r[0]) for r in head) >
        sum(_is_ensembl(r[1]) for r in head if len(r) > 1)):
      sym_col, id_col = 1, 0
  gene_map, skipped, conflicts = {}, 0, 0
  for line_no, row in rows:
    if len(row) <= max(sym_col, id_col):
      raise DataError(f"{path}: line {line_no} has {len(row)} column(s); "
                      "expected a symbol and an Ensembl id on each line")
    symbol, gene_id = row[sym_col], row[id_col]
    if not symbol or not gene_id:
      skipped += 1
    elif gene_map.setdefault(symbol, gene_id) != gene_id:
      conflicts += 1  # The first mapping wins; say so below.
  if skipped or conflicts:
    _log.warning("%s: skipped %d lines with an empty field and %d repeated "
                 "symbols mapped to another id (the first mapping is kept)",
                 path, skipped, conflicts)
  return gene_map


def load_gene_map(path: str | Path) -> dict[str, str]:
  """Reads a symbol -> Ensembl id map.

  Accepts a Geneformer-style pickle (`gene_name_id_dict.pkl`, loaded with the
  restricted unpickler) or a TSV/CSV (gzip allowed) with one mapping per line,
  header optional. When the header names a symbol column (symbol, gene_name,
  ...) and an id column (ensembl_gene_id, ensembl_id, gene_id, ...), those are
  used; otherwise the first two columns, in whichever order puts the Ensembl
  ids second (so 10x features.tsv works as is).

  Raises:
    DataError: unreadable file, malformed line, or empty map.
  """
  try:
    with open(path, "rb") as f:
      is_pickle = f.read(1) == b"\x80"  # Protocol 2+ pickles start with PROTO.
  except FileNotFoundError:
    raise DataError(f"{path}: file not found; {GENE_MAP_SOURCE}") from None
  except OSError as e:
    raise DataError(f"{path}: cannot read the gene map ({e})") from None
  if is_pickle or str(path).endswith((".pkl", ".pickle")):
    gene_map = safe_pickle.load_pickle(path, GENE_MAP_SOURCE)
    if not isinstance(gene_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in gene_map.items()):
      raise DataError(f"{path}: expected a pickled dict of symbol -> Ensembl "
                      f"id strings, got {type(gene_map).__name__}")
  else:
    gene_map = _map_from_table(path)
  if not gene_map:
    raise DataError(f"{path}: the gene map holds no symbol -> Ensembl id "
                    "mappings")
  return gene_map


def map_gene_ids(gene_ids: Iterable[object],
                 gene_map: Mapping[str, str]) -> np.ndarray:
  """Maps gene names to Ensembl ids (object array).

  A name that is a key of `gene_map` is mapped; otherwise an Ensembl-like id
  (starting with "ENS") passes through unchanged and anything else becomes
  None.
  """
  gene_ids = list(gene_ids)
  result = np.empty(len(gene_ids), dtype=object)
  for i, g in enumerate(gene_ids):
    mapped = gene_map.get(g) if isinstance(g, str) else None
    result[i] = mapped if mapped is not None else (
        str(g) if _is_ensembl(g) else None)
  return result


def read_gmt(path: str | Path) -> dict[str, list[str]]:
  """Reads gene sets from a GMT file (gzip allowed).

  Each line: set name, description, then genes, tab-separated. Empty gene
  fields (trailing tabs) are ignored and repeated genes kept once.

  Returns:
    Gene set name -> genes, in file order.

  Raises:
    DataError: a line without genes, an empty or repeated set name, or an
      unreadable file; the message names the line.
  """
  sets: dict[str, list[str]] = {}
  with _open_text(path, GMT_SOURCE) as f:
    try:
      lines = f.read().splitlines()
    except (UnicodeDecodeError, EOFError, OSError) as e:
      raise DataError(f"{path}: cannot read it as text ({e})") from None
  for line_no, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    fields = line.split("\t")
    name, genes = fields[0].strip(), [g.strip() for g in fields[2:]]
    genes = list(dict.fromkeys(g for g in genes if g))
    if not name or not genes:
      raise DataError(
          f"{path}: line {line_no} is not a gene set: expected a name, a "
          "description and at least one gene, separated by tabs")
    if name in sets:
      raise DataError(f"{path}: line {line_no} repeats gene set {name!r}; "
                      "set names must be unique")
    sets[name] = genes
  if not sets:
    raise DataError(f"{path}: no gene sets found")
  return sets


# Where users get the pair files; named in docs/commands.md and in the missing-file error.
GENE2VEC_PAIRS_SOURCE = "https://github.com/jingcheng-du/Gene2vec (folder predictionData/)"


def _read_pair_lines(path: Path) -> list[str]:
  try:
    return path.read_text(encoding="utf-8").splitlines()
  except (OSError, UnicodeDecodeError) as e:  # FileNotFoundError included
    raise DataError(f"{path}: cannot read it ({e}); expected the Gene2Vec pair files "
                    f"<split>_text.txt and <split>_label.txt, from {GENE2VEC_PAIRS_SOURCE}"
                    ) from None


def read_gene_pairs(text_path: str | Path, label_path: str | Path) -> pd.DataFrame:
  """Reads Gene2Vec pair files: two gene symbols a line, and a 0/1 label a line.

  Returns:
    DataFrame with columns gene_a, gene_b (str), label (int64, 0 or 1), one
    row per line, in file order.

  Raises:
    DataError: a file is missing, the two files have different line counts,
      a text line does not hold exactly two genes, or a label is not 0/1.
  """
  text_path, label_path = Path(text_path), Path(label_path)
  text, labels = _read_pair_lines(text_path), _read_pair_lines(label_path)
  if len(text) != len(labels):
    raise DataError(f"{text_path} has {len(text)} lines but {label_path} has "
                    f"{len(labels)}; they must pair line by line")
  genes = [line.split() for line in text]
  for i, fields in enumerate(genes, start=1):
    if len(fields) != 2:
      raise DataError(f"{text_path}, line {i}: expected two gene symbols, "
                      f"got {len(fields)} ({text[i - 1]!r})")
  for i, v in enumerate(labels, start=1):
    if v.strip() not in ("0", "1"):
      raise DataError(f"{label_path}, line {i}: label must be 0 or 1, got {v!r}")
  return pd.DataFrame({"gene_a": [g[0] for g in genes], "gene_b": [g[1] for g in genes],
                       "label": np.array([int(v) for v in labels], dtype=np.int64)})
