"""Counting: the contrastive loss against NumPy, tiles, downsampling and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from objectives.counting import (RESIZE_METHODS, counting_loss, counting_views, downsample,
                                 merge_tiles, sample_resize_method, split_tiles)
from selfsup.errors import UserError


def counting_loss_numpy(phi_d, phi_tiles, phi_other, margin):
  losses = []
  for b in range(phi_d.shape[0]):
    s = sum(phi_tiles[j, b] for j in range(4)).astype(np.float64)
    equiv = np.sum((phi_d[b] - s) ** 2)
    other = np.sum((phi_other[b] - s) ** 2)
    losses.append(equiv + max(0.0, margin - other))
  return float(np.mean(losses))


@pytest.mark.parametrize("other_scale,active", [(0.05, 1.0), (3.0, 0.0), (None, 0.5)])
def test_loss_matches_numpy(other_scale, active):
  """Hinge active (y counts like x), inactive (y far), and a batch with both."""
  rng = np.random.default_rng(0)
  b, k, margin = 4, 6, 10.0
  phi_tiles = rng.uniform(size=(4, b, k)).astype(np.float32)
  s = phi_tiles.sum(0)
  phi_d = (s + 0.3 * rng.normal(size=(b, k))).astype(np.float32)
  if other_scale is None:
    scales = np.array([0.05, 3.0, 0.05, 3.0])[:, None]
  else:
    scales = other_scale
  phi_other = (s + scales * np.sign(rng.normal(size=(b, k)))).astype(np.float32)
  loss, metrics = counting_loss(jnp.asarray(phi_d), jnp.asarray(phi_tiles),
                                jnp.asarray(phi_other), margin)
  ref = counting_loss_numpy(phi_d, phi_tiles, phi_other, margin)
  assert float(loss) == pytest.approx(ref, rel=1e-5)
  assert float(metrics["hinge_active"]) == active
  equiv_only = counting_loss_numpy(phi_d, phi_tiles, phi_d * 0 + 1e3, margin)
  if active == 0.0:
    assert float(loss) == pytest.approx(equiv_only, rel=1e-5)   # the hinge adds nothing
  else:
    assert float(loss) > equiv_only + 1.0


def test_hinge_is_on_the_squared_norm_and_blocks_the_zero_solution():
  zeros = jnp.zeros((3, 5))
  loss, _ = counting_loss(zeros, jnp.zeros((4, 3, 5)), zeros, 10.0)
  assert float(loss) == pytest.approx(10.0)                # phi = 0 pays the margin
  # ||d||^2 = 5 x 1.5^2 = 11.25 > 10: inactive, although every element is below 10.
  other = jnp.full((3, 5), 1.5)
  loss, metrics = counting_loss(zeros, jnp.zeros((4, 3, 5)), other, 10.0)
  assert float(loss) == 0.0 and float(metrics["hinge_active"]) == 0.0
  g = jax.grad(lambda o: counting_loss(zeros, jnp.zeros((4, 3, 5)), o, 10.0)[0])(
      jnp.full((3, 5), 0.5))                               # active: pushes y away
  assert float(jnp.abs(g).sum()) > 0


def test_tiles_reassemble_into_the_image():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(size=(3, 8, 8, 3)), jnp.float32)
  tiles = split_tiles(x)
  assert tiles.shape == (12, 4, 4, 3)
  np.testing.assert_array_equal(merge_tiles(tiles), x)
  np.testing.assert_array_equal(tiles[1 * 3 + 2], x[2, :4, 4:])   # tile 1 = top-right
  np.testing.assert_array_equal(tiles[2 * 3 + 0], x[0, 4:, :4])   # tile 2 = bottom-left


def test_downsampled_image_and_downsampled_tiles():
  """D(x) is the whole image resized; nearest-downsampled tiles reassemble into it
  exactly, antialiased methods agree away from the tile borders."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(size=(2, 16, 16, 3)), jnp.float32)
  tiles = split_tiles(x)
  for i, method in enumerate(RESIZE_METHODS):
    down = downsample(x, i)
    np.testing.assert_allclose(down, jax.image.resize(x, (2, 8, 8, 3), method), atol=1e-6)
    tiled = merge_tiles(jax.image.resize(tiles, (8, 4, 4, 3), method))
    if method == "nearest":
      np.testing.assert_array_equal(tiled, down)
    elif method == "linear":
      away = np.array([0, 1, 2, 5, 6, 7])                  # not next to the border at 4
      np.testing.assert_allclose(np.asarray(tiled)[:, away][:, :, away],
                                 np.asarray(down)[:, away][:, :, away], atol=1e-5)
      assert not np.allclose(tiled, down)                  # ...but differ next to it


def test_counting_views_and_random_method():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.uniform(size=(2, 8, 8, 3)), jnp.float32)
  views = jax.jit(counting_views)             # one compiled program for every key
  seen = set()
  for seed in range(24):
    down, tiles, index = views(jax.random.key(seed), x)
    index = int(index)
    seen.add(index)
    np.testing.assert_allclose(down, jax.image.resize(x, (2, 4, 4, 3), RESIZE_METHODS[index]),
                               atol=1e-6)
    np.testing.assert_array_equal(merge_tiles(tiles), x)
  assert len(seen) >= 3                                    # several methods over keys
  draws = jax.vmap(sample_resize_method)(jax.random.split(jax.random.key(0), 400))
  counts = np.bincount(np.asarray(draws), minlength=4)
  assert counts.min() > 60                                 # ~uniform over the four
  _, _, eval_index = counting_views(None, x)
  assert RESIZE_METHODS[int(eval_index)] == "linear"


def test_objective_forward_and_validation(tiny):
  from conftest import model_forward
  from selfsup.trainer import Trainer
  c = tiny("counting")
  c.objectives.counting.head_hidden = (32,)
  c.objectives.counting.count_dim = 16
  apply, variables, batch, (loss, metrics, _) = model_forward(c)
  assert np.isfinite(float(loss)) and float(loss) >= 0
  assert float(loss) == pytest.approx(float(metrics["counting/loss"]))
  assert {"counting/equivariance_sq", "counting/contrast_sq", "counting/hinge_active"} <= set(
      metrics)
  (eval_loss, _, _), _ = apply(variables, batch, train=False,
                               mutable=("batch_stats", "objective_state"))
  assert np.isfinite(float(eval_loss))

  c.objectives.counting.resize_methods = ("nearest", "box")
  with pytest.raises(UserError, match="resize_methods"):
    Trainer(c, None)
  c = tiny("counting")
  c.objectives.counting.margin = 0.0
  with pytest.raises(UserError, match="margin=0.0"):
    Trainer(c, None)


def _init_metrics(c, batch_size=16):
  """One compiled init_with_output: (metrics of a training forward pass, params)."""
  from selfsup.model import build_model
  model = build_model(c)
  s = c.data.image_size
  batch = {"image": jnp.asarray(np.random.default_rng(0).integers(0, 255, (batch_size, s, s, 3)),
                                jnp.uint8),
           "label": jnp.zeros((batch_size,), jnp.int32), "index": jnp.arange(batch_size)}
  (_, metrics, _), variables = jax.jit(lambda b: model.init_with_output(
      {"params": jax.random.key(0), "augment": jax.random.key(1)}, b))(batch)
  return metrics, variables["params"]["counting"]


@pytest.mark.parametrize("scale_init", [0.05, 0.0])
def test_hinge_is_active_from_the_start_with_the_learned_count_scale(tiny, scale_init):
  """Default (learned BatchNorm scale from 0.05): the squared distances start near M = 10
  with 1000 counts, so a real share of hinges is active at step 0. Without a scale they
  start near 3.9 x 1000 and no hinge fires."""
  c = tiny("counting")
  c.objectives.counting.head_hidden = (32,)
  c.objectives.counting.count_bn_scale_init = scale_init
  assert c.objectives.counting.count_dim == 1000 and c.objectives.counting.margin == 10.0
  metrics, params = _init_metrics(c)
  active = float(metrics["counting/hinge_active"])
  contrast = float(metrics["counting/contrast_sq"])
  if scale_init:
    np.testing.assert_array_equal(params["count_bn"]["scale"], np.full(1000, 0.05, np.float32))
    assert "bias" not in params["count_bn"]
    assert 0.1 <= active <= 0.95 and 3.0 < contrast < 30.0
    assert float(metrics["counting/count_sq"]) > 0.5       # not collapsed
  else:
    assert "count_bn" not in params                        # no learned parameters
    assert active == 0.0 and contrast > 1000.0
