"""Context prediction (relative patch location) on ImageNet, ResNet-50: the reference recipe.

    python -m selfsup.train --config experiments/context_imagenet.py --workdir gs://BUCKET/ctx_in
    python -m evals.linear_probe --checkpoint gs://BUCKET/ctx_in --dataset tfds:imagenet2012 \
        --test_split validation

Needs a prepared `imagenet2012` (array_record). Recipe (Kolesnikov, Zhai & Beyer 2019,
github.com/google/revisiting-self-supervised, config/relative_patch_location/imagenet.sh):
the image cut into a 3x3 grid of 85 px cells (here: 256 px views from a random crop of
area 0.64-1, their resize 292 + random crop 255), 64 px patches (jitter 21: offsets
0-21 px), grayscale with probability 0.66, per-patch standardisation, patches fed at 64
px (2x2 final ResNet-50 map), fc 4096 + BN + ReLU -> 8 (their dropout 0.5 is not used);
SGD momentum 0.9, wd 1e-4, lr 0.1 x B/256, batch 128 as in their script, 5 warmup
epochs, 35 epochs with x0.1 at 15 and 25. Their ResNet-50 v1 is 2x wide
(filters_factor 8): add `--config.encoder.width_multiplier=2` for that.
Expected (published anchors, not measured here): VTAB-1k mean 53.5 (ResNet-50,
fine-tuned); VOC07 detection 51.4 mAP (Doersch et al., original network).
"""

from selfsup.config import imagenet_config, objective, set_epochs


def get_config(arg: str = ""):
  del arg
  c = imagenet_config(256)
  c.objectives = {"context": objective(
      "context", 1.0, patch_size=64, jitter=-1, color_drop_prob=0.66, grayscale_prob=1.0,
      crop_scale=(0.64, 1.0), head_hidden=(4096,), patch_input_size=0)}
  steps_per_epoch = set_epochs(c, epochs=35, batch=128, dataset="imagenet2012")
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.1
  c.optimizer.scale_with_batch = True
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 1e-4
  c.optimizer.schedule = "step"
  c.optimizer.step_fractions = (15 / 35, 25 / 35)
  c.optimizer.step_factor = 0.1
  c.optimizer.warmup_steps = 5 * steps_per_epoch
  return c
