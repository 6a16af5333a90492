"""Encoder shapes, feature maps by stride, masks, and the registry's errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from encoders import PatchMask, build_encoder
from selfsup.errors import UserError


@pytest.mark.parametrize("cfg,dim,strides", [
    (dict(name="tiny_cnn"), 128, (2, 4, 8, 16)),
    (dict(name="resnet18", cifar_stem=True, width_multiplier=0.125), 64, (1, 2, 4, 8)),
    (dict(name="resnet50", width_multiplier=0.125), 256, (4, 8, 16, 32)),
])
def test_convnet_outputs(cfg, dim, strides):
  enc = build_encoder(ConfigDict(cfg))
  x = jnp.ones((2, 32, 32, 3))
  v = enc.init(jax.random.key(0), x, train=False)
  out = enc.apply(v, x, train=False)
  assert out.pooled.shape == (2, dim) and out.pooled.dtype == jnp.float32
  assert tuple(sorted(out.maps)) == strides
  for s, m in out.maps.items():
    assert m.shape[1:3] == (32 // s, 32 // s)


def test_convnet_mask_zeroes_masked_positions_and_ignores_them():
  enc = build_encoder(ConfigDict(dict(name="resnet18", cifar_stem=True, width_multiplier=0.125)))
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  v = enc.init(jax.random.key(0), x, train=False)
  mask = np.ones((2, 4, 4), bool)
  mask[:, :2] = False
  out, _ = enc.apply(v, x, train=True, mask=jnp.asarray(mask), mutable=["batch_stats"])
  assert float(jnp.abs(out.maps[8][:, :2]).max()) == 0.0
  # Changing pixels under the mask changes nothing.
  x2 = x.at[:, :16].set(0.0)
  out2, _ = enc.apply(v, x2, train=True, mask=jnp.asarray(mask), mutable=["batch_stats"])
  np.testing.assert_allclose(out.pooled, out2.pooled, atol=1e-5)


def test_vit_outputs_and_token_dropping():
  enc = build_encoder(ConfigDict(dict(name="vit_ti", patch_size=8)))
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  v = enc.init(jax.random.key(0), x, train=False)
  out = enc.apply(v, x, train=False)
  assert out.pooled.shape == (2, 192) and out.maps[8].shape == (2, 4, 4, 192)
  visible = np.zeros((2, 4, 4), bool)
  visible[0, :2] = True
  visible[1, 2:] = True
  fn = jax.jit(lambda v, x, m: enc.apply(v, x, train=False, mask=PatchMask(m, 8)))
  masked = fn(v, x, jnp.asarray(visible))
  assert float(jnp.abs(masked.maps[8][0, 2:]).max()) == 0.0
  assert float(jnp.abs(masked.maps[8][0, :2]).min()) > 0.0


def test_bfloat16_compute_keeps_float32_params_and_features():
  enc = build_encoder(ConfigDict(dict(name="tiny_cnn")), "bfloat16")
  x = jnp.ones((2, 16, 16, 3))
  v = enc.init(jax.random.key(0), x, train=False)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v["params"]))
  assert enc.apply(v, x, train=False).pooled.dtype == jnp.float32


def test_registry_errors_list_valid_choices():
  with pytest.raises(UserError, match="valid encoders: .*resnet50.*tiny_cnn"):
    build_encoder(ConfigDict(dict(name="resnet51")))
  with pytest.raises(UserError, match="no option 'patch_size'"):
    build_encoder(ConfigDict(dict(name="resnet18", patch_size=4)))


@pytest.mark.ci
def test_random_init_baseline_has_standard_residual_init():
  """Training init zero-initialises each block's last BatchNorm scale; the random-init
  baseline (evals.features) is the same architecture with every such scale 1."""
  from encoders.resnet import Bottleneck
  from evals.features import random_init_variables
  enc = build_encoder(ConfigDict(dict(name="resnet18", width_multiplier=0.125)))
  assert enc.zero_init_residual
  x = jnp.zeros((2, 16, 16, 3))
  # Jitted: an eager flax init runs op by op, which is slow on a busy CPU.
  train_init = jax.jit(lambda: enc.init(jax.random.key(0), x, train=False))()["params"]
  baseline = jax.jit(lambda: random_init_variables(enc, 16, seed=0))()["params"]
  assert jax.tree_util.tree_structure(train_init) == jax.tree_util.tree_structure(baseline)
  blocks = [k for k in baseline if k.startswith("BasicBlock")]
  assert len(blocks) == 8
  for block in blocks:
    np.testing.assert_array_equal(train_init[block]["_Masked_1"]["BatchNorm_0"]["scale"], 0.0)
    np.testing.assert_array_equal(baseline[block]["_Masked_1"]["BatchNorm_0"]["scale"], 1.0)
    # The block's first BatchNorm starts at 1 in both.
    np.testing.assert_array_equal(train_init[block]["_Masked_0"]["BatchNorm_0"]["scale"], 1.0)
  # The option is an encoder config field too, and bottlenecks follow it.
  off = build_encoder(ConfigDict(dict(name="resnet50", zero_init_residual=False)))
  assert not off.zero_init_residual
  y = jnp.zeros((1, 4, 4, 8))
  for flag, value in ((True, 0.0), (False, 1.0)):
    block = Bottleneck(4, 1, False, jnp.float32, zero_init_residual=flag)
    params = block.init(jax.random.key(0), y, None)["params"]
    np.testing.assert_array_equal(params["_Masked_2"]["BatchNorm_0"]["scale"], value)
    np.testing.assert_array_equal(params["_Masked_0"]["BatchNorm_0"]["scale"], 1.0)


def test_vit_reads_its_position_embeddings_at_another_resolution():
  """A ViT trained at 16 px (a 4x4 grid of 4 px patches) probed at 32 px: the learned
  position embeddings are resized bilinearly to the 8x8 grid, and at the training size
  they are used as stored."""
  from encoders.vit import ViT
  vit = ViT(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, pooling="mean")
  small = jnp.ones((2, 16, 16, 3))
  variables = vit.init(jax.random.PRNGKey(0), small, train=False)
  pos = variables["params"]["pos_embed"]
  assert pos.shape == (1, 16, 16)
  out = vit.apply(variables, jnp.ones((2, 32, 32, 3)), train=False)
  assert out.pooled.shape == (2, 16) and out.maps[4].shape == (2, 8, 8, 16)
  # The resize is bilinear on the 4x4 grid: a constant embedding stays constant.
  flat = jax.tree.map(lambda x: x, variables)
  flat["params"]["pos_embed"] = jnp.full_like(pos, 0.5)
  a = vit.apply(flat, jnp.ones((1, 32, 32, 3)), train=False).maps[4]
  b = ViT(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, pooling="mean").apply(
      {"params": {**flat["params"], "pos_embed": jnp.full((1, 64, 16), 0.5)}},
      jnp.ones((1, 32, 32, 3)), train=False).maps[4]
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  same = vit.apply(variables, small, train=False)
  assert same.maps[4].shape == (2, 4, 4, 16)


def _scan_case(remat, masked, depth=34):
  """(unrolled, scanned) of one jitted ResNet (tiny width) train step: loss, new
  BatchNorm statistics, gradients; and eval features."""
  from encoders.resnet import ResNet
  kw = dict(depth=depth, width_multiplier=0.125, cifar_stem=True, remat=remat)
  plain, scanned = ResNet(**kw), ResNet(**kw, scan_blocks=True)
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
  init = lambda enc: jax.jit(lambda: enc.init(jax.random.key(0), x, train=False))()
  v, v2 = init(plain), init(scanned)
  # The parameter tree and its initial values do not depend on scan_blocks.
  assert jax.tree.structure(v) == jax.tree.structure(v2)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(v2)))
  # Non-trivial weights: zero-init residual scales would make most blocks the identity.
  keys = iter(jax.random.split(jax.random.key(2), len(jax.tree.leaves(v))))
  v = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(next(keys), a.shape), v)
  v["batch_stats"] = jax.tree.map(jnp.abs, v["batch_stats"])
  mask = None
  if masked:
    m = np.ones((2, 4, 4), bool)
    m[0, :2] = False
    mask = jnp.asarray(m)

  def run(enc):
    def loss(params):
      out, new = enc.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                           train=True, mask=mask, mutable=["batch_stats"])
      return jnp.sum(out.pooled ** 2) + sum(jnp.sum(o ** 2) for o in out.maps.values()), new

    (l, stats), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
    return l, stats, g, enc.apply(v, x, train=False, mask=mask).pooled
  return jax.jit(lambda: run(plain))(), jax.jit(lambda: run(scanned))()


@pytest.mark.parametrize("remat,masked,depth", [
    # Slow: XLA's CPU backend compiles convolutions inside a loop body slowly, even at
    # stages of (3, 1, 1, 1) tiny basic blocks (~110 s on a loaded 2-core machine).
    pytest.param("none", True, 6, marks=pytest.mark.slow),
    pytest.param("none", True, 34, marks=pytest.mark.slow),
    pytest.param("blocks", False, 34, marks=pytest.mark.slow),
    pytest.param("full", True, 34, marks=pytest.mark.slow)])
def test_resnet_scan_blocks_matches_unrolled(remat, masked, depth, monkeypatch):
  """scan_blocks: same parameters, features, new BatchNorm statistics and gradients as
  the unrolled ResNet (with a SparK mask; with activation rematerialisation)."""
  from encoders import resnet
  monkeypatch.setitem(resnet.STAGES, 6, ("basic", (3, 1, 1, 1)))
  a, b = _scan_case(remat, masked, depth)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4)


def test_vit_scan_blocks_matches_unrolled():
  """ViT scan_blocks: same parameter tree, same tokens and gradients with dropped tokens."""
  from encoders.vit import ViT
  kw = dict(width=16, depth=3, mlp_dim=32, num_heads=2, patch_size=8)
  plain, scanned = ViT(**kw), ViT(**kw, scan_blocks=True)
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  v = jax.jit(lambda: plain.init(jax.random.key(0), x, train=False))()
  v2 = jax.jit(lambda: scanned.init(jax.random.key(0), x, train=False))()
  assert jax.tree.structure(v) == jax.tree.structure(v2)
  visible = np.zeros((2, 4, 4), bool)
  visible[0, :2] = True
  visible[1, 2:] = True
  mask = PatchMask(jnp.asarray(visible), 8)

  def run(enc):
    def loss(v):
      out = enc.apply(v, x, train=True, mask=mask)
      return jnp.sum(out.maps[8] ** 2) + jnp.sum(out.pooled), out.maps[8]
    return jax.value_and_grad(loss, has_aux=True)(v)
  a, b = jax.jit(lambda: run(plain))(), jax.jit(lambda: run(scanned))()
  # atol: some gradients are zero up to rounding (attention's key bias: softmax ignores
  # a per-query constant), so their relative error means nothing.
  for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(p, q, rtol=1e-4, atol=1e-3)
