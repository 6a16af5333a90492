"""G-SimCLR on ImageNet, ResNet-50: the autoencoder phase, k-means with K = the batch
(4096), then the SimCLR ImageNet recipe (`experiments/simclr_imagenet.py`) on the
cluster-balanced order.

    python -m selfsup.train --config experiments/gsimclr_imagenet.py --workdir gs://BUCKET/gsimclr_in

The autoencoder phase: tiny CNN at 224 px, 5 epochs at batch 1024, AdamW 2e-3; k-means
on a seeded subset of 200,000 images (`clusters.max_examples`), then every image assigned.
Expected (published anchor on a 5-class ImageNet subset, not measured here): linear 52.4
(SimCLR) -> 60.0 (G-SimCLR); none is published for the full ImageNet.
"""

from experiments import simclr_imagenet
from selfsup.config import objective


def get_config(arg: str = ""):
  del arg
  c = simclr_imagenet.get_config()
  options = dict(c.objectives.simclr)
  options.pop("weight")
  c.objectives = {"gsimclr": objective("gsimclr", 1.0, **options)}
  c.data.order = "cluster_balanced"
  c.clusters.enabled = True
  c.clusters.batch_size = 1024
  c.clusters.steps = 5 * (1281167 // 1024)
  c.clusters.k = 0
  c.clusters.max_examples = 200000
  return c
