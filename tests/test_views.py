"""Views come from the whole image: host canvases + valid boxes, crops sampled inside them.

Tiny canvases and views (2 shared CPU cores): every test compiles one or two small
programs and runs in seconds.
"""

import math
import pathlib
import sys

_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from scipy import stats

from selfsup import augment, data  # pylint: disable=g-import-not-at-top
from selfsup.errors import UserError  # pylint: disable=g-import-not-at-top

# Crop and flip only (the colour ops do not move pixels), values kept in [0, 1].
CROP_ONLY = augment.view_params(augment.default_view_config(
    normalize=False, jitter_strength=0.0, grayscale_prob=0.0))


def _pipeline(source, **kw):
  args = dict(batch_size=1, image_size=16, seed=0, process_index=0, process_count=1,
              shuffle=False, num_epochs=1, drop_remainder=False)
  args.update(kw)
  return data.make_pipeline(source, **args)


def _photo_folder(tmp_path, w=500, h=375):
  """One w x h photo whose red channel is its column (x / (w - 1)) and green its row."""
  x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
  y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
  img = np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8)
  d = tmp_path / 'train' / 'a'
  d.mkdir(parents=True)
  Image.fromarray(img).save(d / 'photo.png')
  return data.FolderSource(str(tmp_path), 'train')


def _views_of_one(batch, n, cfg, out_size):
  """n views of the single example of `batch` (keys 0..n-1), image shared, not tiled."""
  image, valid = jnp.asarray(batch['image'][0]), jnp.asarray(batch['valid'][0])
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(n))
  return jax.jit(jax.vmap(
      lambda k: augment.view_augment_single(k, image, cfg, out_size, valid)))(keys)


# ---------------------------------------------------------------------------------------
# Host side.


def test_fit_to_canvas_keeps_the_whole_image():
  img = np.random.default_rng(0).integers(0, 256, (375, 500, 3)).astype(np.uint8)
  canvas, valid = data.fit_to_canvas(img, 64)
  assert canvas.shape == (64, 64, 3) and canvas.dtype == np.uint8
  assert valid.tolist() == [0, 0, 48, 64]
  expected = np.asarray(Image.fromarray(img).resize((64, 48), Image.BILINEAR))
  np.testing.assert_array_equal(canvas[:48], expected)
  np.testing.assert_array_equal(canvas[48:], np.repeat(expected[-1:], 16, 0))  # Edge pad.
  # Smaller than the canvas: not enlarged; grayscale becomes RGB.
  small, valid = data.fit_to_canvas(np.full((20, 10), 7, np.uint8), 32)
  assert small.shape == (32, 32, 3) and valid.tolist() == [0, 0, 20, 10]
  assert (small == 7).all()


def test_pipeline_modes_and_eval_crop_fraction(tmp_path):
  src = _photo_folder(tmp_path, w=64, h=48)
  train = next(_pipeline(src, canvas_size=40))
  assert sorted(train) == ['image', 'index', 'label', 'valid']
  assert train['image'].shape == (1, 40, 40, 3) and train['valid'].tolist() == [[0, 0, 30, 40]]
  # Evaluation mode: the keys and behaviour evaluation code relies on.
  ev = next(_pipeline(src, image_size=14))
  assert sorted(ev) == ['image', 'index', 'label'] and ev['image'].shape == (1, 14, 14, 3)
  full = np.asarray(Image.open(src.files[0]))
  np.testing.assert_array_equal(ev['image'][0], data.resize_and_crop(full, 14))
  # crop_fraction 0.875: shorter side to 16, centre 14 x 14 of it.
  ev = next(_pipeline(src, image_size=14, crop_fraction=0.875))
  resized = np.asarray(Image.fromarray(full).resize((21, 16), Image.BILINEAR))
  np.testing.assert_array_equal(ev['image'][0], resized[1:15, 3:17])
  images, _ = data.load_arrays(src, 14, crop_fraction=0.875)
  np.testing.assert_array_equal(images[0], ev['image'][0])
  for bad in (0.0, 1.5):
    with pytest.raises(UserError, match='crop_fraction'):
      _pipeline(src, crop_fraction=bad)
  with pytest.raises(UserError, match='canvas_size'):
    _pipeline(src, canvas_size=0)


def test_folder_draft_for_a_canvas_keeps_the_longer_side(tmp_path):
  d = tmp_path / 'train' / 'a'
  d.mkdir(parents=True)
  Image.new('RGB', (400, 200), (10, 200, 30)).save(d / 'wide.jpg')
  src = data.FolderSource(str(tmp_path), 'train')
  # 'shorter' must keep 200 >= 64 (no reduction possible beyond 1/2: 200x100 > 64).
  assert src.for_image_size(64)[0]['image'].shape == (100, 200, 3)
  # 'longer' only needs 400 -> >= 64: 1/4 scale (100 x 50) still covers a 64 canvas.
  img = src.for_image_size(64, fit='longer')[0]['image']
  assert img.shape == (50, 100, 3)
  batch = next(_pipeline(src, canvas_size=64))
  assert batch['valid'].tolist() == [[0, 0, 32, 64]]


# ---------------------------------------------------------------------------------------
# Device side: crops of the whole image.


def test_every_column_of_a_500x375_image_appears_in_some_view(tmp_path):
  src = _photo_folder(tmp_path)
  batch = next(_pipeline(src, canvas_size=64))
  assert batch['valid'].tolist() == [[0, 0, 48, 64]]
  views, boxes = map(np.asarray, _views_of_one(batch, 500, CROP_ONLY, 8))
  # Boxes are in the original image's coordinates; their union covers every column.
  lo = np.minimum(boxes[:, 1], boxes[:, 3]) * 500
  hi = np.maximum(boxes[:, 1], boxes[:, 3]) * 500
  cols = np.arange(500) + 0.5
  covered = ((lo[:, None] <= cols) & (cols <= hi[:, None])).any(0)
  assert covered.all(), np.flatnonzero(~covered)
  assert (lo >= -1e-4).all() and (hi <= 500 + 1e-4).all()
  # And the pixels say the same: red is the column, so views reach both outer edges
  # (up to half an output pixel of a small crop), which a centre crop of the 375 px
  # middle never shows (red in [0.125, 0.875] there).
  red = views[..., 0]
  assert red.min() < 0.05 and red.max() > 0.95
  # Green is the row: the padding (repeated last row) adds nothing beyond the image.
  assert views[..., 1].max() <= 1 + 1e-6


def _torchvision_areas(rng, n, height, width, scale, ratio, attempts=10):
  """Area fractions of torchvision's RandomResizedCrop.get_params, continuous sizes."""
  out = np.empty(n)
  log_r = np.log(ratio)
  for i in range(n):
    for _ in range(attempts):
      area = rng.uniform(*scale) * height * width
      aspect = math.exp(rng.uniform(*log_r))
      w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
      if w <= width and h <= height:
        out[i] = w * h / (height * width)
        break
    else:
      in_ratio = width / height
      if in_ratio < min(ratio):
        w, h = width, width / min(ratio)
      elif in_ratio > max(ratio):
        w, h = height * max(ratio), height
      else:
        w, h = width, height
      out[i] = w * h / (height * width)
  return out


@pytest.mark.parametrize('scale', [(0.1, 0.5), (0.08, 1.0)])
def test_crop_area_is_a_fraction_of_the_original_image(scale):
  # A 500x375-shaped image (4:3) in the top-left 6 x 8 of an 8 x 8 canvas (tiny, since
  # only the boxes are looked at).
  canvas = jnp.zeros((8, 8, 3), jnp.uint8)
  valid = jnp.array([0, 0, 6, 8], jnp.int32)
  cfg = CROP_ONLY._replace(crop_scale=scale)
  n = 3000
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(n))
  _, boxes = jax.jit(jax.vmap(
      lambda k: augment.view_augment_single(k, canvas, cfg, 2, valid)))(keys)
  boxes = np.asarray(boxes, np.float64)
  area = (boxes[:, 2] - boxes[:, 0]) * np.abs(boxes[:, 3] - boxes[:, 1])
  if scale == (0.1, 0.5):
    # Every candidate fits a 4:3 image at these scales: exactly uniform.
    assert stats.kstest(area, stats.uniform(0.1, 0.4).cdf).pvalue > 1e-3
  else:
    reference = _torchvision_areas(np.random.default_rng(0), 20000, 375, 500, scale,
                                   (3 / 4, 4 / 3))
    assert stats.ks_2samp(area, reference).pvalue > 1e-3
  # Aspect ratios (in pixels of the original) stay in range.
  aspect = np.abs(boxes[:, 3] - boxes[:, 1]) * 500 / ((boxes[:, 2] - boxes[:, 0]) * 375)
  assert aspect.min() > 3 / 4 - 1e-3 and aspect.max() < 4 / 3 + 1e-3


def test_views_and_multi_crop_stay_inside_the_valid_box():
  # Image 0 (dark) in the top half, bright padding below: views of the valid region are
  # dark, apart from the filter's reach of a pixel across the border (a crop of the
  # whole canvas would average about 0.5).
  canvas = jnp.zeros((2, 16, 16, 3), jnp.uint8).at[:, 8:].set(255)
  batch = {'image': canvas, 'valid': jnp.array([[0, 0, 8, 16]] * 2, jnp.int32)}
  crops = ((8, 2, (0.3, 1.0)),)

  @jax.jit
  def views(key, b):
    single = augment.view_augment(key, b, CROP_ONLY, 8)
    multi = augment.multi_crop(key, b, crops, CROP_ONLY, return_boxes=True)
    return single, multi

  (single, boxes), (multi, multi_boxes) = views(jax.random.PRNGKey(0), batch)
  assert multi[0].shape == (4, 8, 8, 3)
  assert float(jnp.mean(single)) < 0.1 and float(jnp.mean(multi[0])) < 0.1
  for bx in [boxes] + multi_boxes:
    assert float(jnp.min(bx)) >= -1e-6 and float(jnp.max(bx)) <= 1 + 1e-6


def test_eval_view_is_the_centre_of_the_valid_region():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (8, 16, 3)).astype(np.uint8)
  canvas = np.pad(img, ((0, 8), (0, 0), (0, 0)), mode='edge')[None]
  batch = {'image': jnp.asarray(canvas), 'valid': jnp.array([[0, 0, 8, 16]], jnp.int32)}
  out, normed, half = jax.jit(lambda b: (
      augment.eval_view(b, 8, normalize=False), augment.eval_view(b, 8),
      augment.eval_view(b, 4, crop_fraction=0.5, normalize=False)))(batch)
  np.testing.assert_allclose(out[0], img[:, 4:12] / 255.0, atol=1e-6)
  np.testing.assert_allclose(normed[0], augment.normalize(img[:, 4:12] / 255.0), atol=1e-5)
  np.testing.assert_allclose(half[0], img[2:6, 6:10] / 255.0, atol=1e-6)


# ---------------------------------------------------------------------------------------
# CIFAR-sized data (32 px images, source_size = image_size) behaves exactly as before.

# Recorded with the code before canvases existed (commit a733fa0): jit(view_augment)
# with key PRNGKey(0) and CIFAR_CFG on ShapesSource('train', 32)[0:4].
CIFAR_CFG = augment.view_params(augment.default_view_config(jitter_strength=0.0,
                                                            grayscale_prob=0.5))
_OLD_BOXES = np.array([
    [0.2840668, 0.9195521, 0.8498237, 0.31840625],
    [0.036911875, 0.92598, 0.82041305, 0.14419955],
    [0.04989182, 0.18524478, 0.47492033, 0.5224996],
    [0.015414187, 0.084894076, 0.97806734, 0.8821507]], np.float32)
_OLD_SUMS = np.array([-534.0633, -1359.2012, -1675.8992, -733.94135], np.float32)
_OLD_PIXELS = np.array([
    [-0.910946, -1.11774, -0.82595736],
    [-1.154492, 0.012605184, -0.7761219],
    [-0.9821517, -1.6196322, -0.24306099],
    [-0.65010446, -0.7176496, 0.26962984]], np.float32)


def test_cifar_sized_input_gives_exactly_the_old_views():
  src = data.ShapesSource('train', image_size=32, length=8)
  batch = next(_pipeline(src, batch_size=4, image_size=32, canvas_size=32))
  old_style = next(_pipeline(src, batch_size=4, image_size=32))
  np.testing.assert_array_equal(batch['image'], old_style['image'])
  assert batch['valid'].tolist() == [[0, 0, 32, 32]] * 4
  batch = {k: jnp.asarray(v) for k, v in batch.items()}

  @jax.jit
  def both(key, b):
    return (augment.view_augment(key, b, CIFAR_CFG, 32),
            augment.view_augment(key, b['image'], CIFAR_CFG, 32))

  (new_views, new_boxes), (plain_views, plain_boxes) = both(jax.random.PRNGKey(0), batch)
  # Bit-equal to the array path (no valid boxes), and equal to what the old code gave.
  np.testing.assert_array_equal(new_views, plain_views)
  np.testing.assert_array_equal(new_boxes, plain_boxes)
  np.testing.assert_allclose(new_boxes, _OLD_BOXES, rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new_views).sum(axis=(1, 2, 3)), _OLD_SUMS, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(new_views)[:, 5, 7], _OLD_PIXELS, atol=1e-5)
  # The un-augmented path is the old normalize(to_float(image)), bit for bit.
  np.testing.assert_array_equal(
      augment.eval_view(batch, 32), augment.normalize(augment.to_float(batch['image'])))


def test_trainer_feeds_canvases_larger_than_the_training_size(tmp_path, tiny):
  # 40x24 photos, 16 px views from a 24 px canvas: the trainer's pipeline, dummy batch
  # and sharding all carry `valid`, and the online probe's eval_view resizes to 16.
  from selfsup.trainer import Trainer  # pylint: disable=g-import-not-at-top
  for cls in 'ab':
    d = tmp_path / 'train' / cls
    d.mkdir(parents=True)
    for k in range(4):
      Image.new('RGB', (40, 24), (60 * k, 100, 0 if cls == 'a' else 200)).save(d / f'{k}.png')
  c = tiny('rotation', batch_size=8, image_size=16)
  c.data.source = f'folder:{tmp_path}'
  c.data.source_size = 24
  trainer = Trainer(c, None)
  batch = next(trainer.iterator)
  assert batch['image'].shape == (8, 24, 24, 3)
  assert batch['valid'].tolist() == [[0, 0, 14, 24]] * 8
  metrics, _ = trainer.train_step(batch)
  assert np.isfinite(float(metrics['rotation/loss']))
  assert np.isfinite(float(metrics['probe/loss']))
  c.data.source_size = 8
  with pytest.raises(UserError, match='source_size=8 is below image_size=16'):
    Trainer(c, None)
