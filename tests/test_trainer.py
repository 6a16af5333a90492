"""The trainer: a killed run resumes exactly, metrics, one compile, SIGTERM.

8 devices vs 1 and 2 processes vs 1: tests/test_distributed.py.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from conftest import ROOT, tiny_config
from selfsup.metrics_log import read_metrics
from selfsup.trainer import Trainer

def _params(trainer):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(trainer.state))]


def test_killed_run_resumes_to_the_same_result(tmp_path):
  c = tiny_config("rotation", steps=8)
  full = Trainer(c, str(tmp_path / "full"))
  full.run()

  cut = Trainer(c, str(tmp_path / "cut"))
  cut.run(stop_after=5)          # dies after step 5; the newest checkpoint is step 3
  assert cut.checkpointer.latest_step() == 3
  del cut
  resumed = Trainer(c, str(tmp_path / "cut"))
  assert int(resumed.state["step"]) == 3
  resumed.run()

  for a, b in zip(_params(full), _params(resumed)):
    np.testing.assert_array_equal(a, b)
  full_log = read_metrics(str(tmp_path / "full"))
  cut_log = read_metrics(str(tmp_path / "cut"))
  assert [r["step"] for r in cut_log] == list(range(1, 9))
  assert [r["loss"] for r in cut_log] == [r["loss"] for r in full_log]


def test_metrics_jsonl_has_the_contract_fields(tmp_path):
  c = tiny_config("rotation", steps=2)
  Trainer(c, str(tmp_path)).run()
  rows = read_metrics(str(tmp_path))
  assert [r["step"] for r in rows] == [1, 2]
  for key in ("step", "loss", "lr", "images_per_s", "rotation/acc", "probe/acc"):
    assert key in rows[-1]
  assert os.path.exists(tmp_path / "config.json")


def test_step_compiles_once_over_several_steps(monkeypatch):
  import chex

  from selfsup import trainer as trainer_lib
  monkeypatch.setattr(trainer_lib, "train_step",
                      chex.assert_max_traces(trainer_lib.train_step, n=1))
  t = Trainer(tiny_config("rotation", steps=3), None)
  for _ in range(3):
    metrics, _ = t.train_step(next(t.iterator))
  assert np.isfinite(float(metrics["loss"]))
  assert t.step_fn._cache_size() == 1


def test_the_loop_keeps_at_most_two_steps_in_flight(tmp_path):
  # Dispatch is asynchronous: without a bound the loop runs ahead of the device until the
  # next log or checkpoint step, and a SIGTERM's save then waits for every queued step.
  # Each step's loss is made to depend on a slow computation, so queued steps stay
  # unfinished long enough to be counted when the next one is dispatched.
  import jax.numpy as jnp

  from selfsup import trainer as trainer_lib

  @jax.jit
  def slow(x):
    m = jnp.full((384, 384), x)
    m = jax.lax.fori_loop(0, 12, lambda i, m: jnp.tanh(m @ m / 384.0), m)
    return x + 0.0 * m[0, 0]

  c = tiny_config("rotation", steps=10)
  c.train.log_every = 100          # only the last step logs or checkpoints
  c.train.checkpoint_every = 100
  t = Trainer(c, str(tmp_path))
  losses, unfinished = [], []
  step = t.train_step

  def dispatch(batch):
    metrics, host = step(batch)
    metrics = {**metrics, "loss": slow(metrics["loss"])}
    unfinished.append(sum(not x.is_ready() for x in losses))
    losses.append(metrics["loss"])
    return metrics, host

  t.train_step = dispatch
  t.run()
  assert len(unfinished) == 10
  assert max(unfinished) <= trainer_lib.STEPS_IN_FLIGHT == 2, unfinished


def test_sigterm_saves_and_the_rerun_continues(tmp_path):
  # The end-of-run probe is on: after SIGTERM it must not run on the partial model.
  workdir = str(tmp_path / "run")
  args = ["-m", "selfsup.train", "--config", "experiments/quickstart.py:rotation",
          "--workdir", workdir, "--config.train.steps=100000", "--config.train.log_every=1",
          "--config.train.batch_size=8", "--config.data.image_size=16",
          "--config.train.checkpoint_every=100000", "--config.train.progress_bar=False",
          "--config.probe.enabled=True", "--config.probe.train_examples=64",
          "--config.probe.test_examples=32"]
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline:
    if os.path.exists(metrics) and len(open(metrics).readlines()) >= 3:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert "SIGTERM" in err and "run incomplete" in err and "probe was not run" in err
  result = json.loads(out.strip().splitlines()[-1])
  assert result["finished"] is False and "probe_top1" not in result
  last = read_metrics(workdir)[-1]["step"]
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps and steps[-1] == last
