"""MAE: masked tokens never reach the encoder, the unshuffle is exact, the loss matches
NumPy, and the objective's checks. (8 fake devices == 1: tests/test_spark.py.)"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import objectives as objectives_lib
from conftest import model_forward, tiny_config
from encoders.common import gather_visible, scatter_tokens
from encoders.vit import ViT
from objectives.mae import MAE, sincos_2d
from objectives.spark import masked_patch_loss, patchify, random_visible
from selfsup.errors import UserError


def test_unshuffle_restores_the_token_order_exactly():
  rng = np.random.default_rng(0)
  b, length, d, count = 4, 16, 5, 6
  x = rng.normal(size=(b, length, d)).astype(np.float32)
  visible = np.asarray(random_visible(jax.random.key(0), b, length, count))
  kept, keep = gather_visible(jnp.asarray(x), jnp.asarray(visible), count)
  fill = rng.normal(size=(d,)).astype(np.float32)
  back = np.asarray(scatter_tokens(kept, keep, length, jnp.asarray(fill)))
  for i in range(b):
    positions = np.flatnonzero(visible[i])              # grid order
    np.testing.assert_array_equal(np.asarray(kept)[i], x[i, positions])
    for j in range(length):
      np.testing.assert_array_equal(back[i, j], x[i, j] if visible[i, j] else fill)


def _np_mae_loss(pred, images, visible, p):
  b, h, w, c = images.shape
  g = w // p
  losses = []
  for i in range(b):
    for k in range(visible.shape[1]):
      if visible[i, k]:
        continue
      gy, gx = divmod(k, g)
      t = images[i, gy * p:(gy + 1) * p, gx * p:(gx + 1) * p].reshape(-1).astype(np.float64)
      t = (t - t.mean()) / np.sqrt(t.var(ddof=1) + 1e-6)
      losses.append(np.mean((pred[i, k] - t) ** 2))
  return np.mean(losses)


def test_loss_matches_numpy_on_fixed_inputs():
  rng = np.random.default_rng(1)
  images = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  pred = rng.normal(size=(2, 4, 48)).astype(np.float32)
  visible = np.array([[True, False, False, False], [False, True, False, True]])
  got = float(masked_patch_loss(jnp.asarray(pred), patchify(jnp.asarray(images), 4),
                                jnp.asarray(visible)))
  np.testing.assert_allclose(got, _np_mae_loss(pred, images, visible, 4), rtol=1e-5)
  # Patch order: row-major over the grid, pixels (row, column, channel) inside a patch.
  np.testing.assert_array_equal(np.asarray(patchify(jnp.asarray(images), 4))[1, 2],
                                images[1, 4:8, 0:4].reshape(-1))
  raw = float(masked_patch_loss(jnp.asarray(pred), patchify(jnp.asarray(images), 4),
                                jnp.asarray(visible), normalize=False))
  t = np.asarray(patchify(jnp.asarray(images), 4))
  np.testing.assert_allclose(raw, np.mean(((pred - t) ** 2).mean(-1)[~visible]), rtol=1e-5)


class _Probe(nn.Module):
  """Encoder + MAE, returning what the encoder and the decoder produced."""
  @nn.compact
  def __call__(self, images, key):
    encoder = ViT(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=4, pooling="cls")
    objective = MAE(image_size=16, decoder_depth=1, decoder_width=16, decoder_heads=2)
    out, pred, visible, _ = objective._forward(encoder, images, key)
    return out.pooled, out.maps[4], pred, visible


def test_masked_patches_never_reach_the_encoder():
  images = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
  key = jax.random.key(5)
  model = _Probe()
  variables = jax.jit(model.init)(jax.random.key(1), images, key)
  apply = jax.jit(model.apply)
  pooled, tokens, pred, visible = apply(variables, images, key)
  visible = np.asarray(visible)
  assert (visible.sum(1) == 4).all()                       # int(16 * 0.25) tokens kept
  hidden = np.repeat(np.repeat((~visible).reshape(3, 4, 4), 4, 1), 4, 2)[..., None]
  noisy = jnp.where(hidden, images + 5 * jax.random.normal(jax.random.key(2), images.shape),
                    images)
  pooled2, tokens2, pred2, _ = apply(variables, noisy, key)
  np.testing.assert_array_equal(np.asarray(pooled), np.asarray(pooled2))
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(tokens2))
  np.testing.assert_array_equal(np.asarray(pred), np.asarray(pred2))
  grid = np.asarray(tokens).reshape(3, 16, -1)
  assert np.all(grid[~visible] == 0) and np.abs(grid[visible]).min() > 0
  # A visible patch does reach it.
  first = np.argmax(visible[0])
  gy, gx = divmod(first, 4)
  poked = images.at[0, gy * 4:(gy + 1) * 4, gx * 4:(gx + 1) * 4].add(1.0)
  assert np.abs(np.asarray(apply(variables, poked, key)[0]) - np.asarray(pooled)).max() > 1e-4


def test_sincos_positions_are_distinct_and_bounded():
  e = sincos_2d(4, 4, 16)
  assert e.shape == (16, 16) and np.abs(e).max() <= 1
  assert len({tuple(np.round(r, 5)) for r in e}) == 16
  np.testing.assert_array_equal(e[0], np.tile([0.0] * 4 + [1.0] * 4, 2))


def test_quickstart_entry_picks_a_small_vit():
  from experiments.quickstart import get_config
  c = get_config("mae")
  assert c.encoder["name"] == "vit_ti" and c.encoder["patch_size"] == 4
  assert get_config("spark").encoder["cifar_stem"] is True
  assert get_config("rotation").encoder["name"] == "tiny_cnn"


def test_objective_checks_are_one_line_user_errors():
  for ratio in (0.0, 1.0, 2.0):
    with pytest.raises(UserError, match="mask_ratio"):
      objectives_lib.build_objective("mae", {"mask_ratio": ratio}, image_size=32,
                                     dtype=jnp.float32)
  with pytest.raises(UserError, match="decoder_width"):
    objectives_lib.build_objective("mae", {"decoder_width": 30, "decoder_heads": 4},
                                   image_size=32, dtype=jnp.float32)
  c = tiny_config("mae", image_size=32)                     # the tiny CNN: a convnet
  with pytest.raises(UserError, match="use objective spark"):
    model_forward(c, batch_size=2)
  c = tiny_config("mae", image_size=18)
  c.encoder = {"name": "vit_ti", "patch_size": 4}
  with pytest.raises(UserError, match="not a multiple of the ViT patch size 4"):
    model_forward(c, batch_size=2)
