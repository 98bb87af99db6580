"""Train-step benchmarks of the full GeneMamba: throughput and compile time on this machine.

    python -m genemamba_jax.bench train-step --mixer mamba2 --d-model 128 --layers 4 \
        --seq-len 512 --batch 8 --vocab 2000 [--d-state N] [--steps 10] [--backend auto] \
        [--dtype float32] [--remat | --no-remat] [--remat-policy P] [--unroll-layers]
    python -m genemamba_jax.bench compile-time --layers 12 24 48 [--mixer mamba2 ...]

`train-step` times the real training step (`genemamba_jax.train.step.make_train_step`:
the default leak-free `next_gene` objective on a separate-streams model, AdamW of
`genemamba_jax.train.optimizer`) on random tokens without padding, after a
warm-up, and ends with the line `tokens_per_s=<number>` (tokens = batch *
seq_len per step). `compile-time` prints the seconds XLA takes to lower and
compile that step for each depth; layers are applied with `nnx.scan`, so the
figure should not grow with depth.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from genemamba_jax.model import GeneMamba, GeneMambaConfig
from genemamba_jax.model.config import DTYPES, MIXERS, REMAT_POLICIES, SCAN_BACKENDS
from genemamba_jax.train import objectives
from genemamba_jax.train import optimizer as optimizer_lib
from genemamba_jax.train import step as step_lib

# Ids 0..3 are <pad>, <mask>, <cls>, <eos> in our vocabularies: random genes start after them.
FIRST_GENE_ID = 4


def model_config(mixer: str = "mamba2", d_model: int = 128, layers: int = 4, vocab: int = 2000,
                 d_state: int | None = None, backend: str | None = None,
                 dtype: str = "float32", remat: bool | None = None, chunk_size: int = 64,
                 objective: str = "next_gene", unroll_layers: bool = False,
                 remat_policy: str | None = None) -> GeneMambaConfig:
  """The GeneMamba the benchmark trains: mean combination, untied head with bias.

  The streams layout is the one `objective` trains (separate for next_gene),
  as `genemamba_jax.train.loop` builds it. `backend=None` keeps the model's
  default scan backend, i.e. what training uses unless configured otherwise; likewise
  `remat=None` and `remat_policy=None` keep the model's defaults.
  """
  config = GeneMambaConfig(
      vocab_size=vocab, d_model=d_model, n_layers=layers, mixer=mixer, d_state=d_state,
      combine="mean", streams=objectives.model_streams_for(objective),
      scan_chunk_size=chunk_size, dtype=dtype, unroll_layers=unroll_layers)
  overrides = {"scan_backend": backend, "remat": remat, "remat_policy": remat_policy}
  return config.replace(**{k: v for k, v in overrides.items() if v is not None})


def random_batch(batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
  """{"tokens": [batch, seq_len] int32 gene ids, "mask": all True}: full rows, no padding."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(FIRST_GENE_ID, vocab, size=(batch, seq_len), dtype=np.int32)
  return {"tokens": jnp.asarray(tokens), "mask": jnp.ones((batch, seq_len), bool)}


def build_train_step(config: GeneMambaConfig, objective: str = "next_gene", num_steps: int = 100,
                     seed: int = 0, abstract: bool = False):
  """The training loop's step function and a train state for `config`.

  Args:
    config: the model.
    objective: an objective name of `genemamba_jax.train.objectives`.
    num_steps: the run length the optimizer's schedule spans.
    seed: parameter and step RNG seed.
    abstract: return the state as ShapeDtypeStructs (for lowering only; nothing
      is allocated).

  Returns:
    (train_step, state): the un-jitted `(state, batch) -> (state, metrics)`
    and its state {"params", "opt_state", "step", "rng"}.
  """
  with warnings.catch_warnings():  # next_gene_faithful's LeakWarning: known, not news here
    warnings.simplefilter("ignore", objectives.LeakWarning)
    objective_config = objectives.ObjectiveConfig(name=objective)
  opt = optimizer_lib.default_optimizer_config()
  tx = optimizer_lib.make_optimizer(opt, num_steps)
  schedule = optimizer_lib.learning_rate(opt, num_steps)
  make_state = lambda: step_lib.init_state(GeneMamba(config, rngs=nnx.Rngs(seed)), tx, seed)
  abstract_model = nnx.eval_shape(lambda: GeneMamba(config, rngs=nnx.Rngs(seed)))
  graphdef, _ = nnx.split(abstract_model, nnx.Param)
  state = jax.eval_shape(make_state) if abstract else jax.jit(make_state)()
  return step_lib.make_train_step(graphdef, tx, schedule, objective_config), state


def _batch_spec(batch: int, seq_len: int) -> dict:
  return {"tokens": jax.ShapeDtypeStruct((batch, seq_len), jnp.int32),
          "mask": jax.ShapeDtypeStruct((batch, seq_len), jnp.bool_)}


def lower_and_compile(config: GeneMambaConfig, seq_len: int, batch: int,
                      objective: str = "next_gene"):
  """(compiled step, lower+compile seconds) for abstract inputs: nothing is allocated."""
  train_step, state = build_train_step(config, objective, abstract=True)
  t0 = time.perf_counter()
  lowered = jax.jit(train_step, donate_argnums=0).lower(state, _batch_spec(batch, seq_len))
  compiled = lowered.compile()
  return compiled, time.perf_counter() - t0


def time_train_step(mixer: str = "mamba2", d_model: int = 128, layers: int = 4,
                    seq_len: int = 512, batch: int = 8, vocab: int = 2000,
                    d_state: int | None = None, steps: int = 10, warmup: int = 2,
                    backend: str | None = None, dtype: str = "float32",
                    remat: bool | None = None, chunk_size: int = 64, objective: str = "next_gene",
                    seed: int = 0, unroll_layers: bool = False,
                    remat_policy: str | None = None) -> dict:
  """Compiles the train step, runs `warmup` steps, then times `steps` steps.

  Returns:
    {"tokens_per_s": batch * seq_len * steps / total seconds, "step_ms_median",
    "step_ms_min", "compile_s" (lower + compile), "loss" (of the last step),
    "config": the GeneMambaConfig}.
  """
  if steps < 1 or warmup < 0:
    raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
  config = model_config(mixer, d_model, layers, vocab, d_state, backend, dtype, remat,
                        chunk_size, objective, unroll_layers, remat_policy)
  train_step, state = build_train_step(config, objective, warmup + steps, seed)
  data = random_batch(batch, seq_len, vocab, seed)
  t0 = time.perf_counter()
  # Donated state, as in the training loop: the update happens in place.
  step = jax.jit(train_step, donate_argnums=0).lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    state, metrics = step(state, data)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = step(state, data)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  return {"tokens_per_s": batch * seq_len * steps / sum(times),
          "step_ms_median": 1e3 * statistics.median(times), "step_ms_min": 1e3 * min(times),
          "compile_s": compile_s, "loss": float(metrics["loss"]), "config": config}


def compile_seconds(layers: Sequence[int], mixer: str = "mamba2", d_model: int = 128,
                    seq_len: int = 512, batch: int = 8, vocab: int = 2000,
                    d_state: int | None = None, backend: str | None = None,
                    dtype: str = "float32", remat: bool | None = None, chunk_size: int = 64,
                    objective: str = "next_gene", unroll_layers: bool = False,
                    remat_policy: str | None = None) -> dict[int, float]:
  """{depth: lower + compile seconds of the train step} for each depth in `layers`."""
  out = {}
  for n in layers:
    config = model_config(mixer, d_model, n, vocab, d_state, backend, dtype, remat, chunk_size,
                          objective, unroll_layers, remat_policy)
    out[n] = lower_and_compile(config, seq_len, batch, objective)[1]
  return out


def _positive(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"{text} is not >= 1")
  return value


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m genemamba_jax.bench",
                                   description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--mixer", choices=MIXERS, default="mamba2")
  common.add_argument("--d-model", type=_positive, default=128)
  common.add_argument("--seq-len", type=_positive, default=512)
  common.add_argument("--batch", type=_positive, default=8)
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
  common.add_argument("--unroll-layers", action="store_true",
                      help="unroll the loop over layers (compile time grows with depth)")
  common.add_argument("--objective", choices=objectives.OBJECTIVES, default="next_gene")
  step = commands.add_parser("train-step", parents=[common], help="time training steps")
  step.add_argument("--layers", type=_positive, default=4)
  step.add_argument("--steps", type=_positive, default=10, help="timed steps")
  step.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  compile_ = commands.add_parser("compile-time", parents=[common],
                                 help="lower + compile seconds per depth")
  compile_.add_argument("--layers", type=_positive, nargs="+", default=[12, 24, 48])
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  parser = _parser()
  args = parser.parse_args(argv)
  if args.vocab <= FIRST_GENE_ID:
    parser.error(f"--vocab {args.vocab}: needs > {FIRST_GENE_ID} (ids 0-3 are special tokens)")
  if args.command == "train-step" and args.warmup < 0:
    parser.error(f"--warmup {args.warmup}: needs >= 0")
  sizes = {"mixer": args.mixer, "d_model": args.d_model, "seq_len": args.seq_len,
           "batch": args.batch, "vocab": args.vocab, "d_state": args.d_state,
           "backend": args.backend, "dtype": args.dtype, "remat": args.remat,
           "remat_policy": args.remat_policy, "chunk_size": args.chunk_size,
           "objective": args.objective, "unroll_layers": args.unroll_layers}
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
