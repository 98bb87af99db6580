"""python -m genemamba_jax.convert {from-pytorch,to-pytorch}: see genemamba_jax/convert/__init__.py."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from genemamba_jax import cli, convert
from genemamba_jax.model.config import COMBINES


def _from_pytorch(a: argparse.Namespace) -> list[str]:
  classes = None
  if a.classes:
    path = Path(a.classes)
    classes = (path.read_text(encoding="utf-8").split("\n") if path.is_file()
               else a.classes.split(","))
    classes = [c for c in classes if c]
  converted = convert.load_pytorch(a.input, median_dictionary=a.median_dictionary, combine=a.combine,
                           identity_layers=a.identity_layers,
                           token_dictionary=a.token_dictionary, classifier=a.classifier,
                           classes=classes)
  out = convert.write_run(converted, a.out)
  c = converted.config
  kind = "fine-tuned classifier" if converted.head is not None else (
      "fine-tuned backbone" if converted.vocab.cls_id is not None else "pretrained model")
  layers = "identity layers (the public code)" if c.residual == "identity" else "residual layers"
  return [f"{kind}: {c.n_layers} Mamba-2 layers, d_model {c.d_model}, vocabulary "
          f"{c.vocab_size}, combine {c.combine}, {layers}",
          f"written: {out} (model.json, vocab/, checkpoints/0); use it as --checkpoint of embed, "
          "finetune (init_checkpoint), evaluate, predict, or train's init_checkpoint"]


def _to_pytorch(a: argparse.Namespace) -> list[str]:
  out = convert.export_pytorch(a.checkpoint, a.out)
  written = sorted(p.name for p in out.iterdir())
  return [f"written: {out} ({', '.join(written)}); load it with the original's "
          "MambaModel.from_pretrained(DIR, config=config) and --mode set to the run's combine"]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m genemamba_jax.convert", description=convert.__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True, metavar="{from-pytorch,to-pytorch}")
  p = sub.add_parser("from-pytorch", help="the original's checkpoint directory -> a run directory",
                     description="The original PyTorch GeneMamba's checkpoint -> a run directory.")
  p.add_argument("--input", required=True, metavar="DIR",
                 help="the original's checkpoint: config.json, model.safetensors, gene_tokenizer.json")
  p.add_argument("--out", required=True, metavar="RUN_DIR", help="the run directory to write (new)")
  p.add_argument("--median-dictionary", metavar="PKL",
                 help="Geneformer's gene_median_dictionary.pkl, the medians the original's corpus "
                      "was tokenized with (required)")
  p.add_argument("--combine", choices=COMBINES, default=None,
                 help="how the layers combined the two directions: required for concat and gate, "
                      "else mean (the original's default, used when omitted) or sum")
  p.add_argument("--identity-layers", action="store_true",
                 help="reproduce the public code, whose layers return their input (default: the "
                      "paper's residual layers; see docs/commands.md)")
  p.add_argument("--token-dictionary", metavar="PKL",
                 help="Geneformer's token_dictionary.pkl, when DIR has no gene_tokenizer.json")
  p.add_argument("--classifier", metavar="FILE",
                 help="the original's Classifier head as .safetensors (with a fine-tuned "
                      "backbone): the run then predicts cell types")
  p.add_argument("--classes", metavar="FILE_OR_LIST",
                 help="names of the classifier's outputs in label-encoder (sorted) order: a file "
                      "with one per line, or a comma-separated list (default: 0, 1, ...)")
  p.set_defaults(run=_from_pytorch)
  p = sub.add_parser("to-pytorch", help="a run directory -> the original's checkpoint format",
                     description="A run directory -> config.json, model.safetensors and "
                                 "gene_tokenizer.json of the original PyTorch GeneMamba.")
  p.add_argument("--checkpoint", required=True, metavar="RUN_DIR",
                 help="a run directory (its latest checkpoint) or one checkpoints/<step>")
  p.add_argument("--out", required=True, metavar="DIR", help="the directory to write (new)")
  p.set_defaults(run=_to_pytorch)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run(build_parser(), argv)


if __name__ == "__main__":
  sys.exit(main())
