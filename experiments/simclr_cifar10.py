"""SimCLR on CIFAR-10, ResNet-18 with the CIFAR stem: the reference recipe.

    python -m selfsup.train --config experiments/simclr_cifar10.py --workdir runs/simclr_c10 \
        --config.data.source=folder:/data/cifar10      # or tfds:cifar10 once prepared
    python -m evals.linear_probe --checkpoint runs/simclr_c10 --dataset folder:/data/cifar10

Recipe (Chen et al. 2020, appendix B.9 / solo-learn): batch 512, LARS lr 0.3 x B/256
(wd 1e-6, momentum 0.9, BN and biases excluded), 10 warmup epochs, cosine, tau 0.5,
jitter strength 0.5, no blur, 128-d projection after a 2048-d hidden layer.
Expected (published anchor, not measured here): ~90.7-91% linear top-1 after 1000 epochs
(97,656 steps at batch 512). A measured short run on this toolkit's CPU machine is in the
README's results table.
"""

from selfsup.config import cifar10_config, set_epochs


def get_config(arg: str = ""):
  del arg
  c = cifar10_config()
  c.objectives = {"simclr": {"weight": 1.0, "temperature": 0.5, "proj_hidden": (2048,),
                             "proj_dim": 128, "jitter_strength": 0.5, "blur_prob": 0.0}}
  steps_per_epoch = set_epochs(c, epochs=1000, batch=512, dataset="cifar10")
  c.optimizer.name = "lars"
  c.optimizer.lr = 0.3
  c.optimizer.weight_decay = 1e-6
  c.optimizer.nesterov = False
  c.optimizer.warmup_steps = 10 * steps_per_epoch
  return c
