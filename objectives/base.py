"""The Objective seam: what every pretext objective provides to the trainer.

An objective is a Flax module. Its fields are its configuration; in `__call__` it turns a
uint8 batch into views on the device (with the `augment` PRNG stream), runs the shared
encoder it is handed, applies its own heads, and returns an `ObjectiveOutput`. Its heads'
parameters live under `params/<name>`; its non-gradient state (queues, prototypes, fixed
target tables, EMA teachers, vocabularies) lives in the `objective_state/<name>`
collection, created with `self.variable("objective_state", ...)`, mutable during
training and checkpointed with everything else.

Three optional hooks cover what cannot be a gradient step:
- `post_update(state, params, step)`: pure and jitted, after the optimizer step
  (EMA teachers, momentum schedules, prototype re-normalisation).
- `post_update_params(params, old_params, step)`: pure and jitted, after the optimizer
  step, on the objective's own head parameters (`params/<name>`) with their values
  before the step: projections such as SwAV's unit-norm, frozen-at-first prototypes.
- `host_update(state, host_outputs, step, ctx)`: NumPy/SciPy on the host between steps,
  fed by the `host` arrays the objective returned (for work that cannot be jitted; no
  objective needs it at present: NAT's Hungarian reassignment runs in its step). It
  receives the device arrays (read them with `selfsup.distributed.to_host`, or
  `RowReader` for a few rows of a large table: with one process that is `np.asarray`,
  which fetches only what is read, and with several they gather what spans processes;
  copy before writing) and returns the state object unchanged when it has nothing
  to do, or a new state that the trainer puts back on the devices.
- `optimizer_groups()`: extra parameter groups with their own optimizer, e.g. a GAN
  discriminator, as {label: (path predicate, optax transform builder)}.
- `images(encoder, batch, key)`: what the objective does, as pictures (masked modeling:
  originals, masked inputs, reconstructions). Called bound, outside the jitted step,
  every `config.train.image_every` steps (`objective_images`); the trainer writes the
  grid as a PNG to `WORKDIR/images/` and to TensorBoard. Objectives that have pictures
  set `has_images = True` and define their submodules in `setup()` so both `__call__`
  and `images` reach them.
Evaluation may read an objective's features its own way: `eval_features(encoder_fn,
images)` (default None: whole images), e.g. context prediction's grid of patches.
The trainer never names a specific objective; objectives never mention devices.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


class ObjectiveOutput(NamedTuple):
  """What one objective's forward pass gives back.

  loss: scalar to minimise (before the combination weight).
  metrics: scalars to log (prefixed with the objective's name by the model).
  probe_features: (B, D) pooled encoder features of a view aligned with `batch["label"]`,
    reused by the online probe so it costs no extra forward pass; None if there is none.
  host: arrays the objective's `host_update` needs on the host (None if it has no hook).
  """
  loss: jax.Array
  metrics: dict
  probe_features: Any = None
  host: Any = None


class Objective(nn.Module):
  """Base class; subclasses define fields (their config) and `__call__`."""

  # Whether examples must carry stable dataset indices (NAT's per-example targets).
  needs_stable_indices = False
  # Whether `host_update` must run between steps.
  has_host_hook = False
  # Whether `images` returns pictures of what the objective does.
  has_images = False

  def __call__(self, encoder, batch: dict, *, train: bool, step) -> ObjectiveOutput:
    raise NotImplementedError

  # Hooks (plain methods: called on the unbound template with explicit pytrees).
  def post_update(self, state: dict, params: dict, step) -> dict:
    del params, step
    return state

  def post_update_params(self, params: dict, old_params: dict, step) -> dict:
    del old_params, step
    return params

  def host_update(self, state: dict, host: dict, step: int, ctx: "HostContext") -> dict:
    del host, step, ctx
    return state

  def optimizer_groups(self) -> dict:
    return {}

  def images(self, encoder, batch: dict, key) -> dict:
    """{row name: float (N, H, W, 3) in [0, 1]} to look at (bound; see module docstring)."""
    del encoder, batch, key
    return {}

  def validate(self, *, image_size: int, dataset, batch_size: int = 0) -> None:
    """Raises UserError when the objective cannot run on this data (called at start-up).

    batch_size: the global batch (0 = not known).
    """
    del image_size, dataset, batch_size

  def eval_features(self, encoder_fn, images):
    """How this objective's paper reads its encoder's features for evaluation.

    Args:
      encoder_fn: float images (N, h, w, 3) as this objective feeds the encoder ->
        pooled features (N, D) (frozen: BatchNorm in inference mode).
      images: uint8 (B, H, W, 3) evaluation images (resize + centre crop).

    Returns:
      (B, D) features, or None (the default): no protocol of its own, the probe feeds
      whole normalised images. Used by `python -m evals.linear_probe --features
      objective`; the default `--features image` ignores it so objectives compare on
      one protocol. Pure and jittable; called on the unbound template.
    """
    del encoder_fn, images
    return None


class _Images(nn.Module):
  """Binds one objective of a PretextModel (same parameter paths) to call its `images`."""
  encoder: nn.Module
  template: nn.Module
  objective_name: str

  @nn.compact
  def __call__(self, batch, key):
    objective = self.template.clone(parent=self, name=self.objective_name)
    return objective.images(self.encoder, batch, key)


def objective_images(model, variables: dict, batch: dict, key) -> dict:
  """{objective name: uint8 grid (rows of images side by side)} for every objective of
  `model` (a PretextModel) with `has_images`; pure, jittable (eval mode)."""
  out = {}
  for name, template in zip(model.names, model.objectives):
    if template.has_images:
      rows = _Images(model.encoder, template, name).apply(variables, batch, key)
      out[name] = image_grid([rows[k] for k in rows])
  return out


def image_grid(rows, pad: int = 2) -> jax.Array:
  """Rows of (N, H, W, 3) float images in [0, 1] -> one uint8 (R(H+pad)+pad, ..., 3) grid."""
  n, h, w, _ = rows[0].shape
  grid = jnp.ones((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), jnp.float32)
  for r, row in enumerate(rows):
    for i in range(n):
      y, x = pad + r * (h + pad), pad + i * (w + pad)
      grid = grid.at[y:y + h, x:x + w].set(jnp.clip(row[i].astype(jnp.float32), 0, 1))
  return jnp.round(grid * 255).astype(jnp.uint8)


def require_negatives(name: str, batch_size: int) -> None:
  """One line (UserError) for a contrastive objective whose global batch has no negatives:
  every other image of the batch is a negative, so it needs at least two images."""
  if 0 < batch_size < 2:
    from selfsup.errors import UserError
    raise UserError(f"objective {name} is contrastive and needs negatives from the global "
                    f"batch: config.train.batch_size={batch_size}; use at least 2")


@dataclasses.dataclass
class HostContext:
  """What the trainer tells a host hook about the run."""
  steps_per_epoch: int
  dataset_size: int


def cross_entropy(logits, labels):
  """Mean softmax cross-entropy with integer labels, in float32."""
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def l2_normalize(x, eps: float = 1e-12):
  """Rows scaled to unit L2 norm (a zero row stays zero): embeddings on the sphere."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def accuracy(logits, labels):
  return jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))


class MLP(nn.Module):
  """Linear(+BN+ReLU) hidden layers then a linear output; the SimCLR projection shape."""
  hidden: tuple
  out: int
  use_bn: bool = True
  out_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    for width in self.hidden:
      x = nn.Dense(width, use_bias=not self.use_bn, dtype=self.dtype)(x)
      if self.use_bn:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
      x = nn.relu(x)
    return nn.Dense(self.out, use_bias=self.out_bias, dtype=self.dtype)(x).astype(jnp.float32)


Predicate = Callable[[tuple], bool]
