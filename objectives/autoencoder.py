"""Denoising autoencoder (Vincent, Larochelle, Bengio & Manzagol 2008, "Extracting and
Composing Robust Features with Denoising Autoencoders", ICML 2008).

The encoder sees an image corrupted with Gaussian noise (`noise_std`, in [0, 1] pixel
units, clipped back to [0, 1]); a small decoder of transposed convolutions maps the
deepest feature map back to the image size, and the loss is the mean squared error
against the clean image (standardised pixels). A pretext objective of its own, and
G-SimCLR's first phase (Chakraborty et al. 2020, arXiv:2009.12007): its pooled latents
are k-means clustered to order the batches of the SimCLR phase (`selfsup.phases`).

Views: a light random crop (`crop_scale`) and flip, no colour change (the colours are
what is reconstructed). The reference G-SimCLR autoencoder is a small convolutional
network trained on the same CIFAR-10 images with noise factor 0.5; here the encoder is
whichever the config names (the G-SimCLR phase uses `config.clusters.encoder`, the tiny
CNN by default). No published linear-probe anchor exists for this objective.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from objectives.base import Objective, ObjectiveOutput
from selfsup import augment
from selfsup.errors import UserError


def upsampling_stages(map_size: int, out_size: int) -> int:
  """Number of x2 up-convolutions that take map_size to out_size (a power-of-2 ratio)."""
  n = 0
  while map_size * 2 ** n < out_size:
    n += 1
  if map_size * 2 ** n != out_size:
    raise UserError(f"objective autoencoder: the deepest feature map ({map_size} px) does not "
                    f"reach the image size {out_size} by doublings; use an image size that "
                    "is a power-of-2 multiple of it")
  return n


def reconstruction_loss(pred, target) -> jax.Array:
  """Mean squared error over pixels and channels, in float32."""
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))


class Decoder(nn.Module):
  """Deepest map -> (ConvTranspose x2 + BN + ReLU) stages -> 3 linear channels."""
  out_size: int
  width: int = 128
  min_width: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    stages = upsampling_stages(x.shape[1], self.out_size)
    for i in range(stages - 1):
      x = nn.ConvTranspose(max(self.min_width, self.width // 2 ** i), (4, 4), strides=(2, 2),
                           padding="SAME", use_bias=False, dtype=self.dtype)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9,
                               dtype=self.dtype)(x))
    strides = (2, 2) if stages else (1, 1)
    x = nn.ConvTranspose(3, (4, 4), strides=strides, padding="SAME", dtype=self.dtype)(x)
    return x.astype(jnp.float32)


class Autoencoder(Objective):
  image_size: int = 32
  noise_std: float = 0.5             # Gaussian corruption, [0, 1] pixel units
  crop_scale: tuple = (0.5, 1.0)
  flip_prob: float = 0.5
  decoder_width: int = 128
  dtype: Any = jnp.float32

  def validate(self, *, image_size, dataset, batch_size=0):
    del image_size, dataset, batch_size
    if self.noise_std < 0:
      raise UserError(f"objective autoencoder: noise_std={self.noise_std} must be >= 0")
    if self.decoder_width < 1:
      raise UserError(f"objective autoencoder: decoder_width={self.decoder_width} must be >= 1")

  @nn.compact
  def __call__(self, encoder, batch, *, train, step):
    del step
    if train:
      cfg = augment.default_view_config(
          crop_scale=tuple(self.crop_scale), flip_prob=self.flip_prob, jitter_prob=0.0,
          grayscale_prob=0.0, normalize=False)
      key_view, key_noise = jax.random.split(self.make_rng("augment"))
      clean, _ = augment.view_augment(key_view, batch, cfg, self.image_size)
    else:
      clean = augment.eval_view(batch, self.image_size, normalize=False)
      key_noise = (self.make_rng("augment") if self.has_rng("augment")
                   else jax.random.PRNGKey(0))
    noisy = jnp.clip(clean + self.noise_std * jax.random.normal(key_noise, clean.shape),
                     0.0, 1.0)
    out = encoder(augment.normalize(noisy), train=train)
    deepest = out.maps[max(out.maps)]
    pred = Decoder(self.image_size, self.decoder_width, dtype=self.dtype, name="decoder")(
        deepest, train=train)
    loss = reconstruction_loss(pred, augment.normalize(clean))
    return ObjectiveOutput(loss=loss, metrics={"rec_loss": loss}, probe_features=out.pooled)
