"""PixPro (Xie et al. 2021) on CIFAR-10, ResNet-18 with the CIFAR stem.

    python -m selfsup.train --config experiments/pixpro_cifar10.py --workdir runs/pixpro_c10 \
        --config.data.source=folder:/data/cifar10      # or tfds:cifar10 once prepared
    python -m evals.linear_probe --checkpoint runs/pixpro_c10 --dataset folder:/data/cifar10

The paper has no CIFAR recipe; this scales the ImageNet one (experiments/
pixpro_imagenet.py) to 32 px: with the CIFAR stem the last map is 4x4 at 32 px (the
ImageNet stem's would be 1x1, which PixPro refuses); no blur (the BYOL CIFAR setting),
solarize p 0 / 0.2; projector 2048 -> 256; LARS lr 1.0 per 256 at batch 512, wd 1e-5, 10
warmup epochs, 800 epochs. PixPro+ (the instance branch, weight 1): a linear probe reads
pooled features.
Expected: no published CIFAR-10 anchor; not measured here.
"""

from selfsup.config import cifar10_config, objective, set_epochs


def get_config(arg: str = ""):
  del arg
  c = cifar10_config()
  c.objectives = {"pixpro": objective(
      "pixpro", 1.0, view_size=0, crop_scale=(0.08, 1.0), proj_hidden=2048, proj_dim=256,
      ppm_gamma=2.0, ppm_layers=1, pos_ratio=0.7, base_momentum=0.99, instance_weight=1.0,
      pred_hidden=2048, jitter_strength=0.5, jitter_prob=0.8, grayscale_prob=0.2,
      blur_probs=(0.0, 0.0), solarize_probs=(0.0, 0.2))}
  steps_per_epoch = set_epochs(c, epochs=800, batch=512, dataset="cifar10")
  c.optimizer.name = "lars"
  c.optimizer.lr = 1.0
  c.optimizer.scale_with_batch = True
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 1e-5
  c.optimizer.trust_coefficient = 0.001
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 10 * steps_per_epoch
  return c
