"""OBoW (Gidaris et al. 2021) on ImageNet, ResNet-50: the reference recipe.

    python -m selfsup.train --config experiments/obow_imagenet.py --workdir gs://BUCKET/obow_in
    python -m evals.linear_probe --checkpoint gs://BUCKET/obow_in --dataset tfds:imagenet2012 \
        --test_split validation

Source: valeoai/obow, config/ImageNetFull/ResNet50_OBoW_full.yaml and obow/datasets.py.
Two BoW levels on the last two stages (conv4, conv5 of ResNet-50), 8192 words each,
inv_delta 15, kappa 8, teacher momentum 0.99 -> 1 on a cosine over the run; the teacher
sees the centre crop (224 of 256) with a random flip; the student 2 crops of 160 px (area
0.08-0.6) and 5 patches of 96 px, colour jitter (0.4, 0.4, 0.4, 0.1) p 0.8 (our strength
0.5: 0.8 x 0.5 = 0.4 and 0.2 x 0.5 = 0.1), grayscale p 0.2, blur p 0.5. SGD momentum 0.9
(no Nesterov), lr 0.03 at batch 256, weight decay 1e-4, 10 warmup epochs, cosine, 200
epochs. Differences: the patches are random resized crops of area 0.05-0.14 (the
reference cuts a 3x3 jittered grid of 96 px patches from a 256 px resize of an area
0.6-1 crop, so each patch is ~8-14% of the image; ours, as theirs, are of the whole
image); the crops and the patches both get blur p 0.5 (the reference's patches none);
bfloat16 compute.
Expected (published anchor, not measured here): ImageNet linear top-1 73.8 after 200
epochs.
"""

from selfsup.config import imagenet_config, objective, set_epochs


def get_config(arg: str = ""):
  del arg
  c = imagenet_config()
  c.objectives = {"obow": objective(
      "obow", 1.0, num_words=8192, levels=(-2, -1), inv_delta=15.0, kappa=8.0, border=1,
      vocab_pool=3, base_momentum=0.99, num_crops=2, crop_size=160, crop_scale=(0.08, 0.6),
      num_patches=5, patch_size=96, patch_scale=(0.05, 0.14), jitter_strength=0.5,
      jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.5)}
  steps_per_epoch = set_epochs(c, epochs=200, batch=256, dataset="imagenet2012")
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.03
  c.optimizer.scale_with_batch = True
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 1e-4
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 10 * steps_per_epoch
  return c
