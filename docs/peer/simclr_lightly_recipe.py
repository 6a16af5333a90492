"""Our SimCLR with the recipe of the lightly comparison (docs/peer/lightly_simclr.py).

    python -m evals.compare --config docs/peer/simclr_lightly_recipe.py \
        --dataset folder:/data/cifar10 --workdir runs/peer_ours

ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool), batch 128, 100 steps,
SGD lr 0.12 (not scaled with the batch), momentum 0.9 (not Nesterov), weight decay 5e-4,
cosine decay to 0 without warmup, NT-Xent at temperature 0.5, projection 512 -> 512 (BN,
ReLU) -> 128, views: random resized crop (area 0.08-1, aspect 3/4-4/3), flip 0.5, colour
jitter s = 0.5 (brightness, contrast, saturation 0.4, hue 0.1) with p 0.8, grayscale 0.2,
no blur: lightly's SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0).

The argument selects one difference from lightly's defaults to switch to theirs
(`lightly_init`: torchvision's initialisation, every BatchNorm scale 1, instead of our
zero-initialised last BatchNorm scale of each residual block; `per_view_bn`: encoder and
projector called once per view, so BatchNorm statistics are per view, as lightly's model
is called on each view); several joined by `+`; empty = our defaults.
"""

from selfsup.config import cifar10_config, objective


def get_config(arg: str = ""):
  c = cifar10_config()
  c.data.source = "folder:/work/data/cifar10"
  c.data.num_workers = 0
  c.objectives = {"simclr": objective(
      "simclr", 1.0, temperature=0.5, proj_hidden=(512,), proj_dim=128,
      crop_scale=(0.08, 1.0), jitter_strength=0.5, jitter_prob=0.8, grayscale_prob=0.2,
      blur_prob=0.0)}
  c.train.batch_size = 128
  c.train.steps = 100
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.12
  c.optimizer.scale_with_batch = False
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 5e-4
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 0
  for option in filter(None, arg.split("+")):
    if option == "lightly_init":
      c.encoder = {**dict(c.encoder), "zero_init_residual": False}
    elif option == "per_view_bn":
      c.objectives.simclr.per_view_bn = True
    else:
      raise ValueError(f"unknown option {option!r} (lightly_init, per_view_bn)")
  return c
