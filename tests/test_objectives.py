"""Losses against plain NumPy references, and view construction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from objectives.rotation import rotation_views
from objectives.simclr import nt_xent_loss


def nt_xent_numpy(za, zb, tau):
  """(loss, accuracy): accuracy = share of the 2N anchors whose most similar other view
  is their positive."""
  z = np.concatenate([za, zb]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  n2 = z.shape[0]
  n = n2 // 2
  sim = z @ z.T / tau
  losses, hits = [], []
  for i in range(n2):
    pos = (i + n) % n2
    others = [k for k in range(n2) if k != i]
    denom = np.log(np.sum(np.exp(sim[i, others])))
    losses.append(denom - sim[i, pos])
    hits.append(others[int(np.argmax(sim[i, others]))] == pos)
  return float(np.mean(losses)), float(np.mean(hits))


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_matches_numpy(tau):
  rng = np.random.default_rng(0)
  za = rng.normal(size=(6, 5))
  zb = za + rng.normal(size=(6, 5))   # noisy positives: some anchors right, some wrong
  loss, acc = nt_xent_loss(jnp.asarray(za), jnp.asarray(zb), tau)
  ref_loss, ref_acc = nt_xent_numpy(za, zb, tau)
  assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
  assert float(acc) == pytest.approx(ref_acc, abs=1e-7)
  assert 0.0 < ref_acc < 1.0          # the case tells right from wrong anchors


def test_nt_xent_accuracy_on_a_constructed_case():
  """Views b of images 2 and 3 swapped: anchors of images 0 and 1 (both views) find their
  positive, those of 2 and 3 find the swapped view instead: accuracy exactly 1/2."""
  za = np.eye(4, 8)
  zb = za[[0, 1, 3, 2]]
  _, acc = nt_xent_loss(jnp.asarray(za), jnp.asarray(zb), 0.5)
  assert float(acc) == 0.5
  assert nt_xent_numpy(za, zb, 0.5)[1] == 0.5


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


def test_contrastive_objectives_refuse_a_batch_without_negatives(tiny):
  """A global batch of one image has no negatives: one line at start-up."""
  from objectives.counting import Counting
  from objectives.simclr import SimCLR
  from selfsup.errors import UserError
  from selfsup.trainer import Trainer
  for objective, name in ((SimCLR(), "simclr"), (Counting(), "counting")):
    with pytest.raises(UserError, match=f"objective {name} is contrastive.*batch_size=1"):
      objective.validate(image_size=32, dataset=None, batch_size=1)
    objective.validate(image_size=32, dataset=None, batch_size=2)
  c = tiny("simclr")
  c.train.batch_size = 1
  with pytest.raises(UserError, match="needs negatives"):
    Trainer(c, None)


@pytest.mark.parametrize("per_view_bn, calls", [(False, [16]), (True, [8, 8])])
def test_simclr_per_view_bn_calls_the_encoder_once_per_view(per_view_bn, calls):
  """per_view_bn: BatchNorm statistics per view (two encoder calls of B), else one call of
  2B; the loss is NT-Xent either way and finite."""
  import flax.linen as nn

  from encoders.common import EncoderOutput
  from objectives.simclr import SimCLR

  class Spy(nn.Module):
    @nn.compact
    def __call__(self, x, *, train, mask=None):
      self.sow("intermediates", "batch", x.shape[0])
      # Depends on the whole call's batch, as BatchNorm in training does.
      feats = nn.Dense(8)(jnp.mean(x, axis=(1, 2)))
      return EncoderOutput(pooled=feats - jnp.mean(feats, axis=0), maps={})

  class Model(nn.Module):
    @nn.compact
    def __call__(self, batch):
      obj = SimCLR(image_size=16, per_view_bn=per_view_bn, proj_hidden=(16,), proj_dim=8)
      return obj(Spy(), batch, train=True, step=0)

  batch = {"image": jnp.asarray(np.random.RandomState(0).randint(0, 255, (8, 16, 16, 3)),
                                jnp.uint8)}
  rngs = {"params": jax.random.PRNGKey(0), "augment": jax.random.PRNGKey(1)}
  variables = Model().init(rngs, batch)
  out, state = Model().apply(variables, batch, rngs=rngs,
                             mutable=["intermediates", "batch_stats"])
  seen = jax.tree.leaves(state["intermediates"])
  assert [int(n) for n in seen] == calls
  assert np.isfinite(float(out.loss))
