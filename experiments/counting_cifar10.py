"""Counting (Noroozi et al. 2017) on CIFAR-10, ResNet-18 with the CIFAR stem.

    python -m selfsup.train --config experiments/counting_cifar10.py --workdir runs/cnt_c10 \
        --config.data.source=folder:/data/cifar10      # or tfds:cifar10 once prepared
    python -m evals.linear_probe --checkpoint runs/cnt_c10 --dataset folder:/data/cifar10

Recipe: the paper's task at CIFAR scale: random crop (area 0.6-1) + flip of the 32 px
image, grayscale for 60% of the examples, D(x) = x downsampled to 16 px with a method
drawn each step among nearest / bilinear / bicubic / lanczos3, the four 16 px tiles of
x, 1000-d counting vector after fc 4096 + BN + ReLU, margin M = 10 on the squared norm;
the counting layer has the parameter-free BatchNorm that keeps phi from collapsing
(objectives/counting.py, "Collapse"). Optimiser (the paper's is AlexNet/Caffe, not a
ResNet recipe): SGD Nesterov 0.9, lr 0.1 (batch 256, not scaled), wd 5e-4, cosine,
5 warmup epochs, 200 epochs, global gradient norm clipped at 5 (the squared-norm loss
starts in the thousands).
Expected: no published CIFAR-10 anchor (not measured here). Published anchor, AlexNet on
ImageNet, not measured here: VOC07 classification ~67.7 mAP, detection ~51.4 mAP. On the
synthetic quickstart data this objective's probe stays at the random-init level (see
the module docstring).
"""

from selfsup.config import default_config, objective


def get_config(arg: str = ""):
  del arg
  c = default_config()
  c.data.source = "tfds:cifar10"
  c.data.image_size = 32
  c.data.num_workers = 4
  c.encoder = {"name": "resnet18", "cifar_stem": True}
  c.objectives = {"counting": objective(
      "counting", 1.0, tile_size=0, count_dim=1000, head_hidden=(4096,), margin=10.0,
      grayscale_prob=0.6, crop_scale=(0.6, 1.0), count_bn=True)}
  epochs, batch = 200, 256
  steps_per_epoch = 50000 // batch
  c.train.steps = epochs * steps_per_epoch
  c.train.batch_size = batch
  c.train.log_every = 100
  c.train.checkpoint_every = 5000
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.1
  c.optimizer.scale_with_batch = False
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  c.optimizer.warmup_steps = 5 * steps_per_epoch
  c.optimizer.grad_clip = 5.0
  return c
