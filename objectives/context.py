"""Context prediction / relative patch location (Doersch, Gupta & Efros 2015,
"Unsupervised Visual Representation Learning by Context Prediction"), in the fixed-shape
variant of Kolesnikov, Zhai & Beyer 2019 ("Revisiting Self-Supervised Visual
Representation Learning", github.com/google/revisiting-self-supervised).

Views: the image gets a random crop + flip (no colour jitter), is cut into a 3x3 grid of
square cells of side `cell = image_size // 3`, and from every cell a smaller square
patch of side `patch < cell` is cropped at an offset drawn uniformly per patch and per
example. Each example's patches lose their colour with probability `color_drop_prob`
(grayscale, or Doersch's colour dropping), and every patch is standardised on its own.
All 9B patches go through the shared encoder in one call (optionally resized to
`patch_input_size`); for each of the 8 neighbours the pair (centre embedding, neighbour
embedding) is concatenated and an MLP (4096, BN, ReLU) predicts which of the 8 positions
the neighbour came from (8-way cross-entropy).

Shortcuts and what blocks them:
  * edge continuity (lines running from one patch into the next): the gap between cells
    and the random offset inside each cell (gap + jitter);
  * chromatic aberration (colour fringes that shift with the distance from the lens
    centre tell where a patch sits in the frame): grayscale / colour dropping;
  * low-level statistics (vignetting, brightness gradients): per-patch standardisation.

Layout conventions (the tests rely on them):
  * grid positions are numbered row-major, 0 = top-left ... 4 = centre ... 8 =
    bottom-right;
  * the label of a neighbour is its index in `NEIGHBOURS` = (0, 1, 2, 3, 5, 6, 7, 8):
    0 top-left, 1 top, 2 top-right, 3 left, 4 right, 5 bottom-left, 6 bottom,
    7 bottom-right;
  * patch arrays are patch-major: row p * B + b is grid position p of example b (as
    `augment.multi_crop`), pair arrays neighbour-major: row k * B + b is the pair
    (centre of b, neighbour k of b), label k.

Reference (Kolesnikov et al. 2019, config/relative_patch_location/imagenet.sh): ImageNet
resized to 292, random 255 crop (cells of 85 px), 64 px patches (jitter 21), grayscale
with probability 0.66, per-patch standardisation, ResNet-50 v1, fc 4096 + BN + ReLU
(+ dropout 0.5) -> 8, SGD lr 0.1 x B/256, 35 epochs (decay at 15 and 25, 5 warmup).
Anchors (published, not measured here): VTAB-1k mean 53.5 (ResNet-50, fine-tuned);
VOC07 detection 51.4 mAP (Doersch et al., original AlexNet-style network).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from objectives.base import MLP, Objective, ObjectiveOutput, accuracy, cross_entropy
from selfsup import augment
from selfsup.errors import UserError

GRID = 3
CENTRE = 4
# Grid positions of the 8 neighbours, row-major; the label of neighbour k is k.
NEIGHBOURS = (0, 1, 2, 3, 5, 6, 7, 8)
# The reference's patch / cell ratio (64 px patches in 85 px cells): the size used when
# patch_size is 0 (auto), so a config works at any image size.
AUTO_PATCH_FRACTION = 64 / 85


# ---------------------------------------------------------------------------------------
# Views.


def patch_grid(image_size: int, patch_size: int = 0, jitter: int = -1,
               grid: int = GRID) -> tuple[int, int, int, int]:
  """The static geometry of the patch grid, or a UserError when it does not fit.

  Args:
    image_size: side of the (square) image the grid is cut from.
    patch_size: side of a patch; 0 = auto (3/4 of the cell, the reference's 64/85,
      at most cell - 1 so that a gap remains).
    jitter: -1 = the offset of a patch inside its cell is uniform over every position
      that fits, [0, cell - patch] (the reference); j >= 0 = uniform over
      [s // 2 - j, s // 2 + j] with s = cell - patch, which keeps a gap of at least
      s - 2 j pixels between neighbouring patches (Doersch's gap + jitter).
    grid: cells per side.

  Returns:
    (cell, patch, lo, hi): cell and patch sides and the offset range [lo, hi]
    (inclusive) inside a cell, in pixels.
  """
  cell = image_size // grid
  if cell < 2:
    raise UserError(
        f"context: image_size={image_size} gives {grid}x{grid} cells of {cell} px; a cell "
        f"needs at least 2 px (a patch plus a gap), so image_size must be >= {2 * grid}")
  if patch_size == 0:
    patch = min(cell - 1, max(1, int(AUTO_PATCH_FRACTION * cell + 0.5)))
  else:
    patch = int(patch_size)
  if not 1 <= patch <= cell:
    raise UserError(
        f"context: patch_size={patch_size} does not fit the {cell} px cells of a "
        f"{grid}x{grid} grid on image_size={image_size}; valid patch_size: 1..{cell} "
        f"(below {cell} to leave a gap), or 0 for auto ({AUTO_PATCH_FRACTION:.2f} of "
        "the cell)")
  slack = cell - patch
  if jitter == -1:
    return cell, patch, 0, slack
  centre = slack // 2
  if not 0 <= jitter <= centre:
    raise UserError(
        f"context: jitter={jitter} is too large for patch_size={patch} in {cell} px "
        f"cells (slack {slack} px); valid jitter: 0..{centre}, or -1 for the whole "
        "slack")
  return cell, patch, centre - jitter, centre + jitter


def relative_patch_views(key, images, *, patch_size: int = 0, jitter: int = -1,
                         grid: int = GRID) -> tuple[jax.Array, jax.Array]:
  """Cuts a grid x grid array of jittered patches out of every image.

  Cell (r, c) spans rows [r * cell, (r + 1) * cell) and columns [c * cell,
  (c + 1) * cell), cell = H // grid (any remainder pixels at the bottom / right are not
  used, as in the reference). Its patch's top-left corner is (r * cell + oy,
  c * cell + ox) with the offset (oy, ox) drawn uniformly in [lo, hi]^2 per patch and
  per example (see `patch_grid`), so every patch lies inside its cell.

  Args:
    key: PRNG key, or None for the deterministic centred offsets (evaluation).
    images: (B, H, H, C) square images (any dtype).
    patch_size, jitter, grid: as in `patch_grid`.

  Returns:
    (patches, offsets): patches (grid^2 * B, patch, patch, C), patch-major (row p * B + b
    is grid position p of example b); offsets (grid^2 * B, 2) int32 (oy, ox) of each patch
    inside its cell, same order.
  """
  b, h, w, c = images.shape
  if h != w:
    raise ValueError(f"relative_patch_views needs square images, got {h}x{w}")
  cell, patch, lo, hi = patch_grid(h, patch_size, jitter, grid)
  n = grid * grid
  cell_corners = jnp.stack([jnp.arange(n) // grid, jnp.arange(n) % grid], -1) * cell

  def one(k, image):
    if k is None:
      off = jnp.full((n, 2), (lo + hi) // 2, jnp.int32)
    else:
      # floor(u * count) rather than jax.random.randint: the same uniform integers, and
      # one plain uniform draw compiles several times faster on CPU (see augment._uniforms).
      u = jax.random.uniform(k, (n, 2))
      off = lo + jnp.minimum(jnp.floor(u * (hi - lo + 1)), hi - lo).astype(jnp.int32)
    corners = cell_corners + off
    crops = jax.vmap(lambda yx: jax.lax.dynamic_slice(
        image, (yx[0], yx[1], 0), (patch, patch, c)))(corners)
    return crops, off

  if key is None:
    patches, offsets = jax.vmap(lambda x: one(None, x))(images)
  else:
    # One key per example (fold_in of its index), as augment.view_augment: the patches of
    # example i do not depend on the batch size.
    patches, offsets = jax.vmap(one)(augment.per_example_keys(key, b), images)
  patches = jnp.swapaxes(patches, 0, 1).reshape((n * b, patch, patch, c))
  offsets = jnp.swapaxes(offsets, 0, 1).reshape((n * b, 2))
  return patches, offsets


def drop_color(key, patches, *, color_drop_prob: float, grayscale_prob: float = 1.0,
               grid: int = GRID) -> jax.Array:
  """Removes the colour of an example's patches with probability color_drop_prob.

  Chromatic aberration tells where a patch was in the frame; a single channel does not
  carry it. When an example is hit, with probability grayscale_prob its patches become
  grayscale (mean of RGB in all three channels, the reference's `to_gray`), otherwise
  Doersch's colour dropping: every patch keeps one random channel and the other two
  become noise around the kept channel's mean with 1/100 of its standard deviation
  (uniform noise here, Gaussian in the paper).

  Args:
    key: PRNG key.
    patches: (grid^2 * B, P, P, 3) float, patch-major (see `relative_patch_views`).
    color_drop_prob: probability, per example, that its colour is removed.
    grayscale_prob: given removal, probability of grayscale (else channel dropping).
    grid: cells per side.

  Returns:
    Patches of the same shape and order.
  """
  if isinstance(color_drop_prob, (int, float)) and color_drop_prob == 0:
    return patches  # static 0: skipped at trace time (probabilities may be traced)
  n = grid * grid
  shape = patches.shape
  per_example = jnp.swapaxes(patches.reshape((n, -1) + shape[1:]), 0, 1)  # (B, n, ...)

  def one(k, x):
    # One uniform draw for everything (see augment._uniforms): u[0] drop or not, u[1]
    # grayscale or channels, then the kept channel of each patch, then the noise.
    u = jax.random.uniform(k, (2 + n + x.size,))
    gray = jnp.broadcast_to(jnp.mean(x, -1, keepdims=True), x.shape)
    channel = jnp.minimum(jnp.floor(u[2:2 + n] * 3), 2).astype(jnp.int32)
    keep = jax.nn.one_hot(channel, 3, dtype=x.dtype)[:, None, None, :]
    kept = jnp.sum(x * keep, -1, keepdims=True)
    mean = jnp.mean(kept, (1, 2, 3), keepdims=True)
    std = jnp.std(kept, (1, 2, 3), keepdims=True)
    # Zero-mean unit-variance uniform noise rather than Gaussian (same std; a normal draw
    # costs an erf_inv): any structureless filler does, what matters is its small scale.
    unit = (u[2 + n:].reshape(x.shape) - 0.5) * jnp.sqrt(12.0)
    noise = mean + 0.01 * std * unit
    dropped = jnp.where(keep > 0, x, noise)
    removed = jnp.where(u[1] < grayscale_prob, gray, dropped)
    return jnp.where(u[0] < color_drop_prob, removed, x)

  out = jax.vmap(one)(augment.per_example_keys(key, per_example.shape[0]), per_example)
  return jnp.swapaxes(out, 0, 1).reshape(shape)


def standardize_patches(patches) -> jax.Array:
  """Per-patch standardisation over all pixels and channels together.

  (x - mean) / max(std, 1 / sqrt(N)), N = pixels x channels: TF's
  `per_image_standardization`, which the reference applies to every patch. Over all
  channels rather than per channel because per-channel statistics would re-amplify the
  near-constant channels of a colour-dropped patch to unit variance (pure noise at full
  scale) and would erase the colour balance that is left in colour patches; removing each
  patch's overall brightness and contrast is what blocks the low-level-statistics
  shortcut. The floor on the std keeps constant patches finite.
  """
  x = jnp.asarray(patches, jnp.float32)
  n = x.shape[1] * x.shape[2] * x.shape[3]
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  std = jnp.std(x, axis=(1, 2, 3), keepdims=True)
  return (x - mean) / jnp.maximum(std, 1.0 / jnp.sqrt(float(n)))


# ---------------------------------------------------------------------------------------
# Pairs and loss.


def context_pairs(embeddings, grid: int = GRID) -> tuple[jax.Array, jax.Array]:
  """(centre, neighbour) pairs of patch embeddings and their 8-way labels.

  Args:
    embeddings: (9B, D) patch-major (row p * B + b = grid position p of example b).

  Returns:
    (pairs, labels): pairs (8B, 2D) neighbour-major, row k * B + b = concat(centre of b,
    neighbour NEIGHBOURS[k] of b); labels (8B,) int32, k for row k * B + b.
  """
  if grid != GRID:
    raise ValueError("context_pairs is written for the 3x3 grid")
  per_position = embeddings.reshape((GRID * GRID, -1, embeddings.shape[-1]))
  b = per_position.shape[1]
  centre = jnp.broadcast_to(per_position[CENTRE], (len(NEIGHBOURS),) + per_position.shape[1:])
  neighbours = per_position[jnp.asarray(NEIGHBOURS)]
  pairs = jnp.concatenate([centre, neighbours], axis=-1).reshape((len(NEIGHBOURS) * b, -1))
  labels = jnp.repeat(jnp.arange(len(NEIGHBOURS), dtype=jnp.int32), b)
  return pairs, labels


# ---------------------------------------------------------------------------------------
# The objective.


class ContextPrediction(Objective):
  """8-way relative patch location on a 3x3 grid of jittered, standardised patches."""
  image_size: int = 32
  patch_size: int = 0              # 0 = auto: 64/85 of the cell (the reference's ratio)
  jitter: int = -1                 # -1 = offsets over the whole cell slack (reference)
  color_drop_prob: float = 0.66    # per example; the reference's to_gray probability
  grayscale_prob: float = 1.0      # given a drop: grayscale (1.0, reference) vs channels
  crop_scale: tuple = (0.64, 1.0)  # ~ the reference's 255 of 292 random crop, area 0.76
  flip_prob: float = 0.5
  head_hidden: tuple = (4096,)     # fc 4096 + BN + ReLU, as the reference
  patch_input_size: int = 0        # > 0: resize patches to this side before the encoder
  dtype: Any = jnp.float32

  def _geometry(self, image_size=None):
    return patch_grid(self.image_size if image_size is None else image_size,
                      self.patch_size, self.jitter)

  def validate(self, *, image_size, dataset, batch_size=0):
    del dataset, batch_size
    self._geometry(image_size)
    for name in ("color_drop_prob", "grayscale_prob", "flip_prob"):
      p = getattr(self, name)
      if not 0 <= p <= 1:
        raise UserError(f"context: {name}={p} must be a probability in [0, 1]")
    if self.patch_input_size < 0:
      raise UserError(f"context: patch_input_size={self.patch_input_size} must be >= 0 "
                      "(0 = feed patches at their own size)")

  @nn.compact
  def __call__(self, encoder, batch, *, train, step):
    del step
    self._geometry()  # a UserError, not a shape error, when the grid does not fit
    if train:
      k_view, k_patch, k_color = jax.random.split(self.make_rng("augment"), 3)
      cfg = augment.default_view_config(
          crop_scale=tuple(self.crop_scale), flip_prob=self.flip_prob, jitter_prob=0.0,
          grayscale_prob=0.0, normalize=False)
      images, _ = augment.view_augment(k_view, batch, cfg, self.image_size)
    else:
      k_patch = None
      images = augment.eval_view(batch, self.image_size, normalize=False)
    patches, _ = relative_patch_views(k_patch, images, patch_size=self.patch_size,
                                      jitter=self.jitter)
    if train:
      patches = drop_color(k_color, patches, color_drop_prob=self.color_drop_prob,
                           grayscale_prob=self.grayscale_prob)
    patches = standardize_patches(patches)
    q = self.patch_input_size
    if q and q != patches.shape[1]:
      # Tiny patches (8 px on CIFAR) would vanish in the encoder's strides.
      patches = jax.image.resize(patches, (patches.shape[0], q, q, patches.shape[3]),
                                 "linear")
    out = encoder(patches, train=train)  # one call: BatchNorm statistics over all 9B
    pairs, labels = context_pairs(out.pooled)
    logits = MLP(tuple(self.head_hidden), len(NEIGHBOURS), dtype=self.dtype, name="head")(
        pairs, train=train)
    # No probe features: patches are not whole images; the model probes the full image.
    return ObjectiveOutput(loss=cross_entropy(logits, labels),
                           metrics={"acc": accuracy(logits, labels)})

  def eval_features(self, encoder_fn, images):
    """The paper's evaluation input: the 3x3 grid of patches, centred in their cells (no
    jitter, no colour dropping), standardised and resized as in training; the 9 pooled
    features are averaged (Doersch et al. 2015 read features from patches, never from
    whole images, which this encoder has not seen)."""
    b = images.shape[0]
    patches, _ = relative_patch_views(None, augment.to_float(images),
                                      patch_size=self.patch_size, jitter=self.jitter)
    patches = standardize_patches(patches)
    q = self.patch_input_size
    if q and q != patches.shape[1]:
      patches = jax.image.resize(patches, (patches.shape[0], q, q, patches.shape[3]),
                                 "linear")
    features = encoder_fn(patches)
    return jnp.mean(features.reshape((GRID * GRID, b) + features.shape[1:]), axis=0)
