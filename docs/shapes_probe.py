"""Diagnostic: what a run's encoder keeps of a `synthetic:shapes` scene.

Probes the frozen encoder (and a random-init encoder of the same architecture) on three
labels of the same images: the shape class, the 3x3 cell of the object's centre and its
tilt bucket, and reports the pooled features' effective rank (the exponential of the
entropy of the covariance eigenvalues, normalised to sum 1):

    PYTHONPATH=. python docs/shapes_probe.py W [W2 ...]

Measured (README, "Quickstart"; 5,000 / 2,000 images, seed 0): the quickstart's SwAV
encoder reads 16.25 shape / 67.10 position with effective rank 5.0, OBoW's 20.45 /
69.35 / 6.4, the random-init tiny CNN 26.80 / 79.60 / 16.5.
"""

import functools
import json
import sys

import numpy as np

from evals import features
from evals.linear_probe import probe_features
from selfsup.data.sources import ShapesSource

LABELS = ("label", "position", "orientation")


@functools.lru_cache(maxsize=4)  # several runs at one image size share the images
def load(split: str, n: int, image_size: int):
  source = ShapesSource(split, image_size=image_size)
  items = [source[i] for i in range(n)]
  return (np.stack([d["image"] for d in items]),
          {k: np.array([d[k] for d in items]) for k in LABELS})


def effective_rank(x: np.ndarray) -> float:
  eig = np.clip(np.linalg.eigvalsh(np.cov(x.T)), 0, None)
  p = eig[eig > 0] / eig.sum()
  return float(np.exp(-(p * np.log(p)).sum()))


def main(workdirs, max_train=5000, max_test=2000):
  for workdir in workdirs:
    config, encoder, variables, _ = features.load_encoder(workdir)
    size = config.data.image_size
    train_x, train_y = load("train", max_train, size)
    test_x, test_y = load("test", max_test, size)
    for name, v in (("trained", variables),
                    ("random_init", features.random_init_variables(encoder, size))):
      a = features.extract_features(encoder, v, train_x)
      b = features.extract_features(encoder, v, test_x)
      row = {"run": workdir, "encoder": name, "effective_rank": round(effective_rank(a), 2)}
      for k in LABELS:
        row[k] = probe_features(a, train_y[k], b, test_y[k])["top1"]
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  if len(sys.argv) < 2:
    raise SystemExit(__doc__)
  main(sys.argv[1:])
