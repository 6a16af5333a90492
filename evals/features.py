"""Frozen features: rebuild an encoder from a run directory and embed images.

Features are the encoder's pooled output with BatchNorm in inference mode, on images
preprocessed exactly as the objectives feed the encoder (scaled to [0, 1], normalised),
at the run's image size.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from selfsup import augment
from selfsup.errors import UserError


def encoder_variables(state: dict) -> dict:
  """The encoder's variables out of a train-state pytree."""
  variables = {"params": state["params"]["encoder"]}
  stats = state.get("batch_stats", {})
  if stats and "encoder" in stats:
    variables["batch_stats"] = stats["encoder"]
  return variables


def random_init_variables(encoder, image_size: int, seed: int = 0) -> dict:
  """Freshly initialised variables of `encoder`'s architecture: the random-init baseline.

  The standard initialisation, not the training one: an encoder with a
  `zero_init_residual` field (ResNet) is initialised with it off, so every residual
  block's last BatchNorm scale is 1 and the baseline is the whole network, not only its
  stem and projection shortcuts. The variables' structure and shapes are the same.
  """
  if getattr(encoder, "zero_init_residual", False):
    encoder = encoder.clone(zero_init_residual=False)
  dummy = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
  return dict(encoder.init(jax.random.PRNGKey(seed), dummy, train=False))


def extract_features(encoder, variables, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
  """(N, H, W, 3) uint8 -> (N, D) float32 pooled features, in fixed-size batches.

  The last batch is padded to `batch_size` so the function compiles once.
  """
  @functools.partial(jax.jit)
  def embed(variables, x):
    x = augment.eval_view(x)
    return encoder.apply(variables, x, train=False).pooled

  n = images.shape[0]
  out = []
  for start in range(0, n, batch_size):
    chunk = images[start:start + batch_size]
    pad = batch_size - chunk.shape[0]
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    out.append(np.asarray(embed(variables, chunk))[:batch_size - pad])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def load_encoder(workdir: str, step: int | None = None):
  """(config, encoder module, variables at the newest readable or given checkpoint, step).

  Without `step`, a damaged newest checkpoint (truncated array file, missing metadata,
  empty step folder) is skipped with a warning naming it and why, and the newest
  readable one is used. A given `step` must exist (the error lists those that do).
  """
  import sys

  import encoders
  from selfsup import checkpoint as ckpt_lib
  from selfsup.workdir import load_config
  config = load_config(workdir)
  encoder = encoders.build_encoder(config.encoder, "float32")
  ckdir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckdir):
    raise UserError(f"{workdir} has no checkpoints/ folder; train first or pass the run's --workdir")
  checkpointer = ckpt_lib.Checkpointer(ckdir, async_save=False, read_only=True)
  try:
    if step is None:
      step, state, skipped = checkpointer.restore_state_newest()
      if step is None:
        raise UserError(f"{ckdir} holds no complete checkpoint")
      for bad, reason in skipped:
        print(f"warning: skipped damaged checkpoint step {bad} in {ckdir} ({reason}); "
              f"using step {step}", file=sys.stderr)
    else:
      available = checkpointer.steps()
      if step not in available:
        raise UserError(f"--step {step}: {ckdir} has no checkpoint for that step; available "
                        f"steps: {', '.join(map(str, available)) or 'none'}")
      try:
        state = checkpointer.restore_state_only(step)
      except Exception as e:  # noqa: BLE001 - a damaged step the user asked for by name
        raise UserError(f"--step {step}: the checkpoint cannot be read "
                        f"({ckpt_lib.short_reason(e)}); other steps: "
                        f"{', '.join(str(s) for s in available if s != step) or 'none'}") from e
  finally:
    checkpointer.close()
  variables = encoder_variables(state)
  expected = jax.eval_shape(lambda: random_init_variables(encoder, config.data.image_size))
  _check_same_structure(expected, variables, config.encoder.name)
  return config, encoder, variables, step


def _check_same_structure(expected, got, name):
  exp = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(expected)}
  have = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(got)}
  if exp != have:
    missing = sorted(set(exp) - set(have))[:3]
    raise UserError(f"the checkpoint's encoder weights do not match encoder {name!r} "
                    f"(e.g. {missing or 'shapes differ'}); it was made with another encoder")
