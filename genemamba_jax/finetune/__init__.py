"""Fine-tuning GeneMamba for cell type annotation, and the fine-tuned classifier.

    python -m genemamba_jax.finetune --config configs/finetune.py --workdir DIR ...   (CLI)
    from genemamba_jax.finetune import finetune, load_classifier, Classifier

config.py (keys, defaults, the `original` preset), head.py (the classifier),
splits.py (labels, train/val/test), trainer.py (the loop, on train/state.py's
core), run.py (`finetune`: data -> training -> outputs), predict.py
(`load_classifier`, `Classifier`), report.py (scores, tables, the confusion
matrix). Imported lazily, so `--help` starts fast.
"""

from __future__ import annotations

import importlib

_LAZY = {"finetune": "run", "load_classifier": "predict", "Classifier": "predict",
         "main": "__main__"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
  if name in _LAZY:
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
