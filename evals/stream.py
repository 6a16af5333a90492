"""Streamed feature extraction: batches from the grain pipeline, features on the host.

Only features ever accumulate on the host: images are decoded, resized and centre-cropped
batch by batch by `selfsup.data.make_pipeline` (the evaluation form: no shuffle, one
epoch, last batch kept), embedded by the encoder jitted over all devices (the batch split
over the mesh's `data` axis, the last batch padded to the full batch and masked, so the
function compiles once), and written into one preallocated (N, D) float32 array. Host
memory is therefore the features plus a few batches of images in flight, whatever the
size of the dataset (ImageNet's training set as uint8 arrays would be about 193 GB).

The examples are those `selfsup.data.load_arrays` gives: a seeded random subset for
`max_examples` (sorted, so source order is kept) and each readable example once (a
folder's substitute for a corrupt file carries another index and is dropped).

With several processes each process reads every `process_count`-th example of the list,
and the features of each global batch come back to every process (replicated), so every
process ends with all features in list order.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from selfsup import augment
from selfsup import data as data_lib
from selfsup.errors import UserError


@dataclasses.dataclass
class _Positions:
  """A source restricted to (and reordered as) `positions`; keeps the source's `index`."""
  source: Any
  positions: np.ndarray

  def __len__(self) -> int:
    return len(self.positions)

  def __getitem__(self, i: int) -> dict:
    return self.source[int(self.positions[i])]

  def for_image_size(self, image_size: int) -> '_Positions':
    for_size = getattr(self.source, 'for_image_size', None)
    return self if for_size is None else _Positions(for_size(image_size), self.positions)


def image_features(encoder) -> Callable:
  """(variables, uint8 images) -> pooled features of whole normalised images."""
  def fn(variables, images):
    x = augment.eval_view(images)
    return encoder.apply(variables, x, train=False).pooled
  return fn


def objective_features(encoder, objective) -> Callable:
  """(variables, uint8 images) -> features read the objective's way (`eval_features`)."""
  def fn(variables, images):
    encoder_fn = lambda x: encoder.apply(variables, x, train=False).pooled
    return objective.eval_features(encoder_fn, images)
  return fn


@functools.lru_cache(maxsize=16)
def _jitted(feature_fn: Callable, mesh):
  """feature_fn jitted over the mesh, once per (function, mesh): a probe's train and test
  splits (and several probes with one feature function) share one compile."""
  from selfsup import sharding as sharding_lib
  batch = sharding_lib.batch_sharding(mesh)
  replicated = sharding_lib.replicated(mesh)

  def embed(variables, images, index, label):
    return feature_fn(variables, images).astype(jnp.float32), index, label

  # Outputs replicated: every process gets the whole global batch's features.
  return jax.jit(embed, in_shardings=(replicated,) + (batch,) * 3,
                 out_shardings=(replicated,) * 3)


def stream_features(feature_fn: Callable, variables, source, *, image_size: int,
                    batch_size: int = 256, max_examples: int | None = None, seed: int = 0,
                    num_workers: int = 0, devices=None, crop_fraction: float = 1.0,
                    nonfinite_message: str | None = None,
                    progress=None) -> tuple[np.ndarray, np.ndarray]:
  """Features and labels of a source, extracted batch by batch.

  Args:
    feature_fn: (variables, uint8 (B, S, S, 3)) -> (B, D), jittable (`image_features`,
      `objective_features`).
    variables: the encoder's variables (replicated over the devices).
    source: a random-access source (`selfsup.data.make_source`).
    image_size: evaluation image size (resize the shorter side + centre crop).
    crop_fraction: the centre crop's side over the resized shorter side (0.875 for
      ImageNet-style data, 1.0 for 32 px data; the run's `config.data.eval_crop_fraction`).
    batch_size: global batch; rounded up to a multiple of the device count.
    max_examples: a seeded random subset of this many examples (None: all).
    seed: the subset's seed (the same subset as `load_arrays`).
    num_workers: grain worker processes for decoding (0: threads in this process).
    devices: devices of the mesh (default: all).
    nonfinite_message: if given, a batch with a NaN or infinite feature raises
      UserError(nonfinite_message) at once.
    progress: a tqdm-like bar: reset to the number of batches, advanced per batch.

  Returns:
    features float32 (N, D) and labels int32 (N,), in source order.
  """
  from selfsup import sharding as sharding_lib
  if max_examples is not None and max_examples < 1:
    raise UserError(f'max_examples must be a positive number of examples, got {max_examples}')
  mesh = sharding_lib.make_mesh(devices=devices)
  num_devices = mesh.devices.size
  pc, pi = jax.process_count(), jax.process_index()
  step = math.lcm(num_devices, pc)
  global_batch = max(step, -(-int(batch_size) // step) * step)
  local_batch = global_batch // pc

  positions = data_lib.subset_positions(len(source), max_examples, seed)
  n = len(positions)
  mine = positions[pi::pc]
  steps = -(-len(positions[0::pc]) // local_batch)  # process 0 has the most examples

  batch_sharding = sharding_lib.batch_sharding(mesh)
  replicated = sharding_lib.replicated(mesh)

  embed = _jitted(feature_fn, mesh)
  variables = jax.device_put(variables, replicated)

  def global_array(local):
    return jax.make_array_from_process_local_data(
        batch_sharding, local, (global_batch,) + local.shape[1:])

  iterator = None
  if len(mine):
    iterator = data_lib.make_pipeline(
        _Positions(source, mine), batch_size=local_batch, image_size=image_size, seed=0,
        shuffle=False, num_epochs=1, drop_remainder=False, num_workers=num_workers,
        crop_fraction=crop_fraction, process_index=0, process_count=1)

  features = None
  labels = np.zeros((n,), np.int32)
  keep = np.zeros((n,), bool)
  # Row r of process p's part of step s is list entry ((s * local_batch + r) * pc + p).
  local_rows = np.arange(local_batch)
  if progress is not None:
    progress.reset(total=steps)
  for s in range(steps):
    batch = next(iterator, None) if iterator is not None else None
    images = np.zeros((local_batch, image_size, image_size, 3), np.uint8)
    index = np.full((local_batch,), -1, np.int32)
    label = np.zeros((local_batch,), np.int32)
    if batch is not None:
      b = len(batch['index'])
      images[:b], index[:b], label[:b] = batch['image'], batch['index'], batch['label']
    feats, idx, labs = (np.asarray(a) for a in embed(
        variables, global_array(images), global_array(index), global_array(label)))
    if features is None:
      features = np.zeros((n, feats.shape[-1]), np.float32)
    # Global row q = p * local_batch + r (processes in order over the data axis).
    p = np.repeat(np.arange(pc), local_batch)
    r = np.tile(local_rows, pc)
    j = (s * local_batch + r) * pc + p
    valid = (j < n) & (idx >= 0)
    jv = j[valid]
    ok = idx[valid] == positions[jv]  # a substitute for a corrupt file: dropped
    if nonfinite_message and not np.isfinite(feats[valid][ok]).all():
      raise UserError(nonfinite_message)
    features[jv] = feats[valid]
    labels[jv] = labs[valid]
    keep[jv] = ok
    if progress is not None:
      progress.update(1)
  if features is None:
    return np.zeros((0, 0), np.float32), labels
  if not keep.all():
    features, labels = features[keep], labels[keep]
  return features, labels


# ----------------------------------------------------------------------------------------
# An on-disk cache of features (float16), one file per (checkpoint, data, preprocessing).


def cache_path(cache_dir: str, **key) -> str:
  """The cache file for one extraction, named by a hash of everything it depends on."""
  text = json.dumps(key, sort_keys=True, default=str)
  return os.path.join(cache_dir, hashlib.sha256(text.encode()).hexdigest()[:24] + '.npz')


def load_cached(path: str):
  """(features float32, labels) from a cache file, or None when there is none."""
  if not os.path.exists(path):
    return None
  with np.load(path) as f:
    return f['x'].astype(np.float32), f['y']


def save_cached(path: str, features: np.ndarray, labels: np.ndarray, key: dict) -> np.ndarray:
  """Writes features as float16 (float32 if they overflow it); returns what was stored,
  as float32, so a first run probes exactly what a cached rerun will."""
  stored = features.astype(np.float16)
  if not np.isfinite(stored[np.isfinite(features)]).all():
    stored = features
  tmp = path + '.tmp.npz'
  np.savez(tmp, x=stored, y=labels, key=json.dumps(key, sort_keys=True, default=str))
  os.replace(tmp, path)
  return stored.astype(np.float32)
