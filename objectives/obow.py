"""OBoW (Gidaris, Bursuc, Puy, Komodakis, Cord & Perez 2021, "OBoW: Online Bag-of-Visual-
Words Generation for Self-Supervised Learning", CVPR 2021; code github.com/valeoai/obow).

A teacher network turns a clean view of each image into a bag of visual words (BoW) over
a vocabulary of its own local features; the student, which sees only strongly augmented
crops and small patches, predicts that BoW from its pooled features.

- Teacher: an EMA of the encoder (momentum 0.99 -> 1.0 on a cosine over the run, see
  `objectives/ema.py`), kept in `objective_state/obow/teacher` and updated in
  `post_update` after every optimizer step; it gets no gradient. It sees the clean view:
  the centre square of the image at `image_size`, randomly flipped (the reference's
  Resize(256) + CenterCrop(224) + flip).
- Vocabulary: for each feature level (by default the last two stages, `levels=(-2, -1)`
  indexing the encoder's maps by stride), a FIFO queue of `num_words` vectors. Each
  training step, every image of the global batch adds one word: its teacher map with
  `border` pixels cut off each side, `vocab_pool` x `vocab_pool` average-pooled (VALID),
  at one uniformly random position. Words replace the oldest ones (the write pointer is
  part of the state), so the queue and its pointer are checkpointed and restored exactly.
- BoW target: squared distances d(f_u, w_k) of every teacher local feature f_u (after the
  border cut) to every word, soft assignment softmax_k(-d / (delta * mu)) with mu the
  EMA (decay 0.99) of the batch mean of min_k d, inverse temperature 1 / delta =
  `inv_delta` (15), max-pooled over positions u, then L1-normalised. The EMA includes the
  current batch, as the reference updates it before computing the codes. The vocabulary
  used for targets and for the head is the one before this step's words are added.
- Student head generated from the vocabulary: per level, W = l2n(MLP(l2n(vocabulary)))
  with the MLP Linear(no bias) -> BN -> ReLU -> Linear -> one row per word, output size
  the encoder's feature size; logits = kappa * f W^T with f the student's pooled features
  (kappa 8). The student forwards the large crops and the patches in one call per
  resolution.
- Loss: soft-target cross-entropy (= KL up to the targets' entropy) averaged over
  levels, for each kind of student view (crops, patches) averaged over its views, and
  the two kinds summed (the reference sums its per-crop-type losses).
- Logged: `perplexity` (the batch BoW perplexity averaged over levels, exp of the entropy
  of the batch's summed BoW; collapse shows as it falling towards 1), per level
  `perplexity_L{i}` and `perplexity_img_L{i}` (per image).

Differences from the reference, all settable: the patches are small random resized crops
(`patch_scale`), not the reference's 3x3 jittered grid cut from a 256 px resize; the
momentum schedule runs over `total_steps` (the run's train.steps, filled in by the
trainer) rather than a separately configured iteration count. Small images have small
maps: on 32 px CIFAR images the last two ResNet-18 stages are 8x8 and 4x4 with the CIFAR
stem (2x2 and 1x1 without it), so the CIFAR configs set `border=0` (and `vocab_pool=1`
without the CIFAR stem); a map smaller than `2 * border + vocab_pool` is refused at
start-up with one line.

Reference settings (ImageNet, ResNet-50, config ImageNetFull/ResNet50_OBoW_full.yaml):
K = 8192 words per level on conv4 and conv5, inv_delta 15, kappa 8, teacher momentum 0.99
-> 1 cosine, 2 crops of 160 px (scale 0.08-0.6) + 5 patches of 96 px, colour jitter
(0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.2, blur p 0.5 on the crops; SGD momentum 0.9, lr
0.03 at batch 256, wd 1e-4, 10 warmup epochs, cosine, 200 epochs. Anchor: ImageNet linear
top-1 73.8 (200 epochs), not measured here. Ours on CIFAR-10 at the README's 300-step
budget (ResNet-18 x0.25): +3.17 over random-init with the ImageNet stem (seeds 0-2), +7.45
and +5.50 with the CIFAR stem (seeds 0 and 1; README "All new objectives on one encoder").

    python -m selfsup.train --config experiments/obow_cifar10.py --workdir runs/obow_c10
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


def squared_distances(features, words):
  """(..., C) features, (K, C) words -> (..., K) squared Euclidean distances (float32)."""
  f = features.astype(jnp.float32)
  w = words.astype(jnp.float32)
  return (jnp.sum(f * f, -1, keepdims=True) + jnp.sum(w * w, -1)
          - 2.0 * jnp.einsum("...c,kc->...k", f, w))


def bow_targets(features, words, inv_delta: float, min_dist_mean, decay: float = 1.0):
  """Soft BoW targets of teacher feature maps.

  Args:
    features: (B, H, W, C) teacher local features.
    words: (K, C) the vocabulary.
    inv_delta: base inverse temperature.
    min_dist_mean: scalar, the EMA of the mean distance to the nearest word so far.
    decay: the EMA's decay; the EMA first takes in this batch's mean over (B, H, W) of
      min_k d (1.0: it stays as it is, e.g. outside training).

  Returns:
    (bow, new_min_dist_mean): bow (B, K) = L1-normalised max over positions of
    softmax_k(-inv_delta / new_min_dist_mean * d), d the squared distances.
  """
  d = squared_distances(features, words)                 # (B, H, W, K)
  batch_min = jax.lax.stop_gradient(jnp.mean(jnp.min(d, axis=-1)))
  mu = decay * min_dist_mean + (1.0 - decay) * batch_min
  codes = jax.nn.softmax(-(inv_delta / mu) * d, axis=-1)
  bow = jnp.max(codes, axis=(1, 2))
  bow = bow / jnp.maximum(jnp.sum(jnp.abs(bow), -1, keepdims=True), 1e-12)
  return bow, mu


def soft_cross_entropy(logits, targets):
  """Mean over rows of -sum_k t_k log softmax(logits)_k (float32)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(targets * logp, axis=-1))


def perplexity(p, axis=-1):
  """exp(entropy) of distributions along `axis` (after L1 normalisation)."""
  p = p / jnp.maximum(jnp.sum(p, axis=axis, keepdims=True), 1e-12)
  return jnp.exp(-jnp.sum(p * jnp.log(p + 1e-5), axis=axis))


def local_words(features, key, pool: int):
  """One `pool` x `pool` average-pooled local feature per image, at a random position.

  Args:
    features: (B, H, W, C) teacher maps (border already cut).
    key: PRNG key; position of image b drawn with fold_in(key, b), so it does not depend
      on the batch size or its sharding.
    pool: window of the VALID average pooling (1 = no pooling).

  Returns:
    (B, C) float32.
  """
  x = features.astype(jnp.float32)
  if pool > 1:
    x = nn.avg_pool(x, (pool, pool), strides=(1, 1), padding="VALID")
  b, h, w, c = x.shape
  keys = augment.per_example_keys(key, b)
  pos = jax.vmap(lambda k: jax.random.randint(k, (), 0, h * w))(keys)
  return jnp.take_along_axis(x.reshape(b, h * w, c), pos[:, None, None], axis=1)[:, 0]


def fifo_push(words, ptr, new):
  """Writes `new` (N, C) over the oldest words from `ptr` on (wrapping); returns (words,
  ptr + N mod K). N <= K (checked at start-up), so no slot is written twice."""
  k = words.shape[0]
  idx = (ptr + jnp.arange(new.shape[0])) % k
  return words.at[idx].set(new.astype(words.dtype)), ((ptr + new.shape[0]) % k).astype(ptr.dtype)


class BoWHead(nn.Module):
  """Weights generated from the vocabulary: W = l2n(Linear(ReLU(BN(Linear(l2n(words))))))."""
  hidden: int
  out: int
  kappa: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features, words, *, train: bool):
    w = MLP((self.hidden,), self.out, dtype=self.dtype, name="generator")(
        l2_normalize(words.astype(jnp.float32)), train=train)
    w = l2_normalize(w)
    return self.kappa * features.astype(jnp.float32) @ w.T


def select_levels(maps: dict, levels) -> list:
  """The encoder's maps at `levels` (indices into the maps sorted by stride)."""
  strides = sorted(maps)
  out = []
  for level in levels:
    if not -len(strides) <= level < len(strides):
      raise UserError(f"objective obow: levels={tuple(levels)} needs feature maps at "
                      f"index {level}, but the encoder gives {len(strides)} map(s) (strides "
                      f"{strides}); OBoW needs an encoder with multi-scale feature maps "
                      "(a ResNet or the tiny CNN), or fewer levels")
    out.append(strides[level])
  return out


class OBoW(Objective):
  image_size: int = 32
  total_steps: int = 0          # filled in by the trainer (0: constant base momentum)
  num_words: int = 8192
  levels: tuple = (-2, -1)
  inv_delta: float = 15.0
  kappa: float = 8.0
  border: int = 1
  vocab_pool: int = 3
  min_dist_decay: float = 0.99
  base_momentum: float = 0.99
  num_crops: int = 2
  crop_size: int = 0            # 0: image_size
  crop_scale: tuple = (0.08, 0.6)
  num_patches: int = 5
  patch_size: int = 0           # 0: image_size // 2
  patch_scale: tuple = (0.05, 0.14)
  jitter_strength: float = 0.5  # brightness/contrast/saturation 0.4, hue 0.1 (x 0.8, x 0.2)
  jitter_prob: float = 0.8
  grayscale_prob: float = 0.2
  blur_prob: float = 0.0
  head_hidden: int = 0          # 0: twice the encoder's feature size
  dtype: Any = jnp.float32

  def validate(self, *, image_size, dataset, batch_size=0):
    del dataset
    if self.num_words < 1:
      raise UserError(f"objective obow: num_words={self.num_words} must be >= 1 (the "
                      "vocabulary size K per level; 8192 in the reference)")
    if batch_size and self.num_words < batch_size:
      raise UserError(f"objective obow: num_words={self.num_words} is below the global batch "
                      f"{batch_size}; every image adds one word per step, so K must be >= "
                      "the batch (a multiple of it keeps the FIFO aligned)")
    if not self.levels:
      raise UserError("objective obow: levels is empty; give at least one feature level, "
                      "e.g. (-2, -1) for the last two stages")
    if self.num_crops < 1 or self.num_patches < 0:
      raise UserError(f"objective obow: num_crops={self.num_crops} must be >= 1 and "
                      f"num_patches={self.num_patches} >= 0")
    if self.border < 0 or self.vocab_pool < 1:
      raise UserError(f"objective obow: border={self.border} must be >= 0 and vocab_pool="
                      f"{self.vocab_pool} >= 1")
    if self.inv_delta <= 0 or self.kappa <= 0:
      raise UserError(f"objective obow: inv_delta={self.inv_delta} and kappa={self.kappa} "
                      "must be > 0")
    for name in ("crop_size", "patch_size"):
      size = getattr(self, name)
      if size < 0 or size > 4 * image_size:
        raise UserError(f"objective obow: {name}={size} must be in [0, {4 * image_size}] "
                        f"(0 = the default for image_size {image_size})")
    if not 0 <= self.base_momentum <= 1:
      raise UserError(f"objective obow: base_momentum={self.base_momentum} must be in [0, 1]")

  def _sizes(self):
    return self.crop_size or self.image_size, self.patch_size or max(self.image_size // 2, 8)

  def post_update(self, state, params, step):
    m = (ema.cosine_momentum(step, self.total_steps, self.base_momentum) if self.total_steps
         else self.base_momentum)
    return {**state, "teacher": ema.ema_update(state["teacher"], params, m)}

  @nn.compact
  def __call__(self, encoder, batch, *, train, step):
    del step
    crop_size, patch_size = self._sizes()
    cfg = augment.default_view_config(
        jitter_strength=self.jitter_strength, jitter_prob=self.jitter_prob,
        grayscale_prob=self.grayscale_prob, blur_prob=self.blur_prob)
    k_views, k_flip, k_words = jax.random.split(self.make_rng("augment"), 3)
    crops = [(crop_size, self.num_crops, tuple(self.crop_scale))]
    if self.num_patches:
      crops.append((patch_size, self.num_patches, tuple(self.patch_scale)))
    views = augment.multi_crop(k_views, batch, crops, cfg)
    # Student: one encoder call per resolution (BatchNorm statistics per resolution).
    first = encoder(views[0], train=train)
    select_levels(first.maps, self.levels)     # one line for an encoder without the maps
    student = [first.pooled] + [encoder(v, train=train).pooled for v in views[1:]]

    # Teacher: the clean view through the EMA encoder (created at init as a copy).
    clean = augment.eval_view(batch, self.image_size, normalize=False)
    keys = augment.per_example_keys(k_flip, clean.shape[0])
    clean = jax.vmap(lambda k, x: augment.random_flip(k, x)[0])(keys, clean)
    clean = augment.normalize(clean)
    teacher = self.variable("objective_state", "teacher",
                            lambda: ema.mirror(encoder.path, encoder.variables["params"]))
    t_out = ema.apply_teacher(encoder, ema.lookup(teacher.value, encoder.path), clean,
                              train=train, batch_stats=ema.module_batch_stats(encoder))
    strides = select_levels(t_out.maps, self.levels)

    dim = student[0].shape[-1]
    update = train and not self.is_initializing()
    level_losses = [[] for _ in student]
    metrics = {}
    perps = []
    for i, s in enumerate(strides):
      fmap = t_out.maps[s].astype(jnp.float32)
      b, h, w, c = fmap.shape
      if min(h, w) < 2 * self.border + self.vocab_pool:
        raise UserError(
            f"objective obow: the teacher's feature map at level {self.levels[i]} (stride "
            f"{s}) is {h}x{w} for {self.image_size} px views, smaller than 2 * border + "
            f"vocab_pool = {2 * self.border + self.vocab_pool}; set border=0 and/or "
            "vocab_pool=1, choose other levels, or use an encoder with finer maps (e.g. "
            "encoder.cifar_stem=True)")
      if self.border:
        fmap = fmap[:, self.border:h - self.border, self.border:w - self.border]

      def init_words(c=c, i=i):
        key = jax.random.fold_in(self.make_rng("params"), i)
        return jnp.maximum(jax.random.normal(key, (self.num_words, c), jnp.float32), 0.0)

      words = self.variable("objective_state", f"words_L{i}", init_words)
      ptr = self.variable("objective_state", f"ptr_L{i}", lambda: jnp.zeros((), jnp.int32))
      mu = self.variable("objective_state", f"min_dist_L{i}",
                         lambda: jnp.full((), 0.5, jnp.float32))
      vocab = words.value
      # The EMA of the mean nearest-word distance takes in this batch first (as the
      # reference does), then sets the temperature.
      target, new_mu = bow_targets(fmap, vocab, self.inv_delta, mu.value,
                                   self.min_dist_decay if update else 1.0)
      target = jax.lax.stop_gradient(target)
      head = BoWHead(self.head_hidden or 2 * dim, dim, self.kappa, self.dtype,
                     name=f"bow_head_L{i}")
      for j, f in enumerate(student):
        logits = head(f, vocab, train=train)
        n_views = f.shape[0] // b
        t = jnp.tile(target, (n_views, 1))          # view-major rows, as multi_crop
        level_losses[j].append(soft_cross_entropy(logits, t))
      perp = perplexity(jnp.sum(target, 0))
      perps.append(perp)
      metrics[f"perplexity_L{i}"] = perp
      metrics[f"perplexity_img_L{i}"] = jnp.mean(perplexity(target))
      if update:
        new_words = local_words(jax.lax.stop_gradient(fmap), jax.random.fold_in(k_words, i),
                                self.vocab_pool)
        words.value, ptr.value = fifo_push(vocab, ptr.value, new_words)
        mu.value = new_mu
    loss = sum(jnp.mean(jnp.stack(ls)) for ls in level_losses)
    metrics["perplexity"] = jnp.mean(jnp.stack(perps))
    b = batch["image"].shape[0]
    return ObjectiveOutput(loss=loss, metrics=metrics, probe_features=student[0][:b])
