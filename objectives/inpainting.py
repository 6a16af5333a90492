"""Inpainting: Context Encoders (Pathak, Krahenbuhl, Donahue, Darrell & Efros 2016,
"Context Encoders: Feature Learning by Inpainting", CVPR; reference code
github.com/pathak22/context-encoder, train.lua / train_random.lua).

A region of every image is hidden (filled with the dataset mean colour); the encoder
sees the rest, a decoder on its deepest feature map paints the region back, and a
masked L2 loss (optionally plus an adversarial term) scores the painting.

Regions (`mask_type`, each covering `mask_fraction` of the image area):
  * "center": the central square (the reference: 64x64 of a 128x128 image, 1/4).
  * "blocks": random squares, each 1/4 of the fraction, added one after another and
    stopped at the count whose union covers closest to the fraction (the paper's
    "random block": several smaller, possibly overlapping masks).
  * "regions": uniform noise on a coarse grid (`region_res` cells per pixel, 0.06 in
    train_random.lua, i.e. cells of ~17 px), upsampled bicubically, randomly shifted,
    and thresholded at the per-example quantile that hides exactly the fraction
    (the reference thresholds one fixed pattern and resamples windows until the hidden
    area is 20-30%; a per-example quantile hits the fraction every time).
  Every example gets its own region from its own key (`augment.per_example_keys`); all
  shapes are static, so the masks are built inside the jitted step.

Overlap (train.lua's `overlapPred`, 4 px in the reference): the decoder predicts the
whole region R, but the hole that is actually filled with the mean is R shrunk by
`overlap` px (R eroded; a side of R lying on the image border is not shrunk, there is
no context beyond it). The ring B = R - hole is therefore *visible* in the input and
predicted as well, which makes the painting continue the context seamlessly; its
loss weight is `overlap_weight` (x10 in the reference):

    W = hole * 1 + B * overlap_weight          (0 outside R)
    L_rec = sum_{b,i,j,c} W_bij (pred - x)^2 / (C * sum_{b,i,j} W_bij)

(`masked_l2_loss`). For the reference setting this is exactly train.lua's weight matrix:
a 64x64 predicted centre, a 56x56 hole, a 4-px ring at x10. With overlap = 0 the hole
is R and the loss is the plain masked L2 of the paper's Eq. 1.

Pixels are the normalised ones the encoder sees ((x - mean) / std), so "filled with the
dataset mean" is "set to 0". The decoder's last layer is linear, not tanh: the reference
used tanh because its pixels were scaled to [-1, 1], whereas normalised pixels span
about [-2.1, 2.6] and a tanh would make the extremes unreachable.

Decoder (Section 3.1): the deepest map (B, h, w, C) -> channel-wise fully connected layer
(one dense hw -> hw map per channel, no mixing across channels: C (hw)^2 weights
instead of (C hw)^2) -> 1x1 convolution (mixes channels) + BN + ReLU -> up-convolutions
(4x4 transposed conv, stride 2, + BN + ReLU), halving the width each time, until the input
resolution; the last one outputs 3 channels. The image size must be h * 2^n.

Adversarial term (Section 3.2; off by default, `adv_weight` = 0): a small conv
discriminator under `params/<objective>/discriminator` scores the real view against the
view with the predicted region pasted in. It has its own optimizer (`optimizer_groups`,
Adam lr `disc_lr`, b1 0.5; in the reference the generator's lr is 10x the
discriminator's). One scalar loss and one gradient pass serve both players:

    loss = rec_weight * L_rec + adv_weight * L_adv(G) + L_D

  * L_D (non-saturating GAN, BCE on logits) sees the generated image through
    `stop_gradient`, so it only reaches the discriminator's parameters;
  * L_adv(G) applies the same discriminator with stop-gradient *parameters*
    (`nn.map_variables(..., trans_in_fn=stop_gradient)`), so it only reaches the encoder
    and decoder (through the pasted image).
  tests/test_inpainting.py checks both separations on the gradients.

Probe features: the pooled encoder features of the masked view: the encoder already ran
on it, so they are free; a clean pass would cost a second encoder forward (and mix clean
images into the BatchNorm statistics) for an online probe only. The end-of-run probe
scores clean images anyway.

Reference (train.lua README command): 128x128 crops, central region with overlap 4,
wtl2 = 0.999 (rec) / 0.001 (adv), Adam b1 0.5, lr 2e-4 for D and 2e-3 for G, batch 64.
Anchor (AlexNet, published anchor, not measured here): VOC07 classification 56.5 mAP,
detection 44.5 mAP, segmentation 29.7 mIoU.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from objectives.base import Objective, ObjectiveOutput
from selfsup import augment
from selfsup.errors import UserError

MASK_TYPES = ("center", "blocks", "regions")


# ---------------------------------------------------------------------------------------
# Masks.


def center_side(size: int, fraction: float) -> int:
  """Side of the central square covering `fraction` of a size x size image."""
  return min(size, max(1, int(round(size * math.sqrt(fraction)))))


def _center_mask(size: int, fraction: float) -> jax.Array:
  s = center_side(size, fraction)
  lo = (size - s) // 2
  r = jnp.arange(size)
  inside = (r >= lo) & (r < lo + s)
  return (inside[:, None] & inside[None, :]).astype(jnp.float32)


def _block_geometry(size: int, fraction: float) -> tuple[int, int]:
  """(side of one block, number of candidate blocks) for the random-block masks.

  Each block covers ~fraction/4 of the image, so the closest union is within ~1/8 of
  the fraction. The candidate count is 3x the number of uniformly placed blocks whose
  expected union reaches the fraction (1 - (1 - a)^k = f), so the union almost surely
  gets there; only a prefix is kept.
  """
  side = max(1, int(round(size * math.sqrt(fraction / 4))))
  a = min(side * side / (size * size), 0.999)
  needed = math.log(1 - min(fraction, 0.999)) / math.log(1 - a)
  return side, int(min(64, max(8, math.ceil(3 * needed) + 1)))


def _blocks_mask(key, size: int, fraction: float) -> jax.Array:
  side, count = _block_geometry(size, fraction)
  corners = jax.random.randint(key, (count, 2), 0, size - side + 1)
  r = jnp.arange(size)
  rows = (r[None, :] >= corners[:, :1]) & (r[None, :] < corners[:, :1] + side)  # (K, H)
  cols = (r[None, :] >= corners[:, 1:]) & (r[None, :] < corners[:, 1:] + side)  # (K, W)
  blocks = (rows[:, :, None] & cols[:, None, :]).astype(jnp.float32)           # (K, H, W)
  unions = jax.lax.cummax(blocks, axis=0)        # unions[k] = blocks 0..k together
  coverage = jnp.mean(unions, axis=(1, 2))
  return unions[jnp.argmin(jnp.abs(coverage - fraction))]


def region_grid(size: int, region_res: float) -> int:
  """Noise cells across the image for the random-region masks (at least 2)."""
  return max(2, int(round(size * region_res)))


def _regions_mask(key, size: int, fraction: float, region_res: float) -> jax.Array:
  g = region_grid(size, region_res)
  # Two extra cells and a random shift: region edges do not line up with the image's.
  big = int(round(size * (g + 2) / g))
  k_noise, k_shift = jax.random.split(key)
  noise = jax.random.uniform(k_noise, (g + 2, g + 2))
  smooth = jax.image.resize(noise, (big, big), "cubic")
  dy, dx = jax.random.randint(k_shift, (2,), 0, big - size + 1)
  window = jax.lax.dynamic_slice(smooth, (dy, dx), (size, size))
  # Per-example quantile threshold: exactly k pixels lie strictly below the k-th value.
  k = min(size * size - 1, max(1, int(round(fraction * size * size))))
  threshold = jnp.sort(window.ravel())[k]
  return (window < threshold).astype(jnp.float32)


def inpainting_masks(key, batch: int, size: int, mask_type: str, fraction: float,
                     region_res: float = 0.06) -> jax.Array:
  """Regions to inpaint: (batch, size, size, 1) float32, 1 = hidden/predicted.

  Args:
    key: PRNG key; example i uses fold_in(key, i), so masks differ across examples.
    batch, size: static batch size and image side.
    mask_type: "center" (same square for all), "blocks" or "regions".
    fraction: area fraction in (0, 1) to cover (exact for "center" up to rounding of
      the side and for "regions" up to ties, approximate for "blocks").
    region_res: noise cells per pixel for "regions" (reference 0.06).
  """
  if mask_type == "center":
    return jnp.broadcast_to(_center_mask(size, fraction)[None, :, :, None],
                            (batch, size, size, 1))
  keys = augment.per_example_keys(key, batch)
  if mask_type == "blocks":
    masks = jax.vmap(lambda k: _blocks_mask(k, size, fraction))(keys)
  elif mask_type == "regions":
    masks = jax.vmap(lambda k: _regions_mask(k, size, fraction, region_res))(keys)
  else:
    raise UserError(f"inpainting mask_type={mask_type!r} is unknown; valid: "
                    f"{', '.join(MASK_TYPES)}")
  return masks[..., None]


def erode(mask: jax.Array, pixels: int) -> jax.Array:
  """Shrinks (B, H, W, 1) {0,1} regions by `pixels` (Chebyshev distance) from visible pixels.

  A pixel stays in the hole when no visible pixel lies within `pixels` in x and y.
  Outside the image counts as nothing (max-pool padding is -inf), so a region side on
  the image border is not shrunk.
  """
  if pixels <= 0:
    return mask
  w = 2 * pixels + 1
  visible_near = jax.lax.reduce_window(1.0 - mask, -jnp.inf, jax.lax.max, (1, w, w, 1),
                                       (1, 1, 1, 1), "SAME")
  return 1.0 - visible_near


def loss_weights(region: jax.Array, overlap: int, overlap_weight: float):
  """(hole, weights) for a region: hole = region eroded by `overlap`; W as in the module doc."""
  hole = erode(region, overlap)
  return hole, hole + (region - hole) * overlap_weight


def masked_l2_loss(pred: jax.Array, target: jax.Array, weights: jax.Array) -> jax.Array:
  """sum(W * (pred - target)^2) / (C * sum(W)): a weighted mean over pixels and channels.

  pred, target: (B, H, W, C); weights: (B, H, W, 1), broadcast over channels.
  """
  pred, target = pred.astype(jnp.float32), target.astype(jnp.float32)
  err = jnp.sum(weights * jnp.square(pred - target))
  return err / (pred.shape[-1] * jnp.maximum(jnp.sum(weights), 1e-8))


# ---------------------------------------------------------------------------------------
# Heads.


class ChannelWiseFC(nn.Module):
  """Per-channel dense layer over spatial positions: (B, h, w, C) -> (B, h, w, C).

  Every channel has its own (hw x hw) matrix; channels are not mixed (Pathak et al.,
  Section 3.1), so the layer sees the whole image at C (hw)^2 parameters.
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    p = h * w
    kernel = self.param("kernel", nn.initializers.lecun_normal(
        in_axis=1, out_axis=2, batch_axis=(0,)), (c, p, p), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (p, c), jnp.float32)
    y = jnp.einsum("bpc,cpq->bqc", x.reshape(b, p, c).astype(self.dtype),
                   kernel.astype(self.dtype))
    return (y + bias.astype(self.dtype)).reshape(b, h, w, c)


class InpaintingDecoder(nn.Module):
  """Deepest feature map -> channel-wise FC -> 1x1 conv -> up-convolutions -> 3 channels."""
  out_size: int
  width: int = 256
  min_width: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    h = x.shape[1]
    stages = decoder_stages(h, self.out_size)
    x = ChannelWiseFC(dtype=self.dtype)(x)
    x = nn.Conv(self.width, (1, 1), use_bias=False, dtype=self.dtype)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9,
                             dtype=self.dtype)(x))
    for i in range(stages - 1):
      x = nn.ConvTranspose(max(self.min_width, self.width // 2 ** (i + 1)), (4, 4),
                           strides=(2, 2), padding="SAME", use_bias=False,
                           dtype=self.dtype)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9,
                               dtype=self.dtype)(x))
    # Linear output: normalised pixels are not confined to [-1, 1] (see module doc).
    x = nn.ConvTranspose(3, (4, 4), strides=(2, 2), padding="SAME", dtype=self.dtype)(x)
    return x.astype(jnp.float32)


def decoder_stages(map_size: int, out_size: int) -> int:
  """Number of x2 up-convolutions from map_size to out_size; UserError if not a power of 2."""
  n = 0
  while map_size * 2 ** n < out_size:
    n += 1
  if map_size * 2 ** n != out_size or n == 0:
    raise UserError(
        f"inpainting: the decoder doubles the encoder's deepest map ({map_size}x{map_size}) "
        f"and cannot reach the image size {out_size}; use an image size of {map_size} x 2^n "
        f"with n >= 1 (e.g. {map_size * 2 ** max(n, 1)})")
  return n


class Discriminator(nn.Module):
  """DCGAN-style conv net: 4x4 stride-2 convs (+GroupNorm) down to <= 4x4, then a logit.

  GroupNorm rather than BatchNorm: it is per example, so the real and generated batches
  (and the two calls of one step) see identical normalisation and no batch statistics
  have to be threaded through the stop-gradient call.
  """
  width: int = 64
  max_width: int = 512
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = x.astype(self.dtype)
    width, i = self.width, 0
    while x.shape[1] > 4 or i == 0:
      x = nn.Conv(width, (4, 4), strides=(2, 2), padding="SAME", dtype=self.dtype)(x)
      if i > 0:
        x = nn.GroupNorm(num_groups=min(32, width // 4) or 1, dtype=self.dtype)(x)
      x = nn.leaky_relu(x, 0.2)
      width, i = min(self.max_width, 2 * width), i + 1
    logit = nn.Dense(1, dtype=self.dtype)(x.reshape(x.shape[0], -1))
    return logit[:, 0].astype(jnp.float32)


def _apply_frozen(module, x):
  """module(x); wrapped by `nn.map_variables` to read stop-gradient parameters."""
  return module(x)


# ---------------------------------------------------------------------------------------
# The objective.


class Inpainting(Objective):
  """Context Encoders: reconstruct a hidden region from its context."""
  image_size: int = 32
  mask_type: str = "center"
  mask_fraction: float = 0.25
  region_res: float = 0.06          # noise cells per pixel for "regions" (train_random.lua)
  overlap: int = 4                  # px of the predicted region left visible (overlapPred)
  overlap_weight: float = 10.0
  rec_weight: float = 1.0           # lambda_rec (reference 0.999 with adversarial)
  adv_weight: float = 0.0           # lambda_adv (reference 0.001); 0 = reconstruction only
  decoder_width: int = 256
  disc_width: int = 64
  disc_lr: float = 2e-4             # the discriminator's own Adam (reference lr, b1 0.5)
  disc_b1: float = 0.5
  crop_scale: tuple = (0.3, 1.0)
  flip_prob: float = 0.5
  dtype: Any = jnp.float32

  def validate(self, *, image_size, dataset, batch_size=0):
    del dataset, batch_size
    f = self.mask_fraction
    if not 0 < f < 1:
      raise UserError(f"inpainting mask_fraction={f} must lie in the open interval (0, 1) "
                      "(the share of the image area to hide, e.g. 0.25)")
    if self.mask_type not in MASK_TYPES:
      raise UserError(f"inpainting mask_type={self.mask_type!r} is unknown; valid: "
                      f"{', '.join(MASK_TYPES)}")
    if self.overlap < 0 or self.overlap_weight < 0:
      raise UserError(f"inpainting overlap={self.overlap} and overlap_weight="
                      f"{self.overlap_weight} must be >= 0")
    if self.rec_weight < 0 or self.adv_weight < 0 or self.rec_weight + self.adv_weight == 0:
      raise UserError(f"inpainting rec_weight={self.rec_weight}, adv_weight="
                      f"{self.adv_weight}: both must be >= 0 and not both 0")
    if self.mask_type == "center":
      side = center_side(image_size, f)
      if side - 2 * self.overlap < 1:
        raise UserError(
            f"inpainting overlap={self.overlap} px leaves no hole in the {side}x{side} "
            f"central region of a {image_size}px image; use overlap <= {(side - 1) // 2}")

  def optimizer_groups(self):
    if self.adv_weight <= 0:
      return {}
    lr, b1 = self.disc_lr, self.disc_b1
    return {"discriminator": (lambda path: path[0] == "discriminator",
                              lambda total_steps: optax.adam(lr, b1=b1))}

  @nn.compact
  def __call__(self, encoder, batch, *, train, step):
    del step
    size = self.image_size
    if train:
      cfg = augment.default_view_config(
          crop_scale=tuple(self.crop_scale), flip_prob=self.flip_prob, jitter_prob=0.0,
          grayscale_prob=0.0)
      key_view, key_mask = jax.random.split(self.make_rng("augment"))
      images, _ = augment.view_augment(key_view, batch, cfg, size)
    else:
      images = augment.eval_view(batch, size)
      key_mask = (self.make_rng("augment") if self.has_rng("augment")
                  else jax.random.PRNGKey(0))
    b = images.shape[0]
    region = inpainting_masks(key_mask, b, size, self.mask_type, self.mask_fraction,
                              self.region_res)
    hole, weights = loss_weights(region, self.overlap, self.overlap_weight)

    # The hole holds the dataset mean colour: 0 in normalised pixels.
    out = encoder(images * (1.0 - hole), train=train)
    deepest = out.maps[max(out.maps)]
    pred = InpaintingDecoder(size, self.decoder_width, dtype=self.dtype, name="decoder")(
        deepest, train=train)
    rec = masked_l2_loss(pred, images, weights)
    loss = self.rec_weight * rec
    metrics = {"rec_loss": rec}

    if self.adv_weight > 0:
      fake = images * (1.0 - region) + pred * region
      disc = Discriminator(self.disc_width, dtype=self.dtype, name="discriminator")
      # Discriminator step: the generated image is a constant here.
      logits = disc(jnp.concatenate([images, jax.lax.stop_gradient(fake)]))
      real_logit, fake_logit = logits[:b], logits[b:]
      disc_loss = (jnp.mean(jax.nn.softplus(-real_logit))
                   + jnp.mean(jax.nn.softplus(fake_logit)))
      # Generator step: same discriminator, parameters frozen, gradient to the image only.
      frozen = nn.map_variables(_apply_frozen, "params", trans_in_fn=jax.lax.stop_gradient)
      adv = jnp.mean(jax.nn.softplus(-frozen(disc, fake)))   # non-saturating -log D(G)
      loss = loss + self.adv_weight * adv + disc_loss
      metrics.update(
          adv_loss=adv, disc_loss=disc_loss,
          disc_acc=0.5 * (jnp.mean((real_logit > 0).astype(jnp.float32))
                          + jnp.mean((fake_logit < 0).astype(jnp.float32))))
    return ObjectiveOutput(loss=loss, metrics=metrics, probe_features=out.pooled)
