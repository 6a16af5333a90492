"""How examples become batches: host preprocessing, the grain pipeline, its state.

The host pipeline only shuffles, shards by process, decodes, resizes to a fixed size and
batches uint8 images: every random augmentation runs on the device inside the jitted
step, which keeps hosts from becoming the bottleneck and makes runs reproducible.

Two modes (see docs/design.md, "Views from the whole image"):
  * training (`canvas_size` given): the WHOLE image is fitted into a square canvas
    (longer side = canvas_size when larger, never enlarged), padded by repeating its
    last row and column, and `valid` (int32 (y0, x0, y1, x1), canvas pixels) says
    where it is, so the device samples crops of the whole image;
  * evaluation (no `canvas_size`): shorter side resized to image_size / crop_fraction,
    centre crop of image_size.
Batches hold exactly the keys `image`, `label`, `index` (and `valid` in training mode);
source-specific extra labels (the synthetic `count`, `position`, `orientation`) are
dropped there so every source yields the same batch structure; read them from the
source itself when needed.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import json
import os
from typing import Any

import grain
import numpy as np
from PIL import Image

from selfsup.data.order import ClusterBalancedMapDataset
from selfsup.data.sources import DataSource
from selfsup.errors import UserError

# ----------------------------------------------------------------------------------------
# Host preprocessing and the grain pipeline.


def _rgb(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image.astype(np.uint8, copy=False)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  if image.shape[:2] == (height, width):
    return image
  # PIL's bilinear filter widens its support when shrinking: that is the antialiasing.
  return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def resize_and_crop(image: np.ndarray, image_size: int,
                    crop_fraction: float = 1.0) -> np.ndarray:
  """Evaluation preprocessing: shorter side to image_size / crop_fraction, centre crop.

  Bilinear, antialiased. crop_fraction 0.875 is the ImageNet convention (resize to 256,
  crop 224); 1.0 keeps the largest central square (small images such as CIFAR's).
  """
  image = _rgb(image)
  h, w = image.shape[:2]
  if (h, w) == (image_size, image_size) and crop_fraction == 1:
    return image
  short = max(image_size, round(image_size / crop_fraction))
  scale = short / min(h, w)
  nh, nw = max(short, round(h * scale)), max(short, round(w * scale))
  image = _resize(image, nh, nw)
  top, left = (nh - image_size) // 2, (nw - image_size) // 2
  return image[top:top + image_size, left:left + image_size]


def fit_to_canvas(image: np.ndarray, canvas_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Training preprocessing: the whole image in a square canvas, and where it lies.

  An image larger than the canvas is shrunk (bilinear, antialiased, aspect kept) until
  its longer side is canvas_size; a smaller one keeps its pixels (the device resamples
  each crop once, and enlarging here would only blur it twice). It is placed at the
  top-left corner and the rest of the canvas repeats its last row and column: the
  antialiasing filter of a downscaling crop reads a pixel or two beyond the crop, and
  edge padding makes that read the image's own border instead of black.

  Returns:
    canvas uint8 (canvas_size, canvas_size, 3) and valid int32 (4,) = (0, 0, h, w), the
    image's box (y0, x0, y1, x1) in canvas pixels.
  """
  image = _rgb(image)
  h, w = image.shape[:2]
  scale = min(1.0, canvas_size / max(h, w))
  nh, nw = max(1, min(canvas_size, round(h * scale))), max(1, min(canvas_size, round(w * scale)))
  image = _resize(image, nh, nw)
  if (nh, nw) != (canvas_size, canvas_size):
    # Edge padding by three slice copies: np.pad(mode='edge') is several times slower.
    canvas = np.empty((canvas_size, canvas_size, 3), np.uint8)
    canvas[:nh, :nw] = image
    canvas[nh:, :nw] = image[-1:]
    canvas[:, nw:] = canvas[:, nw - 1:nw]
    image = canvas
  return image, np.array([0, 0, nh, nw], np.int32)


@dataclasses.dataclass(frozen=True)
class _Preprocess:
  """Decode + fixed-size resize; a picklable top-level callable for grain workers.

  canvas_size > 0: training mode (`fit_to_canvas`, adds `valid`); 0: evaluation mode
  (`resize_and_crop`).
  """

  image_size: int
  canvas_size: int = 0
  crop_fraction: float = 1.0

  def __call__(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
    out = {'label': np.int32(example['label']), 'index': np.int32(example['index'])}
    if self.canvas_size:
      out['image'], out['valid'] = fit_to_canvas(example['image'], self.canvas_size)
    else:
      out['image'] = resize_and_crop(example['image'], self.image_size, self.crop_fraction)
    out['image'] = np.ascontiguousarray(out['image'])
    return out


def _sized(source: DataSource, image_size: int, crop_fraction: float = 1.0,
           canvas_size: int = 0) -> DataSource:
  """The source told the size it will be resized to, when it can decode cheaper for it.

  JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale while staying at least that size:
  both sides >= the evaluation resize (image_size / crop_fraction) or the longer side
  >= the canvas.
  """
  for_size = getattr(source, 'for_image_size', None)
  if for_size is None:
    return source
  if canvas_size:
    return for_size(canvas_size, fit='longer')
  return for_size(max(image_size, round(image_size / crop_fraction)))


def _shuffle_seed(seed: int) -> int:
  # grain seeds epoch e with (seed + e): mixing the user seed first keeps seed s + 1 from
  # replaying the epochs of seed s shifted by one.
  return int(np.random.SeedSequence([int(seed) % 2**63, 0x5EED]).generate_state(1)[0])


def _ensure_absl_flags_parsed() -> None:
  # grain's multiprocess prefetch reads an absl flag (worker profiling) and fails with
  # UnparsedFlagAccessError outside an absl app (pytest, notebooks); defaults are right.
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _process_defaults(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return int(process_index), int(process_count)


def global_order(n: int, *, seed: int, shuffle: bool = True,
                 num_epochs: int | None = None,
                 clusters: np.ndarray | None = None) -> grain.MapDataset:
  """The ONE global order of a run: position g -> dataset index, the same on every host.

  Epoch e is a permutation of range(n) (a pure function of `seed` and e; grain seeds
  epoch e with the mixed seed + e), epochs follow each other; no shuffle keeps source
  order. Global batch s is positions [s*B, (s+1)*B) of this order whatever the number of
  processes or workers; each process reads only its rows of it (`make_pipeline`).
  """
  order = grain.MapDataset.range(n)
  if shuffle and clusters is not None:
    # G-SimCLR's cluster-balanced epochs (selfsup.data.order), same position semantics.
    order = ClusterBalancedMapDataset(order, clusters, seed)
  elif shuffle:
    order = order.shuffle(seed=_shuffle_seed(seed))
  return order.repeat(num_epochs)


class _ProcessRows(grain.MapDataset):
  """Item s: this process's rows [lo, hi) of global batch s, as dataset indices.

  A last partial global batch (finite epochs, drop_remainder=False) of r < B examples
  gives each process rows [lo*r//B, hi*r//B), so the processes stay disjoint.
  """

  def __init__(self, order: grain.MapDataset, global_batch: int, lo: int, hi: int,
               drop_remainder: bool):
    super().__init__(order)
    self._b, self._lo, self._hi = global_batch, lo, hi
    total = len(order)
    self._full, self._rest = divmod(total, global_batch)
    self._len = self._full + (0 if drop_remainder or not self._rest else 1)

  def __len__(self) -> int:
    return self._len

  def __str__(self) -> str:
    return f'ProcessRows(global_batch={self._b}, rows=[{self._lo}, {self._hi}))'

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    s = int(index) % self._len if self._len else 0
    if s < self._full:
      lo, hi = self._lo, self._hi
    else:
      r = self._rest
      lo, hi = self._lo * r // self._b, self._hi * r // self._b
    start = s * self._b
    return np.array([self._parent[start + j] for j in range(lo, hi)], np.int64)


_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}


def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
  """One decode thread pool per (process, size), made on first use (so grain workers,
  which unpickle the pipeline in a new process, make their own)."""
  key = (os.getpid(), threads)
  if key not in _POOLS:
    _POOLS[key] = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix='decode')
  return _POOLS[key]


@dataclasses.dataclass(frozen=True)
class _ReadBatch:
  """Dataset indices -> a batch: read + decode + resize each in threads, then stack.

  PIL and NumPy release the GIL while decoding and resizing, so threads scale on the
  cores of the process (or grain worker) that runs this.
  """

  source: Any
  preprocess: _Preprocess
  threads: int

  def _one(self, i: int) -> dict[str, np.ndarray]:
    return self.preprocess(self.source[int(i)])

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    if self.threads > 1 and len(indices) > 1:
      examples = list(_pool(self.threads).map(self._one, indices))
    else:
      examples = [self._one(i) for i in indices]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def default_threads(num_workers: int) -> int:
  """Decode threads per process (num_workers=0) or per grain worker."""
  cores = os.cpu_count() or 1
  return min(16, 2 * cores) if num_workers == 0 else max(1, min(4, 2 * cores // num_workers))


def make_pipeline(source: DataSource, *, batch_size: int, image_size: int, seed: int,
                  shuffle: bool = True, num_epochs: int | None = None,
                  drop_remainder: bool = True, num_workers: int = 0, prefetch: int = 2,
                  process_index: int | None = None,
                  process_count: int | None = None,
                  canvas_size: int | None = None,
                  crop_fraction: float = 1.0,
                  process_rows: tuple[int, int] | None = None,
                  threads: int | None = None,
                  clusters: np.ndarray | None = None) -> grain.DatasetIterator:
  """Builds this process's checkpointable iterator of uint8 batches.

  With `canvas_size` the batches are for training: whole images fitted into canvases,
  with their `valid` boxes, for the device to crop views from. Without it they are for
  evaluation: shorter side resized to image_size / crop_fraction and centre-cropped.

  Order: ONE global order (`global_order`: a fresh permutation of the whole source every
  epoch, a pure function of `seed`, epochs back to back); global batch s is its
  positions [s*B, (s+1)*B), and this process reads only its rows of it: rows
  [i*B/P, (i+1)*B/P) for process i of P (or `process_rows`, the rows the batch sharding
  gives this process's devices). So the global batch at every step, and with it every
  number of the run, is the same whatever the number of processes, and the processes
  are disjoint. Each batch is read and decoded whole (`_ReadBatch`, in threads) by the
  main process or by one grain worker, so the batches do not depend on num_workers
  either; the iterator state counts batches, so a checkpoint made by P processes
  restores in any other number (with the same num_workers: 0 or not).

  Args:
    source: a random-access source (see `make_source`).
    batch_size: the GLOBAL batch size; each process yields batch_size // process_count.
    image_size: output height and width in evaluation mode (no canvas_size).
    seed: shuffle seed.
    shuffle: whether to shuffle (False keeps source order: evaluation).
    num_epochs: passes over the data; None repeats forever.
    drop_remainder: drop a last partial batch (only matters with finite num_epochs).
    num_workers: grain worker processes for decoding (0: threads in this process).
    prefetch: batches buffered ahead (per worker when num_workers > 0).
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).
    canvas_size: training mode: side of the canvas the whole image is fitted into
      (`fit_to_canvas`); usually >= image_size (config.data.source_size).
    clusters: (N,) cluster id per example: the cluster-balanced order
      (`selfsup.data.order`) replaces the uniform shuffle (with shuffle=True).
    crop_fraction: evaluation mode: the centre crop's side as a fraction of the resized
      shorter side (0.875 for ImageNet-style photographs, 1.0 for 32 px data).
    process_rows: (lo, hi), this process's rows of each global batch, when the device
      layout gives it others than the default (i*B/P, (i+1)*B/P).
    threads: decode threads per process, or per worker (default `default_threads`).

  Returns:
    A grain `DatasetIterator` of dicts `image` uint8 (b, S, S, 3) with S = canvas_size
    or image_size, `label` int32 (b,), `index` int32 (b,), and in training mode `valid`
    int32 (b, 4), each image's (y0, x0, y1, x1) in canvas pixels. Save and restore its
    position with `iterator_state_to_json` / `restore_iterator_state`.

  Raises:
    UserError: on invalid sizes or a batch that does not divide over the processes.
  """
  process_index, process_count = _process_defaults(process_index, process_count)
  if process_count < 1 or not 0 <= process_index < process_count:
    raise UserError(f'process_index must be in [0, process_count); got {process_index} of '
                    f'{process_count}')
  if batch_size < 1 or batch_size % process_count:
    raise UserError(f'global batch_size {batch_size} must be a positive multiple of the '
                    f'number of processes ({process_count})')
  if image_size < 1:
    raise UserError(f'image_size must be positive, got {image_size}')
  _check_crop(canvas_size, crop_fraction)
  if num_epochs is not None and num_epochs < 1:
    raise UserError(f'num_epochs must be a positive integer or None, got {num_epochs}')
  if num_workers < 0 or prefetch < 1:
    raise UserError(f'num_workers must be >= 0 and prefetch >= 1; got {num_workers} and '
                    f'{prefetch}')
  local_batch = batch_size // process_count
  if process_rows is None:
    process_rows = (process_index * local_batch, (process_index + 1) * local_batch)
  lo, hi = (int(r) for r in process_rows)
  if not 0 <= lo < hi <= batch_size:
    raise UserError(f'process_rows {process_rows} must lie within the global batch of '
                    f'{batch_size}')
  n = len(source)
  if n < 1:
    raise UserError(f'{getattr(source, "name", "source")} has no examples')

  order = global_order(n, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                       clusters=clusters)
  rows = _ProcessRows(order, batch_size, lo, hi, drop_remainder)
  threads = default_threads(num_workers) if threads is None else max(1, int(threads))
  read = _ReadBatch(_sized(source, image_size, crop_fraction, canvas_size or 0),
                    _Preprocess(image_size, canvas_size or 0, crop_fraction), threads)
  ds = rows.map(read)
  # One batch in flight in the main process (its threads decode the batch's examples in
  # parallel) and `prefetch` more buffered; workers each prefetch their own batches.
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if num_workers else 2,
                                                prefetch_buffer_size=prefetch))
  if num_workers > 0:
    _ensure_absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=prefetch))
  return iter(it_ds)


def _check_crop(canvas_size: int | None, crop_fraction: float) -> None:
  if canvas_size is not None and canvas_size < 1:
    raise UserError(f'canvas_size must be a positive number of pixels or None, got '
                    f'{canvas_size}')
  if not 0 < crop_fraction <= 1:
    raise UserError(f'crop_fraction must be in (0, 1] (0.875 for ImageNet-style '
                    f'evaluation, 1.0 for 32 px data), got {crop_fraction}')


def _to_jsonable(x: Any) -> Any:
  """Makes a grain state JSON-serialisable without losing types json would change.

  grain's states are dicts of ints and lists today, but its docs reserve the right to
  change the format: bytes, numpy scalars and non-string dict keys are encoded so that
  `_from_jsonable` gives back exactly what `get_state` returned.
  """
  if isinstance(x, dict):
    if all(isinstance(k, str) for k in x):
      return {k: _to_jsonable(v) for k, v in x.items()}
    return {'__items__': [[_to_jsonable(k), _to_jsonable(v)] for k, v in x.items()]}
  if isinstance(x, (list, tuple)):
    return [_to_jsonable(v) for v in x]
  if isinstance(x, bytes):
    return {'__bytes__': base64.b64encode(x).decode('ascii')}
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return x


def _from_jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    if set(x) == {'__bytes__'}:
      return base64.b64decode(x['__bytes__'])
    if set(x) == {'__items__'}:
      return {_from_jsonable(k): _from_jsonable(v) for k, v in x['__items__']}
    return {k: _from_jsonable(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_from_jsonable(v) for v in x]
  return x


def iterator_state_to_json(it: grain.DatasetIterator) -> str:
  """The iterator's position as a JSON string (what checkpoints store)."""
  return json.dumps(_to_jsonable(it.get_state()))


def restore_iterator_state(it: grain.DatasetIterator, state_json: str) -> grain.DatasetIterator:
  """Moves a fresh iterator, built with the same arguments, to a saved position.

  Returns the iterator for chaining.

  Raises:
    UserError: when the state is not JSON or is not a state of this kind of pipeline
      (e.g. saved with num_workers > 0 and restored with 0, or the reverse).
  """
  try:
    it.set_state(_from_jsonable(json.loads(state_json)))
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise UserError(f'cannot restore the input pipeline from the saved iterator state '
                    f'({type(e).__name__}: {e}); build the pipeline with the arguments of '
                    'the saved run (num_workers in particular)') from None
  return it


# ----------------------------------------------------------------------------------------
# Whole small sources as arrays (evaluation).


def subset_positions(n: int, max_examples: int | None, seed: int = 0) -> np.ndarray:
  """The positions, in source order, of a seeded random subset of `max_examples` of n.

  A random subset, not a prefix: folders and many TFDS splits are sorted by class. Shared
  by `load_arrays` and the streamed probe (`evals.stream`), so both read the same examples.
  """
  positions = np.arange(n)
  if max_examples is not None and max_examples < n:
    rng = np.random.default_rng(seed)
    positions = np.sort(rng.choice(n, size=max(0, int(max_examples)), replace=False))
  return positions


def load_arrays(source: DataSource, image_size: int,
                max_examples: int | None = None,
                num_threads: int | None = None, seed: int = 0,
                crop_fraction: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
  """Decodes a (small) source in order into arrays for feature extraction.

  Evaluation preprocessing, as `make_pipeline` without a canvas: shorter side resized to
  image_size / crop_fraction, centre crop of image_size.

  Examples whose `index` is not their own position (a folder's substitute for a corrupt
  file) are dropped, so each readable example appears exactly once.

  Args:
    source: the source.
    image_size: output height and width.
    max_examples: read only this many: a seeded random subset (kept in source order),
      since folders and many TFDS splits are sorted by class and their first N
      examples would cover one or two classes.
    num_threads: decoding threads (default: a few per CPU; PIL and numpy release the GIL).
    seed: seed of the subset.
    crop_fraction: the centre crop's side as a fraction of the resized shorter side.

  Returns:
    images uint8 (N, image_size, image_size, 3) and labels int32 (N,).
  """
  _check_crop(None, crop_fraction)
  positions = subset_positions(len(source), max_examples, seed)
  n = len(positions)
  images = np.zeros((n, image_size, image_size, 3), np.uint8)
  labels = np.zeros((n,), np.int32)
  keep = np.ones((n,), bool)
  prep = _Preprocess(image_size, crop_fraction=crop_fraction)
  source = _sized(source, image_size, crop_fraction)

  def work(lo: int, hi: int) -> None:
    for i in range(lo, hi):
      ex = prep(source[int(positions[i])])
      images[i], labels[i] = ex['image'], ex['label']
      keep[i] = int(ex['index']) == positions[i]

  chunk = 256
  threads = num_threads or min(32, 4 * (os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for f in [pool.submit(work, lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]:
      f.result()  # Re-raises a worker's error here.
  if not keep.all():
    images, labels = images[keep], labels[keep]
  return images, labels
