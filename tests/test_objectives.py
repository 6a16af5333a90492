"""Losses against plain NumPy references, and view construction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from objectives.rotation import rotation_views
from objectives.simclr import nt_xent_loss


def nt_xent_numpy(za, zb, tau):
  z = np.concatenate([za, zb]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  n2 = z.shape[0]
  n = n2 // 2
  sim = z @ z.T / tau
  losses = []
  for i in range(n2):
    pos = (i + n) % n2
    others = [k for k in range(n2) if k != i]
    denom = np.log(np.sum(np.exp(sim[i, others])))
    losses.append(denom - sim[i, pos])
  return float(np.mean(losses))


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_matches_numpy(tau):
  rng = np.random.default_rng(0)
  za, zb = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  loss, acc = nt_xent_loss(jnp.asarray(za), jnp.asarray(zb), tau)
  assert float(loss) == pytest.approx(nt_xent_numpy(za, zb, tau), rel=1e-5)
  assert 0.0 <= float(acc) <= 1.0


def test_nt_xent_perfect_pairs_have_low_loss_and_full_accuracy():
  za = np.eye(4, 8) * 5
  loss_same, acc = nt_xent_loss(jnp.asarray(za), jnp.asarray(za), 0.1)
  loss_shuffled, _ = nt_xent_loss(jnp.asarray(za), jnp.asarray(za[::-1]), 0.1)
  assert float(acc) == 1.0
  assert float(loss_same) < float(loss_shuffled)


def test_nt_xent_is_invariant_to_scale():
  rng = np.random.default_rng(1)
  za, zb = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
  a, _ = nt_xent_loss(jnp.asarray(za), jnp.asarray(zb), 0.5)
  b, _ = nt_xent_loss(jnp.asarray(3 * za), jnp.asarray(0.5 * zb), 0.5)
  assert float(a) == pytest.approx(float(b), rel=1e-6)


def test_rotation_views_and_labels():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (3, 5, 5, 2)).astype(np.float32)
  views, labels = rotation_views(jnp.asarray(images))
  assert views.shape == (12, 5, 5, 2)
  np.testing.assert_array_equal(labels, np.repeat(np.arange(4), 3))
  for k in range(4):
    for b in range(3):
      # np.rot90 on axes (0, 1) of one image: counter-clockwise k quarter turns.
      np.testing.assert_array_equal(views[k * 3 + b], np.rot90(images[b], k, axes=(0, 1)))
  # A pixel at the top-left corner goes to the bottom-left after one quarter turn.
  img = np.zeros((1, 4, 4, 1), np.float32)
  img[0, 0, 0, 0] = 1
  v, _ = rotation_views(jnp.asarray(img))
  assert float(v[1, 3, 0, 0]) == 1.0


def test_rotation_views_reject_non_square():
  with pytest.raises(ValueError, match="square"):
    rotation_views(jnp.zeros((1, 4, 6, 3)))


def test_rotation_objective_loss_is_cross_entropy_on_four_classes(tiny):
  """At init a linear head on BN-normalised features gives a loss near ln 4."""
  from conftest import model_forward
  _, _, _, (loss, metrics, _) = model_forward(tiny("rotation"))
  assert abs(float(metrics["rotation/loss"]) - np.log(4)) < 0.5
  assert float(loss) == pytest.approx(float(metrics["rotation/loss"]))
