"""Optimisers and learning-rate schedules from optax, with parameter groups.

Groups: `main` (encoder and pretext heads), `probe` (the online probe: its own learning
rate, no weight decay, as in EVALUATION.md), and any group an objective declares (e.g. a
GAN discriminator with its own optimizer). BatchNorm parameters and biases are excluded
from weight decay and from LARS/LAMB trust-ratio adaptation, as in SimCLR/BYOL.
"""

import sys

import jax
import optax
from flax import traverse_util

from selfsup.errors import UserError, unknown_name

OPTIMIZERS = ("sgd", "lars", "adamw", "lamb")


def warn(text: str) -> None:
  """One warning line on stderr (process 0 only)."""
  if jax.process_index() == 0:
    print(f"warning: {text}", file=sys.stderr)

SCHEDULES = ("cosine", "constant", "step")


def learning_rate(cfg, batch_size: int, total_steps: int):
  """Peak lr = base_lr x batch/256 when `scale_with_batch`; warmup then the schedule."""
  peak = cfg.lr * (batch_size / 256.0 if cfg.scale_with_batch else 1.0)
  warmup = int(cfg.warmup_steps)
  if cfg.schedule not in SCHEDULES:
    raise unknown_name("schedule", cfg.schedule, SCHEDULES)
  if warmup < 0:
    raise UserError(f"optimizer.warmup_steps must be >= 0, got {warmup}")
  if warmup >= total_steps and total_steps > 0:
    # A shipped config shortened for a smoke test (--config.train.steps=6) keeps its
    # warmup of N epochs in steps; clamp it to a tenth of the run instead of failing.
    clamped = total_steps // 10
    warn(f"optimizer.warmup_steps={warmup} is not below train.steps={total_steps}; "
         f"warming up for {clamped} steps (a tenth of the run) instead")
    warmup = clamped
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1),
                                              end_value=0.0)
  if cfg.schedule == "step":
    # RotNet-style: multiply by `step_factor` at the given fractions of training.
    boundaries = {int(f * total_steps): cfg.step_factor for f in cfg.step_fractions}
    decay = optax.piecewise_constant_schedule(peak, boundaries)
  else:
    decay = optax.constant_schedule(peak)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _decay_mask(params):
  """True for weights that get decay/adaptation: not biases, not BatchNorm/LayerNorm."""
  flat = traverse_util.flatten_dict(params)
  def keep(path):
    leaf = path[-1]
    in_norm = any(p.startswith(("BatchNorm", "LayerNorm", "ln")) for p in path[:-1])
    return not (leaf in ("bias", "scale") or in_norm or leaf in ("pos_embed", "cls"))
  return traverse_util.unflatten_dict({k: keep(k) for k in flat})


def _base_optimizer(cfg, lr):
  name = cfg.name
  if name not in OPTIMIZERS:
    raise unknown_name("optimizer", name, OPTIMIZERS)
  wd = float(cfg.weight_decay)
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(wd, mask=_decay_mask),
                       optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
  if name == "lars":
    return optax.lars(lr, weight_decay=wd, weight_decay_mask=_decay_mask,
                      trust_coefficient=cfg.trust_coefficient, momentum=cfg.momentum,
                      nesterov=cfg.nesterov, trust_ratio_mask=_decay_mask)
  if name == "adamw":
    return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=wd, mask=_decay_mask)
  return optax.lamb(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=wd, mask=_decay_mask)


def param_labels(params, extra_groups: dict):
  """Labels every leaf `main`, `probe` or an objective's own group name."""
  flat = traverse_util.flatten_dict(params)
  labels = {}
  for path in flat:
    label = "main"
    if path[0] == "probe":
      label = "probe"
    for group, (predicate, _) in extra_groups.items():
      if predicate(path):
        label = group
    labels[path] = label
  return traverse_util.unflatten_dict(labels)


def build_optimizer(cfg, *, batch_size: int, total_steps: int, extra_groups: dict):
  """Returns (optax transform, main lr schedule).

  extra_groups: {label: (predicate(path) -> bool, builder(total_steps) -> transform)}.
  """
  lr = learning_rate(cfg, batch_size, total_steps)
  main = _base_optimizer(cfg, lr)
  probe = optax.sgd(optax.cosine_decay_schedule(cfg.probe_lr, max(total_steps, 1)),
                    momentum=0.9, nesterov=True)
  transforms = {"main": main, "probe": probe}
  for label, (_, builder) in extra_groups.items():
    transforms[label] = builder(total_steps)
  tx = optax.multi_transform(transforms, lambda p: param_labels(p, extra_groups))
  if cfg.grad_clip and cfg.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
  return tx, lr
