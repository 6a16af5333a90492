"""PixPro: pixel propagation, the positive-pair mask (flipped and disjoint boxes) and the
loss against NumPy; 8 fake devices equal 1 (replicated and FSDP); a too-small map is
refused with one line."""

import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_script_json, tiny_config
from objectives import pixpro
from selfsup.errors import UserError


def np_propagate(x, gx, gamma):
  b, h, w, c = x.shape
  xf = x.reshape(b, h * w, c)
  gf = gx.reshape(b, h * w, -1)
  gf = gf / np.linalg.norm(gf, axis=-1, keepdims=True)   # the reference's featprop
  out = np.zeros_like(gf)
  for n in range(b):
    for i in range(h * w):
      for j in range(h * w):
        cos = xf[n, i] @ xf[n, j] / (np.linalg.norm(xf[n, i]) * np.linalg.norm(xf[n, j]))
        out[n, i] += max(cos, 0.0) ** gamma * gf[n, j]
  return out.reshape(b, h, w, -1)


def np_pixel_centres(box, h, w):
  """Original-image (y, x) of the centre of each cell of an h x w grid over `box`."""
  y0, x0, y1, x1 = box
  return np.array([[y0 + (r + 0.5) / h * (y1 - y0), x0 + (c + 0.5) / w * (x1 - x0)]
                   for r in range(h) for c in range(w)])


def np_positive_pairs(box_q, box_k, h, w, ratio):
  out = []
  for bq, bk in zip(box_q, box_k):
    cq, ck = np_pixel_centres(bq, h, w), np_pixel_centres(bk, h, w)
    diag = max(np.hypot((bq[2] - bq[0]) / h, (bq[3] - bq[1]) / w),
               np.hypot((bk[2] - bk[0]) / h, (bk[3] - bk[1]) / w))
    d = np.linalg.norm(cq[:, None] - ck[None], axis=-1)
    out.append(d / diag < ratio)
  return np.stack(out)


def np_loss(y, k, mask):
  b = y.shape[0]
  losses = []
  for n in range(b):
    yf = y[n].reshape(-1, y.shape[-1])
    kf = k[n].reshape(-1, k.shape[-1])
    yf = yf / np.linalg.norm(yf, axis=1, keepdims=True)
    kf = kf / np.linalg.norm(kf, axis=1, keepdims=True)
    pairs = [(i, j) for i in range(len(yf)) for j in range(len(kf)) if mask[n, i, j]]
    losses.append(np.mean([yf[i] @ kf[j] for i, j in pairs]) if pairs else 0.0)
  return -np.mean(losses)


def test_pixel_propagation_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 3, 5)).astype(np.float32)
  gx = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
  for gamma in (1.0, 2.0):
    np.testing.assert_allclose(np.asarray(pixpro.propagate(jnp.asarray(x), jnp.asarray(gx), gamma)),
                               np_propagate(x.astype(np.float64), gx.astype(np.float64), gamma),
                               rtol=1e-4, atol=1e-5)


def test_propagation_is_blind_to_the_norm_of_the_transformed_pixels():
  # The reference normalises g(x) per pixel before propagating: scaling one pixel's g(x)
  # (e.g. by a large bias of g) must not change the output.
  rng = np.random.default_rng(2)
  x = rng.normal(size=(1, 2, 2, 5)).astype(np.float32)
  gx = rng.normal(size=(1, 2, 2, 4)).astype(np.float32)
  scaled = gx.copy()
  scaled[0, 0, 0] *= 50.0
  np.testing.assert_allclose(np.asarray(pixpro.propagate(jnp.asarray(x), jnp.asarray(scaled))),
                             np.asarray(pixpro.propagate(jnp.asarray(x), jnp.asarray(gx))),
                             rtol=1e-5, atol=1e-6)


def test_spread_matches_numpy():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(4, 2, 2, 8)).astype(np.float32)
  xf = x.reshape(-1, 8).astype(np.float64)
  xf /= np.linalg.norm(xf, axis=1, keepdims=True)
  np.testing.assert_allclose(float(pixpro.spread(jnp.asarray(x))),
                             xf.std(axis=0).mean() * np.sqrt(8), rtol=1e-5)
  # One direction for every row: 0.
  same = np.broadcast_to(x[:1, :1, :1], x.shape)
  assert float(pixpro.spread(jnp.asarray(same))) < 1e-5


def test_positive_pairs_match_numpy_for_flipped_and_disjoint_boxes():
  boxes_q = np.array([[0.1, 0.1, 0.7, 0.9],    # the same box twice (square 0.2 bins)
                      [0.1, 0.1, 0.7, 0.9],    # its mirror image: x bounds swapped
                      [0.0, 0.0, 0.4, 0.4],    # disjoint boxes
                      [0.0, 0.0, 1.0, 1.0],    # a small crop inside a large one
                      [0.3, 0.8, 0.9, 0.1]],   # flipped query, unflipped overlapping key
                     np.float32)
  boxes_k = np.array([[0.1, 0.1, 0.7, 0.9],
                      [0.1, 0.9, 0.7, 0.1],
                      [0.6, 0.6, 1.0, 1.0],
                      [0.3, 0.3, 0.6, 0.6],
                      [0.2, 0.0, 0.8, 0.7]], np.float32)
  h, w = 3, 4
  got = np.asarray(pixpro.positive_pairs(jnp.asarray(boxes_q), jnp.asarray(boxes_k), h, w, 0.7))
  want = np_positive_pairs(boxes_q.astype(np.float64), boxes_k.astype(np.float64), h, w, 0.7)
  np.testing.assert_array_equal(got, want)
  # The same box: each pixel pairs with itself only (neighbours are 0.707 diagonals away).
  np.testing.assert_array_equal(got[0], np.eye(h * w, dtype=bool))
  # The mirrored view: pixel (r, c) pairs with (r, w - 1 - c).
  mirror = np.zeros((h * w, h * w), bool)
  for r in range(h):
    for c in range(w):
      mirror[r * w + c, r * w + (w - 1 - c)] = True
  np.testing.assert_array_equal(got[1], mirror)
  assert not got[2].any()                      # disjoint: no positive pair
  assert got[3].any() and got[4].any()


def test_loss_matches_numpy_and_ignores_images_without_pairs():
  rng = np.random.default_rng(1)
  y = rng.normal(size=(3, 2, 2, 6)).astype(np.float32)
  k = rng.normal(size=(3, 2, 2, 6)).astype(np.float32)
  mask = rng.random((3, 4, 4)) < 0.4
  mask[2] = False                                # an image without positive pairs
  got = float(pixpro.pixel_consistency_loss(jnp.asarray(y), jnp.asarray(k), jnp.asarray(mask)))
  np.testing.assert_allclose(got, np_loss(y.astype(np.float64), k.astype(np.float64), mask),
                             rtol=1e-4, atol=1e-6)
  # Perfect agreement on the positive pairs gives -1 for images that have any.
  eye = np.broadcast_to(np.eye(4, dtype=bool), (3, 4, 4))
  same = float(pixpro.pixel_consistency_loss(jnp.asarray(y), jnp.asarray(y), jnp.asarray(eye)))
  np.testing.assert_allclose(same, -1.0, rtol=1e-5)


def test_feature_map_below_2x2_is_refused_in_one_line():
  from selfsup.trainer import Trainer
  c = tiny_config("pixpro", batch_size=8)       # 16 px views: the tiny CNN's last map is 1x1
  c.objectives.pixpro.update(view_size=0, proj_hidden=16, proj_dim=8)
  with pytest.raises(UserError, match=r"at least 2x2 pixels.*1x1 for 16 px views.*view_size"):
    Trainer(c, None)


EIGHT_DEVICES = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    import jax, numpy as np
    from conftest import tiny_config
    from selfsup.trainer import Trainer
    assert len(jax.devices()) == 8
    out = {{}}
    for name, devices, sharding in [("one", jax.devices()[:1], "replicate"),
                                    ("eight", jax.devices(), "replicate"),
                                    ("fsdp", jax.devices(), "fsdp")]:
      c = tiny_config("pixpro", steps=2, batch_size=8)
      c.encoder.width_multiplier = 0.25
      c.objectives.pixpro.update(view_size=24, proj_hidden=16, proj_dim=8, pred_hidden=16,
                                 instance_weight=0.5)
      c.optimizer.name = "sgd"
      c.train.online_probe = False
      c.mesh.sharding = sharding
      c.mesh.fsdp_min_size = 64
      t = Trainer(c, None, devices=devices)
      losses, shares = [], []
      for _ in range(2):
        m, _ = t.train_step(next(t.iterator))
        losses.append(float(m["loss"]))
        shares.append(float(m["pixpro/pos_share"]))
      state = jax.device_get({{"params": t.state["params"],
                               "teacher": t.state["objective_state"]["pixpro"]["teacher"]}})
      leaves = [np.asarray(x).ravel() for x in jax.tree.leaves(state)]
      out[name] = dict(losses=losses, shares=shares, state=np.concatenate(leaves).tolist())
      if name == "fsdp":
        specs = [str(x.sharding.spec) for x in jax.tree.leaves(t.state)]
        out["fsdp_sharded"] = any("data" in s for s in specs)
    print(json.dumps(out))
""")


@pytest.mark.slow  # three compilations of the step on 8 fake devices: over a minute idle
def test_eight_devices_match_one_replicated_and_fsdp(tmp_path):
  out = run_script_json(EIGHT_DEVICES, timeout=3600)
  assert out["fsdp_sharded"]
  assert out["one"]["losses"][0] < 0.5 and all(0 < s <= 1 for s in out["one"]["shares"])
  for name in ("eight", "fsdp"):
    np.testing.assert_allclose(out[name]["losses"], out["one"]["losses"], rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(out[name]["shares"], out["one"]["shares"], atol=1e-6)
    np.testing.assert_allclose(out[name]["state"], out["one"]["state"], rtol=1e-3, atol=2e-5)
