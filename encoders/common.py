"""What every encoder returns, and the mask helpers shared by the convnets."""

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import lift


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


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _is_float(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.inexact)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _recompute(f, by_row, diff, other):
  return f(diff, other)


def _recompute_fwd(f, by_row, diff, other):
  return f(diff, other), (diff, other)


def _tie(xs, by_row, ct):
  """xs (float arrays) plus zeros computed from the cotangent `ct`: the same values, but
  every use of the result waits for `ct`.

  The zero of example i is `float(s_i > inf)`, s_i the sum of one entry of row i of each
  cotangent with that leading size: always 0 (NaN included), and XLA cannot fold it.
  xs[i] with `by_row[i]` (activations) whose leading size is a cotangent's gets its
  rows' zeros, so a batch-sharded activation is tied without communication; the others
  (parameters) get one scalar zero, which on a batch-sharded mesh is one scalar
  all-reduce. Tying only the activations is not enough: ViT-Ti's blocks then needed 309
  MiB instead of 156 on this CPU (docs/design.md). Not `lax.optimization_barrier((xs,
  ct))`: XLA's CPU compiler removes barriers before it schedules
  (OptimizationBarrierExpander), so they order nothing there, and a barrier over the
  zero cotangents of unused outputs makes XLA materialise them. The tie also keeps XLA
  from merging the recomputation with the forward pass (CSE): the inputs differ.
  """
  rows = {}
  for c in jax.tree.leaves(ct):
    if _is_float(c) and c.ndim and c.size:
      rows.setdefault(c.shape[0], []).append(c[(slice(None),) + (0,) * (c.ndim - 1)]
                                             .astype(jnp.float32))
  if not rows:
    return xs
  zeros = {n: (sum(r) > jnp.inf).astype(jnp.float32) for n, r in rows.items()}
  scalar = sum(z[0] for z in zeros.values())

  def tied(a, row):
    if row and a.ndim and a.shape[0] in zeros:
      return a + zeros[a.shape[0]].reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype)
    return a + scalar.astype(a.dtype)
  return [tied(a, row) for a, row in zip(xs, by_row)]


def _recompute_bwd(f, by_row, residuals, ct):
  diff, other = residuals
  diff = _tie(diff, by_row, ct)   # the recomputation waits for the cotangent
  _, vjp = jax.vjp(lambda d: f(d, other), diff)
  return vjp(ct)[0], jax.tree.map(lambda _: None, other)


_recompute.defvjp(_recompute_fwd, _recompute_bwd)


def recompute_after_cotangent(fun, row_argnums=()):
  """`jax.checkpoint(fun)` whose recomputation waits for the cotangent.

  A custom VJP: the forward pass keeps only `fun`'s inputs; the backward pass reruns
  `fun` on them (with `jax.vjp`) once the cotangent of its outputs has arrived, because
  it reruns it on inputs tied to that cotangent (`_tie`; `row_argnums`: the arguments
  that are batch-major activations, tied row by row). `jax.checkpoint`'s inputs to the
  recomputation are ready in the forward pass, and XLA's CPU scheduler runs the
  recomputation there, right after the original, which keeps every activation alive
  (docs/design.md "Memory and compilation"). Float array inputs (and float values `fun`
  closes over) are differentiated; other arrays (integers, booleans, PRNG keys) get no
  gradient; other leaves (Python numbers, None) stay static. Reverse mode only (a custom
  VJP has no `jax.jvp`).
  """
  def wrapped(*args):
    leaves, tree = jax.tree.flatten(args)
    owner = [i for i, arg in enumerate(args) for _ in jax.tree.leaves(arg)]
    arrays = [i for i, a in enumerate(leaves) if _is_array(a)]
    is_diff = {i: _is_float(leaves[i]) for i in arrays}

    def f(diff, other):
      d, o, full = iter(diff), iter(other), list(leaves)
      for i in arrays:
        full[i] = next(d) if is_diff[i] else next(o)
      return fun(*jax.tree.unflatten(tree, full))

    diff = [leaves[i] for i in arrays if is_diff[i]]
    other = [leaves[i] for i in arrays if not is_diff[i]]
    by_row = tuple(owner[i] in row_argnums for i in arrays if is_diff[i])
    # Float values `fun` closes over (maybe differentiated) become explicit inputs.
    g, consts = jax.closure_convert(f, diff, other)
    n = len(diff)
    return _recompute(lambda d, o: g(d[:n], o, *d[n:]), by_row + (False,) * len(consts),
                      diff + list(consts), other)
  return wrapped


def _lift_remat(fn, variables=True, rngs=True):
  """`flax.core.lift.checkpoint` with `recompute_after_cotangent` for `jax.checkpoint`."""
  def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args, **kwargs):
    def rematted(variable_groups, rng_groups, *args):
      scope = scope_fn(variable_groups, rng_groups)
      y = fn(scope, *args, **kwargs)
      return y, repack_fn(scope)
    rows = tuple(range(2, 2 + len(args)))   # the call's arguments, not the variables
    return recompute_after_cotangent(rematted, rows)(variable_groups, rng_groups, *args)
  return lift.pack(inner, (variables,), (variables,), (rngs,), name="remat")


def remat(target):
  """`nn.remat` (a Module class, or a method-like function of a module) whose
  recomputation runs in the backward pass, after the cotangent arrives
  (`recompute_after_cotangent`). Same variables, names, rng streams and mutable
  collections (BatchNorm statistics) as the plain target."""
  return nn.transforms.lift_transform(_lift_remat, target)
