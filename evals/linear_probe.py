"""`python -m evals.linear_probe --checkpoint DIR --dataset SOURCE [--output FILE.json]
[--random_init] [--save_features FILE.npz]`

L-BFGS multinomial logistic regression on frozen features (EVALUATION.md): features
standardised with training statistics, the L2 strength swept on a validation part of
the training split and refined, refit on all training data, scored on the test split.
Prints (and optionally writes) one JSON object with top1, top5, num_train, num_test,
feature_dim and l2.

From a notebook:
    from evals.linear_probe import probe_checkpoint
    result = probe_checkpoint("runs/simclr", "folder:/data/cifar10")
"""

import json
import os
import sys
import time

import numpy as np
from absl import flags

from evals import features as features_lib
from evals.logreg import linear_probe
from selfsup import cli
from selfsup import data as data_lib


def probe_arrays(encoder, variables, train, test, *, batch_size=256, save_features=None,
                 seed=0) -> dict:
  """Probe on ((images, labels), (images, labels)) uint8 arrays."""
  t0 = time.perf_counter()
  train_x = features_lib.extract_features(encoder, variables, train[0], batch_size)
  test_x = features_lib.extract_features(encoder, variables, test[0], batch_size)
  t1 = time.perf_counter()
  if save_features:
    np.savez_compressed(save_features, train_x=train_x, train_y=train[1], test_x=test_x,
                        test_y=test[1])
  num_classes = int(max(train[1].max(), test[1].max())) + 1
  result = linear_probe(train_x, train[1], test_x, test[1], num_classes=num_classes, seed=seed)
  result["feature_seconds"] = t1 - t0
  result["probe_seconds"] = time.perf_counter() - t1
  return result


def load_split(dataset: str, split: str, image_size: int, max_examples, data_dir=None):
  source = data_lib.make_source(dataset, split, image_size=image_size, data_dir=data_dir)
  return data_lib.load_arrays(source, image_size, max_examples=max_examples)


def probe_checkpoint(checkpoint: str, dataset: str, *, train_split="train", test_split="test",
                     max_train=None, max_test=None, random_init=False, save_features=None,
                     step=None, data_dir=None, seed=0) -> dict:
  """Loads the encoder of a run directory and probes it on `dataset`."""
  config, encoder, variables, step = features_lib.load_encoder(checkpoint, step)
  if random_init:
    variables = features_lib.random_init_variables(encoder, config.data.image_size, seed=seed)
  size = config.data.image_size
  train = load_split(dataset, train_split, size, max_train, data_dir)
  test = load_split(dataset, test_split, size, max_test, data_dir)
  result = probe_arrays(encoder, variables, train, test, save_features=save_features, seed=seed)
  result.update(checkpoint=os.path.abspath(checkpoint), step=None if random_init else int(step),
                random_init=bool(random_init), dataset=dataset, encoder=config.encoder.name,
                objectives=list(config.objectives.keys()))
  return result


def probe_live(trainer, train, test) -> dict:
  """Probe of a live Trainer's encoder (float32 features) on loaded arrays."""
  import jax
  state = jax.device_get(trainer.state)
  return probe_arrays(trainer.model.encoder.clone(dtype=np.float32),
                      features_lib.encoder_variables(state), train, test)


def probe_random_init(encoder, image_size: int, train, test, seed: int = 0) -> dict:
  """The baseline: the same encoder architecture, freshly initialised."""
  encoder = encoder.clone(dtype=np.float32)
  fresh = features_lib.random_init_variables(encoder, image_size, seed=seed)
  return probe_arrays(encoder, fresh, train, test)


def probe_trainer(trainer, *, random_init_too: bool = True) -> dict:
  """End-of-run probe from a live Trainer (the quickstart): trained vs random-init."""
  c = trainer.config
  size = c.data.image_size
  train = load_split(c.data.source, c.data.train_split, size, c.probe.train_examples,
                     c.data.data_dir or None)
  test = load_split(c.data.source, c.data.test_split, size, c.probe.test_examples,
                    c.data.data_dir or None)
  trained = probe_live(trainer, train, test)
  out = {"probe_top1": trained["top1"], "probe_l2": trained["l2"]}
  if random_init_too:
    baseline = probe_random_init(trainer.model.encoder, size, train, test, seed=c.seed)
    out["random_init_probe_top1"] = baseline["top1"]
  return out


def _define_flags():
  """Flags exist only when run as a program, so importing this module defines none."""
  flags.DEFINE_string("checkpoint", None, "run directory written by selfsup.train")
  flags.DEFINE_string("dataset", None, "tfds:NAME[/CONFIG][:VERSION] | folder:PATH | synthetic:NAME")
  flags.DEFINE_string("output", None, "write the JSON result here too")
  flags.DEFINE_bool("random_init", False, "probe an untrained encoder of the run's configuration")
  flags.DEFINE_string("save_features", None, "write train/test features and labels (.npz)")
  flags.DEFINE_string("train_split", "train", "training split (e.g. train, train[:800])")
  flags.DEFINE_string("test_split", "test", "test split")
  flags.DEFINE_integer("max_train", None, "use at most this many training examples")
  flags.DEFINE_integer("max_test", None, "use at most this many test examples")
  flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)")
  flags.DEFINE_string("data_dir", None, "TFDS data_dir")


def main(argv):
  del argv
  from selfsup.errors import UserError
  f = flags.FLAGS
  if not f.checkpoint or not f.dataset:
    raise UserError("usage: python -m evals.linear_probe --checkpoint DIR --dataset SOURCE "
                    "[--output FILE.json] [--random_init] [--save_features FILE.npz]")
  result = probe_checkpoint(f.checkpoint, f.dataset, train_split=f.train_split,
                            test_split=f.test_split, max_train=f.max_train, max_test=f.max_test,
                            random_init=f.random_init, save_features=f.save_features,
                            step=f.step, data_dir=f.data_dir)
  text = json.dumps(result)
  if f.output:
    with open(f.output, "w") as fh:
      fh.write(text + "\n")
  print(text)


if __name__ == "__main__":
  _define_flags()
  cli.run_main(main)
