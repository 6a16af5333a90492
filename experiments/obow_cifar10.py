"""OBoW (Gidaris et al. 2021) on CIFAR-10, ResNet-18 with the CIFAR stem.

    python -m selfsup.train --config experiments/obow_cifar10.py --workdir runs/obow_c10 \
        --config.data.source=folder:/data/cifar10      # or tfds:cifar10 once prepared
    python -m evals.linear_probe --checkpoint runs/obow_c10 --dataset folder:/data/cifar10

The paper has no CIFAR recipe; this scales the ImageNet one (experiments/obow_imagenet.py)
to 32 px images: the teacher sees the whole 32 px image (flipped at random), the student
2 crops of 24 px (area 0.08-0.6; 160 / 224 of the teacher's side, as the reference) and 5
patches of 16 px (area 0.05-0.14), no blur. With the CIFAR stem the last two stages are
8x8 and 4x4 at 32 px, too small for a 1-px border cut and 3x3 word pooling on both, so
`border=0` (3x3 pooling stays: 6x6 and 2x2 positions). 4096 words per level (a multiple
of the batch, so the FIFO stays aligned; 8 steps fill it). SGD as the reference (lr 0.03
per 256, momentum 0.9, wd 1e-4), batch 512, 10 warmup epochs, 800 epochs.
Expected: no published CIFAR-10 anchor (ImageNet ResNet-50 linear 73.8 after 200 epochs);
not measured here.
"""

from selfsup.config import cifar10_config, objective, set_epochs


def get_config(arg: str = ""):
  del arg
  c = cifar10_config()
  c.objectives = {"obow": objective(
      "obow", 1.0, num_words=4096, levels=(-2, -1), inv_delta=15.0, kappa=8.0, border=0,
      vocab_pool=3, base_momentum=0.99, num_crops=2, crop_size=24, crop_scale=(0.08, 0.6),
      num_patches=5, patch_size=16, patch_scale=(0.05, 0.14), jitter_strength=0.5,
      jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.0)}
  steps_per_epoch = set_epochs(c, epochs=800, batch=512, dataset="cifar10")
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.03
  c.optimizer.scale_with_batch = True
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 1e-4
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 10 * steps_per_epoch
  return c
