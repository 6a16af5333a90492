"""SimCLR on ImageNet, ResNet-50, batch 4096, LARS: the paper's main recipe.

    python -m selfsup.train --config experiments/simclr_imagenet.py --workdir gs://BUCKET/simclr_in \
        --config.train.dtype=bfloat16
    python -m evals.linear_probe --checkpoint gs://BUCKET/simclr_in --dataset tfds:imagenet2012 \
        --test_split validation

Needs a prepared `imagenet2012` (array_record format: `tfds build imagenet2012
--file_format=array_record` with the manual download). Recipe (Chen et al. 2020):
224x224 crops (scale 0.08-1), jitter strength 1.0, blur p 0.5, tau 0.1, 2048-2048-128
projection, LARS lr 0.3 x B/256 = 4.8, wd 1e-6, 10 warmup epochs, cosine, 100 epochs (or
1000 for the best number), FSDP over the data axis for large pods.
Expected (published anchor, not measured here): 69.1-69.3% linear top-1 (1000 epochs),
~64.5% at 100 epochs.
"""

from selfsup.config import imagenet_config, objective, set_epochs


def get_config(arg: str = ""):
  del arg
  c = imagenet_config()
  c.objectives = {"simclr": objective("simclr", 1.0, temperature=0.1,
                                      proj_hidden=(2048, 2048), proj_dim=128,
                                      jitter_strength=1.0, blur_prob=0.5)}
  steps_per_epoch = set_epochs(c, epochs=100, batch=4096, dataset="imagenet2012")
  c.train.log_every = 100
  c.train.checkpoint_every = 2000
  c.optimizer.name = "lars"
  c.optimizer.lr = 0.3
  c.optimizer.weight_decay = 1e-6
  c.optimizer.nesterov = False
  c.optimizer.warmup_steps = 10 * steps_per_epoch
  c.mesh.sharding = "fsdp"
  return c
