"""SparK (Tian, Jiang, Luo, Wang & Yuan 2023, "Designing BERT for Convolutional Networks:
Sparse and Hierarchical Masked Modeling", ICLR; reference code github.com/keyu-tian/SparK).

Masked image modeling for convnets (ResNet, ConvNeXt, the tiny CNN):

1. A random mask on the encoder's coarsest grid (stride 32 for ResNet and ConvNeXt with
   their ImageNet stems; 8 for a ResNet with the CIFAR stem): exactly
   round(L * (1 - mask_ratio)) of the L cells stay visible in every image (0.6 masked by
   default).
2. The encoder runs on the masked image as a sparse network, emulated densely: every
   layer's output is multiplied by the mask at its resolution, BatchNorm statistics are
   taken over visible positions only (ResNet, tiny CNN), LayerNorm is per position
   (ConvNeXt); the encoders implement this when given `mask=`.
3. Densify each scale of the feature hierarchy: normalise (masked BatchNorm for BatchNorm
   encoders, LayerNorm for ConvNeXt), fill every masked position with a learned mask
   token (one per scale), then project (1x1 at the deepest scale, 3x3 elsewhere) to the
   decoder's width at that scale.
4. A light UNet-style decoder: from the deepest scale, log2(stride) upsampling blocks
   (4x4 transposed convolution with stride 2, then conv3x3-BN-ReLU6-conv3x3-BN), halving
   the width each time and adding the densified skip of the next scale when the encoder
   has one; a 1x1 convolution to RGB.
5. Loss: per-patch normalised pixels (each stride x stride patch minus its mean, over its
   standard deviation; unbiased variance + 1e-6 as the reference's torch `var`), squared
   error averaged over the patch, averaged over masked patches only (`spark_loss`).

Views: random resized crop (area 0.67-1) and flip, as the reference. Probe features: the
pooled features of the masked view (visible positions), free since the encoder ran on it.
Pictures (`images`): originals, masked inputs and reconstructions (visible patches
pasted back, masked ones de-normalised with the true patch statistics, as the reference
visualises), written by the trainer every `config.train.image_every` steps.

Reference recipe: LAMB, base lr 2e-4 x B/256 (B = 4096), weight decay 0.04 -> 0.2, 40
warmup epochs, cosine, 1600 epochs, 224 px. Anchors (published, not measured here):
ImageNet fine-tune ResNet-50 80.6, ConvNeXt-B 84.8.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from encoders.common import resize_mask
from objectives.base import Objective, ObjectiveOutput
from selfsup import augment
from selfsup.errors import UserError


def check_mask_ratio(name: str, ratio) -> None:
  if not 0 < float(ratio) < 1:
    raise ValueError(f"mask_ratio={ratio} must be strictly between 0 and 1 (the share of "
                     f"the image hidden; {name} uses "
                     f"{'0.75' if name == 'mae' else '0.6'} by default)")


def encoder_stride(encoder) -> tuple[int, str]:
  """(downsampling stride of the deepest map, densify norm "batch" | "layer")."""
  from encoders.convnext import ConvNeXt
  from encoders.resnet import ResNet
  from encoders.tiny_cnn import TinyCNN
  from encoders.vit import ViT
  if isinstance(encoder, ViT):
    raise UserError("objective spark is for convolutional encoders (resnet18..152, "
                    "convnext_tiny/small/base, tiny_cnn), not a ViT; use objective mae "
                    "for ViT encoders")
  if isinstance(encoder, ResNet):
    return (8 if encoder.cifar_stem else 32), "batch"
  if isinstance(encoder, ConvNeXt):
    return 32, "layer"
  if isinstance(encoder, TinyCNN):
    return encoder.first_stride * 2 ** (len(encoder.widths) - 1), "batch"
  raise UserError(f"objective spark does not know the encoder {type(encoder).__name__}; "
                  "use a ResNet, ConvNeXt or the tiny CNN")


def check_grid(objective: str, image_size: int, cell: int, what: str) -> int:
  """Cells per side of the mask grid; UserError when the image does not tile or has one."""
  if image_size % cell:
    lo = max(cell, image_size // cell * cell)
    raise UserError(f"objective {objective}: image size {image_size} is not a multiple of "
                    f"{what} {cell}; use {lo} or {lo + cell}")
  side = image_size // cell
  if side < 2:
    raise UserError(f"objective {objective}: image size {image_size} gives a 1x1 mask grid "
                    f"({what} {cell}); use at least {2 * cell} px"
                    + (" or a ResNet with encoder.cifar_stem=True (stride 8)"
                       if objective == "spark" else ""))
  return side


def num_visible(cells: int, mask_ratio: float, rounding=round) -> int:
  """Visible cells: at least one, and at least one cell masked."""
  return int(min(cells - 1, max(1, rounding(cells * (1 - mask_ratio)))))


def random_visible(key, batch: int, cells: int, count: int) -> jax.Array:
  """(batch, cells) bool: exactly `count` True per row, uniformly at random."""
  noise = jax.random.uniform(key, (batch, cells))
  ranks = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  return ranks < count


def patchify(images, patch: int) -> jax.Array:
  """(B, H, W, C) -> (B, L, patch*patch*C), patches in row-major grid order."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches, patch: int, height: int, width: int) -> jax.Array:
  b = patches.shape[0]
  c = patches.shape[-1] // (patch * patch)
  x = patches.reshape(b, height // patch, width // patch, patch, patch, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)


def patch_stats(patches, eps: float = 1e-6):
  """Per-patch mean and std (unbiased variance + eps, as torch's default `var`)."""
  n = patches.shape[-1]
  mean = jnp.mean(patches, axis=-1, keepdims=True)
  var = jnp.sum((patches - mean) ** 2, axis=-1, keepdims=True) / max(n - 1, 1)
  return mean, jnp.sqrt(var + eps)


def masked_patch_loss(pred_patches, target_patches, visible, normalize: bool = True):
  """Mean over masked patches of the per-patch mean squared error.

  pred_patches, target_patches: (B, L, P); visible: (B, L) bool. With `normalize`, the
  target is each patch standardised by its own mean and std (`patch_stats`).
  """
  target = target_patches.astype(jnp.float32)
  if normalize:
    mean, std = patch_stats(target)
    target = (target - mean) / std
  per_patch = jnp.mean((pred_patches.astype(jnp.float32) - target) ** 2, axis=-1)
  masked = (~visible).astype(jnp.float32)
  return jnp.sum(per_patch * masked) / jnp.maximum(jnp.sum(masked), 1.0)


def spark_loss(pred, images, visible_grid, patch: int):
  """SparK's loss on images: pred, images (B, H, W, 3); visible_grid (B, h, w) bool."""
  b = images.shape[0]
  return masked_patch_loss(patchify(pred, patch), patchify(images, patch),
                           visible_grid.reshape(b, -1))


def denormalize(x):
  """ImageNet-standardised images back to [0, 1] for pictures."""
  mean = jnp.asarray(augment.IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(augment.IMAGENET_STD, jnp.float32)
  return jnp.clip(x.astype(jnp.float32) * std + mean, 0, 1)


def reconstruction_rows(images, pred_patches, visible, patch: int, normalized: bool = True):
  """(original, masked input, reconstruction) in [0, 1] for pictures.

  pred_patches: (B, L, P) in the loss's target space; visible: (B, L). Masked patches
  are de-normalised with the true patch statistics (as the references visualise);
  visible patches show the input; the masked input shows hidden patches in grey.
  """
  b, h, w, _ = images.shape
  target = patchify(images, patch)
  pred = pred_patches.astype(jnp.float32)
  if normalized:
    mean, std = patch_stats(target)
    pred = pred * std + mean
  keep = visible[..., None]
  recon = unpatchify(jnp.where(keep, target, pred), patch, h, w)
  grey = (0.5 - jnp.asarray(augment.IMAGENET_MEAN)) / jnp.asarray(augment.IMAGENET_STD)
  masked = unpatchify(jnp.where(keep, target, jnp.tile(grey, patch * patch)), patch, h, w)
  return {"original": denormalize(images), "masked": denormalize(masked),
          "reconstruction": denormalize(recon)}


def default_decoder_width(deepest: int) -> int:
  """The decoder's width at the deepest scale when `decoder_width` is 0: 3/8 of the
  encoder's deepest width, the reference's ratio (width 768 for ResNet-50's 2048), at
  least 16. A decoder as wide as the encoder would cost about 2.5x the encoder's FLOPs on
  a ResNet-18 x0.25 with the CIFAR stem (three 4x4 transposed convolutions up to 32 px);
  at 3/8 it costs about a third of them."""
  return max(16, (3 * deepest) // 8)


class _UpBlock(nn.Module):
  """4x4 transposed conv (stride 2) -> conv3x3-BN-ReLU6 -> conv3x3(out)-BN."""
  out: int
  dtype: Any

  @nn.compact
  def __call__(self, x, *, train: bool):
    c = x.shape[-1]
    bn = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)
    x = nn.ConvTranspose(c, (4, 4), (2, 2), padding="SAME", dtype=self.dtype)(x)
    x = jax.nn.relu6(bn()(nn.Conv(c, (3, 3), use_bias=False, dtype=self.dtype)(x)))
    return bn()(nn.Conv(self.out, (3, 3), use_bias=False, dtype=self.dtype)(x))


class SparKDecoder(nn.Module):
  """Densify every scale (norm, mask token, projection) and decode UNet-style to RGB."""
  width: int = 0      # 0: 3/8 of the encoder's deepest width (see SparK.decoder_width)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, maps, visible, stride: int, norm: str, *, train: bool):
    deepest = maps[stride]
    width = self.width or default_decoder_width(deepest.shape[-1])
    x = None
    for i in range(int(math.log2(stride))):
      s = stride >> i
      w_i = max(8, width >> i)
      if s in maps:
        f = maps[s]
        m = resize_mask(visible, f.shape[1], f.shape[2]) > 0
        if norm == "batch":
          f = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                           name=f"densify_norm{s}")(f, mask=m)
        else:
          f = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=f"densify_norm{s}")(f)
        token = self.param(f"mask_token{s}", nn.initializers.truncated_normal(0.02),
                           (f.shape[-1],))
        f = jnp.where(m, f, token.astype(f.dtype))
        k = 1 if i == 0 else 3
        f = nn.Conv(w_i, (k, k), dtype=self.dtype, name=f"densify_proj{s}")(f)
        x = f if x is None else x + f
      x = _UpBlock(max(8, width >> (i + 1)), self.dtype, name=f"up{i}")(x, train=train)
    return nn.Conv(3, (1, 1), dtype=self.dtype, name="to_pixels")(x).astype(jnp.float32)


class SparK(Objective):
  image_size: int = 32
  mask_ratio: float = 0.6
  # 0: 3/8 of the encoder's deepest width (`default_decoder_width`): the reference's
  # 768 for ResNet-50's 2048 channels, 48 for a ResNet-18 x0.25 (128).
  decoder_width: int = 0
  crop_scale: tuple = (0.67, 1.0)
  dtype: Any = jnp.float32

  has_images = True

  def __post_init__(self):
    check_mask_ratio("spark", self.mask_ratio)
    if self.decoder_width < 0:
      raise ValueError(f"decoder_width={self.decoder_width} must be >= 0 (0 = 3/8 of the "
                       "encoder's deepest width)")
    super().__post_init__()

  def setup(self):
    self.decoder = SparKDecoder(self.decoder_width, self.dtype)

  def _forward(self, encoder, images, key, train):
    stride, norm = encoder_stride(encoder)
    side = check_grid("spark", images.shape[1], stride, "the encoder's downsampling stride")
    if images.shape[1] != images.shape[2]:
      raise UserError(f"objective spark needs square images, got {images.shape[1:3]}")
    cells = side * side
    visible = random_visible(key, images.shape[0], cells,
                             num_visible(cells, self.mask_ratio)).reshape(-1, side, side)
    out = encoder(images, train=train, mask=visible)
    pred = self.decoder(out.maps, visible, stride, norm, train=train)
    return out, pred, visible, stride

  def __call__(self, encoder, batch, *, train, step):
    del step
    cfg = augment.default_view_config(crop_scale=tuple(self.crop_scale), jitter_prob=0.0,
                                      grayscale_prob=0.0)
    k_view, k_mask = jax.random.split(self.make_rng("augment"))
    images, _ = augment.view_augment(k_view, batch, cfg, self.image_size)
    out, pred, visible, stride = self._forward(encoder, images, k_mask, train)
    loss = spark_loss(pred, images, visible, stride)
    return ObjectiveOutput(loss=loss, metrics={"visible_fraction": jnp.mean(visible)},
                           probe_features=out.pooled)

  def images(self, encoder, batch, key):
    images = augment.eval_view(batch, self.image_size)
    _, pred, visible, stride = self._forward(encoder, images, key, False)
    b = images.shape[0]
    return reconstruction_rows(images, patchify(pred, stride), visible.reshape(b, -1), stride)
