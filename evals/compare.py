"""`python -m evals.compare`: pretrain several objectives the same way and probe each.

Trains every objective (or `+`-joined combination) named in `--objectives` from one
experiment config file (`--config`, default the quickstart; each name is passed to the
file as its `:ARG`, so `--objectives rotation,simclr` runs `quickstart.py:rotation` and
`quickstart.py:simclr`), with the encoder, data, optimizer and budget the flags override,
probes each frozen encoder with the L-BFGS linear probe (features streamed), and probes
one random-init encoder of the same architecture as the baseline. Prints a table and
writes a JSON list, one row per run:

    python -m evals.compare --dataset folder:/data/cifar10 --encoder resnet18 \
        --width_multiplier 0.25 --cifar_stem --steps 300 \
        --objectives rotation,simclr,rotation+simclr --workdir runs/compare

`--seeds 0,1,2` runs the whole comparison once per seed (in WORKDIR/seed_S) and ends with
each run's mean and standard deviation of top-1 and of its gain over the same seed's
random-init baseline (rows marked `"summary": true`):

    python -m evals.compare --dataset folder:/data/cifar10 --encoder resnet18 \
        --width_multiplier 0.25 --steps 300 --objectives simclr,swav --seeds 0,1,2

A config file without an argument (`--config experiments/simclr_cifar10.py`) is one
run, named by its objectives. Every objective name, option and step count is checked,
and the dataset opened, before anything trains.

From a notebook: `compare(["rotation", "simclr"], dataset=..., workdir=...)`, or
`compare_seeds([...], seeds=(0, 1, 2), ...)`.

A SIGTERM while a run trains (either phase of G-SimCLR's, `selfsup/phases.py`) saves
that run and stops the comparison as `selfsup.train` does: it says which run is
incomplete, does not probe it or start the runs after it, prints the rows finished so
far, and exits 0; rerunning the same command resumes the interrupted phase (runs already
finished are only probed again).
"""

import importlib.util
import json
import os
import sys
import time

from absl import flags

from selfsup import cli
from selfsup.errors import UserError

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "experiments", "quickstart.py")


def _config_module(path: str):
  if not os.path.isfile(path):
    raise UserError(f"--config {path}: no such file (an experiment config, e.g. "
                    "experiments/quickstart.py)")
  spec = importlib.util.spec_from_file_location("_compare_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(f"--config {path}: syntax error at line {e.lineno}: {e.msg}") from None
  if not callable(getattr(module, "get_config", None)):
    raise UserError(f"--config {path} defines no get_config()")
  return module


def split_config_arg(config: str) -> tuple[str, str | None]:
  """'FILE.py:ARG' -> ('FILE.py', 'ARG'); 'FILE.py' -> ('FILE.py', None)."""
  path, sep, arg = config.partition(".py:")
  return (path + ".py", arg) if sep else (config, None)


def parse_overrides(items) -> dict:
  """['KEY=VALUE', ...] -> {KEY: VALUE}; VALUE read as a Python literal (0.01, (0.2, 1.0),
  True), else kept as a string."""
  import ast
  out = {}
  for item in items or ():
    key, sep, text = item.partition("=")
    if not sep or not key:
      raise UserError(f"--set {item!r}: use KEY=VALUE, e.g. objectives.swav.epsilon=0.02")
    try:
      out[key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      out[key] = text
  return out


def apply_overrides(c, overrides: dict, name: str):
  """Sets each dotted KEY of `overrides` in config `c`; an unknown key is one line."""
  for key, value in (overrides or {}).items():
    node, parts = c, key.split(".")
    for i, part in enumerate(parts):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        where = ".".join(parts[:i]) or "the config"
        raise UserError(f"--set {key}: run {name!r} has no {part!r} in {where}; valid: "
                        f"{', '.join(sorted(keys)) or 'none'}")
      if i == len(parts) - 1:
        node[part] = value
      else:
        node = node[part]


def run_configs(config: str, specs=None, *, dataset=None, encoder=None, steps=None,
                batch_size=None, image_size=None, seed=None, data_dir=None,
                dtype=None, overrides=None) -> list:
  """[(name, ConfigDict)]: one validated training config per spec, with the overrides.

  `config` is a config file, optionally `FILE.py:ARG`. Each spec is passed to the file's
  get_config as its argument; with no specs, the file (with its own ARG) is one run.
  Arguments left None keep the config's value. Raises UserError for an unknown
  objective, a bad option or value, or runs that do not share data and encoder.
  `overrides` ({dotted key: value}, `--set`) is applied to every run after its file and
  before the other arguments; a key that a run lacks (an objective it does not train)
  is an error.
  """
  import objectives as objectives_lib
  from selfsup import config as config_lib
  path, arg = split_config_arg(config)
  module = _config_module(path)
  if specs:
    if arg is not None:
      raise UserError(f"--config {config}: give the objectives either after the colon or "
                      "with --objectives, not both")
    for spec in specs:
      for name in spec.split("+"):
        if name not in objectives_lib.REGISTRY:
          raise UserError(f"--objectives: unknown objective {name!r} in {spec!r}; valid "
                          f"objectives: {', '.join(sorted(objectives_lib.REGISTRY))} "
                          "(NAME+NAME for a combination)")
  if steps is not None and steps < 1:
    raise UserError(f"--steps must be >= 1, got {steps}")
  if batch_size is not None and batch_size < 1:
    raise UserError(f"--batch_size must be >= 1, got {batch_size}")

  out = []
  for spec in (specs or [arg]):
    c = module.get_config(spec) if spec is not None else module.get_config()
    # (a ConfigDict lists its keys sorted, so the order of NAME+NAME is not compared)
    if specs and sorted(c.objectives.keys()) != sorted(spec.split("+")):
      raise UserError(f"--config {path} does not take its objectives from its argument (it "
                      f"gave {'+'.join(c.objectives.keys())} for {spec!r}); leave --objectives "
                      "out to run it once, or use a config such as experiments/quickstart.py")
    # --set first, then the named flags (which win where both set a key).
    named = {key: value for key, value in (
        ("seed", seed), ("data.source", dataset), ("data.image_size", image_size),
        ("data.data_dir", data_dir), ("train.steps", steps), ("train.batch_size", batch_size),
        ("train.dtype", dtype)) if value is not None}
    apply_overrides(c, {**(overrides or {}), **named}, spec or path)
    if encoder:  # a whole encoder (with "name"), or fields of the config's encoder
      c.encoder = dict(encoder) if "name" in encoder else {**c.encoder.to_dict(), **encoder}
    n = c.train.steps
    c.train.log_every = max(1, min(50, n // 10))
    c.train.checkpoint_every = n
    c.train.progress_bar = False
    c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, n // 10)
    c.probe.enabled = False
    config_lib.validate(c)
    out.append((spec or "+".join(c.objectives.keys()), c))
  first = out[0][1]
  for name, c in out[1:]:
    for key in ("source", "image_size", "train_split", "test_split", "data_dir"):
      if c.data[key] != first.data[key]:
        raise UserError(f"run {name!r} has data.{key}={c.data[key]!r}, not "
                        f"{first.data[key]!r} as {out[0][0]!r}: compared runs share their data")
    if c.encoder.to_dict() != first.encoder.to_dict():
      raise UserError(f"run {name!r} has another encoder than {out[0][0]!r}: compared runs "
                      "share one architecture (and one random-init baseline)")
  return out


# The option that sets each objective's main training views' side (0 = the image size).
_VIEW_SIZE_FIELDS = ("view_size", "large_size", "crop_size")


def view_size_warnings(configs) -> list[str]:
  """One line per objective whose main views are not the probe's image size.

  The probe reads whole images at `data.image_size`; an encoder trained on views of
  another side has other feature-map sizes and BatchNorm statistics there (PixPro on
  CIFAR-10, ImageNet stem: trained on 36 px views, one checkpoint probed 27.30 at 32 px
  and 36.20 at 36 px), so the comparison would measure the mismatch.
  """
  lines = []
  for run, c in configs:
    size = c.data.image_size
    for name, options in c.objectives.items():
      for field in _VIEW_SIZE_FIELDS:
        side = options.get(field, 0)
        if side and side != size:
          lines.append(
              f"warning: run {run!r} trains {name} on {side} px views "
              f"(objectives.{name}.{field}={side}) but the probe reads {size} px images; "
              f"to train and probe at one size pass --image_size {side} --set "
              f"objectives.{name}.{field}=0")
  return lines


def _check_objectives(configs) -> None:
  """Builds every objective and runs its start-up checks on the training source."""
  import numpy as np

  from ml_collections import ConfigDict

  import encoders as encoders_lib
  import objectives as objectives_lib
  from selfsup import data as data_lib
  from selfsup import phases
  first = configs[0][1]
  encoders_lib.build_encoder(ConfigDict(first.encoder), "float32")
  source = data_lib.make_source(first.data.source, first.data.train_split,
                                image_size=first.data.image_size,
                                data_dir=first.data.data_dir or None)
  for _, c in configs:
    for name, options in c.objectives.items():
      options = dict(options)
      options.pop("weight", None)
      template = objectives_lib.build_objective(name, options, image_size=c.data.image_size,
                                                dtype=np.float32, dataset_size=len(source))
      template.validate(image_size=c.data.image_size, dataset=source,
                        batch_size=c.train.batch_size)
    phases.check(c)   # a given cluster file matches the training set


def compare(specs=None, *, workdir: str, config: str = DEFAULT_CONFIG, dataset=None,
            encoder=None, steps=None, batch_size=None, image_size=None, max_train=10000,
            max_test=2000, seed=None, data_dir=None, dtype=None, features: str = "image",
            overrides=None, log=print) -> list[dict]:
  """Trains each spec from `config` and probes it; the first row is random-init.

  Arguments left None keep the config file's values (the quickstart: synthetic:shapes,
  tiny CNN, 300 steps at batch 128, 32 px). After SIGTERM during a run's training it
  saves the run, says so on stderr and returns the rows finished before it (the
  interrupted run has none); calling it again resumes.
  """
  from ml_collections import ConfigDict

  import encoders as encoders_lib
  from evals.linear_probe import ProbeData, probe_live, probe_random_init
  from selfsup import phases
  from selfsup.trainer import Trainer

  # Everything that can fail does so before the first step.
  configs = run_configs(config, specs, dataset=dataset, encoder=encoder, steps=steps,
                        batch_size=batch_size, image_size=image_size, seed=seed,
                        data_dir=data_dir, dtype=dtype, overrides=overrides)
  first = configs[0][1]
  data = ProbeData(first.data.source, first.data.image_size, first.data.train_split,
                   first.data.test_split, max_train, max_test, first.data.data_dir or None)
  data.check()
  data.sources()
  _check_objectives(configs)
  for line in view_size_warnings(configs):
    _note(line)

  rows = []
  # The baseline first: a run cut short still has it.
  result = probe_random_init(encoders_lib.build_encoder(ConfigDict(first.encoder)), data,
                             seed=first.seed)
  rows.append({"objectives": "random-init", "probe_top1": result["top1"],
               "probe_top5": result["top5"], "l2": result["l2"], "steps": 0,
               "seed": first.seed})
  log(json.dumps(rows[-1]), flush=True)
  for name, c in configs:
    t0 = time.perf_counter()
    run_dir = os.path.join(workdir, name.replace("+", "_"))
    # G-SimCLR's clustering phase, if any (its messages are not rows: stderr).
    c, ready = phases.prepare(c, run_dir, log=_note)
    if not ready:
      _note(f"{run_dir}: run incomplete (its clustering phase was stopped by SIGTERM, saved); "
            f"{_unfinished(configs, name)}rerun the same command to resume")
      break
    trainer = Trainer(c, run_dir)
    last = trainer.run()
    if trainer.preempted:
      _note(f"{run_dir}: run incomplete (stopped by SIGTERM at step "
            f"{trainer.checkpointer.latest_step()} of {c.train.steps}, saved; not probed); "
            f"{_unfinished(configs, name)}rerun the same command to resume")
      break
    train_s = time.perf_counter() - t0
    result = probe_live(trainer, data, features=features)
    row = {"objectives": name, "probe_top1": result["top1"], "probe_top5": result["top5"],
           "l2": result["l2"], "features": result["features"], "steps": c.train.steps,
           "train_seconds": round(train_s, 1),
           "images_per_s": round(last.get("images_per_s", float("nan")), 1),
           "final_loss": last.get("loss"), "seed": c.seed}
    row.update({k: v for k, v in last.items() if k.endswith("/loss")})
    rows.append(row)
    log(json.dumps(row), flush=True)
  return rows


def compare_seeds(specs=None, *, seeds, workdir: str, log=print, **kwargs) -> list[dict]:
  """`compare` once per seed, each in WORKDIR/seed_S, then `seed_summary`'s rows.

  The seed is every run's `config.seed`: its parameter init, data order and augmentation,
  and the random-init baseline's weights, so each seed's gains are read against that
  seed's own baseline (ResNet-18 x0.25 on CIFAR-10, seeds 0/1/2: 32.75 / 32.40 / 32.90
  random-init top-1 at 32 px, 35.70 / 36.25 / 36.40 at 36 px). Returns the per-seed rows
  (each with its "seed") followed by one summary row per run name (`"summary": true`). A
  seed cut short by SIGTERM stops the loop and returns what finished, without summary;
  rerunning resumes it.
  """
  seeds = [int(s) for s in seeds]
  if not seeds or len(set(seeds)) != len(seeds):
    raise UserError(f"seeds={seeds}: give one or more distinct integer seeds, e.g. 0,1,2")
  expected = 1 + (len(specs) if specs else 1)   # the baseline and every run
  rows = []
  for seed in seeds:
    got = compare(specs, workdir=os.path.join(workdir, f"seed_{seed}"), seed=seed, log=log,
                  **kwargs)
    rows.extend(got)
    if len(got) < expected:
      return rows
  summary = seed_summary(rows)
  for row in summary:
    log(json.dumps(row), flush=True)
  return rows + summary


def seed_summary(rows) -> list[dict]:
  """One row per run name over the seeds in `rows`: mean and sample standard deviation of
  top-1 and, for trained runs, of the gain over the same seed's random-init row."""
  import numpy as np
  def std(x):  # the sample standard deviation; 0 for one seed
    return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0

  base = {r["seed"]: r["probe_top1"] for r in rows if r["objectives"] == "random-init"}
  out = []
  for name in dict.fromkeys(r["objectives"] for r in rows):
    runs = [r for r in rows if r["objectives"] == name and r["seed"] in base]
    top1 = np.array([r["probe_top1"] for r in runs], np.float64)
    row = {"objectives": name, "summary": True, "seeds": [r["seed"] for r in runs],
           "probe_top1": round(float(np.mean(top1)), 2), "probe_top1_std": round(std(top1), 2),
           "probe_top5": round(float(np.mean([r["probe_top5"] for r in runs])), 2)}
    if name != "random-init":
      gains = top1 - np.array([base[r["seed"]] for r in runs])
      row.update(gain=round(float(np.mean(gains)), 2), gain_std=round(std(gains), 2),
                 gain_min=round(float(np.min(gains)), 2),
                 gains=[round(float(g), 2) for g in gains])
    out.append(row)
  return out


def _note(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _unfinished(configs, name: str) -> str:
  """'the runs after it (a, b) were not started; ' or ''."""
  names = [n for n, _ in configs]
  later = names[names.index(name) + 1:]
  return f"the runs after it ({', '.join(later)}) were not started; " if later else ""


def _define_flags():
  """Flags exist only when run as a program, so importing this module defines none.

  Flags left unset keep the config file's values.
  """
  flags.DEFINE_string("config", DEFAULT_CONFIG, "experiment config file; each --objectives "
                      "entry is its :ARG (a file without an argument is one run)")
  flags.DEFINE_string("dataset", None, "SOURCE with train and test splits (default: the "
                      "config's data.source)")
  flags.DEFINE_string("objectives", "rotation,simclr", "comma-separated; NAME+NAME = "
                      "combination; each is the config's :ARG")
  flags.DEFINE_string("workdir", "runs/compare", "one sub-directory per run")
  flags.DEFINE_string("encoder", None, "encoder name (default: the config's)")
  flags.DEFINE_float("width_multiplier", None, "encoder width multiplier")
  flags.DEFINE_bool("cifar_stem", None, "ResNet CIFAR stem")
  flags.DEFINE_integer("steps", None, "pretraining steps per objective")
  flags.DEFINE_integer("batch_size", None, "global batch")
  flags.DEFINE_integer("image_size", None, "image size")
  flags.DEFINE_integer("max_train", 10000, "probe training examples")
  flags.DEFINE_integer("max_test", 2000, "probe test examples")
  flags.DEFINE_integer("seed", None, "seed")
  flags.DEFINE_string("seeds", None, "comma-separated seeds, e.g. 0,1,2: the whole comparison "
                      "once per seed (WORKDIR/seed_S), then each run's mean and standard "
                      "deviation of top-1 and of its gain over the same seed's random-init")
  flags.DEFINE_string("output", None, "write the rows here (JSON; rows also stream to FILEl)")
  flags.DEFINE_string("dtype", None, "compute dtype: float32 | bfloat16")
  flags.DEFINE_enum("features", "image", ("image", "objective"),
                    "probe features: whole images, or each objective's own protocol")
  flags.DEFINE_multi_string("set", [], "KEY=VALUE: set a config field in every run, e.g. "
                            "--set objectives.swav.epsilon=0.02 (repeatable)")


def _encoder_override(f):
  """The encoder fields the flags set: a whole encoder when --encoder is given (the CIFAR
  stem off unless asked for), else fields merged into the config's encoder; None if none."""
  encoder = {}
  if f.encoder is not None:
    encoder["name"] = f.encoder
    if f.encoder.startswith("resnet"):
      encoder["cifar_stem"] = False
  if f.width_multiplier is not None:
    encoder["width_multiplier"] = f.width_multiplier
  if f.cifar_stem is not None:
    if f.encoder is not None and not f.encoder.startswith("resnet"):
      raise UserError(f"--cifar_stem is for ResNets, not {f.encoder!r}")
    encoder["cifar_stem"] = f.cifar_stem
  return encoder or None


def main(argv):
  del argv
  from evals.linear_probe import check_max_examples, check_writable
  f = flags.FLAGS
  check_max_examples("--max_train", f.max_train)
  check_max_examples("--max_test", f.max_test)
  check_writable(f.output, "--output")
  check_writable(f.output + "l" if f.output else None, "--output")
  specs = None
  if f["objectives"].present or os.path.abspath(f.config) == DEFAULT_CONFIG:
    specs = [s.strip() for s in f.objectives.split(",") if s.strip()]
    if not specs:
      raise UserError("--objectives is empty; name at least one objective (e.g. rotation,simclr)")

  def log(line, flush=True):
    print(line, flush=flush)
    if f.output:  # one row at a time, so a run cut short keeps what it finished
      with open(f.output + "l", "a") as fh:
        fh.write(line + "\n")

  kwargs = dict(config=f.config, dataset=f.dataset, workdir=f.workdir,
                encoder=_encoder_override(f), steps=f.steps, batch_size=f.batch_size,
                image_size=f.image_size, max_train=f.max_train, max_test=f.max_test,
                dtype=f.dtype, features=f.features, overrides=parse_overrides(f.set), log=log)
  if f.seeds is not None:
    if f.seed is not None:
      raise UserError("--seed and --seeds: give one of them (--seeds 0,1,2 runs every seed)")
    try:
      seeds = [int(s) for s in f.seeds.split(",") if s.strip()]
    except ValueError:
      raise UserError(f"--seeds {f.seeds!r}: comma-separated integers, e.g. 0,1,2") from None
    rows = compare_seeds(specs, seeds=seeds, **kwargs)
  else:
    rows = compare(specs, seed=f.seed, **kwargs)
  print(f"{'objectives':32s} {'seed':>4s} {'probe top-1':>11s} {'train s':>8s}")
  for r in rows:
    if not r.get("summary"):
      print(f"{r['objectives']:32s} {str(r.get('seed', '')):>4s} {r['probe_top1']:11.2f} "
            f"{r.get('train_seconds', 0):8.1f}")
  summary = [r for r in rows if r.get("summary")]
  if summary:
    print(f"\n{'objectives':32s} {'top-1 mean +- std':>18s} {'gain mean +- std':>17s} "
          f"{'min gain':>8s}  (seeds {','.join(map(str, summary[0]['seeds']))})")
    for r in summary:
      gain = (f"{r['gain']:+8.2f} +- {r['gain_std']:4.2f} {r['gain_min']:+8.2f}"
              if "gain" in r else f"{'-':>17s} {'-':>8s}")
      print(f"{r['objectives']:32s} {r['probe_top1']:10.2f} +- {r['probe_top1_std']:4.2f} {gain}")
  if f.output:
    with open(f.output, "w") as fh:
      json.dump(rows, fh, indent=1)


if __name__ == "__main__":
  _define_flags()
  cli.run_main(main)
