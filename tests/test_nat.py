"""Noise As Targets: loss against NumPy, the batch reassignment (NumPy reference and in the
step), state, resume."""

import functools
import itertools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_script_json, tiny_config
from objectives.nat import NoiseAsTargets, nat_loss, reassign, reassign_in_step
from selfsup import data as data_lib
from selfsup.errors import UserError
from selfsup.metrics_log import read_metrics
from selfsup.model import build_model
from selfsup.trainer import Trainer


def _unit(rng, n, d):
  x = rng.normal(size=(n, d))
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _matched_cost(targets, assignment, index, features):
  """sum_i -z_i . c_{assignment[i]} over the batch (first occurrence of each index)."""
  index = np.asarray(index)
  _, first = np.unique(index, return_index=True)
  return float(-np.sum(features[first] * targets[assignment[index[first]]]))


_N = 300  # dataset size of the module-level tests: one compilation serves them all


def _batch(config, seed=0, batch_size=4, n=_N):
  s = config.data.image_size
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.integers(0, 255, (batch_size, s, s, 3)), jnp.uint8),
          "label": jnp.zeros((batch_size,), jnp.int32),
          "index": jnp.asarray(rng.integers(0, n, batch_size), jnp.int32)}


def _init_fn(config, n=_N):
  """Jitted (seed, batch) -> (model outputs, variables) of a freshly initialised model.

  init_with_output: one compilation gives both the initial state and a forward pass
  with it (eager op-by-op augmentation would be slower than compiling).
  """
  model = build_model(config, dataset_size=n)
  init = jax.jit(lambda seed, b: model.init_with_output(
      {"params": jax.random.key(seed), "augment": jax.random.key(1)}, b, mutable=True))
  return model, init


def _features(variables):
  """The L2-normalised features the objective sowed (stop-gradient, rows = batch)."""
  return np.asarray(variables["intermediates"]["nat"]["features"][0], np.float64)


@functools.cache
def _default_init():
  """One model and compiled init shared by the tests of the default configuration."""
  return _init_fn(tiny_config("nat"))


def test_loss_matches_numpy_on_fixed_inputs():
  rng = np.random.default_rng(0)
  z, c = _unit(rng, 6, 5), _unit(rng, 6, 5)
  expected = np.mean(np.sum((z - c) ** 2, axis=1))
  assert float(nat_loss(jnp.asarray(z), jnp.asarray(c))) == pytest.approx(expected, rel=1e-5)
  # For unit vectors the square loss is 2 - 2 z.c (the paper's separable form).
  assert expected == pytest.approx(np.mean(2 - 2 * np.sum(z * c, axis=1)), rel=1e-9)


def test_objective_loss_is_distance_to_the_assigned_targets():
  """Through the module: the loss uses targets[assignment[index]], duplicates included."""
  _, init = _default_init()
  batch = _batch(tiny_config("nat"))
  batch["index"] = jnp.asarray([4, 217, 4, 299], jnp.int32)
  (_, metrics, host), variables = init(0, batch)
  assert host == {}   # no host hook: the reassignment runs in the step
  state = jax.device_get(variables["objective_state"]["nat"])
  z = _features(variables)
  np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
  targets = state["targets"][state["assignment"][[4, 217, 4, 299]]]
  expected = np.mean(np.sum((z - targets) ** 2, axis=1))
  assert float(metrics["nat/loss"]) == pytest.approx(expected, rel=1e-5)


def test_reassignment_is_the_optimal_deal_of_the_batch_targets():
  rng = np.random.default_rng(1)
  n, d = 40, 6
  targets, assignment = _unit(rng, n, d), rng.permutation(n).astype(np.int32)
  index = np.array([3, 11, 25, 38, 0])
  features = _unit(rng, len(index), d)
  new = reassign(targets, assignment, index, features)

  np.testing.assert_array_equal(np.sort(new), np.arange(n))
  others = np.setdiff1d(np.arange(n), index)
  np.testing.assert_array_equal(new[others], assignment[others])
  assert set(new[index]) == set(assignment[index])
  before = _matched_cost(targets, assignment, index, features)
  after = _matched_cost(targets, new, index, features)
  assert after <= before + 1e-12
  # Optimal over every deal of the batch's five targets (brute force).
  held = assignment[index]
  best = min(-np.sum(features * targets[list(p)]) for p in itertools.permutations(held))
  assert after == pytest.approx(best, abs=1e-9)
  assert after < before  # random features: the initial deal is not already optimal


def test_reassignment_with_duplicate_indices_keeps_a_permutation():
  rng = np.random.default_rng(2)
  n, d = 20, 4
  targets, assignment = _unit(rng, n, d), rng.permutation(n).astype(np.int32)
  index = np.array([7, 2, 7, 15, 2, 9])  # a batch that wrapped round an epoch boundary
  features = _unit(rng, len(index), d)
  new = reassign(targets, assignment, index, features)
  np.testing.assert_array_equal(np.sort(new), np.arange(n))
  others = np.setdiff1d(np.arange(n), index)
  np.testing.assert_array_equal(new[others], assignment[others])
  assert (_matched_cost(targets, new, index, features)
          <= _matched_cost(targets, assignment, index, features) + 1e-12)


def test_reassignment_schedule_in_epochs_or_steps_also_traced():
  nat = NoiseAsTargets(dataset_size=50)   # every 3 epochs: steps 0-9, 30-39, ... at 10/epoch
  on = [s for s in range(45) if nat.is_reassignment_step(s, 10)]
  assert on == list(range(10)) + list(range(30, 40))
  by_steps = NoiseAsTargets(dataset_size=50, reassign_every_steps=4)
  assert [s for s in range(13) if by_steps.is_reassignment_step(s, 10)] == [0, 4, 8, 12]
  # The step counter is traced in the jitted step: the same schedule as an array.
  traced = jax.jit(lambda s: nat.is_reassignment_step(s, 10))(jnp.arange(45))
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(traced)), on)


@pytest.mark.parametrize("index", [
    [7, 2, 7, 15, 2, 9, 30, 31],                        # duplicates: a batch across epochs
    list(range(0, 64, 4)),                              # 16 distinct examples
    [5, 5, 5, 5]])                                      # one example four times: no change
def test_in_step_reassignment_equals_the_scipy_reference(index):
  rng = np.random.default_rng(len(index))
  n, d = 64, 8
  targets = _unit(rng, n, d).astype(np.float32)
  assignment = rng.permutation(n).astype(np.int32)
  index = np.asarray(index, np.int32)
  features = _unit(rng, len(index), d).astype(np.float32)
  expected = reassign(targets, assignment, index, features)   # scipy's linear_sum_assignment
  got = np.asarray(jax.jit(reassign_in_step)(targets, assignment, index, features))
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(np.sort(got), np.arange(n))       # still a permutation
  others = np.setdiff1d(np.arange(n), index)
  np.testing.assert_array_equal(got[others], assignment[others])
  if len(np.unique(index)) > 2:
    assert not np.array_equal(got, assignment)   # random features: a different deal


SHARDED = """
import sys; sys.path.insert(0, {root!r})
import os; os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import json, jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from objectives.nat import reassign, reassign_in_step
rng = np.random.default_rng(0)
unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
targets, assignment = unit(rng.normal(size=(64, 8))), rng.permutation(64).astype(np.int32)
index = rng.choice(64, 16, replace=False).astype(np.int32)
index[[9, 14]] = index[[1, 1]]            # duplicates on other devices than the first one
z = unit(rng.normal(size=(16, 8)))
args = (targets, assignment, index, z)
sh = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
eight = jax.jit(reassign_in_step)(*[jax.device_put(x, sh) for x in args])
one = jax.jit(reassign_in_step)(*[jax.device_put(x, jax.devices()[0]) for x in args])
print(json.dumps(dict(n=len(jax.devices()), eight=np.asarray(eight).tolist(),
                      one=np.asarray(one).tolist(), ref=reassign(*args).tolist(),
                      before=assignment.tolist())))
"""


@pytest.mark.ci   # a subprocess on 8 fake devices: about 10 s on 2 busy cores
def test_sharded_batch_is_one_problem_eight_devices_equal_one():
  """Under jit over a batch (and tables) split over 8 devices the Hungarian solves the
  global batch as one problem: the same new assignment as 1 device and as scipy."""
  out = run_script_json(SHARDED, timeout=600)
  assert out["n"] == 8
  assert out["eight"] == out["one"] == out["ref"] != out["before"]


@functools.cache
def _train_apply():
  """Jitted train-mode forward pass with a traced step: (variables, batch, step) ->
  (metrics, updated objective state, sowed features); one compilation for every step."""
  model, _ = _default_init()

  def apply(variables, batch, step):
    (_, metrics, _), updates = model.apply(
        variables, batch, train=True, step=step, rngs={"augment": jax.random.key(2)},
        mutable=["batch_stats", "objective_state", "intermediates"])
    return metrics, updates["objective_state"]["nat"], updates["intermediates"]["nat"]
  return jax.jit(apply)


def test_reassignment_step_trains_against_the_new_targets():
  """On a reassignment step the assignment is solved on this step's features before the
  loss (the paper's Algorithm 1): state and loss as the scipy reference says; on other
  steps neither moves."""
  _, init = _default_init()
  batch = _batch(tiny_config("nat"))
  batch["index"] = jnp.asarray([4, 217, 4, 299], jnp.int32)   # 4 twice: first one counts
  _, variables = init(0, batch)
  variables = {k: v for k, v in variables.items() if k != "intermediates"}
  state = jax.device_get(variables["objective_state"]["nat"])
  targets, before = state["targets"], state["assignment"]
  index = np.asarray(batch["index"])
  # tiny_config: batch 16 over 300 examples = 18 steps per epoch; every 3rd epoch.
  on_metrics, on_state, on_sowed = _train_apply()(variables, batch, jnp.int32(5))
  off_metrics, off_state, off_sowed = _train_apply()(variables, batch, jnp.int32(20))

  z = np.asarray(on_sowed["features"][0], np.float64)
  expected = reassign(targets, before, index, z)
  assert not np.array_equal(expected, before)          # the deal changes on this batch
  np.testing.assert_array_equal(on_state["assignment"], expected)
  np.testing.assert_array_equal(np.sort(on_state["assignment"]), np.arange(_N))
  np.testing.assert_array_equal(on_state["targets"], targets)
  new_loss = np.mean(np.sum((z - targets[expected[index]]) ** 2, axis=1))
  old_loss = np.mean(np.sum((z - targets[before[index]]) ** 2, axis=1))
  assert float(on_metrics["nat/loss"]) == pytest.approx(new_loss, rel=1e-5)
  assert new_loss < old_loss - 1e-3                     # the optimal deal is closer

  z_off = np.asarray(off_sowed["features"][0], np.float64)
  np.testing.assert_array_equal(off_state["assignment"], before)
  assert float(off_metrics["nat/loss"]) == pytest.approx(
      np.mean(np.sum((z_off - targets[before[index]]) ** 2, axis=1)), rel=1e-5)


def test_initial_state_is_unit_targets_and_a_permutation_fixed_by_the_seed():
  _, init = _default_init()
  batch = _batch(tiny_config("nat"))
  s0, s0b, s1 = (jax.device_get(init(seed, batch)[1]["objective_state"]["nat"])
                 for seed in (0, 0, 1))
  targets, assignment = s0["targets"], s0["assignment"]
  assert targets.shape == (_N, 128) and assignment.dtype == np.int32  # default proj_dim
  np.testing.assert_allclose(np.linalg.norm(targets, axis=1), 1.0, rtol=1e-5)
  # Spread over the whole sphere (not e.g. the positive orthant).
  assert np.abs(targets.mean(axis=0)).max() < 0.1
  np.testing.assert_array_equal(np.sort(assignment), np.arange(_N))
  assert not np.array_equal(assignment, np.arange(_N))
  for k in ("targets", "assignment"):
    np.testing.assert_array_equal(s0[k], s0b[k])
    assert not np.array_equal(s0[k], s1[k])


def test_projection_sets_the_target_dimension():
  c = tiny_config("nat")
  c.objectives.nat.proj_dim = 16
  _, init = _init_fn(c, n=20)
  shapes = jax.eval_shape(init, 0, _batch(c, n=20))  # shapes only: no compilation
  assert shapes[1]["objective_state"]["nat"]["targets"].shape == (20, 16)
  c.objectives.nat.target_dim = 8
  _, init = _init_fn(c, n=20)
  with pytest.raises(UserError, match="target_dim=8"):
    jax.eval_shape(init, 0, _batch(c, n=20))


def test_default_projection_lets_features_reach_every_target():
  """Without a projection the features are non-negative (ReLU + average pool), so the best
  a unit feature can do against a target c is z = c_+ / ||c_+||, cosine ||c_+|| ~ 0.71
  and a loss floor ~ 0.59; the default linear projection gives features of both signs."""
  rng = np.random.default_rng(0)
  c = _unit(rng, 2000, 128)
  best_nonneg = np.linalg.norm(np.maximum(c, 0), axis=1)       # max over z >= 0 of z.c
  assert np.mean(best_nonneg) == pytest.approx(np.sqrt(0.5), abs=0.01)
  assert np.mean(2 - 2 * best_nonneg) == pytest.approx(0.59, abs=0.02)
  # The floor holds for any non-negative z (checked against random non-negative ones).
  z = np.abs(_unit(rng, 2000, 128))
  assert np.all(np.sum(z * c, axis=1) <= best_nonneg + 1e-12)

  assert NoiseAsTargets().proj_dim > 0
  _, init = _default_init()                    # the compiled init the other tests share
  _, variables = init(0, _batch(tiny_config("nat")))
  assert variables["params"]["nat"]["proj"]["kernel"].shape == (64, 128)  # tiny_cnn x0.5
  z = _features(variables)
  assert z.min() < -0.05 and z.max() > 0.05                   # both signs


def _state(trainer):
  return jax.device_get(trainer.state)


def test_killed_run_resumes_to_the_same_targets_assignment_and_params(tmp_path):
  c = tiny_config("nat", steps=8)
  # 40 examples at batch 16: 2 steps per epoch, and batches wrap round epoch boundaries
  # (duplicate indices in a batch). Reassignments at steps 0, 2, 4, 6: before the step-3
  # checkpoint, between it and the cut after step 5 (redone on resume), and after.
  c.data.train_split = "train[:40]"
  c.objectives.nat.reassign_every_steps = 2
  c.train.online_probe = False  # a smaller step to compile
  run = Trainer(c, str(tmp_path / "run"))
  initial = jax.device_get(run.state["objective_state"]["nat"])
  run.run(stop_after=5)          # dies after step 5; the newest checkpoint is step 3
  assert run.checkpointer.latest_step() == 3
  # The dead run's directory, as a crash would leave it, is resumed by a new Trainer.
  # The first Trainer then carries on in memory: that is the uninterrupted run (one
  # compilation fewer than a third Trainer; nothing in stop_after alters the state).
  shutil.copytree(tmp_path / "run", tmp_path / "cut")
  resumed = Trainer(c, str(tmp_path / "cut"))
  assert int(resumed.state["step"]) == 3
  resumed.run()
  run.run()

  a, b = _state(run), _state(resumed)
  assert int(a["step"]) == int(b["step"]) == 8
  for key in ("targets", "assignment"):
    np.testing.assert_array_equal(a["objective_state"]["nat"][key],
                                  b["objective_state"]["nat"][key])
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  final = a["objective_state"]["nat"]
  np.testing.assert_array_equal(np.sort(final["assignment"]), np.arange(40))
  assert not np.array_equal(final["assignment"], initial["assignment"])  # reassigned
  np.testing.assert_array_equal(final["targets"], initial["targets"])
  assert ([r["loss"] for r in read_metrics(str(tmp_path / "cut"))]
          == [r["loss"] for r in read_metrics(str(tmp_path / "run"))])


def test_source_without_stable_indices_is_refused(monkeypatch):
  monkeypatch.setattr(data_lib.ShapesSource, "stable_indices", False)
  with pytest.raises(UserError, match="stable"):
    Trainer(tiny_config("nat"), None)
