"""Streamed feature extraction equals the in-memory path, on one and on 8 devices."""

import functools
import warnings

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli


def _folder(root, per_class=(7, 6), corrupt=True, size=(24, 18)):
  """A small image folder (train split), sizes varying, optionally one corrupt file."""
  rng = np.random.default_rng(0)
  for c, count in enumerate(per_class):
    d = root / "train" / f"class{c}"
    d.mkdir(parents=True)
    for i in range(count):
      h, w = size[0] + i, size[1] + 2 * c
      Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"{i:02d}.png")
  if corrupt:
    (root / "train" / "class0" / "03.png").write_bytes(b"not an image")
  return str(root)


@functools.lru_cache(maxsize=1)
def _encoder():
  """A random-init tiny CNN (built once per test process: initialisation compiles)."""
  import encoders
  from ml_collections import ConfigDict
  from evals import features as features_lib
  encoder = encoders.build_encoder(ConfigDict({"name": "tiny_cnn", "width_multiplier": 0.5}),
                                   "float32")
  return encoder, features_lib.random_init_variables(encoder, 16)


@pytest.mark.parametrize("max_examples", [None, 9])
def test_streamed_features_equal_loaded_arrays(tmp_path, max_examples):
  from evals import features as features_lib
  from evals import stream
  from selfsup import data
  root = _folder(tmp_path)
  encoder, variables = _encoder()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    src = data.FolderSource(root, "train")
    images, labels = data.load_arrays(src, 16, max_examples=max_examples, seed=3)
    expected = features_lib.extract_features(encoder, variables, images, batch_size=4)
    got, got_labels = stream.stream_features(
        stream.image_features(encoder), variables, data.FolderSource(root, "train"),
        image_size=16, batch_size=4, max_examples=max_examples, seed=3)
  # The corrupt file's slot is dropped (its substitute is another example's duplicate).
  assert len(labels) == (12 if max_examples is None else len(labels))
  np.testing.assert_array_equal(got_labels, labels)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_subset_positions_are_load_arrays_subset():
  from selfsup import data
  src = data.ShapesSource("train", image_size=8, length=50)
  images, _ = data.load_arrays(src, 8, max_examples=7, seed=5)
  positions = data.subset_positions(50, 7, seed=5)
  np.testing.assert_array_equal(images, np.stack([src[int(p)]["image"] for p in positions]))
  assert np.all(np.diff(positions) > 0) and positions[-1] > 7  # a spread, not a prefix


def test_nonfinite_features_are_refused(tmp_path):
  import jax
  from evals import stream
  from selfsup import data
  from selfsup.errors import UserError
  encoder, variables = _encoder()
  variables = jax.tree_util.tree_map(lambda v: v * np.nan, variables)
  with pytest.raises(UserError, match="diverged"):
    stream.stream_features(stream.image_features(encoder), variables,
                           data.ShapesSource("test", image_size=16, length=10), image_size=16,
                           batch_size=4, nonfinite_message="features diverged")


def test_feature_cache_round_trip(tmp_path):
  from evals import stream
  x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
  y = np.arange(5, dtype=np.int32)
  path = stream.cache_path(str(tmp_path), step=1, split="train")
  assert path != stream.cache_path(str(tmp_path), step=2, split="train")
  assert stream.load_cached(path) is None
  stored = stream.save_cached(path, x, y, {"step": 1})
  cached_x, cached_y = stream.load_cached(path)
  np.testing.assert_array_equal(cached_x, stored)
  np.testing.assert_allclose(stored, x, rtol=1e-3)
  np.testing.assert_array_equal(cached_y, y)
  assert np.load(path)["x"].dtype == np.float16


_EIGHT_DEVICES = r"""
import sys, warnings
import numpy as np
import jax
assert jax.device_count() == 8
sys.path.insert(0, "tests")
from test_stream import _encoder
from evals import features as features_lib, stream
from selfsup import data
warnings.simplefilter("ignore")
encoder, variables = _encoder()
src = data.FolderSource(sys.argv[1], "train")
images, labels = data.load_arrays(src, 16)
expected = features_lib.extract_features(encoder, variables, images, batch_size=5)
# batch 5 is rounded up to 8 (one row per device); 12 examples: the last batch is padded.
got, got_labels = stream.stream_features(stream.image_features(encoder), variables,
                                         data.FolderSource(sys.argv[1], "train"),
                                         image_size=16, batch_size=5)
np.testing.assert_array_equal(got_labels, labels)
np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
print("OK", got.shape)
"""


def test_streamed_features_on_eight_devices(tmp_path):
  root = _folder(tmp_path)
  proc = run_cli(["-c", _EIGHT_DEVICES, root],
                 env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "OK (12," in proc.stdout


class _NoiseSource:
  """Random 64 px images made from the index: no files, nothing held in memory."""

  def __init__(self, n, size=64):
    self.n, self.size = n, size

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    rng = np.random.default_rng(i)
    return {"image": rng.integers(0, 255, (self.size, self.size, 3), dtype=np.uint8),
            "label": i % 3, "index": i}


def test_streaming_keeps_only_features_on_the_host():
  """Python-side peak (numpy and grain buffers; tracemalloc) stays far below the images'
  size: 1,200 images of 64 px are 14.7 MB as uint8, which load_arrays would hold."""
  import tracemalloc
  from evals import stream
  encoder, variables = _encoder()
  fn = stream.image_features(encoder)
  source = _NoiseSource(1200)
  stream.stream_features(fn, variables, _NoiseSource(40), image_size=64, batch_size=32)  # compile
  tracemalloc.start()
  try:
    features, labels = stream.stream_features(fn, variables, source, image_size=64,
                                               batch_size=32)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert features.shape[0] == 1200 and labels[:4].tolist() == [0, 1, 2, 0]
  images_bytes = 1200 * 64 * 64 * 3
  assert peak < images_bytes / 4, (peak, images_bytes)
