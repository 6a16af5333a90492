"""evals.tasks / evals.vtab: the 19 VTAB-1k tasks through TFDS mock data, their label
functions against NumPy references, split arithmetic, a whole suite end to end, bad input."""

import json
import os

import numpy as np
import pytest

from conftest import run_cli, tiny_config
from evals import tasks as tasks_lib
from evals import vtab

# The test sizes of VTAB-1k (Zhai et al. 2019, table 5 / the task_adaptation data).
TEST_SIZES = {
    "caltech101": 6084, "cifar100": 10000, "dtd": 1880, "flowers102": 6149, "pets": 3669,
    "svhn": 26032, "sun397": 21750, "camelyon": 32768, "eurosat": 5400, "resisc45": 6300,
    "retinopathy": 42670, "clevr-count": 15000, "clevr-dist": 15000, "dmlab": 22735,
    "kitti-dist": 711, "dsprites-loc": 73728, "dsprites-orient": 73728,
    "smallnorb-azim": 12150, "smallnorb-elev": 12150}


def test_registry_has_the_19_tasks_in_their_groups():
  assert set(tasks_lib.SUITES["vtab1k"]) == set(TEST_SIZES)
  assert [len(tasks_lib.SUITES[g]) for g in ("natural", "specialized", "structured")] == [7, 4, 8]
  names = [t.name for t in tasks_lib.parse_tasks("structured,clevr-count,offline")]
  assert names == tasks_lib.SUITES["structured"] + tasks_lib.SUITES["offline"]


def _slice(split):
  base, _, rest = split.partition("[")
  lo, _, hi = rest.rstrip("]").partition(":") if rest else ("", "", "")
  return base, lo, hi


@pytest.mark.parametrize("name", list(TEST_SIZES))
def test_split_arithmetic(name):
  task = tasks_lib.TASKS[name]
  size = lambda part: tasks_lib.split_size(task.split(part), task.sizes)
  assert (size("train800"), size("val200"), size("test")) == (800, 200, TEST_SIZES[name])
  # train800 and val200 never overlap, nor either of them the test examples.
  tr, va, te = (_slice(task.split(p)) for p in ("train800", "val200", "test"))
  if va[0] == tr[0]:
    assert int(va[1]) >= 800
  for part in (tr, va):
    if part[0] == te[0]:
      n = task.sizes[te[0]]
      lo = int(te[1][:-1]) * n // 100 if te[1].endswith("%") else int(te[1] or 0)
      hi = int(part[2]) if part[2] else n
      assert hi <= lo, (part, te)
  # The full protocol's train and val splits are disjoint and hold train800 / val200.
  assert size("train") >= 800 and size("val") >= 200


# ----------------------------------------------------------------------------------------
# Label functions against NumPy references on constructed records.

def _clevr(depths):
  n = len(depths)
  return {"image": np.zeros((4, 4, 3), np.uint8),
          "objects": {"size": np.zeros(n, np.int64),
                      "pixel_coords": np.stack([np.ones(n), np.ones(n), depths], 1)}}


def test_label_functions_match_numpy_references():
  rng = np.random.default_rng(0)
  t = tasks_lib.TASKS
  # clevr-count: objects - 3; clevr-dist: bin of the closest depth.
  thresholds = np.array([0, 8, 8.5, 9, 9.5, 10, 100.0])
  for n in range(3, 11):
    depths = rng.uniform(7, 11, n)
    depths[0] = rng.choice([8.0, 9.5, 12.0, 7.0])  # exact thresholds included
    record = _clevr(depths)
    assert tasks_lib.label_of(record, t["clevr-count"].label) == n - 3
    expected = int(np.digitize(depths.min(), thresholds, right=True)) - 1
    assert tasks_lib.label_of(record, t["clevr-dist"].label) == expected
  # kitti-dist: closest Car / Van / Truck (types 0, 1, 2) by location z; none -> 3.
  for trial in range(40):
    n = int(rng.integers(0, 6))
    types = rng.integers(0, 8, n)
    z = rng.choice([5.0, 8.0, 15.0, 20.0, 40.0, 1200.0], n)
    loc = np.stack([rng.normal(size=n), rng.normal(size=n), z], 1).reshape(n, 3)
    record = {"objects": {"type": types, "location": loc}}
    vehicles = z[types < 3]
    expected = 3 if vehicles.size == 0 else int(
        np.digitize(vehicles.min(), [-100, 8, 20, 999], right=True)) - 1
    assert tasks_lib.label_of(record, t["kitti-dist"].label) == expected, (types, z)
  # dSprites: x position (0..31) // 2, orientation (0..39) // 2.5.
  for x in range(32):
    assert tasks_lib.label_of({"label_x_position": np.int64(x)}, t["dsprites-loc"].label) \
        == x // 2
  for o in range(40):
    assert tasks_lib.label_of({"label_orientation": np.int64(o)},
                              t["dsprites-orient"].label) == int(np.floor(o / 2.5))
  assert {tasks_lib.label_of({"label_orientation": o}, t["dsprites-orient"].label)
          for o in range(40)} == set(range(16))
  # smallNORB azimuth / elevation and every plain-label task: the ClassLabel itself.
  norb = {"label_azimuth": np.int64(17), "label_elevation": np.int64(8)}
  assert tasks_lib.label_of(norb, t["smallnorb-azim"].label) == 17
  assert tasks_lib.label_of(norb, t["smallnorb-elev"].label) == 8
  for name in ("caltech101", "sun397", "retinopathy", "dmlab"):
    assert tasks_lib.label_of({"label": np.int64(4)}, t[name].label) == 4
  # dSprites images are 0/1: x255 and tiled; smallNORB is tiled.
  img = tasks_lib.prepare_image(np.eye(4, dtype=np.uint8)[..., None], ("x255",))
  assert img.shape == (4, 4, 3) and img.dtype == np.uint8 and img.max() == 255
  assert tasks_lib.stretch(np.zeros((10, 30, 3), np.uint8), 16).shape == (16, 16, 3)


# ----------------------------------------------------------------------------------------
# Loading through tfds.testing.mock_data.

def _fields_used(spec):
  keys = [spec["key"]] + ([spec["where_key"]] if "where_key" in spec else [])
  return keys


@pytest.mark.parametrize("name", list(TEST_SIZES))
def test_every_task_loads_through_tfds_mock_data(name):
  import tensorflow_datasets as tfds
  task = tasks_lib.TASKS[name]
  with tfds.testing.mock_data(num_examples=2):
    opened = vtab._Opened(task, None, 16, 0)
    for part in ("train800", "val200", "test"):
      records = opened.part(part).records
      record = records[0]
      # The fields the label function reads exist with the right structure.
      for key in _fields_used(task.label):
        tasks_lib._get(record, key)  # pylint: disable=protected-access
      if task.label["fn"] == "min_bin":
        # Mock sequences have unrelated random lengths per field: check the column exists.
        coords = np.asarray(tasks_lib._get(record, task.label["key"]))  # pylint: disable=protected-access
        assert coords.ndim == 2 and coords.shape[1] > task.label["column"]
      else:
        assert isinstance(tasks_lib.label_of(record, task.label), int)
      image = tasks_lib.stretch(tasks_lib.prepare_image(record["image"], task.preprocess), 16)
      assert image.shape == (16, 16, 3) and image.dtype == np.uint8


# A fake TFDS data source with valid records for every task's label function.
def _fake_records(builder_name, n=12):
  rng = np.random.default_rng(len(builder_name))
  out = []
  for i in range(n):
    img = rng.integers(0, 255, (8, 10, 3), np.uint8)
    r = {"image": img, "label": np.int64(i % 2)}
    if builder_name == "clevr":
      k = 3 + i % 8
      r["objects"] = {"size": np.zeros(k), "pixel_coords": rng.uniform(7, 11, (k, 3))}
    if builder_name == "kitti":
      r["objects"] = {"type": rng.integers(0, 8, 3), "location": rng.uniform(0, 30, (3, 3))}
    if builder_name == "dsprites":
      r = {"image": (img[..., :1] > 128).astype(np.uint8), "label_x_position": np.int64(i),
           "label_orientation": np.int64(3 * i)}
    if builder_name == "smallnorb":
      r = {"image": img[..., :1], "label_azimuth": np.int64(i % 18),
           "label_elevation": np.int64(i % 9)}
    out.append(r)
  return out


def _run_suite_on_mock_data(tmp_path, suite_name):
  import jax
  import tensorflow_datasets as tfds
  import encoders
  from ml_collections import ConfigDict
  encoder = encoders.build_encoder(ConfigDict({"name": "tiny_cnn", "width_multiplier": 0.25}))
  variables = encoder.init(jax.random.PRNGKey(0), np.zeros((2, 16, 16, 3), np.float32),
                           train=False)

  def as_data_source(builder, split, **kwargs):
    del split, kwargs
    return _fake_records(builder.name)

  suite = tasks_lib.parse_tasks(suite_name)
  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    report = vtab.evaluate_encoder(encoder, variables, suite, resolution=16, batch_size=16,
                                   cache_dir=str(tmp_path / "cache"), progress=False,
                                   l2_grid=(1.0,))
  assert list(report["tasks"]) == tasks_lib.SUITES[suite_name]
  groups = sorted({tasks_lib.TASKS[n].group for n in tasks_lib.SUITES[suite_name]})
  assert sorted(report["groups"]) == groups
  for row in report["tasks"].values():
    assert row["num_train"] == 24 and row["num_test"] == 12 and 0 <= row["top1"] <= 100
  means = [np.mean([r["top1"] for r in report["tasks"].values() if r["group"] == g])
           for g in groups]
  np.testing.assert_allclose([report["groups"][g] for g in groups], means)
  np.testing.assert_allclose(report["mean"],
                             np.mean([r["top1"] for r in report["tasks"].values()]))
  out = tmp_path / "report.json"
  vtab.write_atomic(str(out), json.dumps(report))
  table = vtab.markdown(report)
  assert json.loads(out.read_text())["mean"] == report["mean"]
  n = len(suite)
  assert table.count("\n") == 2 + n + len(groups) + 1 - 1
  assert "| clevr-dist | structured |" in table
  # Cached per (task, split, resolution): every part of every task is one file.
  assert len(os.listdir(tmp_path / "cache")) == n * 3


def test_the_structured_suite_end_to_end_on_mock_data_writes_the_report(tmp_path):
  # Every task's probe compiles once per class count: the 8 structured tasks (six class
  # counts) keep this in the default suite; all 19 run under -m slow.
  _run_suite_on_mock_data(tmp_path, "structured")


@pytest.mark.slow
def test_the_vtab1k_suite_end_to_end_on_mock_data(tmp_path):
  _run_suite_on_mock_data(tmp_path, "vtab1k")


# ----------------------------------------------------------------------------------------
# The CLI: a folder task and bad input.

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  from selfsup.trainer import Trainer
  workdir = str(tmp_path_factory.mktemp("vtab") / "run")
  Trainer(tiny_config("rotation", steps=1), workdir).run()
  return workdir


def _folder(root, classes):
  from PIL import Image
  rng = np.random.default_rng(0)
  for split, n in (("train", 6), ("test", 3)):
    for c in range(classes):
      d = root / split / f"c{c}"
      d.mkdir(parents=True)
      for i in range(n):
        Image.fromarray(np.full((12, 12, 3), 40 * c + rng.integers(0, 30), np.uint8)).save(
            d / f"{i}.png")
  return root


def test_cli_folder_task_and_cache_resume(run_dir, tmp_path):
  folder = _folder(tmp_path / "mine", 2)
  out = tmp_path / "r.json"
  args = ["-m", "evals.vtab", "--checkpoint", run_dir, "--tasks", f"folder:{folder}",
          "--resolution", "16", "--output", str(out), "--cache_dir", str(tmp_path / "c"),
          "--progress=false"]
  proc = run_cli(args)
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads(out.read_text())
  row = report["tasks"][f"folder:{folder}"]
  # 12 train images: val200 is a fifth (2), train800 the other 10; test is 6.
  assert (row["num_train"], row["num_test"], row["group"]) == (12, 6, "custom")
  assert "| folder:" in proc.stderr
  files = sorted(os.listdir(tmp_path / "c"))
  assert len(files) == 3
  # The rerun reads the cache (no image is decoded) and gives the same numbers.
  again = vtab.evaluate_checkpoint(run_dir, f"folder:{folder}", resolution=16,
                                   cache_dir=str(tmp_path / "c"), progress=False)
  assert sorted(os.listdir(tmp_path / "c")) == files
  strip = lambda rows: {k: {f: v for f, v in r.items() if f != "seconds"}
                        for k, r in rows.items()}
  assert strip(again["tasks"]) == strip(report["tasks"])


def test_cli_bad_input_one_line_exit_2_nothing_written(run_dir, tmp_path):
  from test_errors import _assert_one_line_error
  out = tmp_path / "r.json"
  proc = run_cli(["-m", "evals.vtab", "--checkpoint", run_dir, "--tasks", "offline,nope",
                  "--output", str(out)])
  _assert_one_line_error(proc, "unknown task 'nope'", "shapes-count", "vtab1k")
  assert not out.exists()


def test_a_dataset_not_prepared_names_the_tfds_build_command(run_dir, tmp_path):
  from selfsup.errors import UserError
  with pytest.raises(UserError, match="tfds build dtd --file_format=array_record") as e:
    vtab.evaluate_checkpoint(run_dir, "dtd", data_dir=str(tmp_path / "tfds"),
                             cache_dir=str(tmp_path / "c"), progress=False)
  assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "c")


def test_folder_task_with_one_class_and_checkpoint_of_another_encoder(run_dir, tmp_path):
  import shutil
  from selfsup.errors import UserError
  one = _folder(tmp_path / "one", 1)
  with pytest.raises(UserError, match="at least 2 classes"):
    vtab.evaluate_checkpoint(run_dir, f"folder:{one}", cache_dir=str(tmp_path / "c"),
                             progress=False)
  other = tmp_path / "other"
  shutil.copytree(run_dir, other)
  cfg = json.loads((other / "config.json").read_text())
  cfg["encoder"] = {"name": "tiny_cnn", "width_multiplier": 1.0}
  (other / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(UserError, match="another encoder"):
    vtab.evaluate_checkpoint(str(other), "offline", cache_dir=str(tmp_path / "c"),
                             progress=False)
  assert not os.path.exists(tmp_path / "c")  # nothing extracted, nothing cached
