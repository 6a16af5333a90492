"""Counting (Noroozi et al. 2017) on CIFAR-10, ResNet-18 with the CIFAR stem.

    python -m selfsup.train --config experiments/counting_cifar10.py --workdir runs/cnt_c10 \
        --config.data.source=folder:/data/cifar10      # or tfds:cifar10 once prepared
    python -m evals.linear_probe --checkpoint runs/cnt_c10 --dataset folder:/data/cifar10

Recipe: the paper's task at CIFAR scale: random crop (area 0.6-1) + flip of the 32 px
image, grayscale for 60% of the examples, D(x) = x downsampled to 16 px with a method
drawn each step among nearest / bilinear / bicubic / lanczos3, the four 16 px tiles of
x, 1000-d counting vector after fc 4096 + BN + ReLU, margin M = 10 on the squared norm;
the counting layer has a BatchNorm (no shift, learned scale from 0.05) before its ReLU,
which keeps phi from collapsing while the hinge stays active on a real share of pairs
(objectives/counting.py, "How this differs from the paper"). Optimiser (the paper's is
AlexNet/Caffe, not a ResNet recipe): SGD Nesterov 0.9, lr 0.1 (batch 256, not scaled),
wd 5e-4, cosine, 5 warmup epochs, 200 epochs, global gradient norm clipped at 5.
Expected: no published CIFAR-10 anchor. Measured at the quickstart's settings (tiny CNN,
300 steps, CIFAR-10 JPEGs; `python -m selfsup.train --config
experiments/quickstart.py:counting --workdir W --config.data.source=folder:/data/cifar10`):
probe 40.35 vs 33.95 random-init (35.45 with the previous unscaled BatchNorm). At the
README's comparison budget (`python -m evals.compare --dataset folder:/data/cifar10
--encoder resnet18 --width_multiplier 0.25 --steps 300 --objectives counting`):
probe 34.05 / 84.20 (top-1 / top-5) vs 32.75 / 82.95 for the random-init ResNet with
standard init, hinge active on 0.86 / 0.58 / 0.48 of pairs at steps 30 / 120 / 300. Published
anchor, AlexNet on ImageNet, not measured here: VOC07 classification ~67.7 mAP,
detection ~51.4 mAP.
"""

from selfsup.config import cifar10_config, objective, set_epochs


def get_config(arg: str = ""):
  del arg
  c = cifar10_config()
  c.objectives = {"counting": objective(
      "counting", 1.0, tile_size=0, count_dim=1000, head_hidden=(4096,), margin=10.0,
      grayscale_prob=0.6, crop_scale=(0.6, 1.0), count_bn=True,
      count_bn_scale_init=0.05)}
  steps_per_epoch = set_epochs(c, epochs=200, batch=256, dataset="cifar10")
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.1
  c.optimizer.scale_with_batch = False
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  c.optimizer.warmup_steps = 5 * steps_per_epoch
  c.optimizer.grad_clip = 5.0
  return c
