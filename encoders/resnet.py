"""ResNet v1.5 (stride in the 3x3 conv of bottlenecks), He et al. 2016.

Depths 18/34 (basic blocks) and 50/101/152 (bottlenecks), a width multiplier, and the
CIFAR stem (3x3 conv, stride 1, no max-pool) used by SimCLR/solo-learn on 32x32 images.
With a `mask` (B, h, w) of visible positions, every conv output is re-masked and
BatchNorm statistics use visible positions only: the dense emulation of sparse
convolution that SparK relies on.

`zero_init_residual` (on by default, for training): the last BatchNorm of every residual
block starts with scale 0, so each block starts as the identity (Goyal et al. 2017). A
network initialised that way and never trained is effectively its stem plus the
projection shortcuts, so the random-init baseline (`evals.features.random_init_variables`)
builds the same architecture with it off: every BatchNorm scale 1, the standard init.
"""

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from encoders.common import EncoderOutput, masked_mean, remat, resize_mask, scan_children

STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


class _Masked(nn.Module):
  """Conv -> mask -> BN(masked statistics) [-> ReLU] -> mask."""
  features: int
  kernel: int
  stride: int
  relu: bool
  train: bool
  dtype: Any
  zero_init_scale: bool = False

  @nn.compact
  def __call__(self, x, mask):
    x = nn.Conv(self.features, (self.kernel, self.kernel), self.stride, use_bias=False,
                dtype=self.dtype, kernel_init=nn.initializers.variance_scaling(
                    2.0, "fan_out", "normal"))(x)
    m = None if mask is None else resize_mask(mask, x.shape[1], x.shape[2])
    if m is not None:
      x = x * m.astype(x.dtype)
    scale_init = nn.initializers.zeros if self.zero_init_scale else nn.initializers.ones
    x = nn.BatchNorm(use_running_average=not self.train, momentum=0.9, epsilon=1e-5,
                     dtype=self.dtype, scale_init=scale_init)(
                         x, mask=None if m is None else m > 0)
    if self.relu:
      x = nn.relu(x)
    if m is not None:
      x = x * m.astype(x.dtype)
    return x


class BasicBlock(nn.Module):
  features: int
  stride: int
  train: bool
  dtype: Any
  zero_init_residual: bool = True

  @nn.compact
  def __call__(self, x, mask):
    layer = partial(_Masked, train=self.train, dtype=self.dtype)
    y = layer(self.features, 3, self.stride, True)(x, mask)
    y = layer(self.features, 3, 1, False, zero_init_scale=self.zero_init_residual)(y, mask)
    if x.shape != y.shape:
      x = layer(self.features, 1, self.stride, False)(x, mask)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  features: int
  stride: int
  train: bool
  dtype: Any
  zero_init_residual: bool = True

  @nn.compact
  def __call__(self, x, mask):
    layer = partial(_Masked, train=self.train, dtype=self.dtype)
    y = layer(self.features, 1, 1, True)(x, mask)
    y = layer(self.features, 3, self.stride, True)(y, mask)
    y = layer(self.features * 4, 1, 1, False, zero_init_scale=self.zero_init_residual)(y, mask)
    if x.shape != y.shape:
      x = layer(self.features * 4, 1, self.stride, False)(x, mask)
    return nn.relu(x + y)


REMAT = ("none", "blocks", "full")


def check_remat(remat: str) -> None:
  if remat not in REMAT:
    from selfsup.errors import UserError
    raise UserError(f"remat must be one of {', '.join(REMAT)}, not {remat!r}")


class ResNet(nn.Module):
  """ResNet encoder returning pooled features and the four stage outputs by stride.

  `remat` (activation rematerialisation, trading compute for memory; config.train.remat):
  "none" keeps every activation for the backward pass; "blocks" keeps only each
  residual block's input and recomputes the block in the backward pass (about one more
  forward pass); "full" also recomputes the whole encoder forward in the backward pass,
  so between the two passes only the input images are held (the encoder's activations
  are not kept while other views' or objectives' graphs run; about two more forward
  passes). Parameter names are the same for all three.

  `scan_blocks` (config.train.scan_blocks): run the identical blocks of each stage (all
  but its first, in stages of 3 or more blocks) as one `lax.scan` over their stacked
  parameters, so XLA compiles one block body per stage instead of one per block:
  ResNet-50's 16 blocks become 8 bodies. Same parameters (names, shapes, init), same
  outputs up to float rounding; only the compiled program differs. For GPU/TPU: XLA's
  CPU backend compiles and runs convolutions inside a loop body far slower.
  """
  depth: int = 50
  width_multiplier: float = 1.0
  cifar_stem: bool = False
  dtype: Any = jnp.float32
  zero_init_residual: bool = True  # last BN scale of each block starts at 0 (training)
  remat: str = "none"
  scan_blocks: bool = False

  @nn.compact
  def __call__(self, images, *, train: bool, mask=None):
    check_remat(self.remat)
    kind, blocks = STAGES[self.depth]
    block_cls = BasicBlock if kind == "basic" else Bottleneck
    block = remat(block_cls) if self.remat != "none" else block_cls
    width = max(8, int(64 * self.width_multiplier))

    def body(mdl, images):
      # Submodules below are created in this module's scope; `mdl` is this module (or
      # its clone under nn.remat), whose variables the scanned blocks read and write.
      x = images.astype(self.dtype)
      if mask is not None:  # masked pixels must not leak into visible receptive fields
        x = x * resize_mask(mask, x.shape[1], x.shape[2]).astype(x.dtype)
      if self.cifar_stem:
        x = _Masked(width, 3, 1, True, train, self.dtype)(x, mask)
        stride = 1
      else:
        x = _Masked(width, 7, 2, True, train, self.dtype)(x, mask)
        x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        stride = 4
      maps = {}
      k = 0
      for i, n in enumerate(blocks):
        names = [f"{block_cls.__name__}_{k + j}" for j in range(n)]
        k += n
        # The blocks after a stage's first are identical (stride 1, same width): one
        # lax.scan body compiles for all of them (apply only; init creates the usual
        # per-block parameters, so the parameter tree does not depend on scan_blocks).
        scanned = self.scan_blocks and n > 2 and not mdl.is_initializing()
        for j, name in enumerate(names[:1] if scanned else names):
          s = 2 if (i > 0 and j == 0) else 1
          # Explicit names: the ones Flax gives the plain class, whatever `remat` is.
          x = block(width * 2**i, s, train, self.dtype, self.zero_init_residual,
                    name=name)(x, mask)
        if scanned:
          x = scan_children(mdl, block_cls(width * 2**i, 1, train, self.dtype,
                                           self.zero_init_residual, parent=None),
                            names[1:], x, mask, remat=self.remat != "none")
        stride *= 2 if i > 0 else 1
        maps[stride] = x
      m = None if mask is None else resize_mask(mask, x.shape[1], x.shape[2])
      return EncoderOutput(masked_mean(x, m).astype(jnp.float32), maps)

    if self.remat == "full":
      body = remat(body)
    return body(self, images)
