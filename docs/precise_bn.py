"""Diagnostic: does a probe change when BatchNorm's running statistics are re-estimated
at the probe's resolution?

Objectives that train on other inputs than whole images (counting's tiles, SwAV's small
crops) leave running statistics gathered on those inputs. This probes a run's encoder
with its statistics as trained, then with "precise" statistics (the average of 20
batches' statistics over 256 whole training images each, in train mode, as precise-BN
does), and the same for the random-init encoder:

    PYTHONPATH=. python docs/precise_bn.py --checkpoint W --dataset folder:/data/caltech101

Measured (README, "Counting on real photographs"): the counting run on Caltech-101 reads
20.70 as trained and 21.05 re-estimated (random-init 21.70 / 20.95); a SwAV run on
CIFAR-10 (K = 3000, 5,000 probe images) 30.70 / 29.25 (random-init 31.85 / 24.40).
"""

import json

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from evals import linear_probe as lp
from evals import stream
from selfsup import augment

# Every BatchNorm in encoders/ updates its running averages as m * old + (1 - m) * batch.
MOMENTUM = 0.9

flags.DEFINE_string("checkpoint", None, "run directory", required=True)
flags.DEFINE_string("dataset", None, "SOURCE with train and test splits", required=True)
flags.DEFINE_integer("max_train", 5000, "probe training examples")
flags.DEFINE_integer("max_test", 2000, "probe test examples")
flags.DEFINE_integer("batches", 20, "batches of 256 training images to average over")


def precise_statistics(loaded, images, batches, seed=0):
  """The running statistics replaced by the mean of `batches` batches' statistics."""
  def batch_stats(variables, x):
    _, new = loaded.encoder.apply(variables, augment.eval_view(x), train=True,
                                  mutable=["batch_stats"])
    return jax.tree.map(lambda n, o: (n - MOMENTUM * o) / (1 - MOMENTUM),
                        new["batch_stats"], variables["batch_stats"])
  batch_stats = jax.jit(batch_stats)
  rng = np.random.default_rng(seed)
  total = None
  for _ in range(batches):
    idx = rng.choice(len(images), min(256, len(images)), replace=False)
    stats = batch_stats(loaded.variables, jnp.asarray(images[idx]))
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
  return dict(loaded.variables, batch_stats=jax.tree.map(lambda t: t / batches, total))


def main(argv):
  del argv
  f = flags.FLAGS
  for random_init in (False, True):
    loaded = lp.load_checkpoint(f.checkpoint, f.dataset, max_train=f.max_train,
                                max_test=f.max_test, random_init=random_init)
    if "batch_stats" not in loaded.variables:
      raise SystemExit(f"{loaded.config.encoder.name} has no BatchNorm statistics")
    splits = loaded.splits()
    row = {"random_init": random_init,
           "as_trained": lp.probe_features(*splits["train"], *splits["test"])["top1"]}
    # The probe's training images (the same subset and preprocessing), as uint8.
    data = loaded.data
    flat, _ = stream.stream_features(
        lambda v, im: im.reshape(im.shape[0], -1).astype(jnp.float32), loaded.variables,
        data.sources()[0], image_size=data.image_size, batch_size=data.batch_size,
        max_examples=data.max_train, seed=data.subset_seed, crop_fraction=data.crop_fraction)
    images = flat.reshape(len(flat), data.image_size, data.image_size, -1).astype(np.uint8)
    loaded.variables = precise_statistics(loaded, images, f.batches)
    splits = loaded.splits()
    row["precise_bn"] = lp.probe_features(*splits["train"], *splits["test"])["top1"]
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  app.run(main)
