"""G-SimCLR on CIFAR-10, ResNet-18 with the CIFAR stem: the denoising autoencoder phase,
k-means with K = the batch (512), then the SimCLR CIFAR recipe on the cluster-balanced
order. One command runs both phases; rerunning it resumes whichever was interrupted.

    python -m selfsup.train --config experiments/gsimclr_cifar10.py --workdir runs/gsimclr_c10 \
        --config.data.source=folder:/data/cifar10
    python -m evals.linear_probe --checkpoint runs/gsimclr_c10 --dataset folder:/data/cifar10

The SimCLR phase is `experiments/simclr_cifar10.py` unchanged (batch 512, LARS 2.0, tau
0.5, jitter 0.5, grayscale p 0.2 applied for real), so the two compare on the batch order
alone. The autoencoder phase: tiny CNN, 20 epochs at batch 512 (1,940 steps), AdamW 2e-3,
noise std 0.5 (the authors' noise factor). Expected (published anchor, ResNet-20, their
smaller budget, not measured here): linear 39.92 (SimCLR) -> 40.5 (G-SimCLR).
"""

from experiments import simclr_cifar10
from selfsup.config import objective


def get_config(arg: str = ""):
  del arg
  c = simclr_cifar10.get_config()
  options = dict(c.objectives.simclr)
  options.pop("weight")
  c.objectives = {"gsimclr": objective("gsimclr", 1.0, **options)}
  c.data.order = "cluster_balanced"
  c.clusters.enabled = True
  c.clusters.objective = "autoencoder"
  c.clusters.encoder = "tiny_cnn"
  c.clusters.batch_size = 512
  c.clusters.steps = 20 * (50000 // 512)
  c.clusters.lr = 2e-3
  c.clusters.k = 0                      # = the batch, 512
  return c
