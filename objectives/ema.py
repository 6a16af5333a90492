"""EMA teachers for BYOL-style objectives (OBoW, PixPro, and any later one).

A teacher is an exponential moving average of some of the student's parameters, kept in
the objective's `objective_state` (so it is checkpointed, restored and sharded with the
rest of the state, and no optimizer ever sees it) and updated after every optimizer
step in the objective's `post_update(state, params, step)`.

How a teacher finds the parameters it follows. `post_update` receives the *whole*
parameter tree (`params/encoder`, `params/<objective>`, `params/probe`) on the unbound
objective template, which does not know its own scope name. So a teacher is stored as a
*mirror* of the parameter paths it follows: `{"encoder": <encoder params>}` for an
encoder teacher, `{"encoder": ..., "pixpro": {"projector": ...}}` when the objective's
own projector is followed too. `ema_update` walks the teacher's keys into `params`; the
teacher's structure is the only bookkeeping, and nothing else needs to know it.
`mirror(module_path, tree)` builds that structure in `__call__` at init (where the
objective knows `self.path`).

The momentum follows BYOL's cosine schedule from `base` (0.99 in OBoW and PixPro) to 1.0
over the run: m(t) = 1 - (1 - base) (cos(pi t / T) + 1) / 2 (Grill et al. 2020, eq. 7 of
the appendix; OBoW's `_get_momentum_alpha`; PixPro's `momentum_update`).

The teacher network runs as the student's module definition applied to the teacher's
parameters (`apply_teacher`), in training mode (batch statistics, as the references'
teachers, which are deep copies of the student in `train()` mode); the BatchNorm
statistics it would update are thrown away, and its output is a `stop_gradient`.
"""

import math

import jax
import jax.numpy as jnp


def cosine_momentum(step, total_steps: int, base: float = 0.99):
  """BYOL's schedule: `base` at step 0, rising on a half cosine to 1.0 at `total_steps`.

  Args:
    step: the step just trained (int or traced int scalar).
    total_steps: the run's length (>= 1); steps beyond it stay at 1.0.
    base: the momentum at step 0.

  Returns:
    float32 scalar momentum in [base, 1].
  """
  t = jnp.minimum(jnp.asarray(step, jnp.float32) / max(int(total_steps), 1), 1.0)
  return (1.0 - (1.0 - base) * (jnp.cos(math.pi * t) + 1.0) / 2.0).astype(jnp.float32)


def select_like(params, like):
  """The sub-tree of `params` at the paths of `like` (a nested dict mirroring them)."""
  if isinstance(like, dict) or hasattr(like, "keys"):
    return {k: select_like(params[k], like[k]) for k in like}
  return params


def ema_update(teacher, params, momentum):
  """teacher <- momentum * teacher + (1 - momentum) * student, leaf by leaf.

  Args:
    teacher: the teacher, a mirror of the parameter paths it follows (see above).
    params: the whole parameter tree after the optimizer step (or the exact sub-tree).
    momentum: scalar in [0, 1].

  Returns:
    The new teacher (float32 leaves, the teacher's dtype).
  """
  student = select_like(params, teacher)
  m = jnp.asarray(momentum, jnp.float32)
  return jax.tree.map(lambda t, s: (m * t + (1.0 - m) * s.astype(t.dtype)).astype(t.dtype),
                      teacher, student)


def mirror(path, tree):
  """`tree` nested under the keys of `path`: mirror(("pixpro", "projector"), p) ->
  {"pixpro": {"projector": p}}; a copy of the student that `ema_update` can follow."""
  for key in reversed(tuple(path)):
    tree = {key: tree}
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def merge(*trees):
  """Deep merge of nested dicts with disjoint leaves (several mirrors into one teacher)."""
  out = {}
  for tree in trees:
    for k, v in tree.items():
      out[k] = merge(out[k], v) if k in out and isinstance(v, dict) else v
  return out


def lookup(tree, path):
  """The sub-tree of a mirror at `path` (the inverse of `mirror`)."""
  for key in path:
    tree = tree[key]
  return tree


def apply_teacher(module, teacher_params, *args, batch_stats=None, **kwargs):
  """Runs `module` (a bound or unbound student sub-module) with the teacher's parameters.

  The module definition is cloned unbound, applied in whatever mode `kwargs` ask for
  (the objectives pass `train=True`: batch statistics), with the BatchNorm statistics it
  updates discarded, and the result is a `stop_gradient` (the teacher gets no gradient).

  Args:
    module: the student's module (e.g. the encoder handed to the objective).
    teacher_params: the teacher's parameters for that module.
    batch_stats: the module's BatchNorm statistics, when it has any (unused in training
      mode but required to exist); None for a module without BatchNorm.
  """
  unbound = module.clone(parent=None)
  variables = {"params": teacher_params}
  if batch_stats is not None:
    variables["batch_stats"] = batch_stats
  out, _ = unbound.apply(variables, *args, mutable=["batch_stats"], **kwargs)
  return jax.lax.stop_gradient(out)


def module_batch_stats(module):
  """The bound module's `batch_stats` collection, or None when it has none."""
  stats = module.variables.get("batch_stats") if hasattr(module.variables, "get") else None
  return stats if stats else None
