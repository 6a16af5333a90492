"""What an example is: the data sources.

A *source* is a random-access sequence (`__len__`, `__getitem__`) of example dicts::

  {'image': uint8 (H, W, 3), 'label': int, 'index': int, ...}

`index` is the position of the example within its (possibly sliced) split. It is stable
across runs and processes, so objectives that keep per-example state (NAT's target
table) can key on it. Three kinds of source exist, picked by a spec string:

  synthetic:NAME                    procedural images rendered from their index
  folder:PATH                       PATH/SPLIT/CLASS/**/IMAGE (jpg, png, tif, ...)
  tfds:NAME[/CONFIG][:VERSION]      a prepared TFDS dataset, read without TensorFlow

How examples become batches is `selfsup.data.pipeline`.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import re
import threading
import warnings
import zlib
from typing import Any, Protocol, Sequence

import numpy as np
from PIL import Image

from selfsup.errors import UserError, unknown_name

SOURCE_FORMS = ('synthetic:NAME', 'folder:PATH', 'tfds:NAME[/CONFIG][:VERSION]')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp')


class DataSource(Protocol):
  """What the pipeline and the evaluators expect from a source."""

  num_classes: int
  split: str
  name: str
  stable_indices: bool

  def __len__(self) -> int:
    ...

  def __getitem__(self, i: int) -> dict[str, Any]:
    ...


# ----------------------------------------------------------------------------------------
# Split strings.


_SPLIT_RE = re.compile(r'^\s*([A-Za-z0-9_\-]+)\s*(?:\[\s*([^:\]]*)\s*:\s*([^:\]]*)\s*\])?\s*$')


def _parse_split(split: str, what: str) -> tuple[str, str | None, str | None]:
  """Splits `train[a:b]` into ('train', 'a', 'b'); bounds resolve once the size is known."""
  m = _SPLIT_RE.match(split)
  if not m:
    raise UserError(
        f'bad split {split!r} for {what}; valid forms: NAME, NAME[START:STOP] '
        '(integers or percentages, e.g. train[:800], train[10%:])')
  return m.group(1), m.group(2) or None, m.group(3) or None


def _resolve_bound(bound: str | None, n: int, split: str) -> int | None:
  """Turns one slice bound (`800`, `-100`, `10%`) into an integer for a split of size n."""
  if bound is None:
    return None
  try:
    if bound.endswith('%'):
      # Percent bounds round like TFDS so the same split string selects the same range.
      return int(round(float(bound[:-1]) * n / 100.0))
    return int(bound)
  except ValueError:
    raise UserError(
        f'bad slice bound {bound!r} in split {split!r}; valid: integers or percentages '
        '(e.g. train[:800], train[10%:])') from None


def _slice_range(split: str, start: str | None, stop: str | None, n: int) -> range:
  """The positions of the full split that a sliced split selects."""
  return range(n)[slice(_resolve_bound(start, n, split), _resolve_bound(stop, n, split))]


# ----------------------------------------------------------------------------------------
# synthetic:shapes


SHAPE_NAMES = ('circle', 'square', 'triangle', 'star', 'cross', 'ring', 'ellipse',
               'diamond', 'hexagon', 'heart', 'arrow', 'crescent')

_DEFAULT_SYNTHETIC_LENGTHS = {'train': 20000, 'test': 2000}
_OTHER_SPLIT_LENGTH = 2000


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Inside-test of shape `shape` in object coordinates (unit size ~ radius 1)."""
  if shape == 0:  # circle
    return u * u + v * v <= 1.0
  if shape == 1:  # square
    return np.maximum(np.abs(u), np.abs(v)) <= 0.78
  if shape in (2, 8):  # triangle, hexagon: regular polygon through its apothem
    sides = 3 if shape == 2 else 6
    sector = 2 * np.pi / sides
    theta = np.mod(np.arctan2(v, u), sector) - sector / 2
    return np.sqrt(u * u + v * v) * np.cos(theta) <= np.cos(np.pi / sides)
  if shape == 3:  # five-pointed star: radius a triangle wave of the angle
    sector = 2 * np.pi / 5
    t = np.mod(np.arctan2(v, u), sector) / sector
    return np.sqrt(u * u + v * v) <= 0.42 + 0.58 * np.abs(2 * t - 1)
  if shape == 4:  # cross
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
  if shape == 5:  # ring
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.36)
  if shape == 6:  # ellipse: clearly elongated so it is not a circle
    return u * u + (v / 0.5) ** 2 <= 1.0
  if shape == 7:  # diamond: an elongated rhombus, so rotation cannot turn a square into it
    return np.abs(u) + np.abs(v) / 0.55 <= 1.0
  if shape == 9:  # heart: the classic sextic, flipped because image rows grow downwards
    x, y = u * 1.25, -v * 1.25 + 0.25
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
  if shape == 10:  # arrow: shaft plus head
    shaft = (np.abs(v) <= 0.2) & (u >= -0.95) & (u <= 0.15)
    head = (u >= 0.05) & (np.abs(v) <= (0.95 - u) * 0.9)
    return shaft | head
  if shape == 11:  # crescent: a disc minus a shifted disc
    return (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + v * v >= 0.64)
  raise ValueError(f'no shape {shape}')


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates of a size x size canvas (cached: the same for every image)."""
  c = np.arange(size, dtype=np.float32) + 0.5
  return c[None, :].repeat(size, 0), c[:, None].repeat(size, 1)


@functools.lru_cache(maxsize=8)
def _upsample_matrix(size: int, cells: int) -> np.ndarray:
  """Linear interpolation from `cells` control points to `size` pixels (separable noise)."""
  pos = (np.arange(size) + 0.5) / size * (cells - 1)
  lo = np.clip(np.floor(pos).astype(int), 0, cells - 2)
  frac = pos - lo
  m = np.zeros((size, cells), np.float32)
  m[np.arange(size), lo] = 1 - frac
  m[np.arange(size), lo + 1] = frac
  return m


_MAX_TILT = np.deg2rad(25.0)  # objects stand upright, give or take


class ShapesSource:
  """`synthetic:shapes`: procedural shapes on textured backgrounds, rendered from the index.

  Every example is a pure function of (split, position): its generator is seeded from a
  CRC of the split name and the position, so train and test differ, nothing is stored and
  runs are reproducible across processes and machines. Labels:

    label        shape class, 0..len(SHAPE_NAMES)-1 (see SHAPE_NAMES)
    count        number of objects (1..max_objects, all of the same class)
    position     3x3 grid cell (row * 3 + col) of the first object's centre
    orientation  tilt of the first object (+-25 degrees) in 8 buckets

  Objects are rendered at twice the resolution and averaged down for light anti-aliasing.
  The split may be sliced (`train[:800]`, `test[10%:]`); `index` is the position in the
  sliced split and the image is the one at the same position of the full split.
  """

  stable_indices = True
  num_classes = len(SHAPE_NAMES)

  def __init__(self, split: str, image_size: int = 32, length: int | None = None,
               max_objects: int = 1):
    base, start, stop = _parse_split(split, 'synthetic:shapes')
    if image_size < 8:
      raise UserError(f'synthetic:shapes needs image_size >= 8, got {image_size}')
    if max_objects < 1:
      raise UserError(f'synthetic:shapes needs max_objects >= 1, got {max_objects}')
    if length is not None and length < 1:
      raise UserError(f'synthetic:shapes needs length >= 1, got {length}')
    full = length if length is not None else _DEFAULT_SYNTHETIC_LENGTHS.get(
        base, _OTHER_SPLIT_LENGTH)
    self.split = split
    self.name = 'synthetic:shapes' if max_objects == 1 else 'synthetic:shapes_multi'
    self.image_size = image_size
    self.max_objects = max_objects
    self._positions = _slice_range(split, start, stop, full)
    # The split name only namespaces the seeds; a stable CRC (unlike hash()) keeps images
    # identical across processes and Python runs.
    self._split_seed = zlib.crc32(base.encode('utf-8'))

  def __len__(self) -> int:
    return len(self._positions)

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = int(i)
    if not -len(self) <= i < len(self):
      raise IndexError(f'index {i} out of range for {len(self)} examples')
    i %= len(self)
    rng = np.random.default_rng([self._split_seed, self._positions[i]])
    return self._render(rng, i)

  def _render(self, rng: np.random.Generator, index: int) -> dict[str, Any]:
    s = 2 * self.image_size  # Supersampled canvas.
    x, y = _grid(s)
    shape = int(rng.integers(self.num_classes))
    count = int(rng.integers(1, self.max_objects + 1))

    # Background: a base colour mixed with a second colour through a low-frequency
    # pattern (stripes or smooth noise), so the object is not the only structure. Darker
    # backgrounds than objects (any hue) make the object's silhouette carry a consistent
    # sign: with free colours a linear probe on pixels was near chance (11% vs 8%), with
    # this about 20%, leaving a wide gap for learned features to show.
    bg = rng.uniform(0, 0.5, 3).astype(np.float32)
    bg2 = rng.uniform(0, 0.5, 3).astype(np.float32)
    if rng.random() < 0.5:
      phi = rng.uniform(0, np.pi)
      freq = rng.uniform(2, 6) * 2 * np.pi / s
      t = 0.5 + 0.5 * np.sin(freq * (np.cos(phi) * x + np.sin(phi) * y) + rng.uniform(0, 6.3))
    else:
      m = _upsample_matrix(s, 5)
      t = m @ rng.uniform(0, 1, (5, 5)).astype(np.float32) @ m.T
    t = (t * rng.uniform(0.2, 0.5)).astype(np.float32)
    # Channels first: numpy broadcasts over a trailing axis of 3 several times slower.
    canvas = bg[:, None, None] + (bg2 - bg)[:, None, None] * t
    # Objects have a canonical "up", as in photographs: they stand upright (tilt of
    # +-25 degrees only) and cast a shadow below. Without it rotation prediction is
    # ill-posed (a randomly rotated shape turned by 90 degrees is as likely as the
    # original); a global cue instead (a brighter sky, a horizon) was a shortcut that
    # rotation solved from the background alone, learning nothing about the shapes.

    # Several objects share the canvas, so they get smaller.
    r_lo, r_hi = (0.2, 0.36) if count == 1 else (0.11, 0.18)
    centres: list[tuple[float, float, float]] = []
    first_angle = 0.0
    for k in range(count):
      r = rng.uniform(r_lo, r_hi) * s
      # A few tries to keep objects apart so `count` is visible; overlap is rare and okay.
      for _ in range(10):
        cx, cy = rng.uniform(r, s - r, 2)
        if all((cx - ox) ** 2 + (cy - oy) ** 2 > (r + orad) ** 2 for ox, oy, orad in centres):
          break
      centres.append((cx, cy, r))
      angle = rng.uniform(-_MAX_TILT, _MAX_TILT)
      # A soft shadow just below the object (darkens, never lightens).
      shadow = ((x - cx) / r) ** 2 + ((y - cy - 1.05 * r) / (0.22 * r)) ** 2 < 1.0
      canvas = np.where(shadow[None], 0.55 * canvas, canvas)
      if k == 0:
        first_angle = angle
      ca, sa = np.cos(angle), np.sin(angle)
      # Only the object's bounding box is evaluated: no shape reaches beyond 1.15 r.
      y0, y1 = max(0, int(cy - 1.15 * r)), min(s, int(cy + 1.15 * r) + 2)
      x0, x1 = max(0, int(cx - 1.15 * r)), min(s, int(cx + 1.15 * r) + 2)
      dx, dy = (x[y0:y1, x0:x1] - cx) / r, (y[y0:y1, x0:x1] - cy) / r
      mask = _shape_mask(shape, ca * dx + sa * dy, -sa * dx + ca * dy)
      # The object colour keeps a clear distance from the mean background colour.
      mean_bg = 0.5 * (bg + bg2)
      for _ in range(10):
        colour = rng.uniform(0.45, 1, 3).astype(np.float32)
        if np.abs(colour - mean_bg).sum() > 0.7:
          break
      np.copyto(canvas[:, y0:y1, x0:x1], colour[:, None, None], where=mask)

    # 2x2 box filter; four strided adds are several times faster than a reshaped mean.
    image = 0.25 * (canvas[:, 0::2, 0::2] + canvas[:, 1::2, 0::2]
                    + canvas[:, 0::2, 1::2] + canvas[:, 1::2, 1::2])
    cx, cy, _ = centres[0]
    position = min(int(cy / s * 3), 2) * 3 + min(int(cx / s * 3), 2)
    orientation = min(int((first_angle + _MAX_TILT) / (2 * _MAX_TILT) * 8), 7)
    return {
        'image': np.ascontiguousarray((image * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)),
        'label': shape,
        'index': index,
        'count': count,
        'position': position,
        'orientation': orientation,
    }


SYNTHETIC_SOURCES: dict[str, dict[str, Any]] = {
    'shapes': dict(max_objects=1),
    # Counting needs more than one object per image.
    'shapes_multi': dict(max_objects=4),
}


# ----------------------------------------------------------------------------------------
# folder:PATH


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.')


def _walk(directory: str):
  """os.walk in sorted order, following directory links but never into a loop."""
  seen = set()
  for top, dirs, names in os.walk(directory, followlinks=True):
    real = os.path.realpath(top)
    if real in seen:
      dirs[:] = []
      continue
    seen.add(real)
    dirs.sort()
    yield top, sorted(names)


def _list_images(directory: str) -> list[str]:
  """Image files anywhere under directory (sub-folders included), as sorted paths."""
  return sorted(os.path.join(top, f) for top, names in _walk(directory) for f in names
                if _is_image(f) and os.path.isfile(os.path.join(top, f)))


def _has_image(directory: str) -> bool:
  return any(_is_image(f) for _, names in _walk(directory) for f in names)


def _subdirs(directory: str) -> list[str]:
  return sorted(d for d in os.listdir(directory)
                if not d.startswith('.') and os.path.isdir(os.path.join(directory, d)))


def _names(items: Sequence[str], limit: int = 8) -> str:
  shown = ', '.join(items[:limit])
  return shown + (f' and {len(items) - limit} more' if len(items) > limit else '')


def _uint8(values: np.ndarray, top: float) -> np.ndarray:
  """Linear map of [0, top] onto [0, 255], rounded and clipped."""
  return np.clip(np.rint(values.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def to_rgb8(img: Image.Image) -> np.ndarray:
  """Any PIL image as uint8 (H, W, 3) RGB with the intensities it means.

  PIL's own convert('RGB') clips high-bit-depth modes instead of scaling them (a 16-bit
  PNG becomes solid white), so those are scaled here first:
    * 'I;16*' and 'I' (how PIL opens 16-bit PNGs and TIFFs): x * 255 / 65535, i.e.
      x / 257, so 65535 -> 255 and 0 -> 0;
    * 'F' (float TIFFs): values within [0, 1] are scaled by 255, values within [0, 255]
      are kept, any other range is stretched from its minimum and maximum to [0, 255]
      (NaN and infinities become 0);
    * palette, 1-bit, grey, grey + alpha, RGBA, CMYK, YCbCr: PIL's conversion. Alpha is
      dropped, as PIL's convert('RGB') and the TFDS source do.
  """
  mode = img.mode
  if mode.startswith('I;16') or mode == 'I':
    gray = _uint8(np.asarray(img), 65535.0)
  elif mode == 'F':
    x = np.asarray(img, np.float64)
    x = np.where(np.isfinite(x), x, 0.0)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if lo >= 0 and hi <= 1:
      gray = _uint8(x, 1.0)
    elif lo >= 0 and hi <= 255:
      gray = _uint8(x, 255.0)
    else:
      gray = _uint8(x - lo, max(hi - lo, 1e-12))
  else:
    if mode == 'P' and 'transparency' in img.info:
      img = img.convert('RGBA')  # PIL warns when a transparent palette goes to RGB directly.
    return np.asarray(img.convert('RGB'))
  return np.repeat(gray[..., None], 3, axis=-1)


class _CorruptLog:
  """Unreadable files met so far; shared by a FolderSource and its resized copies."""

  def __init__(self):
    self.bad: set[int] = set()
    self.warned = False
    self.lock = threading.Lock()  # grain reads from several threads.

  def __getstate__(self):
    # Locks do not pickle (grain worker processes receive a copy of the source).
    return {'bad': set(self.bad), 'warned': self.warned}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self.lock = threading.Lock()


class FolderSource:
  """`folder:PATH`: images under PATH/SPLIT/CLASS/, in sub-folders too.

  Every sub-folder of PATH is a split and every sub-folder of a split is a class. The
  class list is shared by all splits: the sorted union of the class folders that hold at
  least one image in any split, so a class has the same label in `train` and `test`
  whatever either one lacks. Classes of this split that no other split has are reported
  (a warning naming them): a test class unseen in training keeps its own label, which no
  classifier trained on `train` can predict, so it counts as an error rather than being
  silently renumbered onto another class. Class folders without images are skipped with a
  warning that names them.

  Images are found recursively under each class folder (.jpg, .jpeg, .png, .bmp, .gif,
  .tif, .tiff, .webp, any case), sorted by path. Construction only lists files (a folder
  may hold millions of images); images are decoded on access with PIL and converted to
  8-bit RGB by `to_rgb8` (16-bit and float images scaled, not clipped).

  A file that cannot be decoded is skipped: the source counts it (`num_corrupt`, files
  seen in this process), warns once, and returns the next readable example (index + 1,
  index + 2, ... wrapping around) with that example's own `index`, so the result is
  deterministic. With `strict=True` it raises a `UserError` naming the file instead.

  `draft_size`, when given, lets the JPEG decoder downscale by a power of two while
  keeping both sides >= draft_size (`draft_fit='shorter'`) or the longer side >=
  draft_size (`draft_fit='longer'`, for fitting the whole image into a canvas): several
  times faster for large photos that are resized to a small fixed size anyway. The
  pipeline sets it itself (`for_image_size`), so it never falls below the size that is
  finally used.
  """

  stable_indices = True

  def __init__(self, root: str, split: str, strict: bool = False,
               draft_size: int | None = None, draft_fit: str = 'shorter'):
    base, start, stop = _parse_split(split, f'folder:{root}')
    layout = f'expected layout {os.path.join(root, "SPLIT", "CLASS", "*.jpg|*.png|...")}'
    if not os.path.isdir(root):
      raise UserError(f'folder:{root}: no such directory; {layout}')
    split_dir = os.path.join(root, base)
    if not os.path.isdir(split_dir):
      existing = _subdirs(root)
      raise UserError(f'folder:{root}: no split {base!r} ({split_dir} is missing); '
                      f'splits found: {", ".join(existing) or "none"}; {layout}')
    folders = _subdirs(split_dir)
    per_class = {cls: _list_images(os.path.join(split_dir, cls)) for cls in folders}
    empty = [cls for cls in folders if not per_class[cls]]
    if empty:
      warnings.warn(f'folder:{root}: class folder(s) of split {base!r} without images '
                    f'({", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)}), skipped: '
                    f'{_names(empty)}', stacklevel=2)
    own = [cls for cls in folders if per_class[cls]]
    if not own:
      raise UserError(f'folder:{root}: no images in the class folders of {split_dir} '
                      f'({len(folders)} class folders found); {layout}')
    classes, missing_from = self._shared_classes(root, base, own)
    if missing_from:
      detail = '; '.join(f'{_names(lack)} not in {other!r}' for other, lack in missing_from.items())
      warnings.warn(f'folder:{root}: split {base!r} has classes other splits lack ({detail}); '
                    'labels come from the union of all splits\' classes, so those keep '
                    'labels of their own (a classifier trained on a split without them '
                    'cannot predict them)', stacklevel=2)
    index = {cls: k for k, cls in enumerate(classes)}
    files, labels = [], []
    for cls in own:
      files.extend(per_class[cls])
      labels.extend([index[cls]] * len(per_class[cls]))
    keep = _slice_range(split, start, stop, len(files))
    if not len(keep):
      raise UserError(f'folder:{root}: split {split!r} selects none of {len(files)} images')
    if draft_fit not in ('shorter', 'longer'):
      raise UserError(f"draft_fit must be 'shorter' or 'longer', got {draft_fit!r}")
    self.root = root
    self.split = split
    self.name = f'folder:{root}'
    self.classes = classes
    self.num_classes = len(classes)
    self.strict = strict
    self.draft_size = draft_size
    self.draft_fit = draft_fit
    self._files = [files[k] for k in keep]
    self._labels = [labels[k] for k in keep]
    self._log = _CorruptLog()

  @staticmethod
  def _shared_classes(root: str, base: str, own: list[str]) -> tuple[list[str], dict]:
    """(sorted union of non-empty classes over all splits, {split: own classes it lacks})."""
    union, missing_from = set(own), {}
    for other in _subdirs(root):
      if other == base:
        continue
      other_dir = os.path.join(root, other)
      theirs = {cls for cls in _subdirs(other_dir) if _has_image(os.path.join(other_dir, cls))}
      if not theirs:
        continue  # Not a split of this dataset (no class folders with images).
      union |= theirs
      lacking = sorted(set(own) - theirs)
      if lacking:
        missing_from[other] = lacking
    return sorted(union), missing_from

  @property
  def num_corrupt(self) -> int:
    """Number of distinct unreadable files met so far in this process."""
    return len(self._log.bad)

  @property
  def files(self) -> Sequence[str]:
    return tuple(self._files)

  def for_image_size(self, image_size: int, fit: str = 'shorter') -> 'FolderSource':
    """A copy that decodes JPEGs at reduced size, still >= image_size.

    fit='shorter': both sides stay >= image_size (resize + centre crop); fit='longer':
    only the longer side must (the whole image fitted into a canvas of that side). The
    copy shares the file lists and the corrupt-file count with this source.
    """
    if fit not in ('shorter', 'longer'):
      raise UserError(f"fit must be 'shorter' or 'longer', got {fit!r}")
    other = copy.copy(self)
    other.draft_size = image_size
    other.draft_fit = fit
    return other

  def __len__(self) -> int:
    return len(self._files)

  def _decode(self, path: str) -> np.ndarray:
    with Image.open(path) as img:
      if self.draft_size:
        w, h = img.size
        size = self.draft_size
        if self.draft_fit == 'longer':
          # draft keeps both sides >= the requested ones: request the fitted size.
          scale = size / max(w, h, 1)
          request = (math.ceil(w * scale), math.ceil(h * scale))
        else:
          request = (size, size)
        img.draft('RGB', request)
      return to_rgb8(img)

  def __getitem__(self, i: int) -> dict[str, Any]:
    n = len(self._files)
    i = int(i)
    if not -n <= i < n:
      raise IndexError(f'index {i} out of range for {n} examples')
    i %= n
    for k in range(n):
      j = (i + k) % n
      if j in self._log.bad:
        continue
      try:
        image = self._decode(self._files[j])
      except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        if self.strict:
          raise UserError(f'{self.name}: cannot read image {self._files[j]} ({e}); fix or '
                          'remove it, or read with strict=False to skip bad files') from None
        self._mark_bad(j)
        continue
      return {'image': image, 'label': self._labels[j], 'index': j}
    raise UserError(f'{self.name}: none of the {n} images of split {self.split!r} '
                    'could be read')

  def _mark_bad(self, j: int) -> None:
    log = self._log
    with log.lock:
      log.bad.add(j)
      if log.warned:
        return
      log.warned = True
      count = len(log.bad)
    warnings.warn(f'{self.name}: skipping unreadable image {self._files[j]} '
                  f'({count} corrupt so far; only this first one is reported, see '
                  'num_corrupt); the next readable image is used in its place',
                  stacklevel=3)


# ----------------------------------------------------------------------------------------
# tfds:NAME[/CONFIG][:VERSION]


def _tfds_prepare_hint(name: str) -> str:
  base = name.split(':')[0]
  return (f'prepare it with `pip install selfsup[prepare]` and `tfds build {base} '
          '--file_format=array_record` (random access needs array_record files), or pass '
          'data_dir=DIR holding a prepared copy')


class TfdsSource:
  """`tfds:NAME[/CONFIG][:VERSION]`: a prepared TFDS dataset through `tfds.data_source`.

  Reads array_record files with random access and no TensorFlow. The split string passes
  through to TFDS (`train`, `train[:800]`, `test[10%:]`); `index` is the position within
  the sliced split. Images come from the `image` feature (grayscale tiled to 3 channels),
  labels from `label`. Nothing is downloaded here: preparing needs TensorFlow, which is
  the `prepare` extra.
  """

  stable_indices = True

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    self.name = f'tfds:{name}'
    self.split = split
    self.data_dir = data_dir
    try:
      # download=False: a training run must never start a multi-GB download by itself.
      ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError:
      raise UserError(f'unknown TFDS dataset {name!r}; `tfds.list_builders()` lists the '
                      'valid names; form: tfds:NAME[/CONFIG][:VERSION]') from None
    except Exception as e:  # pylint: disable=broad-except
      # TFDS reports an unprepared dataset through several exception types and messages;
      # asking the builder is the reliable way to tell that case from a bad split.
      raise self._explain(tfds, name, split, data_dir, e) from None
    features = getattr(getattr(ds, 'dataset_info', None), 'features', None)
    keys = list(features.keys()) if features is not None else []
    if features is not None and ('image' not in keys or 'label' not in keys):
      raise UserError(f'{self.name} has features {keys}; selfsup needs an `image` and a '
                      '`label` feature')
    num_classes = None
    try:
      num_classes = int(features['label'].num_classes)
    except (AttributeError, KeyError, TypeError, ValueError):
      pass
    if not num_classes:
      raise UserError(f'{self.name}: cannot tell the number of classes (its `label` feature '
                      'is not a ClassLabel); use a classification dataset')
    self.num_classes = num_classes
    self._ds = ds
    self._len = len(ds)

  @staticmethod
  def _explain(tfds, name: str, split: str, data_dir: str | None, e: Exception) -> UserError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except Exception:  # pylint: disable=broad-except
      base, _, config = name.split(':')[0].partition('/')
      try:
        configs = [c.name for c in getattr(tfds.builder_cls(base), 'BUILDER_CONFIGS', ())]
      except Exception:  # pylint: disable=broad-except
        configs = []
      if config and not configs:
        return UserError(f'TFDS dataset {base!r} has no configs; use tfds:{base}')
      if config and config.split('/')[0] not in configs:
        return UserError(f'unknown config {config!r} of TFDS dataset {base!r}; valid configs: '
                         f'{", ".join(configs)}')
      # TFDS prefixes the reason with the builder kwargs ('Failed to construct ...": ').
      return UserError(f'tfds:{name}: {first.rsplit(chr(34) + ": ", 1)[-1]}')
    if not builder.is_prepared():
      where = data_dir or 'the default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)'
      return UserError(f'TFDS dataset {name!r} is not prepared in {where}; '
                       f'{_tfds_prepare_hint(name)}')
    if 'file format' in first.lower() or 'random access' in first.lower():
      return UserError(f'TFDS dataset {name!r} is prepared without random access; '
                       f'{_tfds_prepare_hint(name)}')
    splits = ', '.join(sorted(builder.info.splits.keys()))
    return UserError(f'tfds:{name}: cannot read split {split!r} ({first}); splits: {splits}')

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = int(i)
    if not -self._len <= i < self._len:
      raise IndexError(f'index {i} out of range for {self._len} examples')
    i %= self._len
    ex = self._ds[i]
    image = np.asarray(ex['image'])
    if image.ndim == 2:
      image = image[..., None]
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 4:  # RGBA: drop alpha, as PIL's convert('RGB') does.
      image = image[..., :3]
    return {'image': image.astype(np.uint8, copy=False), 'label': int(ex['label']), 'index': i}


# ----------------------------------------------------------------------------------------
# Spec strings.


def make_source(spec: str, split: str, *, image_size: int = 32, strict: bool = False,
                data_dir: str | None = None) -> DataSource:
  """Builds a source from `synthetic:NAME`, `folder:PATH` or `tfds:NAME[/CONFIG][:VERSION]`.

  Args:
    spec: the source spec.
    split: the split (`train`, `test`, ... optionally sliced: `train[:800]`).
    image_size: rendering size of synthetic images (other sources are resized by the
      pipeline).
    strict: folder sources raise on an unreadable file instead of skipping it.
    data_dir: TFDS data directory (default: TFDS's own default).

  Returns:
    The random-access source.

  Raises:
    UserError: on an unknown scheme or name, or a source that cannot be read.
  """
  scheme, sep, rest = str(spec).partition(':')
  if not sep or scheme not in ('synthetic', 'folder', 'tfds'):
    raise UserError(f'unknown data source {spec!r}; valid forms: {", ".join(SOURCE_FORMS)}')
  if not rest:
    raise UserError(f'data source {spec!r} lacks a name or path; valid forms: '
                    f'{", ".join(SOURCE_FORMS)}')
  if scheme == 'synthetic':
    if rest not in SYNTHETIC_SOURCES:
      raise unknown_name('synthetic dataset', rest, SYNTHETIC_SOURCES)
    return ShapesSource(split, image_size=image_size, **SYNTHETIC_SOURCES[rest])
  if scheme == 'folder':
    return FolderSource(rest, split, strict=strict)
  return TfdsSource(rest, split, data_dir=data_dir)


def dataset_size(source: DataSource) -> int:
  """Number of examples in a source."""
  return len(source)

