"""Tests for gene tables, symbol -> Ensembl maps and GMT gene sets."""

import gzip
import pickle

import numpy as np
import pandas as pd
import pytest

from genemamba_jax.data import genes
from genemamba_jax.errors import DataError


def test_gene_table_biotypes_real(shared_data):
  table = genes.load_gene_table(shared_data / "genes" /
                                "grch38_ens109_genes.tsv.gz")
  assert len(table) == 69_299
  assert {"ensembl_gene_id", "symbol", "biotype"} <= set(table.columns)
  coding = genes.genes_with_biotypes(table, ("protein_coding",))
  mirna = genes.genes_with_biotypes(table, "miRNA")
  # The data README says 24,025 protein_coding; the file itself holds 22,907
  # distinct protein_coding ids (and 69,299 distinct ids in 69,299 rows).
  assert (len(coding), len(mirna)) == (22_907, 1_924)
  union = genes.genes_with_biotypes(table)
  assert union == coding | mirna and len(union) == 24_831
  assert "ENSG00000111640" in union  # GAPDH


def test_gene_table_aliases_and_missing_columns(tmp_path):
  path = tmp_path / "t.tsv"
  path.write_text("gene_id\tgene_type\nENSG1\tprotein_coding\nENSG2\tlncRNA\n")
  table = genes.load_gene_table(path)
  assert genes.genes_with_biotypes(table) == {"ENSG1"}
  with pytest.raises(DataError, match="no gene has biotype protein-coding"):
    genes.genes_with_biotypes(table, ("protein-coding",))
  path.write_text("gene_id\tsymbol\nENSG1\tA\n")
  with pytest.raises(DataError, match=r"t\.tsv: no a biotype column.*"
                     r"has columns gene_id, symbol"):
    genes.load_gene_table(path)
  with pytest.raises(DataError, match="missing column"):
    genes.genes_with_biotypes(pd.DataFrame({"id": ["ENSG1"]}))


def test_gene_map_real_pickle(shared_data):
  gene_map = genes.load_gene_map(shared_data / "geneformer_30m" /
                                 "gene_name_id_dict.pkl")
  assert len(gene_map) == 40_248
  assert gene_map["GAPDH"] == "ENSG00000111640"
  assert gene_map["CD3E"] == "ENSG00000198851"


@pytest.mark.parametrize("text", [
    "GAPDH\tENSG00000111640\nCD3E\tENSG00000198851\n",
    "symbol\tensembl_id\nGAPDH\tENSG00000111640\nCD3E\tENSG00000198851\n",
    "sym,ens\nGAPDH,ENSG00000111640\n\nCD3E,ENSG00000198851\n",
    # Extra columns: the named ones are used.
    "chr\tgene_id\tgene_name\n12\tENSG00000111640\tGAPDH\n"
    "11\tENSG00000198851\tCD3E\n",
    # 10x features.tsv order: id, symbol, feature type, no header.
    "ENSG00000111640\tGAPDH\tGene Expression\n"
    "ENSG00000198851\tCD3E\tGene Expression\n",
])
def test_gene_map_from_table(tmp_path, text):
  path = tmp_path / "map.tsv"
  path.write_text(text)
  assert genes.load_gene_map(path) == {"GAPDH": "ENSG00000111640",
                                       "CD3E": "ENSG00000198851"}


def test_gene_map_gzip_and_errors(tmp_path):
  path = tmp_path / "map.tsv.gz"
  with gzip.open(path, "wt") as f:
    f.write("gene_name\tensembl_gene_id\nGAPDH\tENSG00000111640\n")
  assert genes.load_gene_map(path) == {"GAPDH": "ENSG00000111640"}
  empty = tmp_path / "empty.tsv"
  empty.write_text("symbol\tensembl_id\n")
  with pytest.raises(DataError, match=r"empty\.tsv: the gene map holds no"):
    genes.load_gene_map(empty)
  empty.write_text("")
  with pytest.raises(DataError, match="empty"):
    genes.load_gene_map(empty)
  short = tmp_path / "short.tsv"
  short.write_text("GAPDH\tENSG00000111640\nCD3E\n")
  with pytest.raises(DataError, match=r"short\.tsv: line 2 has 1 column"):
    genes.load_gene_map(short)
  bad = tmp_path / "bad.pkl"
  bad.write_bytes(pickle.dumps(["not", "a", "dict"]))
  with pytest.raises(DataError, match="expected a pickled dict"):
    genes.load_gene_map(bad)
  with pytest.raises(DataError, match="absent.tsv"):
    genes.load_gene_map(tmp_path / "absent.tsv")


def test_map_gene_ids():
  gene_map = {"GAPDH": "ENSG00000111640", "ENSG_OLD": "ENSG_NEW"}
  out = genes.map_gene_ids(
      ["GAPDH", "ENSG00000198851", "NOT_A_GENE", "ENSG_OLD", None], gene_map)
  assert out.dtype == object
  assert out.tolist() == ["ENSG00000111640", "ENSG00000198851", None,
                          "ENSG_NEW", None]
  assert genes.map_gene_ids(np.array(["GAPDH"]), gene_map).tolist() == [
      "ENSG00000111640"]


def test_read_gmt_real(shared_data):
  sets = genes.read_gmt(shared_data / "genesets" / "h.all.v7.0.symbols.gmt")
  assert len(sets) == 50
  tnfa = sets["HALLMARK_TNFA_SIGNALING_VIA_NFKB"]
  assert len(tnfa) == 200 and tnfa[:3] == ["JUNB", "CXCL2", "ATF3"]
  assert len(set().union(*sets.values())) == 4_384


def test_read_gmt_errors(tmp_path):
  path = tmp_path / "s.gmt"
  path.write_text("A\tdesc\tG1\tG2\tG1\t\n\nB\tdesc\tG3\n")
  assert genes.read_gmt(path) == {"A": ["G1", "G2"], "B": ["G3"]}
  path.write_text("A\tdesc\tG1\nB desc G2\n")
  with pytest.raises(DataError, match=r"s\.gmt: line 2 is not a gene set"):
    genes.read_gmt(path)
  path.write_text("A\tdesc\tG1\nA\tdesc\tG2\n")
  with pytest.raises(DataError, match="line 2 repeats gene set 'A'"):
    genes.read_gmt(path)
