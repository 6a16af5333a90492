"""Per-example random image augmentation that runs on the device inside the jitted step.

The host only decodes, resizes to a fixed size and batches uint8 images; every random
transform lives here and runs per example from a PRNG key (see docs/design.md, "The data
path"). That keeps hosts from being the bottleneck and makes runs reproducible: the view
of example i depends only on (key, i, image_i), never on the other examples of the batch
or on how the batch is sharded.

Conventions:
  * Single-image functions take `(key, image, ...)` with `image` float32 (H, W, 3) in
    [0, 1] and return the same shape and range (crops return their new size).
  * Batched helpers (`view_augment`, `multi_crop`, `eval_view`) take a uint8 or float
    (B, H, W, 3) batch, or the batch dict itself (its `image` and, when present, `valid`),
    and one key, derive one key per example and `jax.vmap` the single-image function.
  * Training batches are canvases: the host fits the whole image into a fixed square
    canvas, padded (see `selfsup.data.pipeline.fit_to_canvas`), and `valid` (B, 4) int32
    holds each image's box (y0, x0, y1, x1) in canvas pixels. Crops are sampled inside
    it, with scale and aspect ratio relative to the image, not to the canvas, and the
    boxes functions return are normalised to the image (the valid region). Without
    `valid` the whole array is the image (evaluation batches, CIFAR-sized data).
  * All sizes are static Python ints, so everything is jittable; probabilities and
    strengths are normally static Python floats (an op whose probability or strength is a
    static 0 is skipped at trace time) but may also be traced scalars.

The colour ops come from dm-pix; only the random resized crop and the bookkeeping of crop
boxes (for PixPro) are written by hand.

References:
  * SimCLR: Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
    Representations", arXiv:2002.05709, Appendix A; augmentation code in
    github.com/google-research/simclr (data_util.py).
  * Random resized crop: Szegedy et al. 2015, "Going Deeper with Convolutions"; sampling
    as in torchvision.transforms.RandomResizedCrop.
  * SwAV multi-crop: Caron et al. 2020, "Unsupervised Learning of Visual Features by
    Contrasting Cluster Assignments", arXiv:2006.09882, Section 3.2.
  * PixPro crop boxes: Xie et al. 2021, "Propagate Yourself", arXiv:2011.10043;
    github.com/zdaxie/PixPro (transform_coord.py).
"""

from collections.abc import Mapping, Sequence
import math
from typing import Any, NamedTuple

import dm_pix as pix
import jax
import jax.numpy as jnp
import ml_collections

from selfsup.errors import UserError

# Channel statistics of ImageNet in [0, 1] RGB (the torchvision convention).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------
# Small helpers.


def _is_static(x, value) -> bool:
  """True when x is a Python number equal to value: the op can be skipped when tracing."""
  return isinstance(x, (int, float)) and not isinstance(x, bool) and x == value


def _uniforms(key, n: int) -> jax.Array:
  """n uniforms in [0, 1) from one PRNG call.

  Each op draws all its random numbers at once instead of splitting its key per number:
  every split / draw is a separate threefry hash in the compiled program, and a view
  made of a dozen of them compiles several times slower on CPU for no benefit.
  """
  return jax.random.uniform(key, (n,), jnp.float32)


def _apply_with_prob(u, prob, fn, image):
  """Returns fn(image) when the uniform u < prob, else image (per example under vmap).

  `u < prob` is what `jax.random.bernoulli` computes. A `jnp.where` rather than
  `lax.cond`: under vmap a cond with a batched predicate turns into a select over both
  branches anyway.
  """
  if _is_static(prob, 0):
    return image
  if _is_static(prob, 1):
    return fn(image)
  return jnp.where(u < prob, fn(image), image)


def to_float(images) -> jax.Array:
  """Converts uint8 (or any integer) images in [0, 255] to float32 in [0, 1].

  Floating inputs are assumed to be in [0, 1] already and are only cast to float32.
  """
  images = jnp.asarray(images)
  if jnp.issubdtype(images.dtype, jnp.integer):
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
  """Standardises the channels of float images in [0, 1]: (x - mean) / std."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (jnp.asarray(images, jnp.float32) - mean) / std


_normalize = normalize  # For functions whose `normalize` argument shadows it.


# ---------------------------------------------------------------------------------------
# Crops and boxes.
#
# A box is (y0, x0, y1, x1) in the input image's normalised coordinates: (0, 0) is the
# top-left corner of the image and (1, 1) the bottom-right one (pixel edges, not centres).
# A box with x0 > x1 describes a horizontally mirrored view: its left column comes from
# x0. That is how a flip is recorded (see `flip_box`), so that for every box the
# original-image position of output pixel (i, j) is given by `box_coordinates`.


def crop_and_resize(image, box, out_size: int) -> jax.Array:
  """Crops `box` (normalised, may be fractional) out of `image` and resizes it.

  Bilinear, with antialiasing when the crop is downscaled (triangle filter widened by the
  downscale factor), so large crops shrunk to small views do not alias.

  Why `jax.image.scale_and_translate` and not a sampling grid + `map_coordinates`: it
  crops and resizes in one op with a static output size and traced (per-example) scale
  and offset, it antialiases, and it is computed as two small dense resampling matrices
  (H x out and W x out) contracted with the image by einsum, i.e. matrix multiplies,
  which are fast on GPU/TPU and batch cleanly under vmap. `map_coordinates` is a 4-tap
  gather per output pixel with no antialiasing (aliasing for SwAV's small crops of large
  images), and gathers are slow on TPU.

  The antialiasing filter reads the input around the box, so when downscaling, pixels
  just outside the box contribute a little to the border of the view (as for a crop of a
  continuous image); torchvision instead crops first and resizes within the crop.

  Args:
    image: float (H, W, C).
    box: (4,) (y0, x0, y1, x1) normalised; x0 > x1 gives the mirrored crop.
    out_size: side of the square output (static).

  Returns:
    float32 (out_size, out_size, C); values stay within the input's range because the
    resampling weights are non-negative and sum to one.
  """
  image = jnp.asarray(image, jnp.float32)
  h, w, c = image.shape
  box = jnp.asarray(box, jnp.float32)
  y0, y1 = jnp.minimum(box[0], box[2]), jnp.maximum(box[0], box[2])
  x0, x1 = jnp.minimum(box[1], box[3]), jnp.maximum(box[1], box[3])
  # Guard against degenerate boxes (a zero scale would divide by zero in the weights).
  eps = 1e-6
  crop_h = jnp.maximum((y1 - y0) * h, eps)
  crop_w = jnp.maximum((x1 - x0) * w, eps)
  # scale_and_translate maps input coordinate u (pixel centres at j + 0.5) to output
  # coordinate u * scale + translation; we want [y0 * H, y1 * H] -> [0, out_size].
  scale = jnp.stack([out_size / crop_h, out_size / crop_w])
  translation = jnp.stack([-y0 * h, -x0 * w]) * scale
  out = jax.image.scale_and_translate(
      image, (out_size, out_size, c), (0, 1), scale, translation,
      method="linear", antialias=True)
  mirrored = box[1] > box[3]
  return jnp.where(mirrored, out[:, ::-1], out)


def box_coordinates(box, height: int, width: int | None = None) -> jax.Array:
  """Original-image positions of the pixel centres of a view cut out by `box`.

  This is what PixPro needs to pair pixels of two views: for a flipped view (x0 > x1, see
  `flip_box`) the columns run from right to left in the original image.

  Args:
    box: (..., 4) boxes (y0, x0, y1, x1), normalised.
    height: rows of the view's grid (e.g. a feature map's height).
    width: columns of the grid; defaults to height.

  Returns:
    (..., height, width, 2) normalised (y, x) positions in the original image.
  """
  width = height if width is None else width
  box = jnp.asarray(box, jnp.float32)
  fy = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height
  fx = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width
  y = box[..., 0, None] + fy * (box[..., 2, None] - box[..., 0, None])  # (..., height)
  x = box[..., 1, None] + fx * (box[..., 3, None] - box[..., 1, None])  # (..., width)
  yy = jnp.broadcast_to(y[..., :, None], y.shape[:-1] + (height, width))
  xx = jnp.broadcast_to(x[..., None, :], x.shape[:-1] + (height, width))
  return jnp.stack([yy, xx], axis=-1)


def sample_crop_box(key, height, width, scale=(0.08, 1.0),
                    ratio=(3 / 4, 4 / 3), num_attempts: int = 10) -> jax.Array:
  """Samples a random-resized-crop box (torchvision's rule, without Python loops).

  Draws `num_attempts` candidates at once: area fraction uniform in `scale`, aspect ratio
  (width / height, in pixels) log-uniform in `ratio`, position uniform among the positions
  that fit. The first candidate that fits inside the image wins; when none fits, the
  largest centred crop whose aspect ratio is within `ratio` is used (torchvision's
  fallback). Boxes are continuous (not snapped to whole pixels): the crop is resampled
  anyway, and this keeps the area fraction exactly uniform in `scale`.

  Args:
    key: PRNG key.
    height, width: the image's size in pixels; Python numbers or traced scalars (the
      valid region of a canvas differs per example). Only their ratio matters.
    scale: range of the crop's area as a fraction of the image's area.
    ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
    num_attempts: candidates drawn before falling back to a centred crop.

  Returns:
    (4,) float32 box (y0, x0, y1, x1) in normalised coordinates, y0 < y1 and x0 < x1.
  """
  n = num_attempts
  u = _uniforms(key, 4 * n).reshape(4, n)
  area = scale[0] + (scale[1] - scale[0]) * u[0]
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_lo + (log_hi - log_lo) * u[1])
  # In pixels: w * h = area * H * W and w / h = aspect; normalised by W and H.
  crop_w = jnp.sqrt(area * aspect * height / width)
  crop_h = jnp.sqrt(area / aspect * width / height)
  fits = (crop_w <= 1.0) & (crop_h <= 1.0)
  y0 = u[2] * (1.0 - crop_h)
  x0 = u[3] * (1.0 - crop_w)
  candidates = jnp.stack([y0, x0, y0 + crop_h, x0 + crop_w], axis=-1)
  first = jnp.argmax(fits)  # Index of the first True (0 when none fits).

  # Fallback: the whole image, cut to the nearest allowed aspect ratio. Written with
  # jnp.where so that it also works for a traced (per-example) image size.
  in_ratio = jnp.asarray(width, jnp.float32) / jnp.asarray(height, jnp.float32)
  fb_w = jnp.where(in_ratio > max(ratio), max(ratio) / in_ratio, 1.0)
  fb_h = jnp.where(in_ratio < min(ratio), in_ratio / min(ratio), 1.0)
  fallback = jnp.stack([(1 - fb_h) / 2, (1 - fb_w) / 2, (1 + fb_h) / 2, (1 + fb_w) / 2])
  return jnp.where(jnp.any(fits), candidates[first], fallback).astype(jnp.float32)


def _valid_size(image, valid):
  """(height, width) of the image inside a canvas: static ints without `valid`."""
  if valid is None:
    return image.shape[0], image.shape[1]
  valid = jnp.asarray(valid, jnp.float32)
  return valid[2] - valid[0], valid[3] - valid[1]


def to_canvas_box(box, valid, height: int, width: int) -> jax.Array:
  """Maps a box normalised to the valid region into the canvas's normalised coordinates.

  Args:
    box: (..., 4) (y0, x0, y1, x1) normalised to the image (the valid region).
    valid: (..., 4) the valid region (y0, x0, y1, x1) in canvas pixels, or None (the
      canvas is the image: the box is returned unchanged).
    height, width: the canvas size in pixels.
  """
  box = jnp.asarray(box, jnp.float32)
  if valid is None:
    return box
  valid = jnp.asarray(valid, jnp.float32)
  size = jnp.stack([height, width, height, width]).astype(jnp.float32)
  origin = valid[..., jnp.array([0, 1, 0, 1])] / size
  extent = (valid[..., jnp.array([2, 3, 2, 3])] - valid[..., jnp.array([0, 1, 0, 1])]) / size
  return origin + box * extent


def random_resized_crop(key, image, out_size: int, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3), num_attempts: int = 10, valid=None):
  """Random resized crop (Inception / SimCLR / torchvision RandomResizedCrop).

  Args:
    key: PRNG key.
    image: float (H, W, 3) in [0, 1]: the image, or a canvas holding it in `valid`.
    out_size: side of the square output (static).
    scale: range of the crop's area as a fraction of the image's area.
    ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
    num_attempts: candidates drawn before falling back to a centred crop.
    valid: (4,) the image's box (y0, x0, y1, x1) in canvas pixels, or None when the whole
      array is the image. Scale and ratio then refer to the valid region.

  Returns:
    (crop, box): crop float32 (out_size, out_size, 3) in [0, 1]; box (4,) float32
    (y0, x0, y1, x1) of the crop in the image's normalised coordinates (the valid
    region's, not the canvas's).
  """
  h, w = _valid_size(image, valid)
  box = sample_crop_box(key, h, w, scale, ratio, num_attempts)
  canvas_box = to_canvas_box(box, valid, image.shape[0], image.shape[1])
  return crop_and_resize(image, canvas_box, out_size), box


def center_crop_resize(image, out_size: int, crop_fraction: float = 1.0,
                       valid=None) -> jax.Array:
  """Central square crop of side `crop_fraction * min(H, W)`, resized to out_size.

  crop_fraction = 1 takes the largest central square; 0.875 is the usual ImageNet
  evaluation crop (224 of 256). With `valid` (the image's box in canvas pixels) H and W
  are the valid region's and the square is centred in it.
  """
  h, w = _valid_size(image, valid)
  side = crop_fraction * jnp.minimum(h, w) if valid is not None else crop_fraction * min(h, w)
  bh, bw = side / h, side / w
  box = jnp.stack([(1 - bh) / 2, (1 - bw) / 2, (1 + bh) / 2, (1 + bw) / 2]).astype(jnp.float32)
  return crop_and_resize(image, to_canvas_box(box, valid, image.shape[0], image.shape[1]),
                         out_size)


def _images_and_valid(images):
  """(images, valid or None) from a batch dict (`image`, optional `valid`) or an array."""
  if isinstance(images, Mapping):
    return images["image"], images.get("valid")
  return images, None


def eval_view(images, out_size: int | None = None, crop_fraction: float = 1.0,
              normalize: bool = True) -> jax.Array:
  """The un-augmented view of a batch: what encoders see when nothing is random.

  This is the one evaluation preprocessing (features for probes, the online probe, an
  objective's `augment=False` path): the central square of each image (side
  `crop_fraction` of its shorter side), resized to out_size, in [0, 1], standardised
  with the ImageNet channel statistics unless normalize=False.

  Args:
    images: (B, H, W, 3) uint8 or float in [0, 1], or a batch dict whose `image` is that
      and whose optional `valid` (B, 4) gives each image's box in canvas pixels.
    out_size: side of the output (static); None keeps H (then H must equal W).
    crop_fraction: side of the central square as a fraction of the shorter side.
    normalize: standardise the channels.

  Returns:
    float32 (B, out_size, out_size, 3). An array that already is the square image at
    out_size (evaluation batches, CIFAR-sized training data) is passed through without
    resampling, exactly as before canvases existed.
  """
  images, valid = _images_and_valid(images)
  h, w = images.shape[1], images.shape[2]
  out_size = h if out_size is None else out_size
  if valid is None and h == w == out_size and crop_fraction == 1:
    x = to_float(images)
  else:
    valid_rows = (jnp.zeros((images.shape[0], 4), jnp.int32) + jnp.array([0, 0, h, w])
                  if valid is None else valid)
    x = jax.vmap(lambda im, v: center_crop_resize(to_float(im), out_size, crop_fraction, v))(
        images, valid_rows)
  return _normalize(x) if normalize else x


def random_flip(key, image, prob: float = 0.5):
  """Horizontal flip with probability prob.

  Hand-written around `pix.flip_left_right` because `pix.random_flip_left_right` does not
  say whether it flipped, and the crop box must follow the pixels (PixPro).

  Returns:
    (image, flipped) with flipped a bool scalar.
  """
  if _is_static(prob, 0):
    return image, jnp.zeros((), jnp.bool_)
  flipped = jax.random.uniform(key, ()) < prob
  return jnp.where(flipped, pix.flip_left_right(image), image), flipped


def flip_box(box, flipped) -> jax.Array:
  """Records a horizontal flip of a view in its box by swapping the x bounds.

  After a flip, the view's left column comes from the original image at x1 and its right
  column from x0, so the box becomes (y0, x1, y1, x0): still in original-image
  coordinates, and `box_coordinates` / `crop_and_resize` of the new box give the flipped
  view's pixel positions / pixels. This is PixPro's convention (RandomHorizontalFlipCoord
  swaps coord[0] and coord[2]). Note it is not (y0, 1 - x1, y1, 1 - x0): that is the same
  box in the coordinates of a mirrored original, which would pair the wrong pixels when
  the other view is not flipped.

  Args:
    box: (..., 4) boxes (y0, x0, y1, x1).
    flipped: bool, broadcastable to box[..., 0].

  Returns:
    (..., 4) boxes; unchanged where not flipped.
  """
  box = jnp.asarray(box)
  swapped = box[..., jnp.array([0, 3, 2, 1])]
  return jnp.where(jnp.asarray(flipped)[..., None], swapped, box)


# ---------------------------------------------------------------------------------------
# Colour and pixel ops.


def adjust_brightness(image, factor) -> jax.Array:
  """Multiplicative brightness (SimCLR v1 / torchvision), clipped to [0, 1].

  dm-pix's `adjust_brightness` is additive (TF's), hence this one-liner.
  """
  return jnp.clip(image * jnp.asarray(factor, image.dtype), 0.0, 1.0)


def color_jitter(key, image, brightness: float, contrast: float, saturation: float,
                 hue: float, prob: float = 0.8, random_order: bool = True) -> jax.Array:
  """SimCLR colour jitter, applied with probability prob.

  Factors: brightness uniform in [max(0, 1 - b), 1 + b] (multiplicative), contrast in
  [max(0, 1 - c), 1 + c], saturation in [max(0, 1 - s), 1 + s], hue shift uniform in
  [-h, h] (fraction of the colour wheel, h <= 0.5). The image is clipped to [0, 1] after
  every op, as in SimCLR's `color_jitter_rand`. With random_order the four ops run in a
  random permutation per example: four steps, each selecting its op by the permutation
  index. A strength that is a static 0 turns its op into the identity.

  Args:
    key: PRNG key.
    image: float (H, W, 3) in [0, 1].
    brightness, contrast, saturation, hue: strengths b, c, s, h.
    prob: probability of jittering at all.
    random_order: whether to permute the four ops per example.

  Returns:
    float32 (H, W, 3) in [0, 1].
  """
  skip_b, skip_c = _is_static(brightness, 0), _is_static(contrast, 0)
  skip_s, skip_h = _is_static(saturation, 0), _is_static(hue, 0)
  image = jnp.asarray(image, jnp.float32)
  if skip_b and skip_c and skip_s and skip_h:
    return image

  # u[0]: apply or not; u[1:5]: the four factors; u[5:9]: the order.
  u = _uniforms(key, 9)

  def factor(v, strength):
    lo = jnp.maximum(0.0, 1.0 - strength)
    return lo + (1.0 + strength - lo) * v

  f_b = factor(u[1], brightness)
  f_c = factor(u[2], contrast)
  f_s = factor(u[3], saturation)
  d_h = hue * (2.0 * u[4] - 1.0)

  def clip(x):
    return jnp.clip(x, 0.0, 1.0)

  def fixed_order(x):
    if not skip_b:
      x = adjust_brightness(x, f_b)
    if not skip_c:
      x = clip(pix.adjust_contrast(x, f_c))
    if not skip_s:
      x = clip(pix.adjust_saturation(x, f_s))
    if not skip_h:
      x = clip(pix.adjust_hue(x, d_h))
    return x

  def hsv_step(x, op):
    # Saturation (op 2) or hue (op 3) in one HSV round trip: the inactive one gets the
    # neutral factor 1 / shift 0. Under vmap a `lax.switch` on a per-example index
    # evaluates every branch and selects, so sharing the HSV conversion between the two
    # halves the work of the most expensive part of the jitter.
    # Equal to pix.adjust_saturation / pix.adjust_hue for inputs in [0, 1].
    h, s, v = jnp.moveaxis(pix.rgb_to_hsv(x), -1, 0)
    s = jnp.clip(s * jnp.where(op == 2, f_s, 1.0), 0.0, 1.0)
    h = (h + jnp.where(op == 3, d_h, 0.0)) % 1.0
    return clip(pix.hsv_to_rgb(jnp.stack([h, s, v], axis=-1)))

  def random_step(x, op):
    outs = [
        x if skip_b else adjust_brightness(x, f_b),
        x if skip_c else clip(pix.adjust_contrast(x, f_c)),
        x if (skip_s and skip_h) else hsv_step(x, op),
    ]
    return jax.lax.select_n(jnp.minimum(op, 2), *outs)

  def jitter(x):
    if not random_order:
      return fixed_order(x)
    # argsort of uniforms is a uniform permutation with a single sort (ties have
    # probability ~0); jax.random.permutation does several rounds of sorting.
    order = jnp.argsort(u[5:9])
    for step in range(4):
      x = random_step(x, order[step])
    return x

  return _apply_with_prob(u[0], prob, jitter, image)


def random_grayscale(key, image, prob: float) -> jax.Array:
  """Replaces the image by its luma (Rec. 601, as SimCLR's TF code) in all 3 channels."""
  return _apply_with_prob(jax.random.uniform(key, ()), prob,
                          lambda x: pix.rgb_to_grayscale(x, keep_dims=True), image)


def blur_kernel_size(side: int, kernel_size_fraction: float = 0.1) -> int:
  """Odd Gaussian kernel size, about `fraction` of the image side, at least 3 (static).

  As SimCLR: kernel = side // 10, made odd; the minimum of 3 keeps tiny images blurrable.
  """
  radius = max(int(side * kernel_size_fraction) // 2, 1)
  return 2 * radius + 1


def random_gaussian_blur(key, image, prob: float, sigma=(0.1, 2.0),
                         kernel_size_fraction: float = 0.1) -> jax.Array:
  """Gaussian blur with probability prob, sigma uniform in `sigma` (pixels).

  The kernel size is static (about 10% of the shorter side, odd). The image is
  reflect-padded and blurred with VALID padding, because dm-pix's SAME padding pads with
  zeros and would darken the borders (torchvision also reflects).
  """
  u = _uniforms(key, 2)
  size = blur_kernel_size(min(image.shape[0], image.shape[1]), kernel_size_fraction)
  radius = size // 2
  s = sigma[0] + (sigma[1] - sigma[0]) * u[1]

  def blur(x):
    padded = jnp.pad(x, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    return pix.gaussian_blur(padded, s, size, padding="VALID")

  return _apply_with_prob(u[0], prob, blur, jnp.asarray(image, jnp.float32))


def random_solarize(key, image, prob: float, threshold: float = 0.5) -> jax.Array:
  """Inverts the pixels above `threshold` with probability prob (BYOL-style solarize)."""
  return _apply_with_prob(
      jax.random.uniform(key, ()), prob, lambda x: pix.solarize(x, threshold), image)


# ---------------------------------------------------------------------------------------
# Config-driven views.


class ViewParams(NamedTuple):
  """Static parameters of one view, read from a config by `view_params`.

  Hashable, so it can be a static argument of `jax.jit`; accepted wherever a view config
  is.
  """
  crop_scale: tuple
  crop_ratio: tuple
  flip_prob: float
  jitter_strength: float
  jitter_prob: float
  grayscale_prob: float
  blur_prob: float
  blur_sigma: tuple
  solarize_prob: float
  solarize_threshold: float
  normalize: bool


_DEFAULTS = dict(
    crop_scale=(0.08, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    flip_prob=0.5,
    jitter_strength=0.5,
    jitter_prob=0.8,
    grayscale_prob=0.2,
    blur_prob=0.0,
    blur_sigma=(0.1, 2.0),
    solarize_prob=0.0,
    solarize_threshold=0.5,
    normalize=True,
)


def default_view_config(**overrides) -> ml_collections.ConfigDict:
  """SimCLR CIFAR view augmentation (Chen et al. 2020, Appendix B.9): no blur, s = 0.5.

  Fields: crop_scale, crop_ratio, flip_prob, jitter_strength (s: brightness, contrast,
  saturation 0.8 s, hue 0.2 s), jitter_prob, grayscale_prob, blur_prob, blur_sigma,
  solarize_prob, solarize_threshold, normalize. For SimCLR ImageNet use
  `jitter_strength=1.0, blur_prob=0.5`.
  """
  unknown = set(overrides) - set(_DEFAULTS)
  if unknown:
    raise UserError(f"unknown view augmentation field(s) {sorted(unknown)}; valid "
                    f"fields: {', '.join(sorted(_DEFAULTS))}")
  cfg = dict(_DEFAULTS)
  cfg.update(overrides)
  cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
  return ml_collections.ConfigDict(cfg)


def view_params(cfg, **overrides) -> ViewParams:
  """Reads and validates a view config: ConfigDict, mapping or object with attributes.

  Missing fields take the `default_view_config` values; invalid values raise a
  `UserError` that names the field and what is valid.
  """
  def get(name):
    if name in overrides:
      return overrides[name]
    if isinstance(cfg, Mapping):
      return cfg.get(name, _DEFAULTS[name])
    return getattr(cfg, name, _DEFAULTS[name])

  values = {name: get(name) for name in _DEFAULTS}
  for name in ("crop_scale", "crop_ratio", "blur_sigma"):
    v = tuple(float(x) for x in values[name])
    if len(v) != 2 or not 0 < v[0] <= v[1]:
      raise UserError(f"view augmentation {name}={values[name]!r} must be a pair "
                      "(low, high) with 0 < low <= high")
    values[name] = v
  if values["crop_scale"][1] > 1:
    raise UserError(f"view augmentation crop_scale={values['crop_scale']!r}: the area "
                    "fraction must be at most 1")
  for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob",
               "solarize_prob"):
    p = float(values[name])
    if not 0 <= p <= 1:
      raise UserError(f"view augmentation {name}={p} must be a probability in [0, 1]")
    values[name] = p
  if float(values["jitter_strength"]) < 0:
    raise UserError(f"view augmentation jitter_strength={values['jitter_strength']} "
                    "must be >= 0")
  values["jitter_strength"] = float(values["jitter_strength"])
  values["solarize_threshold"] = float(values["solarize_threshold"])
  values["normalize"] = bool(values["normalize"])
  return ViewParams(**values)


def view_augment_single(key, image, cfg, out_size: int, valid=None):
  """One augmented view of one image: crop, flip, jitter, grayscale, blur, solarize.

  The order is SimCLR's (crop + flip, then colour distortion, then blur); solarize comes
  last as in BYOL.

  Args:
    key: PRNG key.
    image: (H, W, 3) uint8 or float in [0, 1]: the image or a canvas holding it.
    cfg: view config (see `default_view_config`) or a `ViewParams`.
    out_size: side of the square view (static).
    valid: (4,) the image's box in canvas pixels, or None (the whole array is the image).

  Returns:
    (view, box): float32 (out_size, out_size, 3), normalised when cfg.normalize (else in
    [0, 1]); box (4,) in original-image coordinates with flips recorded (`flip_box`).
  """
  p = cfg if isinstance(cfg, ViewParams) else view_params(cfg)
  k_crop, k_flip, k_jit, k_gray, k_blur, k_sol = jax.random.split(key, 6)
  x, box = random_resized_crop(k_crop, to_float(image), out_size, p.crop_scale,
                               p.crop_ratio, valid=valid)
  x, flipped = random_flip(k_flip, x, p.flip_prob)
  box = flip_box(box, flipped)
  s = p.jitter_strength
  x = color_jitter(k_jit, x, 0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, prob=p.jitter_prob)
  x = random_grayscale(k_gray, x, p.grayscale_prob)
  x = random_gaussian_blur(k_blur, x, p.blur_prob, p.blur_sigma)
  x = random_solarize(k_sol, x, p.solarize_prob, p.solarize_threshold)
  if p.normalize:
    x = normalize(x)
  return x, box


def per_example_keys(key, batch_size: int) -> jax.Array:
  """One key per example: fold_in(key, i).

  fold_in rather than split(key, B) so the key of example i does not depend on the batch
  size: a view is a function of (key, i, image_i) only.
  """
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch_size))


def _vmap_views(keys, images, valid, p, out_size):
  if valid is None:
    return jax.vmap(lambda k, x: view_augment_single(k, x, p, out_size))(keys, images)
  return jax.vmap(lambda k, x, v: view_augment_single(k, x, p, out_size, v))(
      keys, images, valid)


def view_augment(key, images, cfg, out_size: int):
  """One random view per example of a batch, each with its own random parameters.

  Args:
    key: PRNG key (fold the step in before calling, so every step differs).
    images: (B, H, W, 3) uint8 (or float in [0, 1]), or the batch dict: then its `image`
      and, when present, its `valid` boxes (crops are sampled inside each image's valid
      region of the canvas, scale and ratio relative to that region).
    cfg: view config (see `default_view_config`) or a `ViewParams`.
    out_size: side of the square views (static).

  Returns:
    (views, boxes): float32 (B, out_size, out_size, 3), normalised when cfg.normalize;
    boxes float32 (B, 4) (y0, x0, y1, x1) in original-image coordinates (normalised to
    the valid region), x bounds swapped for flipped views.
  """
  p = view_params(cfg)
  images, valid = _images_and_valid(images)
  keys = per_example_keys(key, images.shape[0])
  return _vmap_views(keys, images, valid, p, out_size)


def multi_crop(key, images, crops: Sequence[Any], cfg, return_boxes: bool = False):
  """SwAV multi-crop: several views per example at several resolutions.

  Args:
    key: PRNG key.
    images: (B, H, W, 3) uint8 (or float in [0, 1]), or the batch dict (its `image` and
      optional `valid` boxes, as for `view_augment`).
    crops: sequence of (out_size, num_views, scale) with scale the (low, high) area
      fraction of that resolution's crops, e.g. SwAV's
      [(224, 2, (0.14, 1.0)), (96, 6, (0.05, 0.14))].
    cfg: view config for everything but the crop scale.
    return_boxes: also return the boxes.

  Returns:
    A list with one array per entry of `crops`, each (num_views * B, out, out, 3) in
    view-major order (row v * B + b is view v of example b; reshape to
    (num_views, B, ...) to split views), ready to be forwarded as one batch per
    resolution. With return_boxes, (views, boxes) with boxes a list of
    (num_views * B, 4) arrays in the same order, in original-image coordinates. Every
    view of every example has its own random parameters.
  """
  images, valid = _images_and_valid(images)
  b = images.shape[0]
  views, boxes = [], []
  for r, (out_size, num_views, scale) in enumerate(crops):
    p = view_params(cfg, crop_scale=tuple(scale))
    # Key of view v of example b: fold_in(fold_in(fold_in(key, r), v), b), so a view does
    # not depend on the batch size or on the other resolutions' settings. One flat vmap
    # over the num_views * B (key, image) pairs rather than nested vmaps: same result,
    # noticeably less to compile.
    view_keys = per_example_keys(jax.random.fold_in(key, r), num_views)
    keys = jax.vmap(lambda k: per_example_keys(k, b))(view_keys)
    keys = keys.reshape((num_views * b,) + keys.shape[2:])
    tiled = jnp.tile(images, (num_views, 1, 1, 1))  # Row v * B + b is example b.
    tiled_valid = None if valid is None else jnp.tile(valid, (num_views, 1))
    v, bx = _vmap_views(keys, tiled, tiled_valid, p, out_size)
    views.append(v)
    boxes.append(bx)
  return (views, boxes) if return_boxes else views
