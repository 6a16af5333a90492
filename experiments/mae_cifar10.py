"""MAE on CIFAR-10: ViT-Tiny with 4 px patches (8x8 = 64 tokens at 32 px, 16 visible).

    python -m selfsup.train --config experiments/mae_cifar10.py --workdir runs/mae_c10 \
        --config.data.source=folder:/data/cifar10      # or tfds:cifar10 once prepared
    python -m evals.linear_probe --checkpoint runs/mae_c10 --dataset folder:/data/cifar10

Pictures of the masked inputs and reconstructions land in `runs/mae_c10/images/` (and
TensorBoard) every `config.train.image_every` steps.

Recipe: no published CIFAR-10 recipe; the reference's ImageNet one (mask 0.75, normalised
pixel loss, AdamW b2 0.95, base lr 1.5e-4 x B/256, weight decay 0.05, 40 warmup epochs,
cosine, crops of area 0.2-1 and flips) at batch 512 for 800 epochs with 20 warmup epochs,
and a decoder scaled to the small encoder (4 blocks of width 256, 8 heads). The probe reads
the mean of the patch tokens (`encoder.pooling=mean`).
Expected: no published CIFAR-10 number (not measured here at this length). The published
anchor is ImageNet ViT-B/16 (mae_imagenet.py).
"""

from selfsup.config import cifar10_config, objective, set_epochs


def get_config(arg: str = ""):
  del arg
  c = cifar10_config()
  c.encoder = {"name": "vit_ti", "patch_size": 4, "pooling": "mean"}
  c.objectives = {"mae": objective("mae", 1.0, mask_ratio=0.75, decoder_depth=4,
                                   decoder_width=256, decoder_heads=8, norm_pix_loss=True,
                                   crop_scale=(0.2, 1.0))}
  steps_per_epoch = set_epochs(c, epochs=800, batch=512, dataset="cifar10")
  c.optimizer.name = "adamw"
  c.optimizer.lr = 1.5e-4
  c.optimizer.b2 = 0.95
  c.optimizer.weight_decay = 0.05
  c.optimizer.warmup_steps = 20 * steps_per_epoch
  c.train.image_every = 2000
  return c
