"""SimCLR on CIFAR-10, ResNet-18 with the CIFAR stem: the reference command's recipe.

    python -m selfsup.train --config experiments/simclr_cifar10.py --workdir runs/simclr_c10 \
        --config.data.source=folder:/data/cifar10      # or tfds:cifar10 once prepared
    python -m evals.linear_probe --checkpoint runs/simclr_c10 --dataset folder:/data/cifar10

Source: the CIFAR-10 pretraining command in the google-research/simclr README (the
setting behind the ~91% linear anchor),

    python run.py --train_mode=pretrain --train_batch_size=512 --train_epochs=1000 \
      --learning_rate=1.0 --weight_decay=1e-4 --temperature=0.5 --dataset=cifar10 \
      --image_size=32 --eval_split=test --resnet_depth=18 --use_blur=False \
      --color_jitter_strength=0.5 --use_tpu=False

with the defaults of that repository's run.py (tf2/run.py) for every flag it does not set:
`learning_rate_scaling=linear` (so the peak lr is 1.0 x 512/256 = 2.0), `optimizer=lars`,
`momentum=0.9`, `warmup_epochs=10`, cosine decay, `proj_head_mode=nonlinear` with
`num_proj_layers=3` and `proj_out_dim=128` (hidden layers as wide as the encoder output,
512), `batch_norm_decay=0.9`, global BatchNorm. Their LARS uses eta 0.001 and excludes
BatchNorm parameters and biases from weight decay and adaptation, as ours does. Views:
random resized crop (area 0.08-1, aspect 3/4-4/3), flip, colour jitter strength 0.5 (p
0.8), grayscale p 0.2, no blur; the CIFAR stem (3x3 conv, stride 1, no max-pool), which
their code picks for image_size <= 32. ResNet blocks zero-initialise their last BatchNorm
scale, as theirs do.

Remaining differences from the reference:
- The projection head's last layer: theirs is a linear layer followed by BatchNorm
  (without centring); ours is a linear layer without bias and without BatchNorm.
- 1000 epochs are 97,000 steps here (50,000 // 512 = 97 steps per epoch, the partial
  last batch dropped); theirs counts 50,000 x 1000 // 512 + 1 = 97,657 steps.
- Data from `folder:` JPEGs or TFDS's cifar10; ResNet v1.5 (the stride in the 3x3
  convolution), which for ResNet-18's basic blocks is the same network.
Expected (published anchor, not measured here): ~90.7-91% linear top-1 after 1000 epochs.
"""

from selfsup.config import cifar10_config, objective, set_epochs


def get_config(arg: str = ""):
  del arg
  c = cifar10_config()
  c.objectives = {"simclr": objective(
      "simclr", 1.0, temperature=0.5, proj_hidden=(512, 512), proj_dim=128,
      crop_scale=(0.08, 1.0), jitter_strength=0.5, jitter_prob=0.8, grayscale_prob=0.2,
      blur_prob=0.0)}
  steps_per_epoch = set_epochs(c, epochs=1000, batch=512, dataset="cifar10")
  c.optimizer.name = "lars"
  c.optimizer.lr = 1.0                  # per 256 images: x 512/256 = 2.0 at batch 512
  c.optimizer.scale_with_batch = True
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 1e-4
  c.optimizer.trust_coefficient = 0.001
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 10 * steps_per_epoch
  return c
