"""Benchmarks of the full GeneMamba on this machine: train step, compile time, embedding.

    python bench/train_step.py train-step --mixer mamba2 --d-model 128 --layers 4 \
        --seq-len 512 --batch 8 --vocab 2000 [--d-state N] [--steps 10] [--backend auto] \
        [--dtype float32] [--remat | --no-remat] [--remat-policy P]
    python bench/train_step.py compile-time --layers 12 24 48 [--mixer mamba2 ...]
    python bench/train_step.py embed-step --d-model 512 --layers 2 --seq-len 2048 \
        --batch 8 --vocab 25426 [--combine mean] [--steps 5] [--chunk-size 64]

`train-step` times the real training step (`genemamba_jax.train.step.pretraining_core`:
the default leak-free `next_gene` objective on a separate-streams model, AdamW of
`genemamba_jax.train.optimizer`) on random tokens without padding, after a
warm-up, and ends with the line `tokens_per_s=<number>` (tokens = batch *
seq_len per step). `compile-time` prints the seconds XLA takes to lower and
compile that step for each depth; layers are applied with `nnx.scan`, so the
figure should not grow with depth. `embed-step` times the forward pass that
`embed` runs (`inference.embedding_fn`: encode + mean pooling, jitted) on the
original GeneMamba's layout (what `convert from-pytorch` gives: mixed streams,
Mamba-2 with d_state 64, the residual inside the combination), random weights
and full rows, after compilation; its last line is `cells_per_s=<number>`.

Other scripts in bench/ import it as `train_step` (bench/ on sys.path).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root
# pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from genemamba_jax.train import config as train_config
from genemamba_jax.model import GeneMamba, GeneMambaConfig
from genemamba_jax.model.config import COMBINES, DTYPES, MIXERS, REMAT_POLICIES, SCAN_BACKENDS
from genemamba_jax.train import objectives
from genemamba_jax.train import sharding
from genemamba_jax.train import step as step_lib

# Ids 0..3 are <pad>, <mask>, <cls>, <eos> in our vocabularies: random genes start after them.
FIRST_GENE_ID = 4


def model_config(mixer: str = "mamba2", d_model: int = 128, layers: int = 4, vocab: int = 2000,
                 d_state: int | None = None, backend: str | None = None,
                 dtype: str = "float32", remat: bool | None = None, chunk_size: int = 64,
                 objective: str = "next_gene", remat_policy: str | None = None
                 ) -> GeneMambaConfig:
  """The GeneMamba the benchmark trains: mean combination, untied head with bias.

  The streams layout is the one `objective` trains (separate for next_gene),
  as `genemamba_jax.train.loop` builds it. `backend=None` keeps the model's
  default scan backend, i.e. what training uses unless configured otherwise; likewise
  `remat=None` and `remat_policy=None` keep the model's defaults.
  """
  config = GeneMambaConfig(
      vocab_size=vocab, d_model=d_model, n_layers=layers, mixer=mixer, d_state=d_state,
      combine="mean", streams=objectives.model_streams_for(objective),
      scan_chunk_size=chunk_size, dtype=dtype)
  overrides = {"scan_backend": backend, "remat": remat, "remat_policy": remat_policy}
  return config.replace(**{k: v for k, v in overrides.items() if v is not None})


def random_batch(batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
  """{"tokens": [batch, seq_len] int32 gene ids, "mask": all True}: full rows, no padding."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(FIRST_GENE_ID, vocab, size=(batch, seq_len), dtype=np.int32)
  return {"tokens": jnp.asarray(tokens), "mask": jnp.ones((batch, seq_len), bool)}


def train_core(config: GeneMambaConfig, objective: str = "next_gene", num_steps: int = 100,
               seed: int = 0):
  """The training loop's core for `config` on one device: its state builder and jitted step
  (default AdamW, the objective's loss); nothing is allocated until `.init()`."""
  with warnings.catch_warnings():  # next_gene_faithful's LeakWarning: known, not news here
    warnings.simplefilter("ignore", objectives.LeakWarning)
    objective_config = objectives.ObjectiveConfig(name=objective)
  c = train_config.default_config()
  return step_lib.pretraining_core(config, objective_config, c.optimizer, num_steps,
                                   sharding.make_mesh(c.mesh, jax.devices()[:1]), seed)


def _batch_spec(batch: int, seq_len: int) -> dict:
  return {"tokens": jax.ShapeDtypeStruct((batch, seq_len), jnp.int32),
          "mask": jax.ShapeDtypeStruct((batch, seq_len), jnp.bool_)}


def lower_and_compile(config: GeneMambaConfig, seq_len: int, batch: int,
                      objective: str = "next_gene"):
  """(compiled step, lower+compile seconds) for abstract inputs: nothing is allocated."""
  core = train_core(config, objective)
  t0 = time.perf_counter()
  compiled = core.lower(core.restore_target(), _batch_spec(batch, seq_len)).compile()
  return compiled, time.perf_counter() - t0


def time_train_step(mixer: str = "mamba2", d_model: int = 128, layers: int = 4,
                    seq_len: int = 512, batch: int = 8, vocab: int = 2000,
                    d_state: int | None = None, steps: int = 10, warmup: int = 2,
                    backend: str | None = None, dtype: str = "float32",
                    remat: bool | None = None, chunk_size: int = 64, objective: str = "next_gene",
                    seed: int = 0, remat_policy: str | None = None) -> dict:
  """Compiles the train step, runs `warmup` steps, then times `steps` steps.

  Returns:
    {"tokens_per_s": batch * seq_len * steps / total seconds, "step_ms_median",
    "step_ms_min", "compile_s" (lower + compile), "loss" (of the last step),
    "config": the GeneMambaConfig}.
  """
  if steps < 1 or warmup < 0:
    raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
  config = model_config(mixer, d_model, layers, vocab, d_state, backend, dtype, remat,
                        chunk_size, objective, remat_policy)
  core = train_core(config, objective, warmup + steps, seed)
  state = core.init()
  data = random_batch(batch, seq_len, vocab, seed)
  t0 = time.perf_counter()
  # The training loop's step: sharded, the state donated (updated in place).
  step = core.lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    state, metrics = step(state, data, ())
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = step(state, data, ())
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  return {"tokens_per_s": batch * seq_len * steps / sum(times),
          "step_ms_median": 1e3 * statistics.median(times), "step_ms_min": 1e3 * min(times),
          "compile_s": compile_s, "loss": float(metrics["loss"]), "config": config}


def compile_seconds(layers: Sequence[int], mixer: str = "mamba2", d_model: int = 128,
                    seq_len: int = 512, batch: int = 8, vocab: int = 2000,
                    d_state: int | None = None, backend: str | None = None,
                    dtype: str = "float32", remat: bool | None = None, chunk_size: int = 64,
                    objective: str = "next_gene", remat_policy: str | None = None
                    ) -> dict[int, float]:
  """{depth: lower + compile seconds of the train step} for each depth in `layers`."""
  out = {}
  for n in layers:
    config = model_config(mixer, d_model, n, vocab, d_state, backend, dtype, remat, chunk_size,
                          objective, remat_policy)
    out[n] = lower_and_compile(config, seq_len, batch, objective)[1]
  return out


def original_layout_config(d_model: int = 512, layers: int = 24, vocab: int = 25_426,
                           combine: str = "mean", chunk_size: int = 64,
                           backend: str | None = None, dtype: str = "float32") -> GeneMambaConfig:
  """The model `convert from-pytorch` builds for the original's checkpoints of these sizes."""
  from genemamba_jax.convert.original_files import ORIGINAL_MIXER  # pylint: disable=g-import-not-at-top
  config = GeneMambaConfig(vocab_size=vocab, d_model=d_model, n_layers=layers, combine=combine,
                           shared_combine=combine in ("concat", "gate"), residual="inside",
                           scan_chunk_size=chunk_size, dtype=dtype, **ORIGINAL_MIXER)
  return config.replace(scan_backend=backend) if backend else config


def time_embed(model: GeneMamba, tokens: np.ndarray, mask: np.ndarray, steps: int = 5,
               warmup: int = 1) -> dict:
  """Times `embed`'s jitted batch function (mean pooling) on one batch, after compiling.

  Returns {"cells_per_s", "batch_ms_median", "batch_ms_min", "compile_s", "embedding"
  ([B, d] of the last call)}.
  """
  from genemamba_jax import inference  # pylint: disable=g-import-not-at-top
  step = inference.batch_step(inference.embedding_fn(("mean",), model.config.vocab_size), model)
  tokens, mask = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, bool)
  t0 = time.perf_counter()
  out = jax.block_until_ready(step(tokens, mask, None))
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    out = jax.block_until_ready(step(tokens, mask, None))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    out = jax.block_until_ready(step(tokens, mask, None))
    times.append(time.perf_counter() - t0)
  return {"cells_per_s": len(tokens) * steps / sum(times),
          "batch_ms_median": 1e3 * statistics.median(times), "batch_ms_min": 1e3 * min(times),
          "compile_s": compile_s, "embedding": np.asarray(out[0]["mean"])}


def time_embed_step(d_model: int = 512, layers: int = 2, seq_len: int = 2048, batch: int = 8,
                    vocab: int = 25_426, steps: int = 5, warmup: int = 1, combine: str = "mean",
                    chunk_size: int = 64, backend: str | None = None, dtype: str = "float32",
                    seed: int = 0) -> dict:
  """`time_embed` on a randomly initialised model of the original's layout and random cells."""
  config = original_layout_config(d_model, layers, vocab, combine, chunk_size, backend, dtype)
  model = GeneMamba(config, rngs=nnx.Rngs(seed))
  data = random_batch(batch, seq_len, vocab, seed)
  return dict(time_embed(model, data["tokens"], data["mask"], steps, warmup), config=config)


def _positive(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"{text} is not >= 1")
  return value


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python bench/train_step.py",
                                   description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--mixer", choices=MIXERS, default="mamba2", help="default mamba2")
  common.add_argument("--d-model", type=_positive, default=128, help="hidden size (default 128)")
  common.add_argument("--seq-len", type=_positive, default=512, help="tokens a cell (default 512)")
  common.add_argument("--batch", type=_positive, default=8, help="cells a step (default 8)")
  common.add_argument("--vocab", type=int, default=2000, help=f"> {FIRST_GENE_ID}")
  common.add_argument("--d-state", type=_positive, default=None,
                      help="state size N (default: 16 for mamba1, 64 for mamba2)")
  common.add_argument("--backend", choices=SCAN_BACKENDS, default=None,
                      help="selective-scan backend (default: the model's, "
                           f"{GeneMambaConfig.scan_backend!r})")
  common.add_argument("--chunk-size", type=_positive, default=64, help="for --backend chunked")
  common.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype")
  common.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                      help="keep only --remat-policy's activations for the backward and "
                           f"recompute the rest (default: the model's, {GeneMambaConfig.remat})")
  common.add_argument("--remat-policy", choices=REMAT_POLICIES, default=None,
                      help=f"default: the model's, {GeneMambaConfig.remat_policy!r}")
  common.add_argument("--objective", choices=objectives.OBJECTIVES, default="next_gene",
                      help="the training objective (default next_gene, separate streams)")
  step = commands.add_parser("train-step", parents=[common], help="time training steps")
  step.add_argument("--layers", type=_positive, default=4, help="BiMamba layers (default 4)")
  step.add_argument("--steps", type=_positive, default=10, help="timed steps")
  step.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  compile_ = commands.add_parser("compile-time", parents=[common],
                                 help="lower + compile seconds per depth")
  compile_.add_argument("--layers", type=_positive, nargs="+", default=[12, 24, 48],
                        help="depths to compile (default 12 24 48)")
  embed = commands.add_parser("embed-step", help="time embed's forward pass (cells/s)")
  embed.add_argument("--d-model", type=_positive, default=512, help="hidden size (default 512)")
  embed.add_argument("--layers", type=_positive, default=2, help="BiMamba layers (default 2)")
  embed.add_argument("--seq-len", type=_positive, default=2048,
                     help="tokens a cell (default 2048)")
  embed.add_argument("--batch", type=_positive, default=8, help="cells a forward pass (default 8)")
  embed.add_argument("--vocab", type=int, default=25_426, help=f"> {FIRST_GENE_ID}")
  embed.add_argument("--combine", choices=COMBINES, default="mean",
                     help="bidirectional combination (default mean, the original's)")
  embed.add_argument("--chunk-size", type=_positive, default=64, help="SSD chunk length")
  embed.add_argument("--backend", choices=SCAN_BACKENDS, default=None,
                     help="scan backend (default: the model's, auto)")
  embed.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype")
  embed.add_argument("--steps", type=_positive, default=5, help="timed batches")
  embed.add_argument("--warmup", type=int, default=1, help="untimed batches after compiling")
  return parser


def _embed_main(args) -> None:
  result = time_embed_step(args.d_model, args.layers, args.seq_len, args.batch, args.vocab,
                           args.steps, args.warmup, args.combine, args.chunk_size, args.backend,
                           args.dtype)
  config = result["config"]
  print(f"jax {jax.__version__} ({jax.default_backend()}), {jax.device_count()} device(s); "
        f"embed forward, original layout: d_model={config.d_model}, layers={config.n_layers}, "
        f"seq_len={args.seq_len}, batch={args.batch}, vocab={config.vocab_size}, "
        f"combine={config.combine}, chunk={config.scan_chunk_size}, dtype={config.dtype}")
  print(f"| compile s | batch ms (median) | batch ms (min) | cells/s |\n|---|---|---|---|\n"
        f"| {result['compile_s']:.1f} | {result['batch_ms_median']:.0f} | "
        f"{result['batch_ms_min']:.0f} | {result['cells_per_s']:.2f} |")
  print(f"cells_per_s={result['cells_per_s']:.3f}")


def main(argv: Sequence[str] | None = None) -> None:
  parser = _parser()
  args = parser.parse_args(argv)
  if args.vocab <= FIRST_GENE_ID:
    parser.error(f"--vocab {args.vocab}: needs > {FIRST_GENE_ID} (ids 0-3 are special tokens)")
  if args.command == "embed-step":
    if args.warmup < 0:
      parser.error(f"--warmup {args.warmup}: needs >= 0")
    try:
      original_layout_config(args.d_model, args.layers, args.vocab)
    except ValueError as e:
      parser.error(str(e))
    return _embed_main(args)
  if args.command == "train-step" and args.warmup < 0:
    parser.error(f"--warmup {args.warmup}: needs >= 0")
  sizes = {"mixer": args.mixer, "d_model": args.d_model, "seq_len": args.seq_len,
           "batch": args.batch, "vocab": args.vocab, "d_state": args.d_state,
           "backend": args.backend, "dtype": args.dtype, "remat": args.remat,
           "remat_policy": args.remat_policy, "chunk_size": args.chunk_size,
           "objective": args.objective}
  try:
    probe = model_config(args.mixer, args.d_model, 1, args.vocab, args.d_state, args.backend,
                         args.dtype, args.remat, args.chunk_size, args.objective,
                         remat_policy=args.remat_policy)
  except ValueError as e:  # e.g. d_inner not a multiple of headdim
    parser.error(str(e))
  shown = dict(sizes, d_state=probe.state_size, backend=probe.scan_backend, remat=probe.remat,
               remat_policy=probe.remat_policy)
  print(f"jax {jax.__version__} ({jax.default_backend()}), {jax.device_count()} device(s); "
        + ", ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
  if args.command == "compile-time":
    print("| layers | lower + compile s |\n|---|---|", flush=True)
    for n in args.layers:
      seconds = compile_seconds([n], **sizes)[n]
      print(f"| {n} | {seconds:.2f} |", flush=True)
    return
  result = time_train_step(layers=args.layers, steps=args.steps, warmup=args.warmup, **sizes)
  config = result["config"]
  print(f"| layers | N | compile s | step ms (median) | step ms (min) | loss | tokens/s |\n"
        f"|---|---|---|---|---|---|---|\n"
        f"| {config.n_layers} | {config.state_size} | {result['compile_s']:.1f} | "
        f"{result['step_ms_median']:.1f} | {result['step_ms_min']:.1f} | {result['loss']:.3f} | "
        f"{result['tokens_per_s']:,.0f} |")
  print(f"tokens_per_s={result['tokens_per_s']:.1f}")


if __name__ == "__main__":
  main(sys.argv[1:])
