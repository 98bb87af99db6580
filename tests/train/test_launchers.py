"""launch/*.sh and where a process finds its multi-process settings (train/distributed.py).

The settings are read from simulated launcher variables (no SLURM or TPU here); the
scripts' commands are checked with stand-ins for `srun` and a dry run of `gcloud`. The
local launcher runs real processes in tests/train/test_multiprocess.py.
"""

import os
import shlex
import subprocess
from pathlib import Path

import ml_collections
import pytest

from genemamba_jax.errors import DataError
from genemamba_jax.train import config as train_config
from genemamba_jax.train import distributed
from genemamba_jax.train.distributed import Settings

ROOT = Path(__file__).resolve().parents[2]
SRUN_STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[017-020],big1",
             "SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}


def _mesh(**values):
  cfg = train_config.default_config().mesh
  cfg.update(values)
  return cfg


@pytest.mark.parametrize("environ, want", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "1"}, Settings("127.0.0.1:1234", 2, 1, "environment")),
    # srun with 4 tasks: JAX's SlurmCluster port rule (the job id mod 4096 + 61440).
    (SRUN_STEP, Settings(f"gpu017:{4242 % 4096 + 61440}", 4, 2, "SLURM")),
    ({**SRUN_STEP, "JAX_COORDINATOR_PORT": "5000"}, Settings("gpu017:5000", 4, 2, "SLURM")),
    ({**SRUN_STEP, "SLURM_NTASKS": "1"}, None),  # one task: a single-process run
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, None),  # sbatch, not srun
    # The launcher's explicit variables win over SLURM's.
    ({**SRUN_STEP, "JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4",
      "JAX_PROCESS_ID": "3"}, Settings("h:1", 4, 3, "environment")),
])
def test_settings_from_the_environment(environ, want):
  assert distributed.settings(_mesh(), environ) == want


def test_settings_from_the_config_and_switches():
  assert distributed.settings(_mesh(coordinator_address="a:1", num_processes=3, process_id=0),
                              SRUN_STEP) == Settings("a:1", 3, 0, "config")
  assert distributed.settings(_mesh(distributed=False), SRUN_STEP) is None
  # distributed=True with nothing set: JAX's own detection (Cloud TPU VMs, Open MPI, ...).
  assert distributed.settings(_mesh(distributed=True), {}) == Settings(
      None, None, None, "JAX cluster detection")


@pytest.mark.parametrize("environ, message", [
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"},
     r"settings from environment lack num_processes, process_id \(\$JAX_\.\.\.\)"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
     r"coordinator address '127.0.0.1' \(from environment\) is not host:port"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     r"process id 2 \(from environment\) must be < the number of processes 2"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     r"JAX_NUM_PROCESSES='two' must be an integer >= 1"),
    ({**SRUN_STEP, "SLURM_PROCID": "-1"}, r"SLURM_PROCID='-1' must be an integer >= 0"),
])
def test_inconsistent_settings_are_one_line_errors(environ, message):
  with pytest.raises(DataError, match=message) as error:
    distributed.settings(_mesh(), environ)
  assert "\n" not in str(error.value)


def test_single_process_runs_never_start_jax_distributed():
  assert not distributed.initialize(ml_collections.ConfigDict(dict(distributed=None)), {})


def _fake(tmp_path: Path, name: str) -> Path:
  """A stand-in for `name` on PATH that records its arguments, one per line."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  (bin_dir / name).write_text(
      f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{tmp_path}/{name}.args"\n')
  (bin_dir / name).chmod(0o755)
  return bin_dir


def test_slurm_script_runs_train_under_srun_with_kill_on_bad_exit(tmp_path):
  bin_dir = _fake(tmp_path, "srun")
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  subprocess.run(["bash", str(ROOT / "launch" / "slurm.sh"), "configs/pretrain.py", "/runs/x",
                  "--config.data.path=/tokens"], env=env, check=True, timeout=60)
  args = (tmp_path / "srun.args").read_text().splitlines()
  assert args == ["--kill-on-bad-exit=1", "python", "-m", "genemamba_jax.train", "--config",
                  "configs/pretrain.py", "--workdir", "/runs/x", "--config.mesh.distributed=True",
                  "--config.data.path=/tokens"]


def test_tpu_vm_script_runs_the_same_command_on_every_worker(tmp_path):
  env = dict(os.environ, DRY_RUN="1", GENEMAMBA_DIR="/home/me/genemamba jax")
  out = subprocess.run(["bash", str(ROOT / "launch" / "tpu_vm.sh"), "v5e-32", "us-west4-a",
                        "configs/pretrain.py", "gs://b/runs/p", "--config.data.path=gs://b/t"],
                       env=env, check=True, capture_output=True, text=True, timeout=60).stdout
  argv = shlex.split(out)
  assert argv[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "v5e-32", "--zone",
                      "us-west4-a", "--worker=all"]
  assert argv[9] == "--command"
  assert shlex.split(argv[10]) == [
      "cd", "/home/me/genemamba jax", "&&", "python", "-m", "genemamba_jax.train", "--config",
      "configs/pretrain.py", "--workdir", "gs://b/runs/p", "--config.mesh.distributed=True",
      "--config.data.path=gs://b/t"]
  # Run for real: gcloud (a stand-in here) gets exactly those arguments.
  bin_dir = _fake(tmp_path, "gcloud")
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  subprocess.run(["bash", str(ROOT / "launch" / "tpu_vm.sh"), "v5e-32", "us-west4-a",
                  "configs/pretrain.py", "gs://b/runs/p"], env=env, check=True, timeout=60)
  args = (tmp_path / "gcloud.args").read_text().splitlines()
  assert args[-1] == ("cd ~/genemamba-jax && python -m genemamba_jax.train --config "
                      "configs/pretrain.py --workdir gs://b/runs/p --config.mesh.distributed=True")


@pytest.mark.parametrize("argv, message", [
    (["2", "configs/demo.py"], "usage:"),
    (["two", "configs/demo.py", "runs/x"], "error: N=two must be a positive number"),
])
def test_local_launcher_refuses_bad_arguments(argv, message):
  proc = subprocess.run(["bash", str(ROOT / "launch" / "local_multiprocess.sh"), *argv],
                        capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 2 and message in proc.stderr
