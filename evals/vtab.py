"""`python -m evals.vtab --checkpoint DIR --tasks SUITE_OR_LIST [--data_dir D]
[--output report.json] [--random_init] [--protocol 1k|full] [--resolution N|run]`

Task suites on frozen features (EVALUATION.md, "VTAB-1k"). `--tasks` is a comma-separated
list of suite names (vtab1k, natural, specialized, structured, offline), task names
(`evals.tasks.TASKS`) and `folder:PATH` tasks (a labelled folder PATH/{train,test}/CLASS
becomes a task with the same protocol), or a file with one such entry per line.

Protocol 1k (default): images stretched to 224 x 224 (the offline tasks: the run's image
size), frozen pooled features, the L-BFGS probe trained on train800 for every l2 of the
grid, the l2 with the best val200 top-1 chosen, refit on train800val200, top-1 on the whole
test split. `--protocol full`: the same with the task's whole train / val splits. Prints
one JSON object `{"tasks": {NAME: {top1, l2, num_train, num_test, group, ...}}, "groups":
{GROUP: mean}, "mean": ...}` (also written to --output) and the same table as Markdown.

Features are cached per (checkpoint step, task, split, resolution) in --cache_dir
(default CHECKPOINT/vtab_features): a rerun, or a suite that was interrupted, continues
where it stopped. From a notebook: `evaluate_checkpoint("runs/x", "offline")`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np
from absl import flags

from evals import features as features_lib
from evals import stream
from evals import tasks as tasks_lib
from evals.logreg import linear_probe
from selfsup import cli
from selfsup.errors import UserError

PROTOCOLS = {"1k": ("train800", "val200"), "full": ("train", "val")}
DEFAULT_L2_GRID = tuple(10.0 ** np.arange(-6, 7, 2))


class TaskSource:
  """A task's split as a random-access source: stretched uint8 images and task labels."""
  stable_indices = True

  def __init__(self, task, records, positions, resolution: int, num_classes: int, split: str):
    self.task, self.records, self.positions = task, records, np.asarray(positions)
    self.resolution, self.num_classes, self.split = resolution, num_classes, split
    self.name = task.name

  def __len__(self) -> int:
    return len(self.positions)

  def __getitem__(self, i: int) -> dict:
    i = int(i) % len(self)
    record = self.records[int(self.positions[i])]
    label = record["label"] if self.task.source.startswith("folder:") else (
        tasks_lib.label_of(record, self.task.label))
    if not 0 <= label < self.num_classes:
      raise UserError(f"task {self.task.name}: label {label} of example {i} of "
                      f"{self.split} is outside [0, {self.num_classes})")
    image = tasks_lib.stretch(tasks_lib.prepare_image(record["image"], self.task.preprocess),
                              self.resolution)
    return {"image": image, "label": int(label), "index": i}


def _open_tfds(task, split: str, data_dir):
  import tensorflow_datasets as tfds
  from selfsup.data.sources import TfdsSource
  name = task.source[len("tfds:"):]
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # noqa: BLE001 - TFDS reports these through many types
    err = TfdsSource._explain(tfds, name, split, data_dir, e)  # pylint: disable=protected-access
    note = f" ({task.note})" if task.note else ""
    raise UserError(f"task {task.name}: {err}{note}") from None


class _Opened:
  """Everything a task's parts need, opened once (fails before any extraction)."""

  def __init__(self, task, data_dir, resolution: int, seed: int):
    self.task, self.resolution = task, resolution
    self.num_classes = task.num_classes
    self._folders = {}
    if task.source.startswith("folder:"):
      from selfsup.data import make_source
      train = make_source(task.source, "train")
      test = make_source(task.source, "test")
      if train.num_classes < 2:
        raise UserError(f"task {task.name}: a classification task needs at least 2 classes; "
                        f"its train split has {train.num_classes}")
      self.num_classes = train.num_classes
      n = len(train)
      n_val = min(200, n // 5)
      n_train = min(800, n - n_val)
      order = np.random.default_rng(seed).permutation(n)
      self._folders = {
          "train800": (train, np.sort(order[:n_train])),
          "val200": (train, np.sort(order[n_train:n_train + n_val])),
          "train": (train, np.sort(np.concatenate([order[:n_train], order[n_train + n_val:]]))),
          "val": (train, np.sort(order[n_train:n_train + n_val])),
          "test": (test, np.arange(len(test)))}
    elif task.is_tfds:
      self._records = {part: None for part in task.splits}
      # Opening checks that the dataset is prepared (and the split exists).
      self._records["test"] = _open_tfds(task, task.split("test"), data_dir)
      self._data_dir = data_dir

  def part(self, name: str) -> TaskSource:
    task = self.task
    if self._folders:
      records, positions = self._folders[name]
      split = f"{name} of train" if name != "test" else "test"
    elif task.is_tfds:
      split = task.split(name)
      if self._records.get(name) is None:
        self._records[name] = _open_tfds(task, split, self._data_dir)
      records = self._records[name]
      positions = np.arange(len(records))
    else:
      from selfsup.data import make_source
      split = task.split(name)
      records = make_source(task.source, split, image_size=self.resolution)
      positions = np.arange(len(records))
    return TaskSource(task, records, positions, self.resolution, self.num_classes, split)


def open_tasks(tasks, *, data_dir=None, resolution=None, run_image_size=32, seed=0):
  """[(task, _Opened)] for every task; raises UserError for the first that cannot open."""
  out = []
  for task in tasks:
    size = resolution or task.resolution or run_image_size
    out.append((task, _Opened(task, data_dir, int(size), seed)))
  return out


def probe_parts(train, val, test, num_classes, l2_grid=DEFAULT_L2_GRID) -> dict:
  """l2 chosen on val after training on train, refit on train + val, top-1 on test."""
  (tx, ty), (vx, vy), (sx, sy) = train, val, test
  for part, x in (("train", tx), ("val", vx), ("test", sx)):
    if not np.isfinite(x).all():
      raise UserError(f"the {part} features are not finite (NaN or inf): the encoder diverged")
  x = np.concatenate([tx, vx])
  y = np.concatenate([ty, vy])
  val_mask = np.concatenate([np.zeros(len(ty), bool), np.ones(len(vy), bool)])
  result = linear_probe(x, y, sx, sy, num_classes=num_classes, l2_grid=l2_grid,
                        val_mask=val_mask)
  return result


def evaluate_encoder(encoder, variables, tasks, *, protocol="1k", data_dir=None,
                     resolution=None, run_image_size=32, batch_size=256, cache_dir=None,
                     cache_key=None, l2_grid=DEFAULT_L2_GRID, seed=0, progress=True,
                     log=None, opened=None) -> dict:
  """Runs `tasks` (Task rows) on a frozen encoder; returns the report dict."""
  if protocol not in PROTOCOLS:
    raise UserError(f"--protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
  opened = opened or open_tasks(tasks, data_dir=data_dir, resolution=resolution,
                                run_image_size=run_image_size, seed=seed)
  fit_part, val_part = PROTOCOLS[protocol]
  feature_fn = stream.image_features(encoder)
  bar = batches = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=len(opened), desc="tasks", unit="task", file=sys.stderr, leave=False)
    batches = tqdm(total=0, desc="batches", unit="batch", file=sys.stderr, leave=False)
  t0 = time.perf_counter()
  rows = {}
  try:
    for task, op in opened:
      if bar is not None:
        bar.set_description(task.name)
      parts = {}
      t_task = time.perf_counter()
      for part in (fit_part, val_part, "test"):
        source = op.part(part)
        key = None
        if cache_dir:
          key = dict(cache_key or {}, task=task.name, source=task.source, split=source.split,
                     label=task.label, preprocess=list(task.preprocess),
                     resolution=op.resolution, seed=seed if task.source.startswith(
                         "folder:") else None, n=len(source))
          cached = stream.load_cached(stream.cache_path(cache_dir, **key))
          if cached is not None:
            parts[part] = cached
            continue
        x, y = stream.stream_features(
            feature_fn, variables, source, image_size=op.resolution, batch_size=batch_size,
            nonfinite_message=f"the features of task {task.name} ({source.split}) are not "
                              "finite (NaN or inf): the encoder diverged",
            progress=batches)
        if key is not None:
          os.makedirs(cache_dir, exist_ok=True)
          x = stream.save_cached(stream.cache_path(cache_dir, **key), x, y, key)
        parts[part] = (x, y)
      r = probe_parts(parts[fit_part], parts[val_part], parts["test"], op.num_classes,
                      l2_grid=l2_grid)
      rows[task.name] = {"top1": r["top1"], "l2": r["l2"], "num_train": r["num_train"],
                         "num_test": r["num_test"], "group": task.group,
                         "val_top1": r["val_top1"], "top5": r["top5"],
                         "num_classes": int(op.num_classes), "resolution": op.resolution,
                         "seconds": round(time.perf_counter() - t_task, 2)}
      if log:
        log(f"{task.name}: top-1 {r['top1']:.2f} (l2 {r['l2']:.3g}, val {r['val_top1']:.1f})")
      if bar is not None:
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
      batches.close()
  return summarize(rows, protocol=protocol, seconds=time.perf_counter() - t0)


def summarize(rows: dict, **extra) -> dict:
  groups = {}
  for row in rows.values():
    groups.setdefault(row["group"], []).append(row["top1"])
  return {"tasks": rows, "groups": {g: float(np.mean(v)) for g, v in groups.items()},
          "mean": float(np.mean([r["top1"] for r in rows.values()])) if rows else None,
          **extra}


def markdown(report: dict, title: str | None = None) -> str:
  """The report as a Markdown table: one row per task, then group means and the mean."""
  lines = [f"### {title}", ""] if title else []
  lines += ["| task | group | top-1 | l2 | train | test |", "|---|---|---:|---:|---:|---:|"]
  for name, r in report["tasks"].items():
    lines.append(f"| {name} | {r['group']} | {r['top1']:.2f} | {r['l2']:.3g} | "
                 f"{r['num_train']} | {r['num_test']} |")
  for g, v in report["groups"].items():
    lines.append(f"| **{g} mean** | | {v:.2f} | | | |")
  if report.get("mean") is not None:
    lines.append(f"| **mean** | | {report['mean']:.2f} | | | |")
  return "\n".join(lines)


def evaluate_checkpoint(checkpoint: str, tasks="offline", *, random_init=False, step=None,
                        protocol="1k", data_dir=None, resolution=None, batch_size=256,
                        cache_dir="", seed=0, progress=True, log=None) -> dict:
  """Loads a run directory's encoder and runs the task suite `tasks` (see module doc).

  cache_dir "" means CHECKPOINT/vtab_features; None turns the cache off.
  """
  task_list = tasks_lib.parse_tasks(tasks) if isinstance(tasks, str) else list(tasks)
  if protocol not in PROTOCOLS:
    raise UserError(f"--protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
  config, encoder, variables, step = features_lib.load_encoder(checkpoint, step)
  size = config.data.image_size
  if random_init:
    variables = features_lib.random_init_variables(encoder, size, seed=seed)
  opened = open_tasks(task_list, data_dir=data_dir, resolution=resolution,
                      run_image_size=size, seed=seed)
  if cache_dir == "":
    cache_dir = os.path.join(checkpoint, "vtab_features")
  cache_key = dict(checkpoint=os.path.abspath(checkpoint),
                   step=None if random_init else int(step), random_init=bool(random_init),
                   init_seed=seed if random_init else None,
                   encoder=json.loads(config.encoder.to_json()))
  report = evaluate_encoder(encoder, variables, task_list, protocol=protocol,
                            run_image_size=size, batch_size=batch_size, cache_dir=cache_dir,
                            cache_key=cache_key, seed=seed, progress=progress, log=log,
                            opened=opened)
  report.update(checkpoint=os.path.abspath(checkpoint), step=None if random_init else int(step),
                random_init=bool(random_init), encoder=config.encoder.name,
                objectives=list(config.objectives.keys()))
  return report


def write_atomic(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as fh:
    fh.write(text)
  os.replace(tmp, path)


def _define_flags():
  flags.DEFINE_string("checkpoint", None, "run directory written by selfsup.train")
  flags.DEFINE_string("tasks", "offline", "suites (vtab1k, natural, specialized, structured, "
                      "offline), task names and folder:PATH, comma-separated, or a file")
  flags.DEFINE_string("data_dir", None, "TFDS data_dir")
  flags.DEFINE_string("output", None, "write the JSON report here too")
  flags.DEFINE_string("markdown", None, "write the Markdown table here too")
  flags.DEFINE_bool("random_init", False, "evaluate an untrained encoder of the run's "
                    "architecture (the baseline)")
  flags.DEFINE_enum("protocol", "1k", list(PROTOCOLS), "1k: train800/val200; full: the "
                    "whole train/val splits")
  flags.DEFINE_string("resolution", None, "image size for every task (default: 224 for VTAB "
                      "tasks, the run's size for offline tasks; 'run': the run's size)")
  flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)")
  flags.DEFINE_integer("batch_size", 256, "feature extraction batch")
  flags.DEFINE_string("cache_dir", "", "feature cache (default CHECKPOINT/vtab_features; "
                      "'none' to turn it off)")
  flags.DEFINE_bool("progress", True, "progress bar on stderr")
  flags.DEFINE_integer("seed", 0, "seed of folder tasks' train800/val200 draw and the "
                       "random-init baseline")


def main(argv):
  del argv
  from evals.linear_probe import check_writable
  f = flags.FLAGS
  if not f.checkpoint:
    raise UserError("usage: python -m evals.vtab --checkpoint DIR --tasks SUITE_OR_LIST "
                    "[--output report.json] [--random_init]")
  task_list = tasks_lib.parse_tasks(f.tasks)
  check_writable(f.output, "--output")
  check_writable(f.markdown, "--markdown")
  resolution = None
  if f.resolution and f.resolution != "run":
    try:
      resolution = int(f.resolution)
    except ValueError:
      raise UserError(f"--resolution must be a number of pixels or 'run', not "
                      f"{f.resolution!r}") from None
    if resolution < 8:
      raise UserError(f"--resolution must be >= 8, got {resolution}")
  elif f.resolution == "run":
    task_list = [dataclasses.replace(t, resolution=None) for t in task_list]
  cache_dir = None if f.cache_dir == "none" else f.cache_dir
  report = evaluate_checkpoint(f.checkpoint, task_list, random_init=f.random_init,
                               step=f.step, protocol=f.protocol, data_dir=f.data_dir,
                               resolution=resolution, batch_size=f.batch_size,
                               cache_dir=cache_dir, seed=f.seed, progress=f.progress)
  table = markdown(report)
  print(table, file=sys.stderr, flush=True)
  text = json.dumps(report)
  print(text, flush=True)
  if f.output:
    write_atomic(f.output, text + "\n")
  if f.markdown:
    write_atomic(f.markdown, table + "\n")


if __name__ == "__main__":
  _define_flags()
  cli.run_main(main)
