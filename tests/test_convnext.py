"""ConvNeXt: published model sizes, shapes, masked (sparse-emulated) layers, remat, drop path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

import encoders
from encoders.convnext import ConvNeXt
from selfsup.errors import UserError

SMALL = dict(depths=(1, 1, 1, 1), widths=(8, 16, 24, 32))


@pytest.mark.parametrize("size,millions", [
    ("tiny", 28.59),
    pytest.param("small", 50.22, marks=pytest.mark.slow),    # 27 blocks in stage 3: tracing
    pytest.param("base", 88.59, marks=pytest.mark.slow)])    # alone takes seconds
def test_parameter_counts_match_the_published_sizes(size, millions):
  # Shapes only (jax.eval_shape): no FLOP is spent. The published counts include the
  # 1000-class linear head on the pooled (LayerNormed) feature.
  e = encoders.build_encoder(ConfigDict({"name": f"convnext_{size}"}))
  shapes = jax.eval_shape(lambda: e.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)),
                                         train=False))
  n = sum(x.size for x in jax.tree.leaves(shapes["params"]))
  n += 1000 * e.widths[-1] + 1000
  assert abs(n / 1e6 - millions) < 0.01
  if size != "tiny":
    return
  out = jax.eval_shape(lambda v: e.apply(v, jnp.zeros((2, 224, 224, 3)), train=False), shapes)
  assert out.pooled.shape == (2, e.widths[-1])
  assert {s: m.shape for s, m in out.maps.items()} == {
      4: (2, 56, 56, e.widths[0]), 8: (2, 28, 28, e.widths[1]),
      16: (2, 14, 14, e.widths[2]), 32: (2, 7, 7, e.widths[3])}


@pytest.fixture(scope="module")
def small():
  model = ConvNeXt(**SMALL)
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  variables = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(1), x)
  # Layer scales at 1 (not 1e-6) so every block visibly changes its input.
  variables = jax.tree_util.tree_map_with_path(
      lambda p, v: jnp.ones_like(v) if p[-1].key == "gamma" else v, variables)
  mask = jnp.array([[[True, False], [False, True]], [[False, False], [True, False]]])
  return model, variables, x, mask


def test_masked_pixels_change_no_visible_feature_and_masked_positions_stay_zero(small):
  model, variables, x, mask = small
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False, mask=mask))
  out = apply(variables, x)
  hidden = ~np.asarray(jnp.repeat(jnp.repeat(mask, 32, 1), 32, 2))[..., None]
  noise = jax.random.normal(jax.random.key(2), x.shape) * 10
  out2 = apply(variables, jnp.where(hidden, x + noise, x))
  np.testing.assert_array_equal(np.asarray(out.pooled), np.asarray(out2.pooled))
  for s, m in out.maps.items():
    vis = np.asarray(encoders.common.resize_mask(mask, m.shape[1], m.shape[2]))
    np.testing.assert_array_equal(np.asarray(m) * vis, np.asarray(out2.maps[s]) * vis)
    assert np.all(np.asarray(m)[np.broadcast_to(vis == 0, m.shape)] == 0)   # sparse
    assert np.abs(np.asarray(m) * vis).max() > 0
  # Without the mask, the same perturbation does change the features.
  full = model.apply(variables, x, train=False).pooled
  full2 = model.apply(variables, jnp.where(hidden, x + noise, x), train=False).pooled
  assert np.abs(np.asarray(full) - np.asarray(full2)).max() > 1e-3


def test_layernorm_of_visible_positions_matches_numpy(small):
  model, variables, x, mask = small
  _, inter = model.apply(variables, x, train=False, mask=mask,
                         capture_intermediates=lambda mdl, _: mdl.name in ("stem_conv",
                                                                            "stem_norm"))
  conv = np.asarray(inter["intermediates"]["stem_conv"]["__call__"][0])
  assert np.abs(conv).max() > 0
  p = variables["params"]["stem_norm"]
  mean = conv.mean(-1, keepdims=True)
  var = conv.var(-1, keepdims=True)
  expected = (conv - mean) / np.sqrt(var + 1e-6) * np.asarray(p["scale"]) + np.asarray(p["bias"])
  vis = np.asarray(encoders.common.resize_mask(mask, 16, 16))
  # Each position is normalised over its own channels (a masked one never enters a
  # visible one's statistics); the masked positions are zeroed right after.
  normed = np.asarray(inter["intermediates"]["stem_norm"]["__call__"][0])
  np.testing.assert_allclose(normed * vis, expected * vis, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # three gradient compilations
@pytest.mark.parametrize("remat", ["blocks", "full"])
def test_remat_gives_the_same_features_and_gradients(small, remat):
  model, variables, x, mask = small
  def loss(v, m):
    out = m.apply(v, x, train=False, mask=mask)
    return jnp.sum(out.pooled ** 2) + sum(jnp.sum(t ** 2) for t in out.maps.values())
  g0 = jax.grad(loss)(variables, model)
  g1 = jax.grad(loss)(variables, model.clone(remat=remat))
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)

  # Training with stochastic depth: the recomputed blocks draw the same drops.
  def train_loss(v, m, key):
    out = m.apply(v, x, train=True, mask=mask, rngs={"dropout": key})
    return jnp.sum(out.pooled ** 2)
  m0 = model.clone(drop_path=0.5)
  keys = [jax.random.key(3), jax.random.key(4)]
  g0 = [jax.grad(train_loss)(variables, m0, k) for k in keys]
  g1 = [jax.grad(train_loss)(variables, m0.clone(remat=remat), k) for k in keys]
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)
  # (the two keys drop different blocks: the check above is not of one fixed pattern)
  assert any(not np.allclose(a, b) for a, b in zip(*map(jax.tree.leaves, g0)))


def test_stochastic_depth_drops_whole_examples_in_training_only(small):
  model, variables, x, _ = small
  m = model.clone(drop_path=0.5)
  a = m.apply(variables, x, train=True, rngs={"dropout": jax.random.key(0)}).pooled
  b = m.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)}).pooled
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4
  e1 = m.apply(variables, x, train=False).pooled
  e2 = model.apply(variables, x, train=False).pooled
  np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))


def test_bad_options_are_user_errors():
  with pytest.raises(UserError, match="remat"):
    encoders.build_encoder(ConfigDict({"name": "convnext_tiny", "remat": "some"}))
  with pytest.raises(UserError, match="drop_path"):
    encoders.build_encoder(ConfigDict({"name": "convnext_tiny", "drop_path": 1.0}))
