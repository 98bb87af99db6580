"""The embedded demo: a small GeneMamba on scanpy's bundled pbmc68k_reduced, on CPU.

    python -m genemamba_jax.train --config configs/demo.py --workdir runs/demo

Prepares the data once (700 real PBMCs: exact counts -> medians -> rank tokens,
cached under ~/.cache/genemamba_jax or $GENEMAMBA_CACHE) and trains a 2-layer
Mamba-2 BiMamba model with the leak-free next-gene objective for about a
minute on CPU (67 s on 2 cores); the loss falls visibly. The model is far too
small to beat simple baselines downstream (docs/commands.md, "What to expect").
"""

from genemamba_jax.train.config import DEMO_DATA, default_config


def get_config(arg=None):
  del arg
  config = default_config()
  config.data.path = DEMO_DATA  # --config.data.path=TOKENS trains this model on your data
  config.data.max_len = 128  # the top 128 of the 180-440 genes a pbmc68k cell expresses
  config.data.eval_fraction = 0.1
  config.batch_size = 16
  config.num_steps = 300
  config.model.d_model = 64
  config.model.n_layers = 2
  config.model.d_state = 16
  config.model.headdim = 32
  config.optimizer.lr = 3e-3
  config.optimizer.warmup_steps = 30
  config.log_every = 10
  config.eval_every = 100
  config.checkpoint_every = 100
  return config
