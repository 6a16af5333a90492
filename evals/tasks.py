"""The task registry of `evals.vtab`: VTAB-1k, the offline suite, and folder tasks, as data.

A task is a row of `TASKS`: where its examples come from (`source`), which split strings
make its train800 / val200 / test parts (and train / val for the full protocol), how a
record becomes a label (`label`, one of the few generic label functions below, with its
parameters), how many classes there are, how the image is prepared (`preprocess`) and the
group it is averaged in. Nothing is code per task: adding a task is adding a row.

Label functions (`label["fn"]`), each on a decoded record (nested dicts of arrays):

  field       int(record[key]) + offset
  count       len(record[key]) + offset                      (clevr-count: objects - 3)
  min_bin     d = min over rows of record[key][:, column] (optionally only rows whose
              record[where_key] is in where_values; none left: the `none` class);
              label = (number of thresholds < d) - 1         (clevr-dist, kitti-dist)
  floordiv    floor(record[key] / divisor)                   (dSprites location, angle)

The VTAB-1k rows follow EVALUATION.md's table (Zhai et al. 2019; the task_adaptation
repository's label functions). `sizes` are the sizes of the TFDS splits the table slices
(the TFDS wheel carries no split metadata, so split arithmetic comes from here).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import numpy as np

from selfsup.errors import UserError

GROUPS = ("natural", "specialized", "structured")


@dataclasses.dataclass(frozen=True)
class Task:
  """One evaluation task (see the module docstring for the fields' meaning)."""
  name: str
  group: str
  source: str                  # tfds:NAME[/CONFIG][:VERSION] | synthetic:NAME | folder:PATH
  num_classes: int | None      # None: a folder task's class count is its folder's
  label: dict                  # {"fn": ..., parameters}
  splits: dict                 # train800, val200, test, train, val -> split strings
  sizes: dict = dataclasses.field(default_factory=dict)  # full TFDS split sizes
  preprocess: tuple = ()       # steps on the raw image: "x255"
  resolution: int | None = 224  # None: the run's own image size
  note: str = ""               # e.g. a manual download

  @property
  def is_tfds(self) -> bool:
    return self.source.startswith("tfds:")

  def split(self, part: str) -> str:
    if part not in self.splits:
      raise UserError(f"task {self.name} has no {part!r} split; it has "
                      f"{', '.join(self.splits)}")
    return self.splits[part]


def _vtab(name, group, tfds_name, num_classes, val200, test, sizes, *, label=None,
          train="train", val=None, preprocess=(), note=""):
  """A VTAB-1k row: train800 is always train[:800]."""
  base = train.split("[")[0]
  return Task(name=name, group=group, source=f"tfds:{tfds_name}", num_classes=num_classes,
              label=label or {"fn": "field", "key": "label"},
              splits={"train800": f"{base}[:800]", "val200": val200, "test": test,
                      "train": train, "val": val or val200.replace("[:200]", "")},
              sizes=sizes, preprocess=tuple(preprocess), note=note)


_CLEVR_SIZES = {"train": 70000, "validation": 15000, "test": 15000}
_DSPRITES_SIZES = {"train": 737280}
_NORB_SIZES = {"train": 24300, "test": 24300}

VTAB1K = [
    _vtab("caltech101", "natural", "caltech101:3.*.*", 102, "train[2754:2954]", "test",
          {"train": 3060, "test": 6084}, train="train[:2754]", val="train[2754:]"),
    _vtab("cifar100", "natural", "cifar100:3.*.*", 100, "train[45000:45200]", "test",
          {"train": 50000, "test": 10000}, train="train[:45000]", val="train[45000:]"),
    _vtab("dtd", "natural", "dtd:3.*.*", 47, "validation[:200]", "test",
          {"train": 1880, "validation": 1880, "test": 1880}),
    _vtab("flowers102", "natural", "oxford_flowers102:2.*.*", 102, "validation[:200]", "test",
          {"train": 1020, "validation": 1020, "test": 6149}),
    # VTAB used 3.x; TFDS now only builds 4.0.0 (same images and labels).
    _vtab("pets", "natural", "oxford_iiit_pet:4.*.*", 37, "train[2944:3144]", "test",
          {"train": 3680, "test": 3669}, train="train[:2944]", val="train[2944:]"),
    _vtab("svhn", "natural", "svhn_cropped:3.*.*", 10, "train[65931:66131]", "test",
          {"train": 73257, "test": 26032}, train="train[:65931]", val="train[65931:]"),
    _vtab("sun397", "natural", "sun397/tfds:4.*.*", 397, "validation[:200]", "test",
          {"train": 76128, "validation": 10875, "test": 21750}),
    _vtab("camelyon", "specialized", "patch_camelyon:2.*.*", 2, "validation[:200]", "test",
          {"train": 262144, "validation": 32768, "test": 32768}),
    _vtab("eurosat", "specialized", "eurosat/rgb:2.*.*", 10, "train[16200:16400]",
          "train[21600:]", {"train": 27000}, train="train[:16200]", val="train[16200:21600]"),
    _vtab("resisc45", "specialized", "resisc45:3.*.*", 45, "train[18900:19100]",
          "train[25200:]", {"train": 31500}, train="train[:18900]", val="train[18900:25200]",
          note="manual download: put NWPU-RESISC45.rar in the TFDS manual_dir"),
    _vtab("retinopathy", "specialized", "diabetic_retinopathy_detection/btgraham-300:3.*.*", 5,
          "validation[:200]", "test", {"train": 35126, "validation": 10906, "test": 42670},
          note="manual download: the Kaggle competition files in the TFDS manual_dir"),
    _vtab("clevr-count", "structured", "clevr:3.*.*", 8, "train[63000:63200]", "validation",
          _CLEVR_SIZES, train="train[:63000]", val="train[63000:]",
          label={"fn": "count", "key": "objects/size", "offset": -3}),
    _vtab("clevr-dist", "structured", "clevr:3.*.*", 6, "train[63000:63200]", "validation",
          _CLEVR_SIZES, train="train[:63000]", val="train[63000:]",
          label={"fn": "min_bin", "key": "objects/pixel_coords", "column": 2,
                 "thresholds": [0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0]}),
    _vtab("dmlab", "structured", "dmlab:2.0.1", 6, "validation[:200]", "test",
          {"train": 65550, "validation": 22628, "test": 22735}),
    # Vehicles are types Car (0), Van (1), Truck (2); depth is location z.
    _vtab("kitti-dist", "structured", "kitti:3.1.0", 4, "validation[:200]", "test",
          {"train": 6347, "validation": 423, "test": 711},
          label={"fn": "min_bin", "key": "objects/location", "column": 2,
                 "where_key": "objects/type", "where_values": [0, 1, 2],
                 "thresholds": [-100.0, 8.0, 20.0, 999.0], "none": 3}),
    _vtab("dsprites-loc", "structured", "dsprites:2.*.*", 16, "train[589824:590024]",
          "train[663552:]", _DSPRITES_SIZES, train="train[:589824]",
          val="train[589824:663552]", preprocess=("x255",),
          label={"fn": "floordiv", "key": "label_x_position", "divisor": 2}),
    _vtab("dsprites-orient", "structured", "dsprites:2.*.*", 16, "train[589824:590024]",
          "train[663552:]", _DSPRITES_SIZES, train="train[:589824]",
          val="train[589824:663552]", preprocess=("x255",),
          label={"fn": "floordiv", "key": "label_orientation", "divisor": 2.5}),
    _vtab("smallnorb-azim", "structured", "smallnorb:2.*.*", 18, "test[:200]", "test[50%:]",
          _NORB_SIZES, val="test[:50%]", label={"fn": "field", "key": "label_azimuth"}),
    _vtab("smallnorb-elev", "structured", "smallnorb:2.*.*", 9, "test[:200]", "test[50%:]",
          _NORB_SIZES, val="test[:50%]", label={"fn": "field", "key": "label_elevation"}),
]


def _offline(name, source, num_classes, label):
  return Task(name=name, group="offline", source=source, num_classes=num_classes,
              label=label, resolution=None,
              splits={"train800": "train[:800]", "val200": "train[800:1000]", "test": "test",
                      "train": "train[1000:]", "val": "train[800:1000]"},
              sizes={"train": 20000, "test": 2000})


# The built-in procedural data (`synthetic:shapes`): structured tasks that need no download.
OFFLINE = [
    _offline("shapes-class", "synthetic:shapes", 12, {"fn": "field", "key": "label"}),
    # The analogue of clevr-count: 1..4 objects.
    _offline("shapes-count", "synthetic:shapes_multi", 4,
             {"fn": "field", "key": "count", "offset": -1}),
    # The analogues of dSprites location / orientation: 3x3 cell, 8 tilt bins.
    _offline("shapes-position", "synthetic:shapes", 9, {"fn": "field", "key": "position"}),
    _offline("shapes-orient", "synthetic:shapes", 8, {"fn": "field", "key": "orientation"}),
]

TASKS: dict[str, Task] = {t.name: t for t in VTAB1K + OFFLINE}

SUITES: dict[str, list[str]] = {
    "vtab1k": [t.name for t in VTAB1K],
    **{g: [t.name for t in VTAB1K if t.group == g] for g in GROUPS},
    "offline": [t.name for t in OFFLINE],
}


def folder_task(path: str) -> Task:
  """A user's labelled folder (PATH/{train,test}/CLASS/IMAGE) as a task with the 1k
  protocol: train800 and val200 are a seeded random 800 and the next 200 of its train
  split (folders are sorted by class, so not a prefix); test is its whole test split."""
  path = path.rstrip("/") or "/"
  name = "folder:" + path
  return Task(name=name, group="custom", source=name, num_classes=None,
              label={"fn": "field", "key": "label"},
              splits={"train800": "train", "val200": "train", "test": "test", "train": "train",
                      "val": "train"})


def parse_tasks(spec: str) -> list[Task]:
  """Tasks of a comma-separated list of suite names, task names and `folder:PATH`, or of a
  config file (`.txt`/`.json`/`.py`-free: one entry per line, `#` comments)."""
  entries = []
  text = str(spec or "").strip()
  if not text:
    raise UserError(f"--tasks is empty; give suites ({', '.join(SUITES)}), task names or "
                    "folder:PATH")
  if os.path.isfile(text) and not text.startswith("folder:"):
    with open(text) as fh:
      for line in fh:
        line = line.split("#", 1)[0].strip()
        entries += [e.strip() for e in line.split(",") if e.strip()]
  else:
    entries = [e.strip() for e in text.split(",") if e.strip()]
  out, seen = [], set()
  for entry in entries:
    if entry.startswith("folder:"):
      names = [entry]
    elif entry in SUITES:
      names = SUITES[entry]
    elif entry in TASKS:
      names = [entry]
    else:
      raise UserError(f"unknown task {entry!r}; valid suites: {', '.join(SUITES)}; valid "
                      f"tasks: {', '.join(TASKS)}; or folder:PATH")
    for n in names:
      if n not in seen:
        seen.add(n)
        out.append(folder_task(n[len("folder:"):]) if n.startswith("folder:") else TASKS[n])
  return out


# ----------------------------------------------------------------------------------------
# Split arithmetic.

_SLICE = re.compile(r"^([A-Za-z0-9_]+)(?:\[([^:\]]*):([^:\]]*)\])?$")


def split_size(split: str, sizes: dict) -> int:
  """Number of examples `split` (e.g. `train[2754:2954]`, `test[50%:]`) selects."""
  m = _SLICE.match(split.replace(" ", ""))
  if not m or m.group(1) not in sizes:
    raise ValueError(f"cannot size split {split!r} with sizes {sizes}")
  n = sizes[m.group(1)]

  def bound(b, default):
    if b in (None, ""):
      return default
    if b.endswith("%"):
      return int(round(n * int(b[:-1]) / 100))  # TFDS rounds percent slices
    v = int(b)
    return max(0, n + v) if v < 0 else min(v, n)

  return max(0, bound(m.group(3), n) - bound(m.group(2), 0))


# ----------------------------------------------------------------------------------------
# Label functions.


def _get(record: dict, key: str):
  value = record
  for part in key.split("/"):
    if not isinstance(value, dict) or part not in value:
      raise UserError(f"the record has no field {key!r} (fields: {_fields(record)})")
    value = value[part]
  return value


def _fields(record, prefix=""):
  out = []
  for k, v in record.items():
    out += _fields(v, f"{prefix}{k}/") if isinstance(v, dict) else [prefix + k]
  return ", ".join(out)


def label_of(record: dict, spec: dict) -> int:
  """The label of one record under a label spec (see the module docstring)."""
  fn = spec["fn"]
  if fn == "field":
    return int(np.asarray(_get(record, spec["key"]))) + int(spec.get("offset", 0))
  if fn == "count":
    return len(np.asarray(_get(record, spec["key"]))) + int(spec.get("offset", 0))
  if fn == "floordiv":
    return int(math.floor(float(np.asarray(_get(record, spec["key"]))) / spec["divisor"]))
  if fn == "min_bin":
    values = np.asarray(_get(record, spec["key"]), np.float64)
    column = values if values.ndim == 1 else values.reshape(-1, values.shape[-1])[
        :, spec.get("column", 0)]
    if "where_key" in spec:
      kind = np.asarray(_get(record, spec["where_key"])).reshape(-1)
      column = column[np.isin(kind, spec["where_values"])]
    if column.size == 0:
      if "none" not in spec:
        raise UserError(f"a record has no {spec['key']} to take the minimum of")
      return int(spec["none"])
    thresholds = np.asarray(spec["thresholds"], np.float64)
    return int(np.sum(thresholds < column.min())) - 1
  raise ValueError(f"unknown label function {fn!r}")


def prepare_image(image, steps: tuple) -> np.ndarray:
  """Raw record image -> uint8 (H, W, 3): the task's steps, then channels tiled to 3."""
  image = np.asarray(image)
  if "x255" in steps:
    image = image.astype(np.float32) * 255.0
  if image.dtype != np.uint8:
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  elif image.shape[-1] == 4:
    image = image[..., :3]
  return image


def stretch(image: np.ndarray, size: int) -> np.ndarray:
  """Resize to size x size, aspect ratio not kept (VTAB's preprocessing), bilinear."""
  from PIL import Image
  if image.shape[:2] == (size, size):
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def tfds_build_command(task: Task) -> str:
  name = task.source[len("tfds:"):].split(":")[0]
  return f"tfds build {name} --file_format=array_record"


__all__ = ["Task", "TASKS", "SUITES", "GROUPS", "parse_tasks", "folder_task", "label_of",
           "split_size", "prepare_image", "stretch"]
