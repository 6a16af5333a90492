"""Multi-process runs on one machine: 2 processes x 4 fake CPU devices equal 1 x 8 and 1 x 1.

One short rotation+SimCLR+NAT+host_memory run (host_memory: a toy objective with a host
hook, tests/host_hook_objective.py) (tiny CNN, 16 px, batch 16, 6 steps) is trained
  * in ONE process on 1 device and on 8 devices with FSDP (one subprocess, both layouts);
  * in TWO processes (4 CPU devices each) started as `srun` would (SLURM's variables),
    resuming the 8-device run's step-2 checkpoint (1 -> 2 processes); process 1 is
    SIGKILLed before step 5, and process 0 must stop promptly with one line;
  * rerun in TWO processes (JAX's own variables), resuming from the checkpoint the two
    processes wrote, to the end.
It checks: the logged losses and the final parameters agree; at every step the two
processes read disjoint halves of the global batch the 1-process run read (one global
order); only process 0 wrote metrics.jsonl and TensorBoard; the checkpoint the two
processes wrote restores in this (1-device) process; the host hook's per-example table
ends equal too, with every example's visits counted once per appearance. It also replaces the former
8-devices-vs-1 test of tests/test_trainer.py (the FSDP checkpoint loads for evaluation).
"""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import host_hook_objective
from conftest import ROOT
from selfsup.metrics_log import read_metrics

host_hook_objective.register()   # evaluation below reads the configs that name it

# Four processes' worth of compiles (about 4 minutes on 2 cores): .ci/run runs these
# after the default suite (`python -m pytest -m ci`).
pytestmark = pytest.mark.ci

WORKER = os.path.join(ROOT, "tests", "distributed_worker.py")
ARGS = ["--config", "experiments/quickstart.py:rotation+simclr+nat+host_memory",
        "--config.data.image_size=16", "--config.train.batch_size=16",
        "--config.train.steps=6", "--config.train.log_every=1",
        "--config.train.checkpoint_every=2", "--config.train.progress_bar=False",
        "--config.probe.enabled=False", "--config.optimizer.name=sgd",
        "--config.optimizer.warmup_steps=0", "--config.mesh.fsdp_min_size=64"]
TIMEOUT = 900   # hard limit per launch (idle CI needs ~1-2 min): nothing here can hang


def _env(devices, **extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "TPU_"))}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch_two(workdir, record, *, slurm, kill_at=0):
  """Starts both processes; returns [(returncode, stderr, seconds)] per process."""
  port, job = _free_port(), _slurm_job_for_free_port()
  procs = []
  for i in range(2):
    if slurm:   # as `srun --ntasks=2` on one node sets them
      extra = dict(SLURM_JOB_ID=str(job), SLURM_NTASKS="2", SLURM_PROCID=str(i),
                   SLURM_LOCALID=str(i), SLURM_STEP_NODELIST="localhost")
    else:
      extra = dict(SELFSUP_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
    if kill_at:
      extra.update(KILL_AT_STEP=str(kill_at), KILL_PROCESS="1")
    # stderr to a file: a pipe nobody reads fills up and blocks the process.
    log = open(os.path.join(record, f"launch{time.time_ns()}.p{i}.err"), "w+")
    procs.append((subprocess.Popen([sys.executable, WORKER, "train", *ARGS, "--workdir",
                                    workdir], cwd=ROOT, env=_env(4, RECORD_DIR=record, **extra),
                                   stdout=subprocess.DEVNULL, stderr=log, text=True),
                  time.time(), log))
  results = [None, None]
  deadline = time.time() + TIMEOUT
  try:
    while None in results and time.time() < deadline:
      for i, (p, start, _) in enumerate(procs):
        if results[i] is None and p.poll() is not None:
          log = procs[i][2]
          log.seek(0)
          results[i] = (p.returncode, log.read(), time.time())
          log.close()
      time.sleep(0.2)
  finally:
    for p, _, _ in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert None not in results, f"a process did not finish within {TIMEOUT} s"
  return results


def _slurm_job_for_free_port():
  # JAX puts the coordinator of a SLURM job on port 61440 + SLURM_JOB_ID % 4096.
  for job in np.random.default_rng(os.getpid() + int(time.time())).permutation(4096):
    with socket.socket() as s:
      try:
        s.bind(("localhost", 61440 + int(job)))
        return int(job) + 4096 * 7
      except OSError:
        continue
  raise RuntimeError("no free port in SLURM's range")


def _records(record, name):
  """{step: [indices of process 0, indices of process 1]}, the last launch's per step."""
  out = {}
  for p in (0, 1):
    path = os.path.join(record, f"{name}.p{p}.jsonl")
    if not os.path.exists(path):
      continue
    for line in open(path):
      row = json.loads(line)
      out.setdefault(row["step"], [None, None])[p] = row["index"]
  return out


def _final_state(workdir, step=6):
  """(all parameters as one vector, the host hook's {memory, seen} table) at `step`."""
  from selfsup.checkpoint import Checkpointer
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  state = jax.device_get(ckpt.restore_state_only(step))
  ckpt.close()
  leaves = jax.tree.leaves(state["params"])
  params = np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])
  return params, state["objective_state"][host_hook_objective.NAME]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("dist")
  record = str(base / "record")
  os.makedirs(record)
  single = subprocess.run([sys.executable, WORKER, "single", *ARGS, "--workdir",
                           str(base / "single")], cwd=ROOT, env=_env(8, RECORD_DIR=record),
                          capture_output=True, text=True, timeout=TIMEOUT)
  assert single.returncode == 0, single.stderr[-3000:]
  # 1 -> 2 processes: the 8-device run's step-2 checkpoint, resumed by two processes
  # started as `srun` starts them; process 1 dies before step 5 (after the step-4 save).
  two = str(base / "two")
  shutil.copytree(str(base / "single" / "eight"), two)
  for step in ("4", "6"):
    shutil.rmtree(os.path.join(two, "checkpoints", step))
  killed = _launch_two(two, record, slurm=True, kill_at=5)
  # Rerun both (JAX's own variables this time): resumes from the newest complete
  # checkpoint the two processes wrote and finishes.
  rerun = _launch_two(two, record, slurm=False)
  return dict(base=base, record=record, killed=killed, rerun=rerun)


def _losses(workdir):
  return [r["loss"] for r in read_metrics(str(workdir))]


def test_a_killed_process_stops_the_other_with_one_line(runs):
  (rc0, err0, t0), (rc1, _, t1) = runs["killed"]
  assert rc1 == -9                       # SIGKILL, as a preempted host
  assert rc0 == 3, err0[-2000:]
  assert "went away" in err0 and "restart every process" in err0
  assert t0 - t1 < 60                     # promptly: the heartbeat timeout is 10 s


def test_two_processes_equal_one_and_eight_devices(runs):
  base = runs["base"]
  for rc, err, _ in runs["rerun"]:
    assert rc == 0, err[-3000:]
  one = _losses(base / "single" / "one")
  assert len(one) == 6
  for other in (base / "single" / "eight", base / "two"):
    assert [r["step"] for r in read_metrics(str(other))] == list(range(1, 7))
    np.testing.assert_allclose(_losses(other), one, rtol=2e-4, atol=2e-5)
  # The checkpoints the two processes wrote restore in this 1-device process.
  reference, table = _final_state(str(base / "single" / "one"))
  params, two_table = _final_state(str(base / "two"))
  np.testing.assert_allclose(params, reference, rtol=1e-3, atol=2e-5)
  # The host hook ran once per step in every layout, on the whole global batch (the
  # killed launch's steps 3-4 were saved, then 5-6 by the rerun): 6 steps x 16 visits.
  visits = [_records(runs["record"], "one")[s][0] for s in range(1, 7)]
  expected = np.bincount(np.concatenate(visits), minlength=len(table["seen"]))
  np.testing.assert_array_equal(table["seen"], expected)
  np.testing.assert_array_equal(two_table["seen"], expected)
  assert np.count_nonzero(table["memory"]) > 0
  np.testing.assert_allclose(two_table["memory"], table["memory"], rtol=1e-3, atol=2e-5)


def test_each_process_reads_its_half_of_one_global_order(runs):
  one = _records(runs["record"], "one")
  two = _records(runs["record"], "two")
  assert sorted(two) == [3, 4, 5, 6]   # steps 1-2 ran in the 8-device process
  for step, (p0, p1) in two.items():
    assert len(p0) == len(p1) == 8 and not set(p0) & set(p1)
    assert p0 + p1 == one[step][0]   # rows [0, 8) and [8, 16) of the same global batch


def test_only_process_zero_writes_logs(runs):
  two = runs["base"] / "two"
  # The 8-device run's events file, then one per launch of process 0 (killed, rerun):
  # none from process 1.
  assert len(glob.glob(str(two / "tensorboard" / "events*"))) == 3
  assert len(open(two / "metrics.jsonl").readlines()) == 6


def test_the_fsdp_checkpoint_loads_for_evaluation(runs):
  from evals.features import load_encoder
  _, _, variables, step = load_encoder(str(runs["base"] / "single" / "eight"))
  assert step == 6
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(variables))
