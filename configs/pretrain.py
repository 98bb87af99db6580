"""The paper's pretraining run: 24 Mamba-2 BiMamba layers, d 512, vocab 25,426, 2,048 tokens.

65.74M parameters (see docs/model.md on the count). Table 5 variants by argument:

    python -m genemamba_jax.train --config configs/pretrain.py --workdir runs/pretrain \\
        --config.data.path=/data/cellxgene_tokens
    python -m genemamba_jax.train --config configs/pretrain.py:layers=48,d_model=768,seq_len=4096 ...
    python -m genemamba_jax.train --config configs/pretrain.py:mixer=mamba1 ...

On one host with 8 GPUs the mesh defaults to data parallel over all of them
(`--config.mesh.data=-1`); FSDP over 8 GPUs: `--config.mesh.data=1 --config.mesh.fsdp=8`.
Multi-host (SLURM, one process per host, all GPUs of the host each):

    srun --nodes=4 --ntasks-per-node=1 python -m genemamba_jax.train \\
        --config configs/pretrain.py --workdir /shared/runs/pretrain \\
        --config.data.path=/shared/tokens --config.mesh.distributed=True

(`launch/slurm.sh` wraps this; train/distributed.py reads SLURM's variables; README,
"Scaling out", also for Cloud TPU VMs.) The batch is global: each process reads
batch_size / processes cells.
"""

from genemamba_jax.train.config import default_config

_ARGS = {"layers": ("n_layers", int), "d_model": ("d_model", int), "seq_len": (None, int),
         "mixer": ("mixer", str), "d_state": ("d_state", int)}


def get_config(arg=None):
  config = default_config()
  config.data.max_len = 2048
  config.batch_size = 32  # global; the original trained with 4 per GPU on 4 A100s
  config.num_steps = 200_000
  config.model.vocab_size = 0  # the corpus's (25,426 with Geneformer's dictionary)
  config.model.d_model = 512
  config.model.n_layers = 24
  config.model.mixer = "mamba2"
  config.model.dtype = "bfloat16"
  config.model.remat = True
  config.optimizer.lr = 6e-4
  config.optimizer.warmup_steps = 2_000
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in _ARGS:
      raise ValueError(f"configs/pretrain.py: unknown argument {key!r}; use {', '.join(_ARGS)}")
    field, cast = _ARGS[key]
    if field is None:
      config.data.max_len = cast(value)
    else:
      config.model[field] = cast(value)
  return config
