"""A four-layer CNN with BatchNorm: fast enough for tests and the CPU quickstart."""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from encoders.common import EncoderOutput, masked_mean, resize_mask


class TinyCNN(nn.Module):
  """Four conv3x3 stages with BatchNorm, each halving the resolution; maps at strides 2..16."""
  widths: Sequence[int] = (16, 32, 64, 128)
  first_stride: int = 2  # stride-2 first conv: 4x less CPU work, maps at strides 2..16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool, mask=None):
    x = images.astype(self.dtype)
    if mask is not None:  # masked pixels must not leak into visible positions' receptive fields
      x = x * resize_mask(mask, x.shape[1], x.shape[2]).astype(x.dtype)
    maps = {}
    stride = 1
    for i, width in enumerate(self.widths):
      s = self.first_stride if i == 0 else 2
      stride *= s
      x = nn.Conv(width, (3, 3), strides=s, use_bias=False, dtype=self.dtype)(x)
      m = None if mask is None else resize_mask(mask, x.shape[1], x.shape[2])
      if m is not None:
        x = x * m.astype(x.dtype)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(
          x, mask=None if m is None else m > 0)
      x = nn.relu(x)
      if m is not None:
        x = x * m.astype(x.dtype)
      maps[stride] = x
    pooled = masked_mean(x, None if mask is None else resize_mask(mask, x.shape[1], x.shape[2]))
    return EncoderOutput(pooled.astype(jnp.float32), maps)

