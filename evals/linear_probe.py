"""`python -m evals.linear_probe --checkpoint DIR --dataset SOURCE [--output FILE.json]
[--random_init] [--save_features FILE.npz] [--features image|objective] [--max_train N]
[--feature_cache DIR] [--protocol lbfgs|sgd] [--layers all|LAYER,...]`

L-BFGS multinomial logistic regression on frozen features (EVALUATION.md): features
standardised with training statistics, the L2 strength swept on a validation part of
the training split and refined, refit on all training data, scored on the test split.
Prints (and optionally writes) one JSON object with top1, top5, num_train, num_test,
feature_dim and l2.

Features are streamed (`evals.stream`): images are decoded batch by batch by the grain
pipeline and embedded by the encoder jitted over all devices; only features stay on the
host. `--features objective` reads them the way the run's objective declares
(`Objective.eval_features`, e.g. context prediction's grid of patches); the default,
whole images, is the same protocol for every objective.

`--protocol sgd` is the SGD protocol instead (`evals.sgd_probe`: a linear head trained
on augmented views, checkpointed and resumable). `--layers all` (or a list such as
`stride8,pooled`) probes every encoder layer's pooled features (`evals.layers`) from one
pass over the images and prints one JSON object with a row per layer.

From a notebook:
    from evals.linear_probe import probe_checkpoint
    result = probe_checkpoint("runs/simclr", "folder:/data/cifar10")
"""

import dataclasses
import json
import os
import sys
import tempfile
import time

import numpy as np
from absl import flags

from evals import features as features_lib
from evals import stream
from evals.logreg import linear_probe
from selfsup import cli
from selfsup import data as data_lib
from selfsup.errors import UserError

FEATURE_MODES = ("image", "objective")
def probe_features(train_x, train_y, test_x, test_y, *, seed=0) -> dict:
  """The L-BFGS probe on features already extracted."""
  for what, x in (("training", train_x), ("test", test_x)):
    if not np.isfinite(x).all():
      raise UserError(f"the {what} features are not finite (NaN or inf): the encoder "
                      "diverged; probe an earlier checkpoint")
  t0 = time.perf_counter()
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  result = linear_probe(train_x, train_y, test_x, test_y, num_classes=num_classes, seed=seed)
  result["probe_seconds"] = time.perf_counter() - t0
  return result


def check_max_examples(flag: str, value) -> None:
  if value is not None and value < 1:
    raise UserError(f"{flag} must be a positive number of examples, got {value} (omit it to "
                    "use the whole split)")


def check_writable(path: str | None, flag: str) -> None:
  """Before any work: `path` can be written (its directory is created if missing)."""
  if not path:
    return
  if os.path.isdir(path):
    raise UserError(f"{flag} {path} is a directory; give a file name")
  folder = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_check"):
      pass
  except OSError as e:
    raise UserError(f"{flag} {path}: cannot write into {folder} ({e.strerror or e}); "
                    "choose a writable location") from None


@dataclasses.dataclass
class ProbeData:
  """Which examples a probe reads, and how (the evaluation preprocessing)."""
  dataset: str
  image_size: int
  train_split: str = "train"
  test_split: str = "test"
  max_train: int | None = None
  max_test: int | None = None
  data_dir: str | None = None
  subset_seed: int = 0          # the seeded random subset of --max_train / --max_test
  batch_size: int = 256         # global extraction batch (rounded to the device count)
  num_workers: int = 0          # grain decoding processes
  crop_fraction: float = 1.0    # evaluation centre crop (the run's data.eval_crop_fraction)

  def check(self) -> None:
    check_max_examples("max_train", self.max_train)
    check_max_examples("max_test", self.max_test)
    if self.batch_size < 1:
      raise UserError(f"batch_size must be >= 1, got {self.batch_size}")

  def sources(self):
    """The (train, test) sources; fails before any extraction if either is missing."""
    return tuple(data_lib.make_source(self.dataset, split, image_size=self.image_size,
                                      data_dir=self.data_dir)
                 for split in (self.train_split, self.test_split))


def feature_function(encoder, mode: str = "image", config=None):
  """(jittable (variables, uint8 images) -> features, what it reads: "image" or
  "objective:NAME").

  mode "objective" uses the protocol an objective of the run's `config` declares
  (`Objective.eval_features`); with none declared it falls back to whole images.
  """
  if mode not in FEATURE_MODES:
    raise UserError(f"--features must be one of {', '.join(FEATURE_MODES)}, not {mode!r}")
  if mode == "image":
    return stream.image_features(encoder), "image"
  import objectives as objectives_lib
  from objectives.base import Objective
  declared = []
  for name, options in config.objectives.items():
    options = dict(options)
    options.pop("weight", None)
    template = objectives_lib.build_objective(name, options, image_size=config.data.image_size,
                                              dtype=np.float32)
    if type(template).eval_features is not Objective.eval_features:
      declared.append((name, template))
  if not declared:
    print(f"note: --features objective: {'+'.join(config.objectives.keys())} declares no "
          "feature protocol of its own; probing whole images", file=sys.stderr)
    return stream.image_features(encoder), "image"
  if len(declared) > 1:
    raise UserError(f"--features objective: several objectives of this run declare their own "
                    f"feature protocol ({', '.join(n for n, _ in declared)}); use --features "
                    "image")
  name, template = declared[0]
  return stream.objective_features(encoder, template), f"objective:{name}"


def extract_splits(encoder, variables, data: ProbeData, *, feature_fn=None, features="image",
                   nonfinite_hint="", cache_dir=None, cache_key=None):
  """{"train": (x, y), "test": (x, y)}: features of `data`'s two splits, streamed (and
  read from / written to the float16 cache in cache_dir, keyed by cache_key + the data)."""
  data.check()
  train_source, test_source = data.sources()
  feature_fn = feature_fn or stream.image_features(encoder)
  splits = {}
  for part, source, split, limit in (("train", train_source, data.train_split, data.max_train),
                                     ("test", test_source, data.test_split, data.max_test)):
    key = None
    if cache_dir:
      key = dict(cache_key or {}, dataset=data.dataset, split=split, max_examples=limit,
                 subset_seed=data.subset_seed, image_size=data.image_size,
                 crop_fraction=data.crop_fraction, features=features,
                 data_dir=data.data_dir)
      cached = stream.load_cached(stream.cache_path(cache_dir, **key))
      if cached is not None:
        splits[part] = cached
        continue
    message = (f"the encoder's features on {data.dataset} {split} are not finite (NaN or "
               f"inf){nonfinite_hint}")
    x, y = stream.stream_features(
        feature_fn, variables, source, image_size=data.image_size, batch_size=data.batch_size,
        max_examples=limit, seed=data.subset_seed, num_workers=data.num_workers,
        crop_fraction=data.crop_fraction, nonfinite_message=message)
    if key is not None:
      os.makedirs(cache_dir, exist_ok=True)
      x = stream.save_cached(stream.cache_path(cache_dir, **key), x, y, key)
    splits[part] = (x, y)
  return splits


def probe_encoder(encoder, variables, data: ProbeData, *, feature_fn=None, features="image",
                  save_features=None, seed=0, nonfinite_hint="", cache_dir=None,
                  cache_key=None) -> dict:
  """Streams train and test features of `data` through the encoder and probes them.

  Args:
    encoder, variables: the frozen encoder.
    data: which examples.
    feature_fn: (variables, uint8 images) -> features (default: whole images).
    features: what feature_fn reads, recorded in the result.
    save_features: write train/test features (float32) and labels here (.npz).
    seed: the probe's seed (validation split).
    nonfinite_hint: appended to the error raised for NaN / inf features.
    cache_dir, cache_key: keep features in cache_dir as float16, keyed by cache_key plus
      the data; a later call with the same key reads them instead of the images.
  """
  t0 = time.perf_counter()
  splits = extract_splits(encoder, variables, data, feature_fn=feature_fn, features=features,
                          nonfinite_hint=nonfinite_hint, cache_dir=cache_dir,
                          cache_key=cache_key)
  t1 = time.perf_counter()
  (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
  result = probe_features(train_x, train_y, test_x, test_y, seed=seed)
  result["feature_seconds"] = t1 - t0
  result["features"] = features
  if save_features:
    try:
      np.savez_compressed(save_features, train_x=train_x, train_y=train_y, test_x=test_x,
                          test_y=test_y)
    except OSError as e:  # keep the result: the caller prints it, then reports this
      result["save_features_error"] = f"cannot write {save_features}: {e.strerror or e}"
  return result


@dataclasses.dataclass
class Loaded:
  """A run directory's frozen encoder, ready to be read: see `load_checkpoint`."""
  config: object
  encoder: object
  variables: object
  step: int | None
  data: ProbeData
  hint: str
  cache_key: dict
  random_init: bool
  checkpoint: str

  def meta(self) -> dict:
    return dict(checkpoint=self.checkpoint, step=self.step, random_init=self.random_init,
                dataset=self.data.dataset, encoder=self.config.encoder.name,
                objectives=list(self.config.objectives.keys()))

  def splits(self, feature_fn=None, features="image", cache_dir=None, extra_key=None):
    return extract_splits(self.encoder, self.variables, self.data, feature_fn=feature_fn,
                          features=features, nonfinite_hint=self.hint, cache_dir=cache_dir,
                          cache_key=dict(self.cache_key, **(extra_key or {})))


def load_checkpoint(checkpoint: str, dataset: str, *, train_split="train", test_split="test",
                    max_train=None, max_test=None, random_init=False, step=None,
                    data_dir=None, seed=0, batch_size=256, num_workers=0) -> Loaded:
  """The encoder of a run directory (or its random-init twin) and the data to read."""
  data = ProbeData(dataset, 0, train_split, test_split, max_train, max_test, data_dir,
                   batch_size=batch_size, num_workers=num_workers)
  data.check()
  config, encoder, variables, step = features_lib.load_encoder(checkpoint, step)
  data.image_size = size = config.data.image_size
  data.crop_fraction = float(config.data.get("eval_crop_fraction", 1.0))
  if random_init:
    variables = features_lib.random_init_variables(encoder, size, seed=seed)
    hint = "; the random-init encoder itself produces them"
  else:
    hint = (f": the checkpoint at step {int(step)} of {checkpoint} holds a diverged "
            "encoder (see its metrics.jsonl for where the loss stopped being finite); "
            "probe an earlier --step or retrain with a lower learning rate")
  step = None if random_init else int(step)
  cache_key = dict(checkpoint=os.path.abspath(checkpoint), step=step,
                   random_init=bool(random_init), init_seed=seed if random_init else None,
                   encoder=json.loads(config.encoder.to_json()))
  return Loaded(config, encoder, variables, step, data, hint, cache_key, bool(random_init),
                os.path.abspath(checkpoint))


def probe_checkpoint(checkpoint: str, dataset: str, *, train_split="train", test_split="test",
                     max_train=None, max_test=None, random_init=False, save_features=None,
                     step=None, data_dir=None, seed=0, features="image", batch_size=256,
                     num_workers=0, feature_cache=None) -> dict:
  """Loads the encoder of a run directory and probes it on `dataset` (streamed)."""
  run = load_checkpoint(checkpoint, dataset, train_split=train_split, test_split=test_split,
                        max_train=max_train, max_test=max_test, random_init=random_init,
                        step=step, data_dir=data_dir, seed=seed, batch_size=batch_size,
                        num_workers=num_workers)
  fn, what = feature_function(run.encoder, features, run.config)
  result = probe_encoder(run.encoder, run.variables, run.data, feature_fn=fn, features=what,
                         save_features=save_features, seed=seed, nonfinite_hint=run.hint,
                         cache_dir=feature_cache, cache_key=run.cache_key)
  result.update(run.meta())
  return result


def probe_layers(checkpoint: str, dataset: str, layers: str = "all", *, seed=0,
                 feature_cache=None, **kwargs) -> dict:
  """One L-BFGS probe per encoder layer (`evals.layers`), from one pass over the images.

  Returns {"layers": [{"layer", "feature_dim", "top1", "top5", "l2"}, ...], "best_layer",
  and the run's metadata}.
  """
  from evals import layers as layers_lib
  run = load_checkpoint(checkpoint, dataset, seed=seed, **kwargs)
  specs = layers_lib.select_layers(
      layers_lib.layer_specs(run.encoder, run.variables, run.data.image_size), layers)
  fn = layers_lib.layer_feature_fn(run.encoder, [n for n, _ in specs])
  t0 = time.perf_counter()
  splits = run.splits(fn, features="layers:" + ",".join(n for n, _ in specs),
                      cache_dir=feature_cache)
  (tx, ty), (sx, sy) = splits["train"], splits["test"]
  train_cols, test_cols = layers_lib.split_columns(tx, specs), layers_lib.split_columns(sx, specs)
  rows = []
  for name, width in specs:
    r = probe_features(train_cols[name], ty, test_cols[name], sy, seed=seed)
    rows.append({"layer": name, "feature_dim": width, "top1": r["top1"], "top5": r["top5"],
                 "l2": r["l2"], "val_top1": r["val_top1"]})
  best = max(rows, key=lambda r: r["top1"])["layer"]
  return {"layers": rows, "best_layer": best, "num_train": int(len(ty)),
          "num_test": int(len(sy)), "seconds": time.perf_counter() - t0, **run.meta()}


def probe_live(trainer, data: ProbeData, features="image") -> dict:
  """Probe of a live Trainer's encoder (float32 features)."""
  import jax
  state = jax.device_get(trainer.state)
  encoder = trainer.model.encoder.clone(dtype=np.float32)
  fn, what = feature_function(encoder, features, trainer.config)
  return probe_encoder(encoder, features_lib.encoder_variables(state), data, feature_fn=fn,
                       features=what, nonfinite_hint=": the training diverged")


def probe_random_init(encoder, data: ProbeData, seed: int = 0) -> dict:
  """The baseline: the same encoder architecture, freshly initialised."""
  encoder = encoder.clone(dtype=np.float32)
  fresh = features_lib.random_init_variables(encoder, data.image_size, seed=seed)
  return probe_encoder(encoder, fresh, data)


def trainer_probe_data(config) -> ProbeData:
  """The end-of-run probe's examples for a training config (`config.probe`)."""
  c = config
  return ProbeData(c.data.source, c.data.image_size, c.data.train_split, c.data.test_split,
                   c.probe.train_examples, c.probe.test_examples, c.data.data_dir or None,
                   crop_fraction=float(c.data.eval_crop_fraction))


def probe_trainer(trainer, *, random_init_too: bool = True) -> dict:
  """End-of-run probe from a live Trainer (the quickstart): trained vs random-init."""
  data = trainer_probe_data(trainer.config)
  trained = probe_live(trainer, data)
  out = {"probe_top1": trained["top1"], "probe_l2": trained["l2"]}
  if random_init_too:
    baseline = probe_random_init(trainer.model.encoder, data, seed=trainer.config.seed)
    out["random_init_probe_top1"] = baseline["top1"]
  return out


def _define_flags():
  """Flags exist only when run as a program, so importing this module defines none."""
  define_data_flags()
  flags.DEFINE_string("save_features", None, "write train/test features and labels (.npz)")
  flags.DEFINE_enum("features", "image", FEATURE_MODES,
                    "image: whole images for every objective (comparable); objective: the "
                    "run's objective's own protocol where it declares one (context: 3x3 "
                    "patch grid, features averaged)")
  flags.DEFINE_enum("protocol", "lbfgs", ("lbfgs", "sgd"), "lbfgs: logistic regression on "
                    "cached features, l2 swept; sgd: a linear head trained by Nesterov SGD on "
                    "augmented views (EVALUATION.md)")
  flags.DEFINE_string("layers", None, "probe every layer (all) or these layers "
                      "(strideS, blockN, pooled; comma-separated): one row per layer")
  flags.DEFINE_integer("sgd_epochs", 90, "SGD protocol: epochs")
  flags.DEFINE_integer("sgd_batch_size", 256, "SGD protocol: batch (over all devices)")
  flags.DEFINE_float("sgd_lr", 0.1, "SGD protocol: learning rate per 256 examples")
  flags.DEFINE_float("sgd_weight_decay", 0.0, "SGD protocol: weight decay")
  flags.DEFINE_bool("sgd_augment", True, "SGD protocol: random resized crop + flip")
  flags.DEFINE_string("sgd_checkpoint_dir", None, "SGD protocol: checkpoint the head here and "
                      "resume from it (default CHECKPOINT/sgd_probe[_random_init])")
  flags.DEFINE_integer("sgd_checkpoint_every", 500, "SGD protocol: steps between checkpoints")


def define_data_flags():
  """The flags that say which frozen features to read (shared by the probe, kNN and
  few-shot command lines)."""
  flags.DEFINE_string("checkpoint", None, "run directory written by selfsup.train")
  flags.DEFINE_string("dataset", None, "tfds:NAME[/CONFIG][:VERSION] | folder:PATH | synthetic:NAME")
  flags.DEFINE_string("output", None, "write the JSON result here too")
  flags.DEFINE_bool("random_init", False, "use an untrained encoder of the run's configuration")
  flags.DEFINE_string("train_split", "train", "training split (e.g. train, train[:800])")
  flags.DEFINE_string("test_split", "test", "test split")
  flags.DEFINE_integer("max_train", None, "use at most this many training examples")
  flags.DEFINE_integer("max_test", None, "use at most this many test examples")
  flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)")
  flags.DEFINE_string("data_dir", None, "TFDS data_dir")
  flags.DEFINE_integer("batch_size", 256, "feature extraction batch over all devices")
  flags.DEFINE_integer("num_workers", 0, "grain decoding processes (0: threads)")
  flags.DEFINE_string("feature_cache", None, "keep features here as float16 (one file per "
                      "checkpoint step, dataset, split, subset and protocol) and reuse them")


def check_data_flags(f, usage: str) -> None:
  """Everything about the data flags that can fail cheaply, before any work."""
  if not f.checkpoint or not f.dataset:
    raise UserError(usage)
  check_max_examples("--max_train", f.max_train)
  check_max_examples("--max_test", f.max_test)
  if f.batch_size < 1 or f.num_workers < 0:
    raise UserError(f"--batch_size must be >= 1 and --num_workers >= 0; got {f.batch_size} "
                    f"and {f.num_workers}")
  check_writable(f.output, "--output")
  if f.feature_cache:
    check_writable(os.path.join(f.feature_cache, "probe.npz"), "--feature_cache")


def loaded_from_flags(f) -> Loaded:
  return load_checkpoint(f.checkpoint, f.dataset, train_split=f.train_split,
                         test_split=f.test_split, max_train=f.max_train, max_test=f.max_test,
                         random_init=f.random_init, step=f.step, data_dir=f.data_dir,
                         batch_size=f.batch_size, num_workers=f.num_workers)


def emit(result: dict, output: str | None) -> None:
  """Prints the one JSON object (first), then writes it to `output`."""
  text = json.dumps(result)
  print(text, flush=True)
  if output:
    try:
      with open(output, "w") as fh:
        fh.write(text + "\n")
    except OSError as e:
      raise UserError(f"cannot write --output {output} ({e.strerror or e}); the result is "
                      "printed above") from None


USAGE = ("usage: python -m evals.linear_probe --checkpoint DIR --dataset SOURCE "
         "[--output FILE.json] [--random_init] [--protocol lbfgs|sgd] [--layers all|LIST] "
         "[--save_features FILE.npz]")


def main(argv):
  del argv
  f = flags.FLAGS
  # Everything that can fail cheaply fails before the extraction.
  check_data_flags(f, USAGE)
  check_writable(f.save_features, "--save_features")
  if f.protocol == "sgd" and (f.layers or f.save_features or f.features != "image"):
    raise UserError("--protocol sgd probes the pooled features of whole images; leave out "
                    "--layers, --save_features and --features")
  if f.layers is not None and (f.save_features or f.features != "image"):
    raise UserError("--layers probes whole images; leave out --save_features and --features")
  if f.protocol == "sgd":
    from evals import sgd_probe
    cfg = sgd_probe.SgdConfig(epochs=f.sgd_epochs, batch_size=f.sgd_batch_size, lr=f.sgd_lr,
                              weight_decay=f.sgd_weight_decay, augment=f.sgd_augment,
                              checkpoint_every=f.sgd_checkpoint_every)
    cfg.check()
    run = loaded_from_flags(f)
    ckdir = f.sgd_checkpoint_dir or os.path.join(
        f.checkpoint, "sgd_probe_random_init" if f.random_init else "sgd_probe")
    result = sgd_probe.sgd_probe_checkpoint(run, cfg, checkpoint_dir=ckdir,
                                            log=lambda m: print(m, file=sys.stderr, flush=True))
    emit(result, f.output)
    return
  if f.layers is not None:
    result = probe_layers(f.checkpoint, f.dataset, f.layers, train_split=f.train_split,
                          test_split=f.test_split, max_train=f.max_train, max_test=f.max_test,
                          random_init=f.random_init, step=f.step, data_dir=f.data_dir,
                          batch_size=f.batch_size, num_workers=f.num_workers,
                          feature_cache=f.feature_cache)
    emit(result, f.output)
    return
  result = probe_checkpoint(f.checkpoint, f.dataset, train_split=f.train_split,
                            test_split=f.test_split, max_train=f.max_train, max_test=f.max_test,
                            random_init=f.random_init, save_features=f.save_features,
                            step=f.step, data_dir=f.data_dir, features=f.features,
                            batch_size=f.batch_size, num_workers=f.num_workers,
                            feature_cache=f.feature_cache)
  emit(result, f.output)  # printed first: whatever happens to the files, it is shown
  if "save_features_error" in result:
    raise UserError(f"--save_features: {result['save_features_error']}; the result is "
                    "printed above")


if __name__ == "__main__":
  _define_flags()
  cli.run_main(main)
