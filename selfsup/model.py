"""The pretext model: one shared encoder, one or more weighted objectives, online probe.

`PretextModel.__call__(batch)` returns the weighted total loss, per-objective metrics and
host outputs. Parameters: `params/encoder`, `params/<objective name>`, `params/probe`.
Combining objectives (Doersch & Zisserman 2017) is therefore a config change: each
member builds its own views and heads on the same encoder, and the loss is the weighted
sum.
"""


import flax.linen as nn
import jax
import jax.numpy as jnp

import encoders
import objectives as objectives_lib
from objectives.base import accuracy, cross_entropy
from selfsup import augment


class PretextModel(nn.Module):
  encoder: nn.Module
  objectives: tuple          # unbound Objective templates
  names: tuple               # their names (also their parameter/state scopes)
  weights: tuple             # their loss weights
  num_classes: int = 0       # > 0: train an online linear probe on stop-gradient features
  image_size: int = 0        # the probe's view size when no objective gives features (0: as batched)

  @nn.compact
  def __call__(self, batch: dict, *, train: bool = True, step=0):
    total = jnp.zeros((), jnp.float32)
    metrics, host = {}, {}
    probe_features = None
    for name, template, weight in zip(self.names, self.objectives, self.weights):
      out = template.clone(parent=self, name=name)(self.encoder, batch, train=train, step=step)
      total = total + weight * out.loss
      metrics[f"{name}/loss"] = out.loss
      metrics.update({f"{name}/{k}": v for k, v in out.metrics.items()})
      if out.host is not None:
        host[name] = out.host
      if probe_features is None:
        probe_features = out.probe_features
    metrics["pretext_loss"] = total
    if self.num_classes and "label" in batch:
      if probe_features is None:
        images = augment.eval_view(batch, self.image_size or None)
        probe_features = self.encoder(images, train=False).pooled
      # Labels never reach the encoder: the probe sees stop-gradient features.
      logits = nn.Dense(self.num_classes, name="probe")(jax.lax.stop_gradient(probe_features))
      probe_loss = cross_entropy(logits, batch["label"])
      metrics["probe/loss"] = probe_loss
      metrics["probe/acc"] = accuracy(logits, batch["label"])
      total = total + probe_loss
    return total, metrics, host


def build_model(config, num_classes: int = 0, dataset_size: int = 0):
  """The PretextModel a config describes (also used by evals to rebuild the encoder)."""
  encoder = encoders.build_encoder(config.encoder, config.train.dtype,
                                   remat=config.train.get("remat", "none"),
                                   scan_blocks=config.train.get("scan_blocks", False))
  dtype = encoders.DTYPES[config.train.dtype]
  names, templates, weights = [], [], []
  for name, options in config.objectives.items():
    options = dict(options)
    weights.append(float(options.pop("weight", 1.0)))
    templates.append(objectives_lib.build_objective(
        name, options, image_size=config.data.image_size, dtype=dtype,
        dataset_size=dataset_size, total_steps=int(config.train.steps),
        batch_size=int(config.train.batch_size)))
    names.append(name)
  return PretextModel(encoder=encoder, objectives=tuple(templates), names=tuple(names),
                      weights=tuple(weights), num_classes=num_classes,
                      image_size=config.data.image_size)
