"""Context prediction: the 8-way loss against NumPy, patch geometry, colour and errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from objectives.base import accuracy, cross_entropy
from objectives.context import CENTRE, NEIGHBOURS, context_pairs, patch_grid
from objectives.context import drop_color as _drop_color
from objectives.context import relative_patch_views as _relative_patch_views
from objectives.context import standardize_patches
from selfsup.errors import UserError


def _ce_numpy(logits, label):
  z = logits - logits.max()
  return float(np.log(np.exp(z).sum()) - z[label])


def test_neighbour_order_is_row_major_without_the_centre():
  assert NEIGHBOURS == (0, 1, 2, 3, 5, 6, 7, 8) and CENTRE == 4


def test_loss_matches_numpy_reference():
  """A fixed linear head on (centre, neighbour) pairs; label of neighbour k is k."""
  rng = np.random.default_rng(0)
  b, d = 3, 5
  emb = rng.normal(size=(9 * b, d)).astype(np.float32)   # row p * b + i
  w = rng.normal(size=(2 * d, 8)).astype(np.float32)
  pairs, labels = context_pairs(jnp.asarray(emb))
  loss = float(cross_entropy(pairs @ jnp.asarray(w), labels))

  ref = []
  for k, pos in enumerate(NEIGHBOURS):
    for i in range(b):
      x = np.concatenate([emb[CENTRE * b + i], emb[pos * b + i]]).astype(np.float64)
      ref.append(_ce_numpy(x @ w, k))
  assert loss == pytest.approx(np.mean(ref), rel=1e-5)
  np.testing.assert_array_equal(labels, np.repeat(np.arange(8), b))


def test_known_layout_is_solved_by_a_head_that_reads_the_neighbour_position():
  """Embeddings = one-hot grid positions: a head mapping position NEIGHBOURS[k] -> k is
  right on every pair, so the pairing and labels agree; a shuffled head is not."""
  b = 4
  emb = np.repeat(np.eye(9, dtype=np.float32), b, axis=0)  # row p * b + i = onehot(p)
  w = np.zeros((18, 8), np.float32)
  for k, pos in enumerate(NEIGHBOURS):
    w[9 + pos, k] = 20.0                                   # the neighbour half
  pairs, labels = context_pairs(jnp.asarray(emb))
  np.testing.assert_array_equal(pairs[:, :9], np.tile(np.eye(9)[CENTRE], (8 * b, 1)))
  logits = pairs @ jnp.asarray(w)
  assert float(accuracy(logits, labels)) == 1.0
  assert float(cross_entropy(logits, labels)) < 1e-6
  assert float(accuracy(logits[:, ::-1], labels)) == 0.0


@functools.partial(jax.jit, static_argnames=("patch_size", "jitter"))
def _views_with_key(key, images, patch_size=0, jitter=-1):
  return _relative_patch_views(key, images, patch_size=patch_size, jitter=jitter)


def relative_patch_views(key, images, *, patch_size=0, jitter=-1):
  """Jitted (one compiled program instead of hundreds of eager ops); key None as is."""
  if key is None:
    return _relative_patch_views(None, images, patch_size=patch_size, jitter=jitter)
  return _views_with_key(key, images, patch_size=patch_size, jitter=jitter)


def _coordinate_images(b, size):
  """Pixel (y, x) of every image holds (y, x, image index): crops reveal their origin."""
  y, x = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  img = np.stack([y, x, np.zeros_like(y)], -1).astype(np.int32)
  imgs = np.repeat(img[None], b, axis=0)
  imgs[..., 2] = np.arange(b)[:, None, None]
  return jnp.asarray(imgs)


@pytest.mark.parametrize("size,patch_size,jitter", [(30, 6, 1), (32, 0, -1), (16, 3, -1)])
def test_patch_geometry(size, patch_size, jitter):
  b = 16
  cell, patch, lo, hi = patch_grid(size, patch_size, jitter)
  patches, offsets = relative_patch_views(jax.random.key(0), _coordinate_images(b, size),
                                          patch_size=patch_size, jitter=jitter)
  patches, offsets = np.asarray(patches), np.asarray(offsets)
  assert patches.shape == (9 * b, patch, patch, 3) and offsets.shape == (9 * b, 2)
  assert offsets.min() >= lo and offsets.max() <= hi and 0 <= lo <= hi <= cell - patch
  corners = np.zeros((9, b, 2), np.int64)
  for p in range(9):
    r, c = divmod(p, 3)
    for i in range(b):
      crop = patches[p * b + i]
      assert (crop[..., 2] == i).all()                     # patch-major order
      y0, x0 = crop[0, 0, 0], crop[0, 0, 1]
      # A contiguous crop whose corner is the cell corner plus the returned offset...
      rows, cols = np.meshgrid(np.arange(patch), np.arange(patch), indexing="ij")
      np.testing.assert_array_equal(crop[..., 0], y0 + rows)
      np.testing.assert_array_equal(crop[..., 1], x0 + cols)
      np.testing.assert_array_equal([y0 - r * cell, x0 - c * cell], offsets[p * b + i])
      # ...lying inside its cell.
      assert r * cell <= y0 and y0 + patch <= (r + 1) * cell
      assert c * cell <= x0 and x0 + patch <= (c + 1) * cell
      corners[p, i] = (y0, x0)
  # Gaps between horizontal and vertical neighbours: at least cell - patch - (hi - lo).
  min_gap = cell - patch - (hi - lo)
  for p in range(9):
    r, c = divmod(p, 3)
    if c < 2:
      assert (corners[p + 1, :, 1] - (corners[p, :, 1] + patch) >= min_gap).all()
    if r < 2:
      assert (corners[p + 3, :, 0] - (corners[p, :, 0] + patch) >= min_gap).all()
  if jitter == 1:
    assert min_gap == 2        # Doersch's gap + jitter: patches never touch
  # The offsets use the whole allowed range (9 * 16 draws per axis), not a fixed spot.
  assert offsets.min() == lo and offsets.max() == hi


def test_offsets_depend_on_the_key_and_eval_offsets_are_centred():
  images = _coordinate_images(4, 32)
  _, a = relative_patch_views(jax.random.key(0), images, patch_size=6)
  _, b = relative_patch_views(jax.random.key(1), images, patch_size=6)
  assert not np.array_equal(a, b)
  _, again = relative_patch_views(jax.random.key(0), images, patch_size=6)
  np.testing.assert_array_equal(a, again)
  _, centred = relative_patch_views(None, images, patch_size=6)
  assert (np.asarray(centred) == 2).all()                 # (10 - 6) // 2


def test_auto_patch_size_is_the_reference_ratio():
  assert patch_grid(255)[:2] == (85, 64)                  # the reference's 64 px in 85
  assert patch_grid(32)[:2] == (10, 8)
  assert patch_grid(6)[:2] == (2, 1)                      # smallest grid: still a gap


@pytest.mark.parametrize("size,patch_size,jitter,match", [
    (32, 11, -1, r"patch_size=11 .* 10 px cells .* valid patch_size: 1\.\.10"),
    (5, 0, -1, r"image_size=5 .* cells of 1 px.*>= 6"),
    (32, 6, 3, r"jitter=3 .* valid jitter: 0\.\.2"),
])
def test_grid_that_does_not_fit_is_a_user_error(size, patch_size, jitter, match):
  with pytest.raises(UserError, match=match):
    patch_grid(size, patch_size, jitter)


def test_trainer_rejects_a_grid_that_does_not_fit(tiny):
  from selfsup.trainer import Trainer
  c = tiny("context")
  c.objectives.context.patch_size = 9                      # 16 px image: 5 px cells
  with pytest.raises(UserError, match="patch_size=9"):
    Trainer(c, None)


def test_drop_color():
  rng = np.random.default_rng(0)
  b = 6
  patches = jnp.asarray(rng.uniform(size=(9 * b, 5, 5, 3)), jnp.float32)
  key = jax.random.key(3)
  # Probabilities traced: one compiled program for every setting below.
  drop_color = jax.jit(_drop_color)
  np.testing.assert_array_equal(_drop_color(key, patches, color_drop_prob=0.0), patches)
  gray = np.asarray(drop_color(key, patches, color_drop_prob=1.0, grayscale_prob=1.0))
  np.testing.assert_allclose(gray[..., 0], np.asarray(patches).mean(-1), rtol=1e-6)
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
  dropped = np.asarray(drop_color(key, patches, color_drop_prob=1.0, grayscale_prob=0.0))
  patches = np.asarray(patches)
  kept_channels = []
  for i in range(9 * b):
    same = [np.array_equal(dropped[i, ..., ch], patches[i, ..., ch]) for ch in range(3)]
    assert sum(same) == 1                                  # exactly one channel kept
    kept = int(np.argmax(same))
    kept_channels.append(kept)
    for ch in range(3):
      if ch != kept:                                       # near-constant noise
        assert dropped[i, ..., ch].std() < 0.02 * patches[i, ..., kept].std() + 1e-6
  assert len(set(kept_channels)) == 3                      # the kept channel is random
  # Per example: with probability 0.5 all 9 patches of an example change, or none does.
  half = np.asarray(drop_color(key, jnp.asarray(patches), color_drop_prob=0.5))
  changed = ~np.isclose(half.reshape(9, b, -1), patches.reshape(9, b, -1)).all(-1)
  assert (changed.all(0) | ~changed.any(0)).all() and 0 < changed[0].sum() < b


def test_standardize_patches():
  rng = np.random.default_rng(1)
  x = rng.uniform(size=(4, 6, 6, 3)) * np.array([1, 5, 10, 0])[:, None, None, None]
  z = np.asarray(standardize_patches(jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(z[:3].mean(axis=(1, 2, 3)), 0, atol=1e-5)
  np.testing.assert_allclose(z[:3].std(axis=(1, 2, 3)), 1, rtol=1e-4)
  np.testing.assert_array_equal(z[3], 0)                   # constant patch stays finite
  # Over all channels together: the ratio between channels is kept.
  np.testing.assert_allclose(z[0] - z[0].mean(), (x[0] - x[0].mean()) / x[0].std(),
                             rtol=1e-4, atol=1e-5)


def test_objective_forward_train_and_eval(tiny):
  """At init the 8-way loss is near ln 8; eval mode needs no augment key."""
  from conftest import model_forward
  c = tiny("context")
  c.objectives.context.head_hidden = (32,)
  c.objectives.context.patch_input_size = 8
  apply, variables, batch, (loss, metrics, _) = model_forward(c)
  assert abs(float(metrics["context/loss"]) - np.log(8)) < 0.7
  assert float(loss) == pytest.approx(float(metrics["context/loss"]))
  (eval_loss, _, _), _ = apply(variables, batch, train=False,
                               mutable=("batch_stats", "objective_state"))
  assert np.isfinite(float(eval_loss))
