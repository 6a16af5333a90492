"""SwAV: Sinkhorn and the swapped loss against NumPy, prototypes, queue, bad input,
kill-and-resume with the queue on, and 8 fake devices against 1."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_script_json, tiny_config
from objectives.swav import SwAV, sinkhorn, swapped_prediction_loss
from selfsup.errors import UserError
from selfsup.metrics_log import read_metrics
from selfsup.trainer import Trainer


def sinkhorn_numpy(scores, eps, iters):
  """The reference's distributed_sinkhorn in float64, one process: Q = exp(S/eps)^T."""
  q = np.exp(np.asarray(scores, np.float64) / eps).T
  k, b = q.shape
  q /= q.sum()
  for _ in range(iters):
    q /= q.sum(axis=1, keepdims=True)
    q /= k
    q /= q.sum(axis=0, keepdims=True)
    q /= b
  return (q * b).T


def swapped_numpy(scores, codes, assign, temperature):
  total = 0.0
  for q, s in zip(codes, assign):
    sub = 0.0
    for v in range(len(scores)):
      if v == s:
        continue
      x = np.asarray(scores[v], np.float64) / temperature
      logp = x - x.max(1, keepdims=True)
      logp -= np.log(np.exp(logp).sum(1, keepdims=True))
      sub -= np.mean(np.sum(q * logp, axis=1))
    total += sub / (len(scores) - 1)
  return total / len(assign)


@pytest.mark.parametrize("iters", [1, 3])
def test_sinkhorn_matches_numpy(iters):
  rng = np.random.default_rng(0)
  z = rng.normal(size=(6, 4))
  c = rng.normal(size=(4, 5))
  scores = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ (c / np.linalg.norm(c, axis=0))
  q = np.asarray(sinkhorn(jnp.asarray(scores, jnp.float32), 0.05, iters))
  ref = sinkhorn_numpy(scores, 0.05, iters)
  np.testing.assert_allclose(q, ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-5)            # codes: distributions
  # Columns (prototypes) carry equal mass B/K after the last column step... up to iters.
  assert q.shape == (6, 5)


def test_sinkhorn_does_not_overflow_in_float32():
  """Scores of 5 at eps 0.05: exp(100) is beyond float32; the max subtraction keeps the
  codes finite and equal to the float64 reference."""
  rng = np.random.default_rng(1)
  scores = 5.0 + rng.normal(size=(8, 3)) * 0.01
  q = np.asarray(sinkhorn(jnp.asarray(scores, jnp.float32), 0.05, 3))
  assert np.isfinite(q).all()
  assert not np.isfinite(np.exp(np.float32(scores) / np.float32(0.05))).all()
  np.testing.assert_allclose(q, sinkhorn_numpy(scores, 0.05, 3), rtol=2e-3, atol=1e-6)


def test_swapped_prediction_loss_matches_numpy():
  rng = np.random.default_rng(2)
  scores = [rng.uniform(-1, 1, size=(4, 5)) for _ in range(4)]   # 2 large + 2 small crops
  codes = [sinkhorn_numpy(scores[i], 0.05, 3) for i in range(2)]
  got = swapped_prediction_loss([jnp.asarray(s, jnp.float32) for s in scores],
                                [jnp.asarray(q, jnp.float32) for q in codes], (0, 1), 0.1)
  assert float(got) == pytest.approx(swapped_numpy(scores, codes, (0, 1), 0.1), rel=1e-5)


def test_prototypes_are_unit_and_frozen_then_free():
  swav = SwAV(freeze_prototypes_steps=3, proj_dim=4, num_prototypes=5)
  rng = np.random.default_rng(3)
  old = {"prototypes": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)}
  new = {"prototypes": old["prototypes"] * 2 + 1}
  frozen = swav.post_update_params(new, old, jnp.asarray(2))
  np.testing.assert_array_equal(frozen["prototypes"], old["prototypes"])
  free = np.asarray(swav.post_update_params(new, old, jnp.asarray(3))["prototypes"])
  expected = np.asarray(new["prototypes"])
  np.testing.assert_allclose(free, expected / np.linalg.norm(expected, axis=0), rtol=1e-6)


@pytest.mark.parametrize("options,batch,fragment", [
    ({"small_size": 40}, 8, "small_size=40"),          # a small crop larger than the image
    ({"large_size": 64}, 8, "large_size=64"),
    ({"num_prototypes": 0}, 8, "num_prototypes=0"),    # K < 1
    ({"queue_length": 20}, 8, "queue_length=20"),      # not a multiple of the batch
    ({"epsilon": 0.0}, 8, "epsilon"),
])
def test_bad_options_are_one_line_errors(options, batch, fragment):
  with pytest.raises(UserError, match=fragment) as e:
    SwAV(image_size=32, **options).validate(image_size=32, dataset=None, batch_size=batch)
  assert "\n" not in str(e.value)


def _swav_config(steps):
  c = tiny_config("swav", steps=steps, batch_size=8)
  c.train.online_probe = False
  o = c.objectives.swav
  o.num_small, o.small_size, o.proj_hidden, o.num_prototypes = 2, 8, (32,), 16
  o.queue_length, o.queue_start_step, o.freeze_prototypes_steps = 16, 1, 2
  return c


@pytest.mark.slow   # 53 s on 2 cores (two Trainers); the hook itself is tested above
def test_frozen_prototypes_and_a_killed_run_with_the_queue_on_resume_bit_exact(tmp_path):
  """One Trainer (one compile) covers freezing and resumption: steps 0 and 1 leave the
  prototypes as initialised (unit columns); the run dies after step 5 (newest checkpoint
  3) with the queue full and in use, and a new Trainer on a copy resumes to the same
  bits as the run that carries on."""
  c = _swav_config(steps=7)
  run = Trainer(c, str(tmp_path / "run"))
  initial = np.asarray(run.state["params"]["swav"]["prototypes"])
  np.testing.assert_allclose(np.linalg.norm(initial, axis=0), 1.0, rtol=1e-5)
  for _ in range(2):               # the frozen steps 0 and 1, driven by hand
    run.train_step(next(run.iterator))
    np.testing.assert_array_equal(np.asarray(run.state["params"]["swav"]["prototypes"]),
                                  initial)
  run.run(stop_after=3)            # steps 2-4, then dies; the newest checkpoint is step 3
  assert run.checkpointer.latest_step() == 3
  shutil.copytree(tmp_path / "run", tmp_path / "cut")
  resumed = Trainer(c, str(tmp_path / "cut"))
  assert int(resumed.state["step"]) == 3
  resumed.run()
  run.run()                        # the uninterrupted run carries on in memory
  a, b = jax.device_get(run.state), jax.device_get(resumed.state)
  assert int(a["step"]) == int(b["step"]) == 7
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  swav = a["objective_state"]["swav"]
  assert int(swav["filled"]) == 16 and np.abs(swav["queue"]).min() > 0   # full
  rows = read_metrics(str(tmp_path / "run"))
  assert rows[-1]["swav/queue_used"] == 1
  cut_rows = read_metrics(str(tmp_path / "cut"))
  assert [r["step"] for r in cut_rows] == [3, 4, 5, 6, 7]
  assert [r["loss"] for r in cut_rows] == [r["loss"] for r in rows]
  protos = a["params"]["swav"]["prototypes"]
  np.testing.assert_allclose(np.linalg.norm(protos, axis=0), 1.0, rtol=1e-5)
  assert not np.allclose(protos, initial)


EIGHT = """
import os, sys, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import jax, numpy as np
from test_swav import _swav_config
from selfsup.trainer import Trainer
out = {{}}
for name, devices, sharding in [("one", jax.devices()[:1], "replicate"),
                                ("eight", jax.devices(), "replicate"),
                                ("fsdp", jax.devices(), "fsdp")]:
  c = _swav_config(steps=3)
  c.objectives.swav.queue_start_step = 0
  c.optimizer.name = "sgd"
  c.mesh.sharding = sharding
  c.mesh.fsdp_min_size = 64
  t = Trainer(c, None, devices=devices)
  losses = []
  for _ in range(3):
    m, _ = t.train_step(next(t.iterator))
    losses.append(float(m["loss"]))
  s = jax.device_get(t.state)
  leaves = [np.asarray(x).ravel() for x in jax.tree.leaves(s["params"])]
  out[name] = dict(losses=losses, params=np.concatenate(leaves).tolist(),
                   queue=np.asarray(s["objective_state"]["swav"]["queue"]).ravel().tolist())
print(json.dumps(out))
"""


@pytest.mark.slow
def test_eight_devices_match_one_replicated_and_fsdp():
  """The codes' sums span the global batch: 8 devices (replicated, FSDP) give 1's run."""
  out = run_script_json(EIGHT, timeout=2400)
  for name in ("eight", "fsdp"):
    np.testing.assert_allclose(out[name]["losses"], out["one"]["losses"], rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(out[name]["params"], out["one"]["params"], rtol=1e-3, atol=2e-5)
    np.testing.assert_allclose(out[name]["queue"], out["one"]["queue"], rtol=1e-3, atol=2e-5)


SHARDED_CODES = """
import sys; sys.path.insert(0, {root!r})
import os; os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import json, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from objectives.swav import sinkhorn, swapped_prediction_loss
rng = np.random.default_rng(0)
s = [jnp.asarray(rng.uniform(-1, 1, (32, 20)), jnp.float32) for _ in range(4)]
def f(*s):
  codes = [sinkhorn(s[i], 0.05, 3) for i in range(2)]
  return swapped_prediction_loss(list(s), codes, (0, 1), 0.1), codes[0]
one = jax.jit(f)(*[jax.device_put(x, jax.devices()[0]) for x in s])
sh = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
eight = jax.jit(f)(*[jax.device_put(x, sh) for x in s])
local = np.concatenate([np.asarray(sinkhorn(s[0][i * 4:(i + 1) * 4], 0.05, 3)) for i in range(8)])
print(json.dumps(dict(n=len(jax.devices()), loss=[float(one[0]), float(eight[0])],
                      codes=np.abs(np.asarray(one[1]) - np.asarray(eight[1])).max().item(),
                      local=np.abs(local - np.asarray(one[1])).max().item())))
"""


def test_codes_and_loss_on_a_batch_sharded_over_8_devices_equal_1():
  """Sinkhorn's sums span the global batch: sharded over 8 devices the codes and loss are
  1 device's, while per-shard Sinkhorn (what a missing all-reduce would give) is not."""
  out = run_script_json(SHARDED_CODES, timeout=600)
  assert out["n"] == 8
  assert out["loss"][0] == pytest.approx(out["loss"][1], rel=1e-6)
  assert out["codes"] < 1e-6 and out["local"] > 0.1
