"""SparK: masked convolution on ResNet, masked BatchNorm statistics, the loss, the
objective's checks, pictures, kill-and-resume, and 8 fake devices == 1 (with MAE)."""

import os
import shutil
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import objectives as objectives_lib
from conftest import run_cli, run_script_json, tiny_config
from encoders.common import resize_mask
from encoders.resnet import ResNet, _Masked
from objectives.spark import (SparKDecoder, masked_patch_loss, num_visible, patchify,
                              random_visible, spark_loss, unpatchify)
from selfsup.errors import UserError
from selfsup.metrics_log import read_metrics
from selfsup.trainer import Trainer


def _np_patch_loss(pred, images, visible, p):
  """Plain NumPy: per-patch standardised target (unbiased var + 1e-6), masked mean."""
  b, h, w, c = images.shape
  total, count = 0.0, 0
  for i in range(b):
    for gy in range(h // p):
      for gx in range(w // p):
        if visible[i, gy, gx]:
          continue
        t = images[i, gy * p:(gy + 1) * p, gx * p:(gx + 1) * p].astype(np.float64)
        t = (t - t.mean()) / np.sqrt(t.var(ddof=1) + 1e-6)
        q = pred[i, gy * p:(gy + 1) * p, gx * p:(gx + 1) * p]
        total += np.mean((q - t) ** 2)
        count += 1
  return total / count


def test_loss_matches_numpy_on_fixed_inputs():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
  pred = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
  visible = rng.random((3, 2, 2)) < 0.5
  visible[0] = [[True, False], [False, False]]
  got = float(spark_loss(jnp.asarray(pred), jnp.asarray(images), jnp.asarray(visible), 8))
  np.testing.assert_allclose(got, _np_patch_loss(pred, images, visible, 8), rtol=1e-5)
  # A perfect prediction of the normalised masked patches scores zero.
  x = patchify(jnp.asarray(images), 8)
  mean = x.mean(-1, keepdims=True)
  std = jnp.sqrt(jnp.var(x, -1, keepdims=True, ddof=1) + 1e-6)
  perfect = unpatchify((x - mean) / std, 8, 16, 16)
  assert float(spark_loss(perfect, jnp.asarray(images), jnp.asarray(visible), 8)) < 1e-10
  np.testing.assert_array_equal(np.asarray(unpatchify(x, 8, 16, 16)), images)


def test_random_mask_hides_the_same_count_in_every_image():
  v = np.asarray(random_visible(jax.random.key(0), 64, 16, num_visible(16, 0.6)))
  assert (v.sum(1) == 6).all()                               # round(16 * 0.4)
  assert len({tuple(r) for r in v}) > 50                     # drawn per image
  assert num_visible(4, 0.99) == 1 and num_visible(4, 0.01) == 3  # >= 1 visible, >= 1 hidden


@pytest.fixture(scope="module")
def resnet():
  model = ResNet(depth=18, width_multiplier=0.125, cifar_stem=True, zero_init_residual=False)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(1), x)
  mask = jax.random.uniform(jax.random.key(3), (2, 4, 4)) < 0.5
  return model, variables, x, mask


def test_resnet_masked_pixels_change_no_visible_feature_at_any_stage(resnet):
  model, variables, x, mask = resnet
  apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mask=mask,
                                           mutable=["batch_stats"])[0])
  hidden = np.asarray(resize_mask(mask, 32, 32)) == 0
  out = apply(variables, x)
  out2 = apply(variables, jnp.where(hidden, x + 10 * jax.random.normal(jax.random.key(4),
                                                                       x.shape), x))
  np.testing.assert_array_equal(np.asarray(out.pooled), np.asarray(out2.pooled))
  for s, m in out.maps.items():
    vis = np.asarray(resize_mask(mask, m.shape[1], m.shape[2]))
    np.testing.assert_array_equal(np.asarray(m) * vis, np.asarray(out2.maps[s]) * vis)
    assert np.all(np.asarray(m)[np.broadcast_to(vis == 0, m.shape)] == 0)
    assert np.abs(np.asarray(m)).max() > 0


def test_masked_batchnorm_statistics_are_over_visible_positions():
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 4)) + 2.0
  mask = jax.random.uniform(jax.random.key(1), (3, 2, 2)) < 0.5
  mask = mask.at[0, 0, 0].set(True)
  layer = _Masked(5, 3, 1, False, True, jnp.float32)
  variables = layer.init(jax.random.key(2), x, mask)
  y, updates = layer.apply(variables, x, mask, mutable=["batch_stats"])
  conv = nn.Conv(5, (3, 3), use_bias=False).apply(
      {"params": variables["params"]["Conv_0"]}, x)
  vis = np.asarray(resize_mask(mask, 8, 8))[..., 0] > 0
  c = np.asarray(conv)[vis]                                  # (visible positions, 5)
  mean, var = c.mean(0), c.var(0)
  stats = updates["batch_stats"]["BatchNorm_0"]
  np.testing.assert_allclose(np.asarray(stats["mean"]), 0.1 * mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(stats["var"]), 0.9 + 0.1 * var, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(y)[vis], (c - mean) / np.sqrt(var + 1e-5),
                             rtol=1e-3, atol=1e-4)
  assert np.all(np.asarray(y)[~vis] == 0)


def test_densify_fills_masked_positions_with_the_token_and_normalises_visible_ones():
  maps = {4: jax.random.normal(jax.random.key(0), (2, 4, 4, 6)) + 3.0,
          2: jax.random.normal(jax.random.key(1), (2, 8, 8, 4))}
  visible = jnp.array([[[True, False], [False, True]], [[False, True], [False, False]]])
  dec = SparKDecoder(8)
  variables = dec.init(jax.random.key(2), maps, visible, 4, "batch", train=True)
  out, updates = dec.apply(variables, maps, visible, 4, "batch", train=True,
                           mutable=["batch_stats"], capture_intermediates=True)
  assert out.shape == (2, 16, 16, 3)
  vis = np.asarray(resize_mask(visible, 4, 4))[..., 0] > 0
  feats = np.asarray(maps[4])[vis]
  stats = updates["batch_stats"]["densify_norm4"]
  np.testing.assert_allclose(np.asarray(stats["mean"]), 0.1 * feats.mean(0), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(stats["var"]), 0.9 + 0.1 * feats.var(0), rtol=1e-4)


def test_objective_checks_are_one_line_user_errors():
  for ratio in (0.0, 1.0, -0.1, 1.5):
    with pytest.raises(UserError, match="mask_ratio"):
      objectives_lib.build_objective("spark", {"mask_ratio": ratio}, image_size=32,
                                     dtype=jnp.float32)
  from conftest import model_forward
  c = tiny_config("spark", image_size=40)                    # tiny CNN: stride 16
  with pytest.raises(UserError, match="not a multiple of the encoder's downsampling stride 16"):
    model_forward(c, batch_size=2)
  c = tiny_config("spark", image_size=16)
  with pytest.raises(UserError, match="1x1 mask grid"):
    model_forward(c, batch_size=2)
  c = tiny_config("spark", image_size=32)
  c.encoder = {"name": "vit_ti", "patch_size": 8}
  with pytest.raises(UserError, match="use objective mae"):
    model_forward(c, batch_size=2)


def test_bad_mask_ratio_on_the_command_line_is_one_line_and_exit_2(tmp_path):
  proc = run_cli(["-m", "selfsup.train", "--config", "experiments/quickstart.py:spark",
                  "--workdir", str(tmp_path / "w"), "--config.objectives.spark.mask_ratio=1.0"])
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and "mask_ratio=1.0" in lines[0], proc.stderr


@pytest.mark.ci
def test_killed_run_resumes_exactly_and_writes_pictures(tmp_path):
  c = tiny_config("spark", steps=6, batch_size=8, image_size=32)
  c.train.online_probe = False
  c.train.image_every = 3
  run = Trainer(c, str(tmp_path / "run"))
  run.run(stop_after=4)                     # dies after step 4; newest checkpoint: 3
  assert run.checkpointer.latest_step() == 3
  shutil.copytree(tmp_path / "run", tmp_path / "cut")
  resumed = Trainer(c, str(tmp_path / "cut"))
  resumed.run()
  run.run()
  a, b = jax.device_get(run.state), jax.device_get(resumed.state)
  assert int(a["step"]) == int(b["step"]) == 6
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert ([r["loss"] for r in read_metrics(str(tmp_path / "cut"))]
          == [r["loss"] for r in read_metrics(str(tmp_path / "run"))])
  from PIL import Image
  pictures = sorted(os.listdir(tmp_path / "cut" / "images"))
  assert pictures == ["spark_0000003.png", "spark_0000006.png"]
  grid = np.asarray(Image.open(tmp_path / "cut" / "images" / pictures[-1]))
  assert grid.shape == (3 * 34 + 2, 8 * 34 + 2, 3)           # 3 rows of 8 images, 2 px gaps
  assert grid.std() > 10


EIGHT_DEVICES = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    import jax, numpy as np
    from conftest import tiny_config
    import encoders
    from encoders.vit import ViT
    encoders.REGISTRY["vit_test"] = lambda dtype, patch_size=4, pooling="mean": ViT(
        width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=patch_size, pooling=pooling,
        dtype=dtype)
    from selfsup.trainer import Trainer
    out = {{}}
    for objective in ("spark", "mae"):
      for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
        c = tiny_config(objective, steps=2, batch_size=8, image_size=32 if objective == "spark" else 16)
        c.optimizer.name = "sgd"
        c.train.online_probe = False
        if objective == "mae":
          c.encoder = {{"name": "vit_test"}}
          c.objectives.mae.decoder_depth = 1
          c.objectives.mae.decoder_width = 16
          c.objectives.mae.decoder_heads = 2
        t = Trainer(c, None, devices=devices)
        losses = [float(t.train_step(next(t.iterator))[0]["loss"]) for _ in range(2)]
        leaves = [np.asarray(x).ravel() for x in jax.tree.leaves(jax.device_get(t.state["params"]))]
        out[objective + "/" + name] = dict(losses=losses, params=np.concatenate(leaves).tolist())
    print(json.dumps(out))
""")


@pytest.mark.ci
def test_eight_devices_match_one_for_spark_and_mae():
  out = run_script_json(EIGHT_DEVICES, timeout=1200)
  for objective in ("spark", "mae"):
    one, eight = out[f"{objective}/one"], out[f"{objective}/eight"]
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(eight["params"], one["params"], rtol=1e-3, atol=2e-5)
