"""Cell type annotation (fine-tuning): defaults for small labelled sets, or the original's protocol.

    python -m genemamba_jax.finetune --config configs/finetune.py --workdir runs/finetune \
        --config.init_checkpoint=runs/demo --config.data.input=cells.h5ad \
        --config.label_column=cell_type

`configs/finetune.py:original` is the original's protocol (<cls> state, 3-block MLP head,
Adam 1e-4, batch 24, 5 epochs). Every key and its default: genemamba_jax/finetune/config.py.
"""

from genemamba_jax.finetune import config


def get_config(arg=None):
  return config.get(arg)
