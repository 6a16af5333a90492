"""Vision Transformer (Dosovitskiy et al. 2021), pre-LayerNorm, learned position embeddings.

With a `mask` (B, h, w) of visible patches (the same count of visible patches in every
example, as masked autoencoding draws them), the encoder runs on the visible tokens only
and scatters its outputs back onto the token grid with zeros at masked places, so
objectives see one (B, h, w, D) layout either way.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from encoders.common import (EncoderOutput, PatchMask, gather_visible, remat, scan_children,
                             scatter_tokens)
from encoders.resnet import check_remat

SIZES = {  # name: (width, depth, mlp_dim, heads)
    "ti": (192, 12, 768, 3),
    "s": (384, 12, 1536, 6),
    "b": (768, 12, 3072, 12),
}


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x)
    x = nn.gelu(x)
    return nn.Dense(d, dtype=self.dtype, name="fc2")(x)


class EncoderBlock(nn.Module):
  mlp_dim: int
  num_heads: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(dtype=self.dtype, name="ln1")(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype,
                                        name="attn")(y, y)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype, name="ln2")(x)
    return x + MlpBlock(self.mlp_dim, self.dtype, name="mlp")(y)


class ViT(nn.Module):
  """ViT encoder; `pooling` is "cls" (class token) or "mean" (mean of patch tokens)."""
  width: int = 384
  depth: int = 12
  mlp_dim: int = 1536
  num_heads: int = 6
  patch_size: int = 16
  pooling: str = "cls"
  dtype: Any = jnp.float32
  # none | blocks (each transformer block recomputed in the backward pass) | full (the
  # whole block stack recomputed; only its input kept between the passes)
  remat: str = "none"
  # One compiled body for the blocks (a lax.scan over their stacked parameters; the
  # parameter tree is unchanged): see encoders.common.scan_children.
  scan_blocks: bool = False

  def _pos_embed(self, gh: int, gw: int, d: int):
    """The learned position embeddings for a gh x gw token grid.

    Created for the grid of the initialising images; read at another resolution (a
    32 px CIFAR model probed at VTAB's 224 px, say) they are resized bilinearly on the
    square grid they were learned on, as big_vision does when it loads a ViT at a new
    resolution. Read with `get_variable` because `param` refuses a stored shape other
    than the one this call would initialise.
    """
    if not self.has_variable("params", "pos_embed"):
      return self.param("pos_embed", nn.initializers.normal(0.02), (1, gh * gw, d))
    pos = self.get_variable("params", "pos_embed")
    n = pos.shape[1]
    if n == gh * gw:
      return pos
    side = int(round(n ** 0.5))
    if side * side != n:
      raise ValueError(f"ViT position embeddings for {n} tokens are not a square grid; "
                       f"cannot resize them to {gh}x{gw}")
    grid = pos.reshape(1, side, side, d).astype(jnp.float32)
    return jax.image.resize(grid, (1, gh, gw, d), "bilinear").reshape(1, gh * gw, d)

  @nn.compact
  def __call__(self, images, *, train: bool, mask=None):
    del train  # No dropout or BatchNorm: train and eval are the same function.
    check_remat(self.remat)
    x = nn.Conv(self.width, (self.patch_size, self.patch_size), self.patch_size,
                padding="VALID", dtype=self.dtype, name="patch_embed")(images.astype(self.dtype))
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    x = x + self._pos_embed(gh, gw, d).astype(self.dtype)
    keep = None
    if mask is not None:
      if not isinstance(mask, PatchMask):
        raise TypeError("ViT needs a PatchMask (visible grid + static visible count) to "
                        "drop tokens under jit")
      # Visible tokens in grid order, a static count of them.
      x, keep = gather_visible(x, mask.visible.reshape(b, gh * gw), mask.num_visible)
    if self.pooling == "cls":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, d)).astype(self.dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
    block = remat(EncoderBlock) if self.remat != "none" else EncoderBlock

    def blocks(mdl, x):
      # The blocks are created in this module's scope; `mdl` is this module (or its
      # clone under nn.remat), whose variables the scanned blocks read.
      scanned = self.scan_blocks and self.depth > 2 and not mdl.is_initializing()
      for i in range(1 if scanned else self.depth):
        x = block(self.mlp_dim, self.num_heads, self.dtype, name=f"block{i}")(x)
      if scanned:   # blocks 1.. as one lax.scan (block 0 as the others: the same body)
        x = scan_children(mdl, EncoderBlock(self.mlp_dim, self.num_heads, self.dtype,
                                            parent=None),
                          [f"block{i}" for i in range(1, self.depth)], x,
                          remat=self.remat != "none")
      return x

    if self.remat == "full":   # the whole stack recomputed in the backward pass
      blocks = remat(blocks)
    x = blocks(self, x)
    x = nn.LayerNorm(dtype=self.dtype, name="ln_final")(x)
    if self.pooling == "cls":
      pooled, tokens = x[:, 0], x[:, 1:]
    else:
      tokens = x
      pooled = jnp.mean(tokens, axis=1)
    if keep is not None:
      tokens = scatter_tokens(tokens, keep, gh * gw)
    return EncoderOutput(pooled.astype(jnp.float32),
                         {self.patch_size: tokens.reshape(b, gh, gw, d)})

