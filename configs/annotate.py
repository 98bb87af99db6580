"""Cell type annotation (fine-tuning), the original's protocol.

    python -m genemamba_jax.finetune --config configs/annotate.py --workdir runs/annotate \
        --config.init_checkpoint=runs/demo --config.data.input=cells.h5ad \
        --config.label_column=cell_type

Every key and its default: genemamba_jax/annotation/config.py.
"""

from genemamba_jax.annotation.config import default_config


def get_config(arg=None):
  del arg
  return default_config()
