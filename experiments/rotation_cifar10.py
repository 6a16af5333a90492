"""Rotation prediction (RotNet) on CIFAR-10, ResNet-18 with the CIFAR stem.

    python -m selfsup.train --config experiments/rotation_cifar10.py --workdir runs/rot_c10 \
        --config.data.source=folder:/data/cifar10      # or tfds:cifar10 once prepared
    python -m evals.linear_probe --checkpoint runs/rot_c10 --dataset folder:/data/cifar10

Recipe (Gidaris et al. 2018): SGD Nesterov 0.9, wd 5e-4, lr 0.1, x0.2 at 30/60/80% of
200 epochs, batch 128 (x4 rotations per step), random crop + flip only.
Expected (published anchor, NIN not ResNet, not measured here): 89.06% for a classifier on
conv2-block features; a linear probe on the pooled ResNet-18 output is lower. A measured
short run is in the README's results table.
"""

from selfsup.config import cifar10_config, objective, set_epochs


def get_config(arg: str = ""):
  del arg
  c = cifar10_config()
  c.objectives = {"rotation": objective("rotation", 1.0, crop_scale=(0.6, 1.0))}
  set_epochs(c, epochs=200, batch=128, dataset="cifar10")
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.1
  c.optimizer.scale_with_batch = False
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  c.optimizer.schedule = "step"
  c.optimizer.step_fractions = (0.3, 0.6, 0.8)
  c.optimizer.step_factor = 0.2
  return c
