"""What every encoder returns, and the mask helpers shared by the convnets."""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class EncoderOutput(NamedTuple):
  """Pooled features and feature maps keyed by their stride relative to the input.

  `pooled` is (B, D) float32 whatever the compute dtype, so heads and probes see one
  precision. `maps[s]` is (B, H/s, W/s, C_s) for convnets and the (B, h, w, D) token grid
  for ViT. Objectives pick what they need (`maps[max(maps)]` is the deepest one).
  """
  pooled: jax.Array
  maps: dict


class PatchMask(NamedTuple):
  """A visibility mask on a patch grid with a static count of visible patches.

  Convnets only need `visible`; ViT also needs `num_visible` (a Python int) to drop
  masked tokens with static shapes under jit. Plain boolean arrays are accepted by the
  convnets too.
  """
  visible: jax.Array  # (B, h, w) bool, True = visible
  num_visible: int


def resize_mask(mask, height: int, width: int) -> jax.Array:
  """Nearest-neighbour resize of a (B, h, w) visibility mask to (B, height, width, 1).

  SparK-style masked convnets multiply every activation by the mask at that resolution,
  which emulates sparse convolution densely (masked positions stay exactly zero).
  """
  if isinstance(mask, PatchMask):
    mask = mask.visible
  b, h, w = mask.shape
  if height % h == 0 and width % w == 0:
    m = jnp.repeat(jnp.repeat(mask, height // h, axis=1), width // w, axis=2)
  else:
    rows = (jnp.arange(height) * h) // height
    cols = (jnp.arange(width) * w) // width
    m = mask[:, rows][:, :, cols]
  return m[..., None].astype(jnp.float32)


def masked_mean(x: jax.Array, m) -> jax.Array:
  """Global average pool over (H, W), counting only visible positions when m is given."""
  if m is None:
    return jnp.mean(x, axis=(1, 2))
  m = m.astype(x.dtype)
  return jnp.sum(x * m, axis=(1, 2)) / jnp.maximum(jnp.sum(m, axis=(1, 2)), 1)


def gather_visible(tokens: jax.Array, visible: jax.Array, num_visible: int):
  """The visible tokens of each row, in grid order, with a static count.

  tokens: (B, L, D); visible: (B, L) bool with exactly `num_visible` True per row.
  Returns ((B, num_visible, D) tokens, (B, num_visible) their positions).
  """
  order = jnp.argsort(~visible, axis=1, stable=True)
  keep = order[:, :num_visible]
  return jnp.take_along_axis(tokens, keep[..., None], axis=1), keep


def scatter_tokens(tokens: jax.Array, keep: jax.Array, length: int, fill=0.0) -> jax.Array:
  """The inverse of `gather_visible` (MAE's unshuffle): (B, n, D) tokens back to their
  positions `keep` on (B, length, D); the other positions hold `fill` (a scalar or (D,))."""
  b, _, d = tokens.shape
  grid = jnp.broadcast_to(jnp.asarray(fill, tokens.dtype), (b, length, d))
  return grid.at[jnp.arange(b)[:, None], keep].set(tokens)


def scan_children(mdl, template, names, x, *args, remat: bool = False):
  """x -> the children `names` of module `mdl` applied in turn (`child(x, *args)`), as one
  `lax.scan` over their stacked variables, so XLA compiles one body for all of them.

  The children must be identical in structure: `template` is an unbound module like
  them (`parent=None`). Their parameters stay where `mdl.init` created them (one entry
  per child); new BatchNorm statistics, if any, are written back to the same places.
  `remat`: each child is recomputed in the backward pass (as `nn.remat` does). The
  stacking (and unstacking of the gradients) copies the children's parameters once per
  step, small next to their activations.
  """
  variables = mdl.variables
  cols = [c for c in ("params", "batch_stats") if c in variables]
  stacked = {c: jax.tree.map(lambda *xs: jnp.stack(xs), *[variables[c][n] for n in names])
             for c in cols}
  update = "batch_stats" in cols and mdl.is_mutable_collection("batch_stats")

  def one(x, v):
    if update:
      y, new = template.apply(v, x, *args, mutable=["batch_stats"])
      return y, new["batch_stats"]
    return template.apply(v, x, *args), None

  if remat:
    one = jax.checkpoint(one)
  x, new_stats = jax.lax.scan(one, x, stacked)
  if update:
    for i, n in enumerate(names):
      mdl.put_variable("batch_stats", n, jax.tree.map(lambda a, i=i: a[i], new_stats))
  return x
