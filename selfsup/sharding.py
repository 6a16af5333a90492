"""The device mesh and per-parameter sharding rules.

One `Mesh` with axes ("data", "model"). Batches are split over "data". Parameters follow
a rule: `replicate` (data parallel), or `fsdp` (shard the largest dimension divisible by
the data-axis size, for arrays of at least `fsdp_min_size` elements; XLA inserts the
all-gathers). Tensor parallelism splits ViT attention/MLP kernels over "model"
(Megatron-style: fc1/qkv by output columns, fc2/out by input rows). Under `jax.jit`
with these shardings the program is written for the global batch, so BatchNorm
statistics and contrastive negatives span all devices by construction.
"""

import re

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from selfsup.errors import UserError

STRATEGIES = ("replicate", "fsdp")


def make_mesh(data: int = -1, model: int = 1, devices=None) -> Mesh:
  devices = np.asarray(devices if devices is not None else jax.devices())
  n = devices.size
  if model < 1 or n % model:
    raise UserError(f"mesh.model={model} must divide the {n} devices")
  if data == -1:
    data = n // model
  if data * model != n:
    raise UserError(f"mesh.data x mesh.model = {data} x {model} must equal the number of "
                    f"devices ({n}); use mesh.data=-1 to take the rest")
  return Mesh(devices.reshape(data, model), ("data", "model"))


_TENSOR_PARALLEL = [  # (path regex, which axis of the kernel goes over "model")
    (r".*/attn/(query|key|value)/kernel$", 1),  # (D, heads, head_dim): split heads
    (r".*/attn/out/kernel$", 0),               # (heads, head_dim, D)
    (r".*/mlp/fc1/kernel$", 1),
    (r".*/mlp/fc2/kernel$", 0),
]


def param_spec(path: str, shape, mesh: Mesh, strategy: str, fsdp_min_size: int) -> P:
  spec = [None] * len(shape)
  model_size = mesh.shape["model"]
  if model_size > 1:
    for pattern, axis in _TENSOR_PARALLEL:
      if re.match(pattern, path) and shape[axis] % model_size == 0:
        spec[axis] = "model"
        break
  if strategy == "fsdp":
    data_size = mesh.shape["data"]
    if int(np.prod(shape)) >= fsdp_min_size and data_size > 1:
      for axis in np.argsort(shape)[::-1]:
        if spec[axis] is None and shape[axis] % data_size == 0:
          spec[axis] = "data"
          break
  elif strategy != "replicate":
    raise UserError(f"unknown mesh.sharding {strategy!r}; valid: {', '.join(STRATEGIES)}")
  return P(*spec)


def tree_shardings(tree, mesh: Mesh, strategy: str = "replicate", fsdp_min_size: int = 2**18):
  """NamedShardings for every array of a pytree of (possibly abstract) arrays."""
  def one(path, leaf):
    name = "/".join(_key_name(k) for k in path)
    shape = getattr(leaf, "shape", ())
    return NamedSharding(mesh, param_spec(name, shape, mesh, strategy, fsdp_min_size))
  return jax.tree_util.tree_map_with_path(one, tree)


def _key_name(k):
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def process_rows(batch_sharding: NamedSharding, batch_size: int) -> tuple[int, int]:
  """(lo, hi): the rows of a global batch this process's devices hold.

  With the mesh over `jax.devices()` (process 0's devices first) these are rows
  [i*B/P, (i+1)*B/P) of process i; the input pipeline reads exactly them.
  """
  starts, stops = [], []
  for index in batch_sharding.addressable_devices_indices_map((batch_size,)).values():
    rows = index[0]
    starts.append(rows.start or 0)
    stops.append(batch_size if rows.stop is None else rows.stop)
  lo, hi = min(starts), max(stops)
  held = set()
  for a, b in zip(starts, stops):
    held.update(range(a, b))
  if held != set(range(lo, hi)):
    raise UserError(f"this process's devices hold rows {sorted(held)} of the batch, not one "
                    "contiguous block; order the mesh's devices by process")
  return lo, hi
