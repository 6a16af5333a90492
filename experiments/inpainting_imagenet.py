"""Inpainting (Context Encoders) on ImageNet, ResNet-50: the reference inpainting recipe.

    python -m selfsup.train --config experiments/inpainting_imagenet.py \
        --workdir gs://BUCKET/inp_in
    python -m evals.linear_probe --checkpoint gs://BUCKET/inp_in --dataset tfds:imagenet2012 \
        --test_split validation

Needs a prepared `imagenet2012` (array_record format). Recipe (Pathak et al. 2016; the
reference train.lua command, bfloat16 compute here):
  * 128x128 views: random resized crops (area 0.08-1) where the reference took
    fixed-scale 128 crops of a 350-px resize;
  * the central 64x64 region predicted (mask_type center, mask_fraction 1/4) with a 4-px
    overlap: the mean-filled hole is 56x56, the visible 4-px ring is weighted x10;
  * lambda_rec 0.999 / lambda_adv 0.001; Adam b1 0.5, constant lr: the discriminator at
    2e-4 on its own optimizer, the generator (encoder + decoder) at 10x that, 2e-3, as
    train.lua does when 0 < wtl2 < 1; batch 64 in the reference, 256 here.
ResNet-50 at 128 px has a 4x4x2048 deepest map: channel-wise FC, 1x1 conv to 512, five
up-convolutions to 128x128.

Paper's feature-learning variant (AlexNet; random-region masks and reconstruction only):
    --config.objectives.inpainting.mask_type=regions --config.objectives.inpainting.overlap=0 \
    --config.objectives.inpainting.adv_weight=0 --config.objectives.inpainting.rec_weight=1

Expected (published anchor, not measured here; AlexNet, fine-tuned): VOC07 classification
56.5 mAP, VOC07 detection (Fast R-CNN) 44.5 mAP, VOC12 segmentation (FCN) 29.7 mIoU;
ImageNet linear probes of AlexNet context-encoder features are reported at ~21-22% top-1
by later papers. A ResNet-50 run of this recipe has no published number.
"""

from selfsup.config import imagenet_config, objective, set_epochs


def get_config(arg: str = ""):
  del arg
  c = imagenet_config(128)
  # Every option is listed (at its default unless given), so any can be overridden.
  c.objectives = {"inpainting": objective(
      "inpainting", 1.0, mask_type="center", mask_fraction=0.25, overlap=4,
      overlap_weight=10.0, rec_weight=0.999, adv_weight=0.001, decoder_width=512,
      disc_width=64, disc_lr=2e-4, disc_b1=0.5, crop_scale=(0.08, 1.0))}
  steps_per_epoch = set_epochs(c, epochs=100, batch=256, dataset="imagenet2012")
  c.train.log_every = 100
  c.train.checkpoint_every = 2000
  c.optimizer.name = "adamw"
  c.optimizer.lr = 2e-3
  c.optimizer.scale_with_batch = False
  c.optimizer.b1 = 0.5
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "constant"
  return c
