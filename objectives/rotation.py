"""Rotation prediction (Gidaris, Singh & Komodakis 2018, "Unsupervised Representation
Learning by Predicting Image Rotations", RotNet).

Every image of the batch goes through the step in all four rotations (0, 90, 180, 270
degrees: exact `rot90`, no interpolation), so the effective batch is 4B; a head on pooled
features predicts which rotation was applied (4-way cross-entropy).

Reference: CIFAR-10 NIN, SGD Nesterov 0.9, wd 5e-4, lr 0.1 x0.2 at 60/120/160 of 200
epochs, batch 128; classifier on conv2-block features 89.06% (published anchor).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from objectives.base import MLP, Objective, ObjectiveOutput, accuracy, cross_entropy
from selfsup import augment


def rotation_views(images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(B, H, W, C) square images -> (4B, H, W, C) rotated copies and labels 0..3.

  Rotation-major order: rows [kB, (k+1)B) are the batch rotated by k x 90 degrees.
  """
  if images.shape[1] != images.shape[2]:
    raise ValueError(f"rotation needs square images, got {images.shape[1:3]}")
  views = jnp.concatenate([jnp.rot90(images, k, axes=(1, 2)) for k in range(4)], axis=0)
  labels = jnp.repeat(jnp.arange(4, dtype=jnp.int32), images.shape[0])
  return views, labels


class Rotation(Objective):
  """4-way rotation classification on pooled features."""
  image_size: int = 32
  head_hidden: tuple = ()      # () = linear head, as in the probe-friendly variant
  crop_scale: tuple = (0.6, 1.0)
  flip_prob: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, encoder, batch, *, train, step):
    del step
    cfg = augment.default_view_config(
        crop_scale=tuple(self.crop_scale), flip_prob=self.flip_prob, jitter_prob=0.0,
        grayscale_prob=0.0)
    if train:
      images, _ = augment.view_augment(self.make_rng("augment"), batch, cfg,
                                       self.image_size)
    else:
      images = augment.eval_view(batch, self.image_size)
    views, labels = rotation_views(images)
    out = encoder(views, train=train)
    logits = MLP(tuple(self.head_hidden), 4, dtype=self.dtype, name="head")(
        out.pooled, train=train)
    b = images.shape[0]
    return ObjectiveOutput(
        loss=cross_entropy(logits, labels),
        metrics={"acc": accuracy(logits, labels)},
        probe_features=out.pooled[:b])
