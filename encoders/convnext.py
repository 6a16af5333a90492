"""ConvNeXt (Liu et al. 2022, "A ConvNet for the 2020s"): tiny, small and base.

Stem: 4x4 convolution with stride 4 + LayerNorm. Four stages at strides 4, 8, 16, 32;
between stages LayerNorm + 2x2 convolution with stride 2. A block is a 7x7 depth-wise
convolution, LayerNorm, Linear(4C), GELU, Linear(C), a learned per-channel layer scale
(initialised to 1e-6) and stochastic depth (drop rate rising linearly from 0 to
`drop_path` over the blocks), added to the input. The pooled feature is the global mean
of the last stage followed by a LayerNorm (the classifier's norm in the reference).

Sizes (depths, widths): tiny (3,3,9,3) x (96..768), small (3,3,27,3) x (96..768), base
(3,3,27,3) x (128..1024); with a 1000-class head they have 28.6M, 50.2M and 88.6M
parameters (tests/test_convnext.py counts them).

Masks (SparK): with a (B, h, w) visibility mask (or a `PatchMask`), the input and every
layer's output are multiplied by the mask at that layer's resolution, the dense
emulation of sparse convolution. The stem and the downsampling convolutions do not
overlap patches, the depth-wise convolution only ever sees zeros at masked positions,
and LayerNorm normalises each position over its own channels, so a masked position never
changes a visible one; the pooled feature averages visible positions only.

Memory: `remat` = "none" | "blocks" (every block recomputed in the backward pass) |
"full" (every stage recomputed: only stage boundaries are kept).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from encoders.common import EncoderOutput, masked_mean, remat, resize_mask

SIZES = {  # name: (depths, widths)
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
}
REMAT = ("none", "blocks", "full")
LN_EPS = 1e-6


def _mask_at(mask, x):
  return None if mask is None else resize_mask(mask, x.shape[1], x.shape[2]).astype(x.dtype)


def _apply_mask(x, m):
  return x if m is None else x * m


class Block(nn.Module):
  """Depth-wise 7x7 conv -> LN -> 4C -> GELU -> C -> layer scale -> drop path, + input."""
  drop_rate: float
  layer_scale_init: float
  train: bool
  dtype: Any

  @nn.compact
  def __call__(self, x, mask):
    c = x.shape[-1]
    m = _mask_at(mask, x)
    y = nn.Conv(c, (7, 7), padding=3, feature_group_count=c, dtype=self.dtype,
                kernel_init=nn.initializers.truncated_normal(0.02), name="dwconv")(x)
    y = _apply_mask(y, m)
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm")(y)
    y = nn.Dense(4 * c, dtype=self.dtype, kernel_init=nn.initializers.truncated_normal(0.02),
                 name="pwconv1")(y)
    y = nn.gelu(y, approximate=False)
    y = nn.Dense(c, dtype=self.dtype, kernel_init=nn.initializers.truncated_normal(0.02),
                 name="pwconv2")(y)
    if self.layer_scale_init > 0:
      gamma = self.param("gamma", nn.initializers.constant(self.layer_scale_init), (c,))
      y = y * gamma.astype(y.dtype)
    if self.train and self.drop_rate > 0:
      rng = self.make_rng("dropout" if self.has_rng("dropout") else "augment")
      keep = jax.random.bernoulli(rng, 1.0 - self.drop_rate, (x.shape[0], 1, 1, 1))
      y = y * keep.astype(y.dtype) / (1.0 - self.drop_rate)
    return _apply_mask(x + y, m)


class Stage(nn.Module):
  """Optional downsampling (LN + 2x2 conv, stride 2), then the stage's blocks."""
  width: int
  depth: int
  drop_rates: tuple
  downsample: bool
  layer_scale_init: float
  remat_blocks: bool
  train: bool
  dtype: Any

  @nn.compact
  def __call__(self, x, mask):
    if self.downsample:
      x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="down_norm")(x)
      x = nn.Conv(self.width, (2, 2), 2, padding="VALID", dtype=self.dtype,
                  kernel_init=nn.initializers.truncated_normal(0.02), name="down_conv")(x)
      x = _apply_mask(x, _mask_at(mask, x))
    block = remat(Block) if self.remat_blocks else Block
    for i in range(self.depth):
      x = block(self.drop_rates[i], self.layer_scale_init, self.train, self.dtype,
                name=f"block{i}")(x, mask)
    return x


class ConvNeXt(nn.Module):
  """ConvNeXt encoder: pooled features (LayerNorm of the visible mean) and maps 4..32."""
  depths: tuple = SIZES["tiny"][0]
  widths: tuple = SIZES["tiny"][1]
  drop_path: float = 0.0
  layer_scale_init: float = 1e-6
  remat: str = "none"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool, mask=None):
    if self.remat not in REMAT:
      raise ValueError(f"remat must be one of {REMAT}, not {self.remat!r}")
    x = images.astype(self.dtype)
    x = _apply_mask(x, _mask_at(mask, x))
    x = nn.Conv(self.widths[0], (4, 4), 4, padding="VALID", dtype=self.dtype,
                kernel_init=nn.initializers.truncated_normal(0.02), name="stem_conv")(x)
    x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="stem_norm")(x)
    x = _apply_mask(x, _mask_at(mask, x))
    total = sum(self.depths)
    rates = [self.drop_path * i / max(total - 1, 1) for i in range(total)]
    stage = remat(Stage) if self.remat == "full" else Stage
    maps, stride, first = {}, 4, 0
    for i, (depth, width) in enumerate(zip(self.depths, self.widths)):
      x = stage(width, depth, tuple(rates[first:first + depth]), i > 0, self.layer_scale_init,
                self.remat == "blocks", train, self.dtype, name=f"stage{i}")(x, mask)
      first += depth
      stride *= 2 if i > 0 else 1
      maps[stride] = x
    pooled = masked_mean(x.astype(jnp.float32), _mask_at(mask, x))
    pooled = nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, name="norm")(pooled)
    return EncoderOutput(pooled.astype(jnp.float32), maps)
