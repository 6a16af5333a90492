"""Context Encoders inpainting: masks, the overlap-weighted L2, gradient routing, GAN group."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from encoders.common import EncoderOutput
from objectives import build_objective
from objectives.inpainting import (decoder_stages, inpainting_masks, loss_weights,
                                   masked_l2_loss)
from selfsup import augment
from selfsup.errors import UserError
from selfsup.model import build_model
from selfsup.trainer import Trainer


# XLA:CPU takes ~0.6 s to compile each threefry draw, and a model init has one per
# parameter tensor; the "rbg" generator compiles ~5x faster. Nothing below depends on
# which generator draws the initial weights, views or masks.
_FAST_PRNG = "rbg"


def _batch(n=8, size=16, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.integers(0, 255, (n, size, size, 3)), jnp.uint8),
          "label": jnp.zeros((n,), jnp.int32), "index": jnp.arange(n, dtype=jnp.int32)}


# ---- masks ----------------------------------------------------------------------------

def test_center_mask_is_the_exact_central_square():
  m = np.asarray(inpainting_masks(jax.random.key(0), 4, 16, "center", 0.25))
  expected = np.zeros((16, 16), np.float32)
  expected[4:12, 4:12] = 1
  assert m.shape == (4, 16, 16, 1)
  for i in range(4):
    np.testing.assert_array_equal(m[i, :, :, 0], expected)


@pytest.mark.parametrize("mask_type,fraction,tol", [("blocks", 0.25, 0.04), ("blocks", 0.5, 0.07),
                                                    ("regions", 0.25, 1e-6)])
def test_random_masks_cover_the_fraction_and_differ_per_example(mask_type, fraction, tol):
  masks = jax.jit(lambda k: inpainting_masks(k, 8, 32, mask_type, fraction))
  m = np.asarray(masks(jax.random.key(1)))
  assert set(np.unique(m)) <= {0.0, 1.0}
  coverage = m.mean(axis=(1, 2, 3))
  # Blocks stop at the union closest to the fraction (each block adds <= fraction / 4);
  # regions threshold at the per-example quantile, so they are exact.
  np.testing.assert_allclose(coverage, fraction, atol=tol)
  assert len({m[i].tobytes() for i in range(8)}) == 8       # every example its own mask
  other = np.asarray(masks(jax.random.key(2)))
  assert not np.array_equal(m, other)                       # and every key its own masks


def test_overlap_weights_ring_and_hole():
  """The hole is the region shrunk by `overlap`; the ring in between weighs x overlap_weight."""
  region = np.zeros((1, 12, 16, 1), np.float32)
  region[0, 2:10, 2:10] = 1             # interior 8x8 region
  region[0, 0:4, 13:16] = 1             # a 4x3 block in the top-right corner
  hole, w = loss_weights(jnp.asarray(region), 1, 10.0)
  expected_hole = np.zeros((12, 16), np.float32)
  expected_hole[3:9, 3:9] = 1
  expected_hole[0:3, 14:16] = 1         # shrunk only where it meets visible pixels
  expected_w = region[0, :, :, 0] * 10 - expected_hole * 9
  np.testing.assert_array_equal(np.asarray(w)[0, :, :, 0], expected_w)


def test_masked_l2_matches_numpy():
  rng = np.random.default_rng(0)
  pred, target = rng.normal(size=(2, 6, 6, 3)), rng.normal(size=(2, 6, 6, 3))
  region = np.zeros((2, 6, 6, 1))
  region[:, 1:5, 1:5] = 1
  _, w = loss_weights(jnp.asarray(region, jnp.float32), 1, 10.0)
  w = np.asarray(w, np.float64)
  num = den = 0.0
  for b in range(2):
    for i in range(6):
      for j in range(6):
        num += w[b, i, j, 0] * sum((pred[b, i, j, c] - target[b, i, j, c]) ** 2 for c in range(3))
        den += 3 * w[b, i, j, 0]
  assert den == 3 * 2 * (4 * 1 + 12 * 10)      # 2x2 hole at 1, 12-px ring at 10
  got = masked_l2_loss(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32),
                       jnp.asarray(w, jnp.float32))
  assert float(got) == pytest.approx(num / den, rel=1e-5)
  # Outside the weights nothing counts.
  far = target + 100 * (w == 0)
  assert float(masked_l2_loss(jnp.asarray(far, jnp.float32), jnp.asarray(target, jnp.float32),
                              jnp.asarray(w, jnp.float32))) == pytest.approx(0.0, abs=1e-10)


# ---- the module -----------------------------------------------------------------------

class _RecordingEncoder(nn.Module):
  """Stores its input; one stride-2 conv map at 8x8."""

  @nn.compact
  def __call__(self, images, *, train, mask=None):
    assert mask is None
    self.sow("intermediates", "input", images)
    x = nn.Conv(8, (3, 3), strides=(2, 2))(images)
    return EncoderOutput(jnp.mean(x, axis=(1, 2)), {2: x})


def test_encoder_sees_the_mean_filled_hole_and_the_overlap_ring():
  obj = build_objective("inpainting", {"overlap": 1, "decoder_width": 16},
                        image_size=16, dtype=jnp.float32)
  batch = _batch(2)

  class Wrap(nn.Module):
    @nn.compact
    def __call__(self, batch):
      return obj.clone(parent=self, name="inpainting")(_RecordingEncoder(), batch,
                                                       train=False, step=0)

  with jax.default_prng_impl(_FAST_PRNG):
    variables = jax.jit(lambda: Wrap().init(jax.random.PRNGKey(0), batch))()
  out, state = jax.jit(lambda v: Wrap().apply(v, batch, mutable=["intermediates"]))(variables)
  seen = np.asarray(state["intermediates"]["_RecordingEncoder_0"]["input"][0])
  clean = np.asarray(augment.normalize(augment.to_float(batch["image"])))
  hole = np.zeros((16, 16), bool)
  hole[5:11, 5:11] = True                          # 8x8 centre minus a 1-px ring
  assert np.all(seen[:, hole] == 0)                # the dataset mean, normalised
  np.testing.assert_allclose(seen[:, ~hole], clean[:, ~hole], rtol=1e-5, atol=1e-5)
  assert out.probe_features.shape == (2, 8)
  assert set(out.metrics) == {"rec_loss"}          # reconstruction only by default
  assert "discriminator" not in variables["params"]["inpainting"]
  assert obj.optimizer_groups() == {}


@pytest.fixture(scope="module")
def adversarial_run():
  """A few trainer steps of tiny_config("inpainting") with the adversarial term on.

  Shared by the two tests below: building a trainer (compiling its init and step) is
  most of their cost.
  """
  c = tiny_config("inpainting", steps=3, batch_size=8)
  c.train.online_probe = False
  # The central mask (with its overlap ring) compiles fastest; masks are tested above.
  c.objectives.inpainting.update(adv_weight=0.5, rec_weight=1.0, decoder_width=16,
                                 disc_width=8, disc_lr=1e-3, mask_type="center", overlap=1)
  with jax.default_prng_impl(_FAST_PRNG):
    t = Trainer(c, None)
    before = jax.device_get(t.state["params"])
    for _ in range(3):
      metrics, _ = t.train_step(next(t.iterator))
  return t, before, jax.device_get(metrics)


def test_gradients_route_each_term_to_its_own_player(adversarial_run):
  """loss = rec + 0.5 adv(G) + disc: D gets only disc's gradient, G none of it."""
  t, _, _ = adversarial_run
  state = t.state
  batch = _batch(8)
  with jax.default_prng_impl(_FAST_PRNG):
    key = jax.random.PRNGKey(3)

    def terms(params):
      # train=False: no view augmentation to compile; the loss terms are the same code.
      (_, metrics, _), _ = t.model.apply(
          {"params": params, "batch_stats": state["batch_stats"]}, batch, train=False,
          rngs={"augment": key}, mutable=["objective_state"])
      return jnp.stack([metrics["pretext_loss"], metrics["inpainting/disc_loss"],
                        metrics["inpainting/adv_loss"], metrics["inpainting/rec_loss"]])

    # One reverse pass for the four scalars (one compile instead of four).
    jac = jax.device_get(jax.jit(jax.jacrev(terms))(state["params"]))
  g_total, g_disc, g_adv, g_rec = (jax.tree.map(lambda x, i=i: x[i], jac) for i in range(4))
  g_gen = jax.tree.map(lambda r, a: r + 0.5 * a, g_rec, g_adv)
  leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]
  nonzero = lambda tree: any(np.abs(x).max() > 0 for x in leaves(tree))
  zero = lambda tree: all(np.all(x == 0) for x in leaves(tree))
  close = lambda a, b: all(np.allclose(x, y, rtol=1e-4, atol=1e-7)
                           for x, y in zip(leaves(a), leaves(b)))

  d = lambda g: g["inpainting"]["discriminator"]
  # The discriminator learns from its own loss only ...
  assert nonzero(d(g_disc))
  assert close(d(g_total), d(g_disc))
  assert zero(d(g_gen))                  # fails without the stop-gradient parameters
  # ... the encoder and decoder get nothing from it (fails without stop_gradient(fake)) ...
  assert zero(g_disc["inpainting"]["decoder"]) and zero(g_disc["encoder"])
  # ... but do get the adversarial signal through the pasted image.
  assert nonzero(g_adv["inpainting"]["decoder"]) and nonzero(g_adv["encoder"])
  assert close(g_total["inpainting"]["decoder"], g_gen["inpainting"]["decoder"])
  assert close(g_total["encoder"], g_gen["encoder"])


def test_training_with_the_adversary_uses_the_discriminator_optimizer(adversarial_run):
  t, before, metrics = adversarial_run
  after = jax.device_get(t.state["params"])
  for key in ("rec_loss", "adv_loss", "disc_loss", "disc_acc"):
    assert np.isfinite(metrics[f"inpainting/{key}"])
  changed = lambda a, b: any(not np.array_equal(x, y)
                             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert changed(before["inpainting"]["discriminator"], after["inpainting"]["discriminator"])
  assert changed(before["inpainting"]["decoder"], after["inpainting"]["decoder"])
  # The discriminator's leaves carry the objective's own group, and its Adam moved.
  inner = t.state["opt_state"].inner_states
  assert "inpainting/discriminator" in inner
  adam = jax.device_get(inner["inpainting/discriminator"].inner_state)[0]
  assert int(adam.count) == 3
  mu = adam.mu["inpainting"]["discriminator"]
  assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(mu))


# ---- errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5, -0.2])
def test_mask_fraction_outside_open_unit_interval_is_a_user_error(fraction):
  obj = build_objective("inpainting", {"mask_fraction": fraction}, image_size=32,
                        dtype=jnp.float32)
  with pytest.raises(UserError, match=rf"mask_fraction={fraction}.*\(0, 1\)"):
    obj.validate(image_size=32, dataset=None)


def test_overlap_that_leaves_no_hole_is_a_user_error():
  obj = build_objective("inpainting", {"overlap": 4}, image_size=16, dtype=jnp.float32)
  with pytest.raises(UserError, match="overlap=4"):
    obj.validate(image_size=16, dataset=None)


def test_unreachable_image_size_is_a_user_error():
  assert decoder_stages(4, 32) == 3
  with pytest.raises(UserError, match="image size 24"):
    decoder_stages(2, 24)
  # Through the model (raised while tracing the init, i.e. at start-up): tiny_cnn at
  # 24 px has a 2x2 deepest map, and 24 is not 2 x 2^n.
  model = build_model(tiny_config("inpainting", image_size=24))
  with pytest.raises(UserError, match="cannot reach the image size 24"):
    jax.eval_shape(lambda: model.init({"params": jax.random.key(0),
                                       "augment": jax.random.key(1)}, _batch(2, 24)))
