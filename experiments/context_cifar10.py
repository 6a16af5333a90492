"""Context prediction (relative patch location) on CIFAR-10, ResNet-18 with the CIFAR stem.

    python -m selfsup.train --config experiments/context_cifar10.py --workdir runs/ctx_c10 \
        --config.data.source=folder:/data/cifar10      # or tfds:cifar10 once prepared
    python -m evals.linear_probe --checkpoint runs/ctx_c10 --dataset folder:/data/cifar10

Recipe: the fixed-shape variant of Kolesnikov et al. 2019 (see objectives/context.py)
scaled to 32x32: random crop (area 0.64-1) + flip, 3x3 cells of 10 px, 8 px patches
(the reference's 64/85 ratio; offsets 0-2 px per axis, drawn per patch), grayscale with
probability 0.66, per-patch standardisation; patches resized to 16 px so they survive
the ResNet-18 strides (2x2 final map); fc 4096 + BN + ReLU -> 8. Optimiser as the
reference's shape: SGD momentum 0.9, lr 0.1 x B/256, 5 warmup epochs, x0.1 at 15/35 and
25/35 of training (the reference's 15 and 25 of 35 ImageNet epochs), here 200 CIFAR
epochs at batch 256 with CIFAR's wd 5e-4.
Expected: no published CIFAR-10 anchor for this objective (not measured here). Published
anchors, ImageNet ResNet-50, not measured here: VTAB-1k mean 53.5 (fine-tuned); the
original paper's VOC07 detection 51.4 mAP.
"""

from selfsup.config import cifar10_config, objective, set_epochs


def get_config(arg: str = ""):
  del arg
  c = cifar10_config()
  c.objectives = {"context": objective(
      "context", 1.0, patch_size=0, jitter=-1, color_drop_prob=0.66, grayscale_prob=1.0,
      crop_scale=(0.64, 1.0), head_hidden=(4096,), patch_input_size=16)}
  steps_per_epoch = set_epochs(c, epochs=200, batch=256, dataset="cifar10")
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.1
  c.optimizer.scale_with_batch = True
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 5e-4
  c.optimizer.schedule = "step"
  c.optimizer.step_fractions = (15 / 35, 25 / 35)
  c.optimizer.step_factor = 0.1
  c.optimizer.warmup_steps = 5 * steps_per_epoch
  return c
