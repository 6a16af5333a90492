"""SwAV (Caron, Misra, Mairal, Goyal, Bojanowski & Joulin 2020, "Unsupervised Learning of
Visual Features by Contrasting Cluster Assignments", NeurIPS 2020, arXiv:2006.09882).

Online clustering instead of pairwise comparison: each view's embedding is scored
against K learned prototypes; the codes (soft cluster assignments) of the two large crops
are computed with a few Sinkhorn-Knopp iterations that spread the batch equally over the
prototypes (which is what prevents collapse), and every crop must predict the code of
every other large crop ("swapped prediction").

In this module, top to bottom:
- views: multi-crop (`augment.multi_crop`): 2 large crops (`large_size`, area
  `large_scale`) + `num_small` small crops (`small_size`, area `small_scale`); each
  resolution goes through the encoder in its own call (BatchNorm statistics per
  resolution), as the reference does;
- head: the pooled features of all crops, concatenated, through the projection MLP
  (Linear+BN+ReLU, `proj_hidden`, then `proj_dim`), L2-normalised, then the prototypes:
  a (proj_dim, K) matrix without bias (`params/<name>/prototypes`);
- codes: `sinkhorn` on the stop-gradient scores of the large crops, in float32 with the
  maximum subtracted before the exponential (exp(s / 0.05) overflows float32 for s > 4.4),
  `sinkhorn_iters` (3) alternations, `epsilon` (0.05). Its sums run over the *global*
  batch: under `jax.jit` over a sharded batch a `jnp.sum` over the batch axis spans every
  device, so 8 devices give the codes of 1 (tested);
- queue (optional, `queue_length` > 0): the last `queue_length` embeddings of each large
  crop, in `objective_state/<name>/queue` (checkpointed with the run). It is filled from
  step `queue_start_step` on and, once full, its scores are put before the batch's in
  the Sinkhorn problem (more samples to spread over K prototypes than a small batch
  has); only the batch's codes are used;
- loss: `swapped_prediction_loss`, cross-entropy of softmax(z_v C / `temperature`)
  against the code q_s of large crop s, for every crop v != s, averaged over v and s;
- `post_update_params`: after each optimizer step the prototypes are re-normalised to
  unit columns, and during the first `freeze_prototypes_steps` steps they are put back to
  their previous value (the reference drops their gradient for the first epoch; their
  gradient is also stopped in the forward pass then, so optimizer moments stay clean).

Metrics: `code_entropy` (mean entropy of a code row, nats), `pred_perplexity` (exp of the
entropy of the batch-mean prediction: how many prototypes the predictions use; 1 =
collapsed), `queue_used` (1 once the queue is in the codes). Collapse also shows as a
loss stuck at ln(K).

Reference settings (ImageNet, ResNet-50): 2x224 (scale 0.14-1) + 6x96 (0.05-0.14), MLP
2048 -> 128, K 3000, eps 0.05, 3 iterations, temperature 0.1, prototypes frozen for the
first epoch, queue 3840 from epoch 15 at batch 256, LARS lr 0.6 x B/256 (4.8 at 4096),
cosine to 0.0006, wd 1e-6, colour jitter 0.8 (p 0.8), grayscale p 0.2, blur p 0.5.
Anchors (published, not measured here): ImageNet ResNet-50 linear 75.3 (800 epochs,
batch 4096, 2x224 + 6x96), 72.7 (200 epochs, batch 256, with the queue). Our CIFAR-10
measurement at the README budget is in README.md ("SwAV and G-SimCLR"). In short: at
0.77 epoch SwAV is in its slow start, and what moved it most was the learning rate
(AdamW 5e-3 instead of the quickstart's 2e-3), with sharper codes (eps 0.02) next:
+3.07 points over random-init on average over three seeds (+3.00 over five, single seeds
+1.75 to +4.05), against +1.10 (seed 0) at 2e-3. That is with the ImageNet stem, whose
16 px small crops are a single pixel in the last two stages. With the CIFAR stem (4x4
last maps at 32 px, the encoder of `experiments/swav_cifar10.py`) the same settings gain
+8.10 and +6.20 (seeds 0 and 1; README "All new objectives on one encoder").

Keep K above `proj_dim`: measured at that budget, K = 100 prototypes for a 128-d
embedding collapsed within 30 steps (loss ln 100, uniform codes and predictions) with the
prototypes frozen all along, where K = 300 did not. Our reading, not checked on the
embeddings: with K <= proj_dim an embedding orthogonal to every prototype scores them
all equally, the uniform prediction that uniform codes reward; with K > proj_dim + 1
generic prototypes leave no such direction.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from objectives.base import MLP, Objective, ObjectiveOutput, l2_normalize
from selfsup import augment
from selfsup.errors import UserError


def sinkhorn(scores: jax.Array, epsilon: float = 0.05, iters: int = 3) -> jax.Array:
  """Sinkhorn-Knopp codes (B, K) for scores (B, K), float32, over the whole (global) batch.

  Q = exp(S / eps)^T (K, B) normalised to total mass 1, then `iters` times: rows (one per
  prototype) to mass 1/K each, columns (one per sample) to 1/B each. Returns B Q^T: each
  row a distribution over the K prototypes. The maximum is subtracted first, which
  changes nothing after the first normalisation and keeps exp finite.
  """
  s = scores.astype(jnp.float32) / epsilon
  s = s - jax.lax.stop_gradient(jnp.max(s))
  q = jnp.exp(s).T                    # (K, B)
  k, b = q.shape
  q = q / jnp.sum(q)
  for _ in range(iters):
    q = q / jnp.sum(q, axis=1, keepdims=True) / k
    q = q / jnp.sum(q, axis=0, keepdims=True) / b
  return (q * b).T


def swapped_prediction_loss(scores: list, codes: list, assign: tuple,
                            temperature: float) -> jax.Array:
  """Mean over assigned crops s and other crops v of CE(codes[s], softmax(scores[v]/T)).

  Args:
    scores: one (B, K) score matrix per crop (z_v . c_k).
    codes: one (B, K) code matrix per entry of `assign` (rows sum to 1).
    assign: the crop indices the codes belong to (SwAV's crops_for_assign).
    temperature: T (0.1).
  """
  logp = [jax.nn.log_softmax(s.astype(jnp.float32) / temperature, axis=-1) for s in scores]
  total = 0.0
  for q, s in zip(codes, assign):
    sub = 0.0
    for v, lp in enumerate(logp):
      if v != s:
        sub = sub - jnp.mean(jnp.sum(q * lp, axis=-1))
    total = total + sub / (len(scores) - 1)
  return total / len(assign)


def _unit_columns(key, shape, dtype=jnp.float32):
  """Random prototypes with unit-norm columns (what every later step keeps them at)."""
  return l2_normalize(jax.random.normal(key, shape[::-1], dtype)).T


def small_crop_size(image_size: int, small_size: int) -> int:
  """The small crops' side: `small_size`, or 0 = 96/224 of the image size (at least 8)."""
  return small_size or max(8, round(image_size * 96 / 224))


class SwAV(Objective):
  image_size: int = 32               # filled in: the large crops' side when large_size=0
  large_size: int = 0                # 0: image_size
  large_scale: tuple = (0.14, 1.0)
  num_small: int = 6                 # V
  small_size: int = 0                # 0: 96/224 of the large size
  small_scale: tuple = (0.05, 0.14)
  proj_hidden: tuple = (2048,)
  proj_dim: int = 128
  num_prototypes: int = 3000         # K
  temperature: float = 0.1
  epsilon: float = 0.05
  sinkhorn_iters: int = 3
  freeze_prototypes_steps: int = 0   # reference: one epoch
  queue_length: int = 0              # 0: no queue; else a multiple of the global batch
  queue_start_step: int = 0          # fill the queue from this step (reference: epoch 15)
  jitter_strength: float = 0.8
  jitter_prob: float = 0.8
  grayscale_prob: float = 0.2
  blur_prob: float = 0.5
  dtype: Any = jnp.float32

  # ---- configuration ---------------------------------------------------------------
  @property
  def sizes(self) -> tuple[int, int]:
    large = self.large_size or self.image_size
    return large, small_crop_size(large, self.small_size)

  def validate(self, *, image_size, dataset, batch_size=0):
    del dataset
    large, small = self.sizes
    if large > image_size or large < 8:
      raise UserError(f"objective swav: large_size={self.large_size} must be in [8, "
                      f"{image_size}] (config.data.image_size), or 0 for the image size")
    if not 8 <= small <= large:
      raise UserError(f"objective swav: small_size={small} must be in [8, {large}] (no "
                      f"larger than the large crops of {large} px); 0 picks 96/224 of it")
    for name in ("num_prototypes", "proj_dim", "sinkhorn_iters"):
      if getattr(self, name) < 1:
        raise UserError(f"objective swav: {name}={getattr(self, name)} must be >= 1")
    if self.num_small < 0:
      raise UserError(f"objective swav: num_small={self.num_small} must be >= 0")
    for name in ("temperature", "epsilon"):
      if not getattr(self, name) > 0:
        raise UserError(f"objective swav: {name}={getattr(self, name)} must be > 0")
    if self.queue_length < 0 or self.freeze_prototypes_steps < 0 or self.queue_start_step < 0:
      raise UserError("objective swav: queue_length, queue_start_step and "
                      "freeze_prototypes_steps must be >= 0")
    if self.queue_length and batch_size and self.queue_length % batch_size:
      raise UserError(f"objective swav: queue_length={self.queue_length} must be a multiple "
                      f"of the global batch config.train.batch_size={batch_size} (e.g. "
                      f"{max(1, self.queue_length // batch_size) * batch_size}), or 0 for no "
                      "queue")
    for name in ("large_scale", "small_scale"):
      lo, hi = getattr(self, name)
      if not 0 < lo <= hi <= 1:
        raise UserError(f"objective swav: {name}={(lo, hi)} must satisfy 0 < low <= high <= 1")

  # ---- forward ---------------------------------------------------------------------
  @nn.compact
  def __call__(self, encoder, batch, *, train, step):
    large, small = self.sizes
    cfg = augment.default_view_config(
        jitter_strength=self.jitter_strength, jitter_prob=self.jitter_prob,
        grayscale_prob=self.grayscale_prob, blur_prob=self.blur_prob)
    crops = [(large, 2, tuple(self.large_scale))]
    if self.num_small:
      crops.append((small, self.num_small, tuple(self.small_scale)))
    views = augment.multi_crop(self.make_rng("augment"), batch, crops, cfg)
    b = views[0].shape[0] // 2

    # One encoder call per resolution; the head runs once on all crops (as the reference).
    outs = [encoder(v, train=train) for v in views]
    pooled = jnp.concatenate([o.pooled for o in outs])
    z = MLP(tuple(self.proj_hidden), self.proj_dim, dtype=self.dtype,
            name="projector")(pooled, train=train)
    z = l2_normalize(z.astype(jnp.float32))
    protos = self.param("prototypes", _unit_columns, (self.proj_dim, self.num_prototypes))
    frozen = jnp.asarray(step) < self.freeze_prototypes_steps
    protos = jnp.where(frozen, jax.lax.stop_gradient(protos), protos)
    scores = z @ protos                               # (num_crops * B, K)
    n_crops = 2 + self.num_small
    crop_scores = [scores[i * b:(i + 1) * b] for i in range(n_crops)]

    # Codes of the two large crops, optionally with the queue's samples in the problem.
    sg_z = jax.lax.stop_gradient(z)
    sg_protos = jax.lax.stop_gradient(protos)
    queue = None
    if self.queue_length:
      queue = self.variable("objective_state", "queue",
                            lambda: jnp.zeros((2, self.queue_length, self.proj_dim),
                                              jnp.float32))
      filled = self.variable("objective_state", "filled", lambda: jnp.zeros((), jnp.int32))
      queue_used = filled.value >= self.queue_length
    codes = []
    for i in range(2):
      s = jax.lax.stop_gradient(crop_scores[i])
      q = sinkhorn(s, self.epsilon, self.sinkhorn_iters)
      if queue is not None:
        with_queue = sinkhorn(jnp.concatenate([queue.value[i] @ sg_protos, s]),
                              self.epsilon, self.sinkhorn_iters)[-b:]
        q = jnp.where(queue_used, with_queue, q)
      codes.append(jax.lax.stop_gradient(q))
    if queue is not None and train and not self.is_initializing():
      # Newest first; the oldest batch drops off the end (the reference's shift).
      fill = jnp.asarray(step) >= self.queue_start_step
      new = jnp.stack([jnp.concatenate([sg_z[i * b:(i + 1) * b], queue.value[i, :-b]])
                       for i in range(2)])
      queue.value = jnp.where(fill, new, queue.value)
      filled.value = jnp.where(fill, jnp.minimum(filled.value + b, self.queue_length),
                               filled.value)

    loss = swapped_prediction_loss(crop_scores, codes, (0, 1), self.temperature)
    code_entropy = jnp.mean(jnp.sum(-codes[0] * jnp.log(codes[0] + 1e-12), axis=-1))
    mean_pred = jnp.mean(jax.nn.softmax(jax.lax.stop_gradient(scores) / self.temperature), 0)
    pred_perplexity = jnp.exp(-jnp.sum(mean_pred * jnp.log(mean_pred + 1e-12)))
    metrics = {"code_entropy": code_entropy, "pred_perplexity": pred_perplexity}
    if queue is not None:
      metrics["queue_used"] = queue_used.astype(jnp.float32)
    return ObjectiveOutput(loss=loss, metrics=metrics, probe_features=outs[0].pooled[:b])

  # ---- after the optimizer step ----------------------------------------------------
  def post_update_params(self, params, old_params, step):
    """Unit-norm prototype columns; the previous ones while they are frozen."""
    protos = params["prototypes"]
    normed = protos / jnp.maximum(jnp.linalg.norm(protos, axis=0, keepdims=True), 1e-12)
    kept = jnp.where(jnp.asarray(step) < self.freeze_prototypes_steps,
                     old_params["prototypes"], normed)
    return {**params, "prototypes": kept}
