"""MAE (He, Chen, Xie, Li, Dollar & Girshick 2022, "Masked Autoencoders Are Scalable
Vision Learners", CVPR; reference code github.com/facebookresearch/mae).

Masked autoencoding for ViT encoders:

1. Random masking of patches: int(L * (1 - mask_ratio)) of the L patches stay visible in
   every image (0.75 masked by default), drawn by sorting uniform noise per image.
2. The encoder sees only the visible tokens: a static count, so no padding and no
   attention to masked positions (the ViT drops them when given a `PatchMask`; the class
   token, when the encoder has one, `encoder.pooling=cls`, rides along).
3. A light decoder: the visible encoder tokens embedded to the decoder width, mask
   tokens put back at the masked positions in the original order (the unshuffle,
   `encoders.common.scatter_tokens`), fixed 2-D sine-cosine position embeddings,
   `decoder_depth` pre-LN transformer blocks of width `decoder_width`, LayerNorm, and a
   linear layer to each patch's pixels.
4. Loss: squared error on masked patches only, against per-patch normalised pixels
   (`norm_pix_loss`, the reference's default for its best results; unbiased variance +
   1e-6 as torch's `var`), averaged over the patch's pixels and then over the masked
   patches (`objectives.spark.masked_patch_loss`, shared with SparK).

Views: random resized crop (area 0.2-1) and flip, no colour augmentation (the reference).
Probe features: the pooled encoder features of the visible tokens (free). Pictures
(`images`): originals, masked inputs, reconstructions (visible patches pasted back).

Reference recipe (ViT-B/16): AdamW (b2 0.95), base lr 1.5e-4 x B/256 with B = 4096,
weight decay 0.05, 40 warmup epochs, cosine, 800-1600 epochs, decoder depth 8 width 512
(16 heads). Anchors (published, not measured here): ImageNet linear 68.0, fine-tune 83.6.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from encoders.common import PatchMask, gather_visible, scatter_tokens
from encoders.vit import EncoderBlock
from objectives.base import Objective, ObjectiveOutput
from objectives.spark import (check_grid, check_mask_ratio, masked_patch_loss, num_visible,
                              patchify, random_visible, reconstruction_rows)
from selfsup import augment
from selfsup.errors import UserError


def sincos_2d(height: int, width: int, dim: int) -> np.ndarray:
  """(height * width, dim) fixed 2-D sine-cosine position embeddings (MAE's decoder)."""
  if dim % 4:
    raise ValueError(f"decoder_width={dim} must be a multiple of 4 (sine-cosine positions)")
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
  ys, xs = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64),
                       indexing="ij")
  parts = []
  for pos in (ys.reshape(-1), xs.reshape(-1)):
    angles = pos[:, None] * omega[None]
    parts += [np.sin(angles), np.cos(angles)]
  return np.concatenate(parts, axis=1).astype(np.float32)


class MAEDecoder(nn.Module):
  """Visible tokens -> embed -> unshuffle with mask tokens -> blocks -> pixels per patch."""
  depth: int = 8
  width: int = 512
  heads: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, visible_tokens, keep, grid: tuple, patch_pixels: int):
    length = grid[0] * grid[1]
    x = nn.Dense(self.width, dtype=self.dtype, name="embed")(visible_tokens)
    token = self.param("mask_token", nn.initializers.normal(0.02), (self.width,))
    x = scatter_tokens(x, keep, length, token.astype(x.dtype))
    x = x + jnp.asarray(sincos_2d(grid[0], grid[1], self.width), x.dtype)[None]
    for i in range(self.depth):
      x = EncoderBlock(4 * self.width, self.heads, self.dtype, name=f"block{i}")(x)
    x = nn.LayerNorm(dtype=self.dtype, name="norm")(x)
    return nn.Dense(patch_pixels, dtype=self.dtype, name="pred")(x).astype(jnp.float32)


class MAE(Objective):
  image_size: int = 32
  mask_ratio: float = 0.75
  decoder_depth: int = 8
  decoder_width: int = 512
  decoder_heads: int = 16
  norm_pix_loss: bool = True
  crop_scale: tuple = (0.2, 1.0)
  dtype: Any = jnp.float32

  has_images = True

  def __post_init__(self):
    check_mask_ratio("mae", self.mask_ratio)
    if self.decoder_depth < 0 or self.decoder_width < 4 or self.decoder_heads < 1:
      raise ValueError("decoder_depth must be >= 0, decoder_width >= 4 and decoder_heads >= 1")
    if self.decoder_width % self.decoder_heads or self.decoder_width % 4:
      raise ValueError(f"decoder_width={self.decoder_width} must be a multiple of 4 and of "
                       f"decoder_heads={self.decoder_heads}")
    super().__post_init__()

  def setup(self):
    self.decoder = MAEDecoder(self.decoder_depth, self.decoder_width, self.decoder_heads,
                              dtype=self.dtype)

  def _forward(self, encoder, images, key):
    from encoders.vit import ViT
    if not isinstance(encoder, ViT):
      raise UserError(f"objective mae needs a ViT encoder (vit_ti, vit_s, vit_b), not "
                      f"{type(encoder).__name__}; use objective spark for convolutional "
                      "encoders")
    p = encoder.patch_size
    if images.shape[1] != images.shape[2]:
      raise UserError(f"objective mae needs square images, got {images.shape[1:3]}")
    side = check_grid("mae", images.shape[1], p, "the ViT patch size")
    cells = side * side
    count = num_visible(cells, self.mask_ratio, rounding=int)
    b = images.shape[0]
    visible = random_visible(key, b, cells, count)
    out = encoder(images, train=True, mask=PatchMask(visible.reshape(b, side, side), count))
    tokens = out.maps[p].reshape(b, cells, -1)
    kept, keep = gather_visible(tokens, visible, count)
    pred = self.decoder(kept, keep, (side, side), p * p * 3)
    return out, pred, visible, p

  def __call__(self, encoder, batch, *, train, step):
    del step, train  # no dropout or BatchNorm in a ViT: train and eval are the same
    cfg = augment.default_view_config(crop_scale=tuple(self.crop_scale), jitter_prob=0.0,
                                      grayscale_prob=0.0)
    k_view, k_mask = jax.random.split(self.make_rng("augment"))
    images, _ = augment.view_augment(k_view, batch, cfg, self.image_size)
    out, pred, visible, p = self._forward(encoder, images, k_mask)
    loss = masked_patch_loss(pred, patchify(images, p), visible, self.norm_pix_loss)
    return ObjectiveOutput(loss=loss, metrics={"visible_fraction": jnp.mean(visible)},
                           probe_features=out.pooled)

  def images(self, encoder, batch, key):
    images = augment.eval_view(batch, self.image_size)
    _, pred, visible, p = self._forward(encoder, images, key)
    return reconstruction_rows(images, pred, visible, p, self.norm_pix_loss)
