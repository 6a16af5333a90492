"""MAE on ImageNet: ViT-B/16 at 224 px (196 tokens, 49 visible), the reference recipe.

    python -m selfsup.train --config experiments/mae_imagenet.py --workdir gs://BUCKET/mae_vitb

Needs a prepared `imagenet2012` (array_record). Recipe (He et al. 2022, Table 8 / the
reference code): mask 0.75, normalised pixel loss, decoder 8 blocks of width 512 (16
heads), crops of area 0.2-1 and flips, AdamW (b1 0.9, b2 0.95), base lr 1.5e-4 x B/256 at
B = 4096, weight decay 0.05, 40 warmup epochs, cosine, 800 epochs (1600 for the best
numbers); class token (`encoder.pooling=cls`, as the reference's linear probe reads it);
bfloat16 compute.
Expected (published anchors, not measured here): ImageNet linear probe 68.0 top-1,
fine-tune 83.6 top-1 (ViT-B/16, 1600 epochs).
"""

from selfsup.config import imagenet_config, objective, set_epochs


def get_config(arg: str = ""):
  del arg
  c = imagenet_config()
  c.encoder = {"name": "vit_b", "patch_size": 16, "pooling": "cls"}
  c.objectives = {"mae": objective("mae", 1.0, mask_ratio=0.75, decoder_depth=8,
                                   decoder_width=512, decoder_heads=16, norm_pix_loss=True,
                                   crop_scale=(0.2, 1.0))}
  steps_per_epoch = set_epochs(c, epochs=800, batch=4096, dataset="imagenet2012")
  c.optimizer.name = "adamw"
  c.optimizer.lr = 1.5e-4
  c.optimizer.b2 = 0.95
  c.optimizer.weight_decay = 0.05
  c.optimizer.warmup_steps = 40 * steps_per_epoch
  c.train.image_every = 5000
  c.mesh.sharding = "fsdp"
  return c
