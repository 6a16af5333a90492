"""SparK on CIFAR-10: ResNet-18 with the CIFAR stem (mask on its stride-8 grid: 4x4 cells of
8 px at 32 px, 60% hidden).

    python -m selfsup.train --config experiments/spark_cifar10.py --workdir runs/spark_c10 \
        --config.data.source=folder:/data/cifar10      # or tfds:cifar10 once prepared
    python -m evals.linear_probe --checkpoint runs/spark_c10 --dataset folder:/data/cifar10

Pictures of the masked inputs and reconstructions land in `runs/spark_c10/images/` (and
TensorBoard) every `config.train.image_every` steps.

Recipe: there is no published CIFAR-10 recipe; this scales the reference's ImageNet
pretraining (LAMB, base lr 2e-4 x B/256, weight decay 0.04, 40 warmup epochs of 1600,
cosine, gradient clip 5, random resized crops of area 0.67-1 and flips) to 800 epochs at
batch 512 with 20 warmup epochs. The reference raises the weight decay to 0.2 over training
with a cosine; the optimizer here keeps it constant.
Expected: no published CIFAR-10 number (not measured here at this length). The published
anchor is ImageNet (ResNet-50 fine-tuned 80.6, see spark_imagenet.py).
"""

from selfsup.config import cifar10_config, objective, set_epochs


def get_config(arg: str = ""):
  del arg
  c = cifar10_config()
  c.encoder = {"name": "resnet18", "cifar_stem": True}
  c.objectives = {"spark": objective("spark", 1.0, mask_ratio=0.6, decoder_width=0,
                                     crop_scale=(0.67, 1.0))}
  steps_per_epoch = set_epochs(c, epochs=800, batch=512, dataset="cifar10")
  c.optimizer.name = "lamb"
  c.optimizer.lr = 2e-4
  c.optimizer.b2 = 0.95
  c.optimizer.weight_decay = 0.04
  c.optimizer.grad_clip = 5.0
  c.optimizer.warmup_steps = 20 * steps_per_epoch
  c.train.image_every = 2000
  return c
