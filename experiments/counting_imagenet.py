"""Counting (Noroozi et al. 2017) on ImageNet, ResNet-50.

    python -m selfsup.train --config experiments/counting_imagenet.py --workdir gs://BUCKET/cnt_in \
        --config.train.dtype=bfloat16
    python -m evals.linear_probe --checkpoint gs://BUCKET/cnt_in --dataset tfds:imagenet2012 \
        --test_split validation

Needs a prepared `imagenet2012` (array_record). Recipe: the paper's views: 228 px random
crops (area 0.6-1) + flip, grayscale for 60% of the examples, D(x) = 114 px with a
downsampling method drawn each step among nearest / bilinear / bicubic / lanczos3, four
114 px tiles (a 4x4 final ResNet-50 map), 1000-d counting vector after fc 4096 + BN +
ReLU, M = 10 on the squared norm, plus a BatchNorm (no shift, learned scale from 0.05)
before the counting layer's ReLU (objectives/counting.py, "How this differs from the
paper"). The paper trained AlexNet in Caffe; the
optimiser here is a standard ResNet-50 one, not the paper's: SGD Nesterov 0.9, lr 0.1 x
B/256, batch 256, wd 1e-4, 5 warmup epochs, cosine, 100 epochs, gradient norm clipped
at 5.
Expected (published anchor, AlexNet, not measured here): VOC07 classification ~67.7 mAP,
detection ~51.4 mAP.
"""

from selfsup.config import imagenet_config, objective, set_epochs


def get_config(arg: str = ""):
  del arg
  c = imagenet_config(228)
  c.objectives = {"counting": objective(
      "counting", 1.0, tile_size=0, count_dim=1000, head_hidden=(4096,), margin=10.0,
      grayscale_prob=0.6, crop_scale=(0.6, 1.0), count_bn=True,
      count_bn_scale_init=0.05)}
  steps_per_epoch = set_epochs(c, epochs=100, batch=256, dataset="imagenet2012")
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.1
  c.optimizer.scale_with_batch = True
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 1e-4
  c.optimizer.warmup_steps = 5 * steps_per_epoch
  c.optimizer.grad_clip = 5.0
  return c
