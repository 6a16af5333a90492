"""SparK on ImageNet: ResNet-50 (default) or ConvNeXt-T (`:convnext`), 224 px, the
reference's pretraining recipe.

    python -m selfsup.train --config experiments/spark_imagenet.py --workdir gs://BUCKET/spark_r50
    python -m selfsup.train --config experiments/spark_imagenet.py:convnext --workdir gs://BUCKET/spark_cnxt

Needs a prepared `imagenet2012` (array_record). Recipe (Tian et al. 2023, the reference
code's pretraining defaults): mask 0.6 on the stride-32 grid (7x7 cells), decoder width
768, random resized crops of area 0.67-1 and flips, LAMB (b2 0.95), base lr 2e-4 x B/256
at B = 4096, weight decay 0.04 (the reference anneals it to 0.2 with a cosine; constant
here), 40 warmup epochs, cosine, 1600 epochs, gradient clip 5; bfloat16 compute.
Expected (published anchors, not measured here): ResNet-50 ImageNet fine-tune 80.6 top-1;
the paper's ConvNeXt anchor is ConvNeXt-B, fine-tune 84.8 (`--config.encoder.name=
convnext_base`); ConvNeXt-T is the CPU/GPU-friendly default of `:convnext`.
"""

from selfsup.config import imagenet_config, objective, set_epochs

ENCODERS = {"": {"name": "resnet50"}, "resnet50": {"name": "resnet50"},
            "convnext": {"name": "convnext_tiny", "drop_path": 0.0, "remat": "none"}}


def get_config(arg: str = ""):
  if arg not in ENCODERS:
    from selfsup.errors import UserError
    raise UserError(f"spark_imagenet.py:{arg}: unknown encoder; use one of "
                    f"{', '.join(k for k in ENCODERS if k)}")
  c = imagenet_config()
  c.encoder = dict(ENCODERS[arg])
  c.objectives = {"spark": objective("spark", 1.0, mask_ratio=0.6, decoder_width=768,
                                     crop_scale=(0.67, 1.0))}
  steps_per_epoch = set_epochs(c, epochs=1600, batch=4096, dataset="imagenet2012")
  c.optimizer.name = "lamb"
  c.optimizer.lr = 2e-4
  c.optimizer.b2 = 0.95
  c.optimizer.weight_decay = 0.04
  c.optimizer.grad_clip = 5.0
  c.optimizer.warmup_steps = 40 * steps_per_epoch
  c.train.image_every = 5000
  c.mesh.sharding = "fsdp"
  return c
