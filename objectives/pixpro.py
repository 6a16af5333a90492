"""PixPro (Xie, Lin, Zhang, Cao, Lin & Hu 2021, "Propagate Yourself: Exploring Pixel-Level
Consistency for Unsupervised Visual Representation Learning", CVPR 2021; code
github.com/zdaxie/PixPro).

Pixel-to-propagation consistency between two crops of one image:

- Views: two random resized crops (`view_augment`), each with its box in original-image
  coordinates, a flip recorded by swapping the x bounds (`augment.flip_box`), so that
  `augment.box_coordinates` gives every feature-map pixel's original position.
  Asymmetric BYOL augmentation: blur with probability `blur_probs` = (1.0, 0.1) and
  solarize with `solarize_probs` = (0.0, 0.2) for the first and second view.
- Query: the encoder's deepest feature map -> projector, an MLP of 1x1 convolutions
  (Linear -> BN -> ReLU -> Linear per pixel, 4096 -> 256) -> the pixel propagation module
  y_i = sum_j max(cos(x_i, x_j), 0)^gamma g(x_j) / |g(x_j)|, gamma 2, g one 1x1
  convolution (`ppm_layers=2`: conv-BN-ReLU-conv). g(x_j) is L2-normalised per pixel
  before it is propagated, as the reference's `featprop` does (the paper's equation
  leaves the normalisation out).
- Key: the EMA of the encoder and the projector (momentum 0.99 -> 1.0 on a cosine over
  the run, `objectives/ema.py`), kept in `objective_state/pixpro/teacher` (a mirror of
  `params/encoder` and `params/pixpro/projector`) and updated in `post_update`; it gets
  no gradient.
- Positive pairs: pixel i of one view and j of the other whose original-image centres
  are closer than `pos_ratio` (0.7) times the larger of the two views' bin diagonals
  (distances in coordinates normalised to the image, as the reference).
- Loss: per image, minus the mean cosine between y_i of one view and the key k_j of the
  other over its positive pairs (0 for an image without any), averaged over the batch,
  and over the two directions (the reference sums the directions and uses 2 - 2 cos; same
  gradient direction, half / double the scale).
- PixPro+ (`instance_weight` > 0): an instance branch as BYOL: a second projector and a
  predictor, both per pixel (1x1-conv MLPs, BN over all pixels), the prediction averaged
  over positions (the reference's order: projector, predictor, then average pooling),
  and minus the cosine to the key encoder's (EMA) instance projection of the other
  view, averaged over positions, symmetrised, added with that weight.
- Logged: `pos_share` (share of positive pairs among all pixel pairs), `pos_images`
  (share of images with at least one positive pair), `proj_spread` and `key_spread`
  (`spread`: sqrt(D) x the per-dimension std of the L2-normalised student projections /
  keys over all pixels of the batch, the collapse measure of BYOL / SimSiam scaled so
  that ~1 is spread over the sphere and 0 is one direction); with the instance branch,
  `instance_loss`.

Both views go through the encoder in one call (BatchNorm statistics over 2B; the reference
forwards the views separately). The feature map must have at least 2x2 pixels:
`view_size` resizes the crops (0 = the training image size); on 32 px images a ResNet
with the ImageNet stem has a 1x1 last map, so the quickstart uses 36 px views (2x2), and
the CIFAR config the CIFAR stem (4x4 at 32 px).

What differs from the reference, and why: both views in one encoder call (above); the
loss's scale (above); 1x1 convolutions without a bias before BatchNorm (BN cancels it).
Everything else follows `contrast/models/PixPro.py`: until this was checked, g(x) was
propagated unnormalised and the PixPro+ predictor ran on the pooled projection (BN over
B, not over B x H x W); both now follow the reference (tests: NumPy propagation, and
invariance to the norm of g(x_j)).

Measured on CIFAR-10 at the comparison budget (ResNet-18 x0.25, 300 steps at batch 128,
probe on 10,000 / 2,000 images; see README "OBoW and PixPro"); the mask, boxes, teacher
(init, schedule, no gradient, BN in training mode) and loss direction were checked
against the reference and are right:
- Compare at `--image_size 36` (or with `--cifar_stem`): with the ImageNet stem, 36 px
  views give 2x2 last maps and a probe at 32 px reads 1x1 ones (one checkpoint: 27.30 at
  32 px vs 36.20 at 36 px; random-init 35.70 at 36 px). `evals.compare` warns.
- With the reference's momentum (0.99 -> 1) PixPro is no better than random-init at this
  budget (seeds 0 / 1 / 2: +0.35 / -2.10 / -2.10). From 0.7 (the quickstart's
  `base_momentum`) it gains +3.80 / +0.45 / +2.15 (mean +2.13; paired with 0.99, +3.4
  on average). Over 300 steps the 0.99 schedule, rising to 1.0 on a cosine, leaves the
  key network near an average of the student's first ~100 steps.
- The student projection narrows into a cone within 10-30 steps (`proj_spread` 0.81 ->
  0.31 by step 10; keys follow, the pixel loss sits at -0.93 to -0.96), with 2x2 and 4x4
  maps, with and without the instance branch, with LARS more slowly. It is not what
  limits the probe: it is there with momentum 0.7 too (spread 0.14-0.17 at step 300).
  Nor is the propagation: with `ppm_gamma=100` (0.97^100 = 0.05, so each pixel
  propagates only itself) the cone forms the same and the probe is the same (36.15
  vs 36.05, momentum 0.99).
- Other settings at momentum 0.99: LARS as the reference (lr 1.0 x B/256, wd 1e-5)
  35.70; AdamW at a quarter of the learning rate 33.30; no instance branch 34.20.
- The map size matters most: with the CIFAR stem at 32 px (4x4 last maps instead of
  2x2; momentum from 0.7, `--cifar_stem --set objectives.pixpro.view_size=0`) PixPro
  gains +7.00 / +4.50 / +2.30 over the same architecture's random-init for seeds 0 / 1
  / 2 (mean +4.60), against +2.13 with 2x2 maps.

Reference settings (ImageNet, ResNet-50, PixPro_base_r50_400ep): 2 views of 224 px, crop
area 0.08-1, BYOL colour augmentation; projector 4096 -> 256, PPM gamma 2 with one layer,
pos_ratio 0.7, momentum 0.99 -> 1; LARS lr 1.0 x B/256 at batch 1024, wd 1e-5, 5 warmup
epochs, cosine, 400 epochs; instance branch off (weight 0) in the released 400-epoch
model. Anchors: VOC07+12 Faster R-CNN 60.2 AP, COCO Mask R-CNN 41.4 box AP (400 epochs),
not measured here (this toolkit has no detection benchmark).

    python -m selfsup.train --config experiments/pixpro_cifar10.py --workdir runs/pixpro_c10
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from objectives import ema
from objectives.base import MLP, Objective, ObjectiveOutput, l2_normalize
from selfsup import augment
from selfsup.errors import UserError


# ---------------------------------------------------------------------------------------
# The pure pieces (tested against NumPy references).


def propagate(x, gx, gamma: float = 2.0):
  """Pixel propagation: y_i = sum_j max(cos(x_i, x_j), 0)^gamma g(x_j) / |g(x_j)|.

  The transformed features are L2-normalised per pixel before they are propagated, as in
  the reference's `featprop` (the paper's formula leaves it out): every pixel adds a unit
  vector weighted by its similarity, so no pixel (or bias direction of g) can dominate
  the sum by its norm alone.

  Args:
    x: (B, H, W, C) features whose similarities weigh the propagation.
    gx: (B, H, W, D) the transformed features g(x).
    gamma: sharpness exponent.

  Returns:
    (B, H, W, D) float32.
  """
  b, h, w, c = x.shape
  xn = l2_normalize(x.reshape(b, h * w, c).astype(jnp.float32))
  gn = l2_normalize(gx.reshape(b, h * w, -1).astype(jnp.float32))
  sim = jnp.maximum(jnp.einsum("bic,bjc->bij", xn, xn), 0.0) ** gamma
  y = jnp.einsum("bij,bjd->bid", sim, gn)
  return y.reshape(b, h, w, -1)


def spread(x):
  """sqrt(D) times the mean per-dimension standard deviation of the L2-normalised rows of
  x (..., D) taken over all leading axes: about 1 for directions spread over the sphere,
  0 when they collapse to one direction (the collapse measure of BYOL / SimSiam, scaled)."""
  xn = l2_normalize(x.reshape(-1, x.shape[-1]).astype(jnp.float32))
  return jnp.mean(jnp.std(xn, axis=0)) * jnp.sqrt(jnp.float32(x.shape[-1]))


def positive_pairs(box_q, box_k, height: int, width: int, pos_ratio: float = 0.7):
  """Which pixels of two views of one image are positive pairs.

  Args:
    box_q, box_k: (B, 4) the views' boxes (y0, x0, y1, x1) in original-image
      coordinates, x bounds swapped for a flipped view.
    height, width: the feature maps' grid (both views share it).
    pos_ratio: threshold on centre distance / the larger bin diagonal.

  Returns:
    (B, H*W, H*W) bool, [b, i, j] for pixel i (row-major) of the q view and j of the k
    view.
  """
  cq = augment.box_coordinates(box_q, height, width).reshape(box_q.shape[0], -1, 2)
  ck = augment.box_coordinates(box_k, height, width).reshape(box_k.shape[0], -1, 2)
  dist = jnp.sqrt(jnp.sum((cq[:, :, None, :] - ck[:, None, :, :]) ** 2, axis=-1))

  def diag(box):
    bin_h = (box[:, 2] - box[:, 0]) / height
    bin_w = (box[:, 3] - box[:, 1]) / width
    return jnp.sqrt(bin_h ** 2 + bin_w ** 2)

  max_diag = jnp.maximum(diag(jnp.asarray(box_q, jnp.float32)),
                         diag(jnp.asarray(box_k, jnp.float32)))
  return dist / max_diag[:, None, None] < pos_ratio


def pixel_consistency_loss(y, k, mask):
  """Minus the mean cosine over positive pairs, per image, averaged over the batch.

  Args:
    y: (B, H, W, D) propagated query features.
    k: (B, H, W, D) key features of the other view.
    mask: (B, H*W, H*W) positive pairs (query pixel i, key pixel j).

  Returns:
    scalar; an image without positive pairs contributes 0 (as the reference).
  """
  b = y.shape[0]
  yn = l2_normalize(y.reshape(b, -1, y.shape[-1]).astype(jnp.float32))
  kn = l2_normalize(k.reshape(b, -1, k.shape[-1]).astype(jnp.float32))
  cos = jnp.einsum("bid,bjd->bij", yn, kn)
  m = mask.astype(jnp.float32)
  per_image = jnp.sum(cos * m, axis=(1, 2)) / (jnp.sum(m, axis=(1, 2)) + 1e-6)
  return -jnp.mean(per_image)


class PixelMLP(nn.Module):
  """A stack of 1x1 convolutions = per-pixel Linear(+BN+ReLU) layers over (B, H, W, C)."""
  hidden: tuple
  out: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    return MLP(tuple(self.hidden), self.out, use_bn=True, out_bias=True, dtype=self.dtype,
               name="mlp")(x, train=train)


class PixPro(Objective):
  image_size: int = 32
  total_steps: int = 0          # filled in by the trainer (0: constant base momentum)
  view_size: int = 0            # 0: image_size
  crop_scale: tuple = (0.08, 1.0)
  proj_hidden: int = 4096
  proj_dim: int = 256
  ppm_gamma: float = 2.0
  ppm_layers: int = 1
  pos_ratio: float = 0.7
  base_momentum: float = 0.99
  instance_weight: float = 0.0  # > 0: PixPro+ (the instance branch)
  pred_hidden: int = 4096
  jitter_strength: float = 0.5  # brightness/contrast/saturation 0.4, hue 0.1
  jitter_prob: float = 0.8
  grayscale_prob: float = 0.2
  blur_probs: tuple = (1.0, 0.1)
  solarize_probs: tuple = (0.0, 0.2)
  dtype: Any = jnp.float32

  def validate(self, *, image_size, dataset, batch_size=0):
    del dataset, batch_size
    if self.view_size < 0 or self.view_size > 8 * image_size:
      raise UserError(f"objective pixpro: view_size={self.view_size} must be in [0, "
                      f"{8 * image_size}] (0 = image_size {image_size})")
    if not 0 < self.pos_ratio:
      raise UserError(f"objective pixpro: pos_ratio={self.pos_ratio} must be > 0 (0.7 in "
                      "the reference)")
    if self.ppm_layers not in (1, 2):
      raise UserError(f"objective pixpro: ppm_layers={self.ppm_layers} must be 1 or 2")
    for name in ("proj_hidden", "proj_dim", "pred_hidden"):
      if getattr(self, name) < 1:
        raise UserError(f"objective pixpro: {name}={getattr(self, name)} must be >= 1")
    if self.instance_weight < 0:
      raise UserError(f"objective pixpro: instance_weight={self.instance_weight} must be >= 0")
    if not 0 <= self.base_momentum <= 1:
      raise UserError(f"objective pixpro: base_momentum={self.base_momentum} must be in "
                      "[0, 1]")
    for name in ("blur_probs", "solarize_probs"):
      if len(getattr(self, name)) != 2:
        raise UserError(f"objective pixpro: {name}={getattr(self, name)!r} must give one "
                        "probability per view (two)")

  def post_update(self, state, params, step):
    m = (ema.cosine_momentum(step, self.total_steps, self.base_momentum) if self.total_steps
         else self.base_momentum)
    return {**state, "teacher": ema.ema_update(state["teacher"], params, m)}

  def _views(self, batch):
    size = self.view_size or self.image_size
    views, boxes = [], []
    keys = jax.random.split(self.make_rng("augment"), 2)
    for v in range(2):
      cfg = augment.default_view_config(
          crop_scale=tuple(self.crop_scale), jitter_strength=self.jitter_strength,
          jitter_prob=self.jitter_prob, grayscale_prob=self.grayscale_prob,
          blur_prob=self.blur_probs[v], solarize_prob=self.solarize_probs[v])
      x, box = augment.view_augment(keys[v], batch, cfg, size)
      views.append(x)
      boxes.append(box)
    return views, boxes

  @nn.compact
  def __call__(self, encoder, batch, *, train, step):
    del step
    (view_a, view_b), (box_a, box_b) = self._views(batch)
    b = view_a.shape[0]
    both = jnp.concatenate([view_a, view_b])
    out = encoder(both, train=train)
    stride = max(out.maps)
    fmap = out.maps[stride]
    _, h, w, _ = fmap.shape
    if h < 2 or w < 2:
      raise UserError(
          f"objective pixpro needs a feature map of at least 2x2 pixels; the encoder's "
          f"deepest map (stride {stride}) is {h}x{w} for {both.shape[1]} px views; set "
          f"objectives.pixpro.view_size above {stride} (e.g. {3 * stride // 2}) or use an "
          "encoder with a smaller stride (e.g. encoder.cifar_stem=True)")

    projector = PixelMLP((self.proj_hidden,), self.proj_dim, self.dtype, name="projector")
    x = projector(fmap, train=train)
    if self.ppm_layers == 1:
      g = nn.Dense(self.proj_dim, dtype=self.dtype, name="ppm_transform")
      gx = g(x).astype(jnp.float32)
    else:
      gx = PixelMLP((self.proj_dim,), self.proj_dim, self.dtype, name="ppm_transform")(
          x, train=train)
    y = propagate(x, gx, self.ppm_gamma)

    instance_projector = None
    if self.instance_weight > 0:
      instance_projector = PixelMLP((self.proj_hidden,), self.proj_dim, self.dtype,
                                    name="instance_projector")
      # As the reference: the predictor runs per pixel (BN over all pixels), then the
      # prediction is averaged over the map.
      q_inst = PixelMLP((self.pred_hidden,), self.proj_dim, self.dtype, name="predictor")(
          instance_projector(fmap, train=train), train=train)
      q_inst = jnp.mean(q_inst, axis=(1, 2))

    # The key network: EMA of the encoder and the projector(s), created at init as a copy.
    followed = [(encoder, encoder.path), (projector, projector.path)]
    if instance_projector is not None:
      followed.append((instance_projector, instance_projector.path))
    teacher = self.variable(
        "objective_state", "teacher",
        lambda: ema.merge(*[ema.mirror(p, m.variables["params"]) for m, p in followed]))
    t_out = ema.apply_teacher(encoder, ema.lookup(teacher.value, encoder.path), both,
                              train=train, batch_stats=ema.module_batch_stats(encoder))
    t_map = t_out.maps[stride]
    key = ema.apply_teacher(projector, ema.lookup(teacher.value, projector.path), t_map,
                            train=train, batch_stats=ema.module_batch_stats(projector))

    mask_ab = positive_pairs(box_a, box_b, h, w, self.pos_ratio)
    mask_ba = jnp.swapaxes(mask_ab, 1, 2)
    loss = 0.5 * (pixel_consistency_loss(y[:b], key[b:], mask_ab)
                  + pixel_consistency_loss(y[b:], key[:b], mask_ba))
    metrics = {"pos_share": jnp.mean(mask_ab.astype(jnp.float32)),
               "pos_images": jnp.mean(jnp.any(mask_ab, axis=(1, 2)).astype(jnp.float32)),
               "pixel_loss": loss,
               "proj_spread": spread(x), "key_spread": spread(key)}
    if instance_projector is not None:
      k_inst = ema.apply_teacher(
          instance_projector, ema.lookup(teacher.value, instance_projector.path), t_map,
          train=train, batch_stats=ema.module_batch_stats(instance_projector))
      k_inst = l2_normalize(jnp.mean(k_inst, axis=(1, 2)))
      q = l2_normalize(q_inst)
      inst = -0.5 * (jnp.mean(jnp.sum(q[:b] * k_inst[b:], -1))
                     + jnp.mean(jnp.sum(q[b:] * k_inst[:b], -1)))
      metrics["instance_loss"] = inst
      loss = loss + self.instance_weight * inst
    return ObjectiveOutput(loss=loss, metrics=metrics, probe_features=out.pooled[:b])
