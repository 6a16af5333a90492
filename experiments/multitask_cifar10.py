"""Multi-task pretraining on CIFAR-10: rotation + context + SimCLR on one ResNet-18.

    python -m selfsup.train --config experiments/multitask_cifar10.py --workdir runs/mt_c10 \
        --config.data.source=folder:/data/cifar10      # or tfds:cifar10 once prepared
    # other weights (names must be rotation, context, simclr; 0 switches one off):
    python -m selfsup.train \
        --config "experiments/multitask_cifar10.py:rotation=1,context=0.5,simclr=1" \
        --workdir runs/mt_c10_w
    # or per member from the command line: --config.objectives.context.weight=0.5
    python -m evals.linear_probe --checkpoint runs/mt_c10 --dataset folder:/data/cifar10

Doersch & Zisserman 2017 ("Multi-task Self-Supervised Visual Learning"): one encoder,
several pretext tasks, each with its own head, the loss the weighted sum of the members'
losses; combining tasks beat every single task in the paper. Here every member makes its
own views from the same uint8 batch on the device and runs the shared encoder
(ResNet-18, CIFAR stem) on them; `metrics.jsonl` logs each member's loss
(`rotation/loss`, `context/loss`, `simclr/loss`) and the weighted total (`loss`).

Members and their settings (each as in its own CIFAR config): rotation (crop scale
0.6-1, linear head), context (8 px patches in 10 px cells resized to 16 px, head 1024),
SimCLR (tau 0.5, jitter strength 0.5, 2048-128 projection). Optimiser: SGD Nesterov 0.9,
lr 0.1 (batch 256, not scaled), wd 5e-4, cosine, 200 epochs; LARS as in SimCLR alone
would also do. Per step the encoder sees 4B (rotation) + 9B patches (context) + 2B
(SimCLR) views.
Expected: no published anchor for this combination on CIFAR-10 (the paper's numbers are
ResNet-101 on ImageNet); measure against the single-task configs with the same probe.
"""

from selfsup.config import cifar10_config, objective, set_epochs
from selfsup.errors import UserError

MEMBERS = ("rotation", "context", "simclr")


def parse_weights(arg: str) -> dict:
  """'rotation=1,context=0.5' -> {"rotation": 1.0, "context": 0.5, "simclr": 1.0}."""
  weights = {name: 1.0 for name in MEMBERS}
  for item in filter(None, (s.strip() for s in arg.split(","))):
    name, sep, value = item.partition("=")
    if not sep or name.strip() not in MEMBERS:
      raise UserError(f"multitask_cifar10 argument {item!r}: expected NAME=WEIGHT with NAME "
                      f"one of {', '.join(MEMBERS)}")
    try:
      weights[name.strip()] = float(value)
    except ValueError:
      raise UserError(f"multitask_cifar10 argument {item!r}: the weight must be a number") \
          from None
  return weights


def get_config(arg: str = ""):
  weights = parse_weights(arg)
  c = cifar10_config()
  members = {
      "rotation": objective("rotation", weights["rotation"], crop_scale=(0.6, 1.0)),
      "context": objective("context", weights["context"], patch_input_size=16,
                           head_hidden=(1024,)),
      "simclr": objective("simclr", weights["simclr"], temperature=0.5,
                          proj_hidden=(2048,), proj_dim=128, jitter_strength=0.5,
                          blur_prob=0.0),
  }
  # A member with weight 0 is left out rather than computed and multiplied by zero.
  c.objectives = {name: options for name, options in members.items() if weights[name] > 0}
  steps_per_epoch = set_epochs(c, epochs=200, batch=256, dataset="cifar10")
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.1
  c.optimizer.scale_with_batch = False
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  c.optimizer.warmup_steps = 5 * steps_per_epoch
  return c
