"""PixPro (Xie et al. 2021) on ImageNet, ResNet-50: the reference recipe.

    python -m selfsup.train --config experiments/pixpro_imagenet.py --workdir gs://BUCKET/pixpro_in

Source: zdaxie/PixPro, tools/train_PixPro_base_r50_400ep.sh (main_pretrain.py flags):
2 views of 224 px (area 0.08-1, BYOL augmentation: colour jitter (0.4, 0.4, 0.2, 0.1) p
0.8, grayscale p 0.2, blur p 1.0 / 0.1, solarize p 0 / 0.2), projector 4096 -> 256 of 1x1
convolutions on the last map (7x7), pixel propagation with gamma 2 and one transform
layer, positive pairs below 0.7 bin diagonals, key encoder and projector momentum 0.99 ->
1 on a cosine; LARS, lr 1.0 x B/256 at batch 1024, weight decay 1e-5, 5 warmup epochs,
cosine, 400 epochs; the instance branch off (PixPro, not PixPro+). Differences: our colour
jitter has one strength (0.5: brightness/contrast/saturation 0.4, hue 0.1; the
reference's saturation is 0.2); bfloat16 compute.
Expected (published anchors, not measured here; this toolkit has no detection benchmark):
VOC07+12 Faster R-CNN 60.2 AP, COCO Mask R-CNN 41.4 box AP after 400 epochs.
"""

from selfsup.config import imagenet_config, objective, set_epochs


def get_config(arg: str = ""):
  del arg
  c = imagenet_config()
  c.objectives = {"pixpro": objective(
      "pixpro", 1.0, view_size=0, crop_scale=(0.08, 1.0), proj_hidden=4096, proj_dim=256,
      ppm_gamma=2.0, ppm_layers=1, pos_ratio=0.7, base_momentum=0.99, instance_weight=0.0,
      jitter_strength=0.5, jitter_prob=0.8, grayscale_prob=0.2, blur_probs=(1.0, 0.1),
      solarize_probs=(0.0, 0.2))}
  steps_per_epoch = set_epochs(c, epochs=400, batch=1024, dataset="imagenet2012")
  c.optimizer.name = "lars"
  c.optimizer.lr = 1.0
  c.optimizer.scale_with_batch = True
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 1e-5
  c.optimizer.trust_coefficient = 0.001
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 5 * steps_per_epoch
  c.mesh.sharding = "fsdp"
  return c
