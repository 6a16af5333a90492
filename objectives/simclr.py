"""SimCLR (Chen, Kornblith, Norouzi & Hinton 2020, "A Simple Framework for Contrastive
Learning of Visual Representations").

Two augmented views of every image, a projection MLP (Linear+BN+ReLU, last layer 128-d
without bias), and the NT-Xent loss. Negatives are every other view in the *global*
batch: under `jax.jit` over a sharded batch the similarity matrix spans all devices by
construction, so no explicit all-gather is written here.

Reference: LARS, lr 0.3 x B/256, 10 warmup epochs, cosine, tau 0.1 (ImageNet) / 0.5
(CIFAR), jitter strength 1.0 (ImageNet, with blur) / 0.5 (CIFAR, no blur). Anchors:
ImageNet ResNet-50 linear 69.1-69.3 (v1); CIFAR-10 ResNet-18, B 512, 1000 epochs ~91%.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from objectives.base import MLP, Objective, ObjectiveOutput, l2_normalize, require_negatives
from selfsup import augment


def nt_xent_loss(z_a: jax.Array, z_b: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
  """Normalised-temperature cross-entropy over 2N views (symmetric).

  Args:
    z_a, z_b: (N, D) projections of the two views; row i of each is the same image.
    temperature: tau.

  Returns:
    (loss, accuracy): the mean over all 2N anchors of
    -log( exp(s_ip / tau) / sum_{k != i} exp(s_ik / tau) ) with s cosine similarity and p
    the other view of i, and how often the positive is the most similar view.
  """
  z = jnp.concatenate([z_a, z_b], axis=0).astype(jnp.float32)
  z = l2_normalize(z)
  n = z_a.shape[0]
  logits = z @ z.T / temperature
  # Self-similarity is not a candidate: mask it out before the softmax.
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)
  positives = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
  logp = jax.nn.log_softmax(logits, axis=1)
  loss = -jnp.mean(logp[jnp.arange(2 * n), positives])
  acc = jnp.mean((jnp.argmax(logits, axis=1) == positives).astype(jnp.float32))
  return loss, acc


class SimCLR(Objective):
  image_size: int = 32
  temperature: float = 0.5
  proj_hidden: tuple = (512,)
  proj_dim: int = 128
  crop_scale: tuple = (0.08, 1.0)
  jitter_strength: float = 0.5
  jitter_prob: float = 0.8
  grayscale_prob: float = 0.2
  blur_prob: float = 0.0
  # False: one encoder (and projector) call on both views, BatchNorm statistics over 2B
  # (the reference, google-research/simclr). True: one call per view, statistics per
  # view, as PyTorch implementations that call the model on each view do (lightly).
  per_view_bn: bool = False
  dtype: Any = jnp.float32

  def validate(self, *, image_size, dataset, batch_size=0):
    del image_size, dataset
    require_negatives("simclr", batch_size)

  @nn.compact
  def __call__(self, encoder, batch, *, train, step):
    del step
    cfg = augment.default_view_config(
        crop_scale=tuple(self.crop_scale), jitter_strength=self.jitter_strength,
        jitter_prob=self.jitter_prob, grayscale_prob=self.grayscale_prob,
        blur_prob=self.blur_prob)
    key_a, key_b = jax.random.split(self.make_rng("augment"))
    view_a, _ = augment.view_augment(key_a, batch, cfg, self.image_size)
    view_b, _ = augment.view_augment(key_b, batch, cfg, self.image_size)
    b = view_a.shape[0]
    projector = MLP(tuple(self.proj_hidden), self.proj_dim, out_bias=False,
                    dtype=self.dtype, name="projector")
    if self.per_view_bn:
      outs = [encoder(v, train=train) for v in (view_a, view_b)]
      z_a, z_b = (projector(o.pooled, train=train) for o in outs)
      pooled_a = outs[0].pooled
    else:
      # One encoder call on both views: BatchNorm statistics over 2B, as in the reference.
      out = encoder(jnp.concatenate([view_a, view_b]), train=train)
      z = projector(out.pooled, train=train)
      z_a, z_b, pooled_a = z[:b], z[b:], out.pooled[:b]
    loss, acc = nt_xent_loss(z_a, z_b, self.temperature)
    return ObjectiveOutput(loss=loss, metrics={"contrastive_acc": acc},
                           probe_features=pooled_a)
