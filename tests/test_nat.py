"""Noise As Targets: loss against NumPy, the batch reassignment, state, resume."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from objectives.base import HostContext
from objectives.nat import NoiseAsTargets, nat_loss, reassign
from selfsup import data as data_lib
from selfsup.errors import UserError
from selfsup.trainer import Trainer, build_model


def _unit(rng, n, d):
  x = rng.normal(size=(n, d))
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _matched_cost(targets, assignment, index, features):
  """sum_i -z_i . c_{assignment[i]} over the batch (first occurrence of each index)."""
  index = np.asarray(index)
  _, first = np.unique(index, return_index=True)
  return float(-np.sum(features[first] * targets[assignment[index[first]]]))


def _init(config, dataset_size, seed=0, batch_size=4):
  model = build_model(config, dataset_size=dataset_size)
  s = config.data.image_size
  rng = np.random.default_rng(seed)
  batch = {"image": jnp.asarray(rng.integers(0, 255, (batch_size, s, s, 3)), jnp.uint8),
           "label": jnp.zeros((batch_size,), jnp.int32),
           "index": jnp.asarray(rng.integers(0, dataset_size, batch_size), jnp.int32)}
  variables = model.init({"params": jax.random.key(seed), "augment": jax.random.key(1)},
                         batch)
  return model, variables, batch


def test_loss_matches_numpy_on_fixed_inputs():
  rng = np.random.default_rng(0)
  z, c = _unit(rng, 6, 5), _unit(rng, 6, 5)
  expected = np.mean(np.sum((z - c) ** 2, axis=1))
  assert float(nat_loss(jnp.asarray(z), jnp.asarray(c))) == pytest.approx(expected, rel=1e-5)
  # For unit vectors the square loss is 2 - 2 z.c (the paper's separable form).
  assert expected == pytest.approx(np.mean(2 - 2 * np.sum(z * c, axis=1)), rel=1e-9)


def test_objective_loss_is_distance_to_the_assigned_targets():
  """Through the module: the loss uses targets[assignment[index]], duplicates included."""
  c = tiny_config("nat")
  model, variables, batch = _init(c, dataset_size=30)
  batch["index"] = jnp.asarray([4, 17, 4, 29], jnp.int32)
  (_, metrics, host), _ = model.apply(variables, batch, rngs={"augment": jax.random.key(2)},
                                      mutable=["batch_stats", "objective_state"])
  state = jax.device_get(variables["objective_state"]["nat"])
  z = np.asarray(host["nat"]["features"], np.float64)
  np.testing.assert_array_equal(host["nat"]["index"], [4, 17, 4, 29])
  np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
  targets = state["targets"][state["assignment"][[4, 17, 4, 29]]]
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


def test_host_update_runs_on_reassignment_epochs_only_and_leaves_targets():
  rng = np.random.default_rng(3)
  n, d = 50, 4
  state = {"targets": _unit(rng, n, d).astype(np.float32),
           "assignment": rng.permutation(n).astype(np.int32)}
  targets_before = state["targets"].copy()
  host = {"index": np.arange(8, dtype=np.int32), "features": _unit(rng, 8, d)}
  ctx = HostContext(steps_per_epoch=10, dataset_size=n)
  nat = NoiseAsTargets(dataset_size=n)  # every 3 epochs: steps 0-9, 30-39, ...
  for step in (10, 29):
    assert nat.host_update(state, host, step, ctx) is state
  for step in (0, 9, 30):
    new = nat.host_update(state, host, step, ctx)
    assert new is not state and new["assignment"].dtype == np.int32
    np.testing.assert_array_equal(np.sort(new["assignment"]), np.arange(n))
    np.testing.assert_array_equal(new["targets"], targets_before)
    assert (_matched_cost(new["targets"], new["assignment"], host["index"], host["features"])
            <= _matched_cost(state["targets"], state["assignment"], host["index"],
                             host["features"]) + 1e-9)
  by_steps = NoiseAsTargets(dataset_size=n, reassign_every_steps=4)
  assert by_steps.host_update(state, host, 10, ctx) is state
  assert by_steps.host_update(state, host, 12, ctx) is not state
  np.testing.assert_array_equal(state["targets"], targets_before)


def test_initial_state_is_unit_targets_and_a_permutation_fixed_by_the_seed():
  c = tiny_config("nat")
  n = 300
  _, v0, _ = _init(c, n, seed=0)
  _, v0b, _ = _init(c, n, seed=0)
  _, v1, _ = _init(c, n, seed=1)
  s0, s0b, s1 = (jax.device_get(v["objective_state"]["nat"]) for v in (v0, v0b, v1))
  targets, assignment = s0["targets"], s0["assignment"]
  assert targets.shape == (n, 64) and assignment.dtype == np.int32  # tiny_cnn x0.5: 64-d
  np.testing.assert_allclose(np.linalg.norm(targets, axis=1), 1.0, rtol=1e-5)
  # Spread over the whole sphere (not e.g. the positive orthant).
  assert np.abs(targets.mean(axis=0)).max() < 0.1
  np.testing.assert_array_equal(np.sort(assignment), np.arange(n))
  assert not np.array_equal(assignment, np.arange(n))
  for k in ("targets", "assignment"):
    np.testing.assert_array_equal(s0[k], s0b[k])
    assert not np.array_equal(s0[k], s1[k])


def test_projection_sets_the_target_dimension():
  c = tiny_config("nat")
  c.objectives.nat.proj_dim = 16
  _, v, _ = _init(c, 20)
  assert v["objective_state"]["nat"]["targets"].shape == (20, 16)
  c.objectives.nat.target_dim = 8
  with pytest.raises(UserError, match="target_dim=8"):
    _init(c, 20)


def _state(trainer):
  return jax.device_get(trainer.state)


def test_killed_run_resumes_to_the_same_targets_assignment_and_params(tmp_path):
  c = tiny_config("nat", steps=8)
  # 40 examples at batch 16: 2 steps per epoch, and batches wrap round epoch boundaries
  # (duplicate indices in a batch). Reassignments at steps 0, 2, 4, 6: before the step-3
  # checkpoint, between it and the cut after step 5 (redone on resume), and after.
  c.data.train_split = "train[:40]"
  c.objectives.nat.reassign_every_steps = 2
  full = Trainer(c, str(tmp_path / "full"))
  initial = jax.device_get(full.state["objective_state"]["nat"])
  full.run()

  cut = Trainer(c, str(tmp_path / "cut"))
  cut.run(stop_after=5)
  assert cut.checkpointer.latest_step() == 3
  del cut
  resumed = Trainer(c, str(tmp_path / "cut"))
  assert int(resumed.state["step"]) == 3
  resumed.run()

  a, b = _state(full), _state(resumed)
  for key in ("targets", "assignment"):
    np.testing.assert_array_equal(a["objective_state"]["nat"][key],
                                  b["objective_state"]["nat"][key])
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  final = a["objective_state"]["nat"]
  np.testing.assert_array_equal(np.sort(final["assignment"]), np.arange(40))
  assert not np.array_equal(final["assignment"], initial["assignment"])  # hooks ran
  np.testing.assert_array_equal(final["targets"], initial["targets"])


def test_source_without_stable_indices_is_refused(monkeypatch):
  monkeypatch.setattr(data_lib.ShapesSource, "stable_indices", False)
  with pytest.raises(UserError, match="stable"):
    Trainer(tiny_config("nat"), None)
