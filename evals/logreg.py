"""Linear probe on frozen features: multinomial logistic regression by L-BFGS.

The probe minimises, full batch,

  L(W, b) = sum_i [logsumexp(z_i) - z_i[y_i]] + l2 * ||W||_F^2,   z = x W + b,

with the bias left unregularised (EVALUATION.md, "Linear probe, L-BFGS"). This is
scikit-learn's `LogisticRegression(C=C)` objective with `l2 = 1 / (2 C)`, so the two
can be checked against each other on the same features.

The optimisation is `optax.lbfgs` with its zoom linesearch, driven by
`jax.lax.while_loop` inside one `jax.jit`: on an accelerator the whole solve is a single
device program with no host round-trip per iteration. The l2 strength, iteration cap and
tolerance are traced arguments, so an l2 sweep compiles once per problem shape; the
validation split is expressed as a 0/1 row mask over the full training matrix, so the
sweep and the final refit on train+val share that one compilation too.

References:
  Kolesnikov, Zhai and Beyer, "Revisiting Self-Supervised Visual Representation
  Learning", CVPR 2019 (L-BFGS logistic-regression probe on frozen features).
  Radford et al., "Learning Transferable Visual Models From Natural Language
  Supervision", ICML 2021 (L-BFGS probe with an l2 sweep on a held-out split).
  Liu and Nocedal, "On the limited memory BFGS method for large scale
  optimization", Mathematical Programming 45, 1989.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Gradient-norm tolerance (of the N-scaled loss) of the probe's fits.
PROBE_TOL = 1e-6

# Floor on per-feature standard deviations: constant (dead) features stay finite.
STD_FLOOR = 1e-6

# Refinement offsets (in decades) around the best grid value: the default grid has a
# two-decade step, so these fill it in at half-decade resolution.
REFINE_DECADES = (-1.0, -0.5, 0.5, 1.0)

# Consecutive iterations without an objective decrease after which L-BFGS gives up.
# Isolated non-decreasing steps are normal near convergence (the linesearch accepts
# approximate-Wolfe steps whose value ties in float32); long runs mean it is stuck.
STALL_PATIENCE = 10

# Full float32 matmuls: on GPUs the default precision may be TF32 (10-bit mantissa),
# which would put a floor under the gradient norm far above the stopping tolerance.
_PRECISION = jax.lax.Precision.HIGHEST


def _as_features(x: Any) -> jax.Array:
  return jnp.asarray(x, dtype=jnp.float32)


def _as_labels(y: Any) -> jax.Array:
  return jnp.asarray(y, dtype=jnp.int32)


@jax.jit
def _masked_moments(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-feature mean and floored std over the rows where `mask` is 1."""
  count = jnp.maximum(jnp.sum(mask), 1.0)
  mean = jnp.sum(mask[:, None] * x, axis=0) / count
  # Two-pass variance: one pass (E[x^2] - E[x]^2) cancels badly in float32.
  var = jnp.sum(mask[:, None] * jnp.square(x - mean), axis=0) / count
  return mean, jnp.maximum(jnp.sqrt(var), STD_FLOOR)


def standardize(train_x: Any, *others: Any) -> tuple[jax.Array, ...]:
  """Standardises features with the mean and std of `train_x`.

  Args:
    train_x: [N, D] training features; their statistics are used for every array.
    *others: further [M, D] arrays (validation, test) to transform the same way.

  Returns:
    A tuple `(train_x, *others)` of float32 arrays, each `(a - mean) / std`, where the
    std is floored at `STD_FLOOR` so that constant features map to 0. Always a tuple,
    also when no `others` are given.
  """
  train_x = _as_features(train_x)
  mean, std = _masked_moments(train_x, jnp.ones(train_x.shape[0], jnp.float32))
  return tuple((_as_features(a) - mean) / std for a in (train_x, *others))


def _objective(params, x, y, mask, l2):
  """Logistic loss over the masked rows plus l2 ||W||^2, divided by the row count.

  Dividing by N keeps the loss and gradient O(1) whatever the data size (better
  conditioned linesearch, a meaningful absolute gradient tolerance) and does not move
  the minimiser: it is the same problem with an effective l2 of l2 / N.
  """
  w, b = params
  logits = jnp.dot(x, w, precision=_PRECISION) + b
  nll = optax.losses.softmax_cross_entropy_with_integer_labels(logits, y)
  count = jnp.maximum(jnp.sum(mask), 1.0)
  return (jnp.sum(mask * nll) + l2 * jnp.sum(jnp.square(w))) / count


@jax.jit
def _fit_lbfgs(x, y, mask, l2, w0, b0, max_iter, tol):
  """Runs L-BFGS from (w0, b0) until converged, stalled or out of iterations.

  Follows the optax L-BFGS recipe: the linesearch stores the value and gradient at the
  accepted point in the optimiser state and `value_and_grad_from_state` reuses them, so
  each iteration costs only the linesearch's own function evaluations. The loop stops
  when the gradient norm falls below `tol`, after `max_iter` iterations, or after
  `STALL_PATIENCE` consecutive iterations without a strict decrease of the objective:
  in float32 that happens at the rounding floor of weakly regularised problems, where
  every linesearch then fails and spends its full budget of evaluations for nothing.

  Returns:
    ((w, b), num_iterations, gradient_norm, objective_value), all on device.
  """
  objective = functools.partial(_objective, x=x, y=y, mask=mask, l2=l2)
  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def step(carry):
    params, state, stalls = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(
        grad, state, params, value=value, grad=grad, value_fn=objective)
    decreased = optax.tree.get(state, 'value') < value
    stalls = jnp.where(decreased, 0, stalls + 1)
    return optax.apply_updates(params, updates), state, stalls

  def keep_going(carry):
    _, state, stalls = carry
    count = optax.tree.get(state, 'count')
    grad_norm = optax.tree.norm(optax.tree.get(state, 'grad'))
    # At count 0 the stored gradient is a zero placeholder, not the real one.
    return (count == 0) | ((count < max_iter) & (grad_norm >= tol)
                           & (stalls < STALL_PATIENCE))

  params = (w0, b0)
  params, state, _ = jax.lax.while_loop(
      keep_going, step, (params, solver.init(params), jnp.int32(0)))
  return (params, optax.tree.get(state, 'count'),
          optax.tree.norm(optax.tree.get(state, 'grad')),
          optax.tree.get(state, 'value'))


def _fit(x, y, mask, num_classes, l2, max_iter, tol, init):
  """Shared entry point: fixes dtypes so every call with one shape hits one trace."""
  if init is None:
    w0 = jnp.zeros((x.shape[1], num_classes), jnp.float32)
    b0 = jnp.zeros((num_classes,), jnp.float32)
  else:
    w0, b0 = (jnp.asarray(a, jnp.float32) for a in init)
    if w0.shape != (x.shape[1], num_classes) or b0.shape != (num_classes,):
      raise ValueError(
          f'init has shapes {w0.shape}, {b0.shape}; expected '
          f'{(x.shape[1], num_classes)}, {(num_classes,)}')
  return _fit_lbfgs(x, y, mask, jnp.float32(l2), w0, b0, jnp.int32(max_iter),
                    jnp.float32(tol))


def fit_logistic_regression(
    x: Any,
    y: Any,
    num_classes: int,
    l2: float,
    *,
    max_iter: int = 1000,
    tol: float = 1e-6,
    init: tuple[Any, Any] | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Fits multinomial logistic regression by full-batch L-BFGS.

  Minimises `sum_i [logsumexp(z_i) - z_i[y_i]] + l2 ||W||^2` with `z = x W + b` and an
  unregularised bias; scikit-learn's `LogisticRegression(C=C)` is the case
  `l2 = 1 / (2 C)`. Internally the loss is divided by N (same minimiser), and the
  stopping test is on the gradient norm of that scaled loss.

  Args:
    x: [N, D] features (standardise them first; see `standardize`).
    y: [N] integer labels in [0, num_classes).
    num_classes: number of classes K.
    l2: regularisation strength lambda >= 0 on ||W||_F^2 (traced: changing it does
      not recompile).
    max_iter: cap on L-BFGS iterations.
    tol: stop once the gradient norm of the N-scaled loss falls below this.
    init: optional warm start `(w [D, K], b [K])`, e.g. the solution for a nearby l2.

  Returns:
    `(w, b)`: float32 arrays of shapes [D, K] and [K].
  """
  x, y = _as_features(x), _as_labels(y)
  mask = jnp.ones(x.shape[0], jnp.float32)
  (w, b), *_ = _fit(x, y, mask, num_classes, l2, max_iter, tol, init)
  return w, b


@functools.partial(jax.jit, static_argnames=('ks',))
def _topk_correct(w, b, x, y, mask, ks):
  """Number of masked rows whose label is among the top-k logits, for each k."""
  logits = jnp.dot(x, w, precision=_PRECISION) + b
  _, top = jax.lax.top_k(logits, max(ks))
  hits = top == y[:, None]
  return tuple(jnp.sum(mask * jnp.any(hits[:, :k], axis=1)) for k in ks)


def _clamped_ks(ks: Sequence[int], num_classes: int) -> tuple[int, ...]:
  return tuple(min(int(k), num_classes) for k in ks)


def predict_topk_accuracy(
    w: Any, b: Any, x: Any, y: Any, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
  """Top-k accuracies (percent) of the linear classifier `x w + b`.

  Args:
    w: [D, K] weights.
    b: [K] biases.
    x: [N, D] features, standardised like the training features.
    y: [N] integer labels.
    ks: which top-k accuracies to report.

  Returns:
    `{'top1': ..., 'top5': ...}` (one `f'top{k}'` key per k) as python floats in
    percent. A k >= K is clamped to K, so e.g. 'top5' is 100.0 when there are at most
    5 classes: the key is always present, which keeps report schemas fixed.
  """
  w = _as_features(w)
  x, y = _as_features(x), _as_labels(y)
  mask = jnp.ones(x.shape[0], jnp.float32)
  counts = _topk_correct(w, _as_features(b), x, y, mask,
                         _clamped_ks(ks, w.shape[1]))
  return {f'top{k}': 100.0 * float(c) / max(x.shape[0], 1)
          for k, c in zip(ks, counts)}


def _stratified_val_mask(y: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
  """Boolean mask of a seeded, per-class random `val_fraction` of the rows.

  Each class contributes round(val_fraction * n_c) rows, but never all of its rows (a
  class with no training example could not be learnt), so singleton classes stay in
  training.
  """
  rng = np.random.default_rng(seed)
  val = np.zeros(y.shape[0], dtype=bool)
  for c in np.unique(y):
    rows = rng.permutation(np.flatnonzero(y == c))
    n_val = min(int(round(val_fraction * rows.size)), rows.size - 1)
    val[rows[:n_val]] = True
  return val


def linear_probe(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    *,
    num_classes: int | None = None,
    val_fraction: float = 0.2,
    l2_grid: Sequence[float] = 10.0 ** np.arange(-6, 7, 2),
    refine: bool = True,
    seed: int = 0,
    max_iter: int = 1000,
    val_mask: Any = None,
) -> dict[str, Any]:
  """L-BFGS linear probe with an l2 sweep on a held-out split (EVALUATION.md).

  1. Hold out a seeded, per-class random `val_fraction` of the training split.
  2. Standardise with the statistics of the remaining training rows; fit every l2 of
     `l2_grid`, from the largest down, each warm-started from the previous solution
     (a regularisation path: the strongly regularised problems are easy and each
     solution is a good start for the next).
  3. If `refine`, also fit best * 10^{-1, -0.5, 0.5, 1}, warm-started from the best.
  4. Pick the best validation top-1, ties going to the larger l2 (the simpler model).
  5. Re-standardise with all training rows, refit on train+val with that l2, and score
     the test split.

  Args:
    train_x: [N, D] training features.
    train_y: [N] integer training labels.
    test_x: [M, D] test features.
    test_y: [M] integer test labels.
    num_classes: K; defaults to 1 + the largest label seen.
    val_fraction: fraction of each class held out for the sweep.
    l2_grid: l2 strengths (lambda on ||W||^2 of the summed loss) to sweep.
    refine: whether to refine around the best grid value.
    seed: seed of the validation split.
    max_iter: L-BFGS iteration cap per fit.
    val_mask: optional [N] boolean: these training rows are the validation split
      (VTAB's val200) instead of a stratified random `val_fraction`.

  Returns:
    A JSON-serialisable dict: 'top1', 'top5' (test, percent; 'top5' is 100.0 with at
    most 5 classes), 'l2' (chosen), 'num_train', 'num_test', 'feature_dim',
    'num_classes', 'val_top1' (best validation top-1), 'num_iter' (L-BFGS iterations
    of the final refit), and 'sweep': [{'l2', 'val_top1'}, ...] sorted by l2.

  Raises:
    ValueError: on mismatched shapes, or when there is nothing to validate on but more
      than one l2 to choose from.
  """
  train_y_np = np.asarray(train_y).astype(np.int64).reshape(-1)
  test_y_np = np.asarray(test_y).astype(np.int64).reshape(-1)
  x = _as_features(train_x)
  x_test = _as_features(test_x)
  if x.ndim != 2 or x_test.ndim != 2 or x.shape[1] != x_test.shape[1]:
    raise ValueError(f'features must be [N, D] with the same D; got train {x.shape}, '
                     f'test {x_test.shape}')
  if x.shape[0] != train_y_np.size or x_test.shape[0] != test_y_np.size:
    raise ValueError(f'{x.shape[0]} train / {x_test.shape[0]} test features but '
                     f'{train_y_np.size} / {test_y_np.size} labels')
  if num_classes is None:
    num_classes = int(max(train_y_np.max(initial=0), test_y_np.max(initial=0))) + 1
  y = _as_labels(train_y_np)
  grid = sorted({float(l2) for l2 in np.atleast_1d(l2_grid)}, reverse=True)
  if not grid:
    raise ValueError('l2_grid is empty')

  if val_mask is not None:
    val_np = np.asarray(val_mask, bool).reshape(-1)
    if val_np.size != train_y_np.size:
      raise ValueError(f'val_mask has {val_np.size} rows, the training features '
                       f'{train_y_np.size}')
  else:
    val_np = _stratified_val_mask(train_y_np, val_fraction, seed)
  num_val = int(val_np.sum())
  if num_val == 0 and (len(grid) > 1 or refine):
    raise ValueError(
        f'val_fraction={val_fraction} leaves no validation rows out of '
        f'{train_y_np.size}; give a single-value l2_grid with refine=False instead')

  sweep = {}  # l2 -> (validation correct count, (w, b))
  best_l2 = grid[0]
  if num_val:
    val_mask = jnp.asarray(val_np, jnp.float32)
    fit_mask = 1.0 - val_mask
    mean, std = _masked_moments(x, fit_mask)
    xs = (x - mean) / std

    def evaluate(l2, init):
      params, *_ = _fit(xs, y, fit_mask, num_classes, l2, max_iter, PROBE_TOL, init)
      correct, = _topk_correct(*params, xs, y, val_mask, (1,))
      sweep[l2] = (int(correct), params)

    init = None
    for l2 in grid:
      evaluate(l2, init)
      init = sweep[l2][1]

    def best():
      # Highest validation accuracy; among equals the largest l2.
      return max(sweep, key=lambda l2: (sweep[l2][0], l2))

    if refine:
      center = best()
      for decades in REFINE_DECADES:
        l2 = center * 10.0 ** decades
        if not any(np.isclose(l2, seen, rtol=1e-6, atol=0.0) for seen in sweep):
          evaluate(l2, sweep[center][1])
    best_l2 = best()

  # Refit on everything; warm start from the chosen validation solution (the
  # standardisation shifts a little, but it is still far closer than zero).
  init = sweep[best_l2][1] if sweep else None
  mean, std = _masked_moments(x, jnp.ones(x.shape[0], jnp.float32))
  (w, b), num_iter, *_ = _fit((x - mean) / std, y,
                              jnp.ones(x.shape[0], jnp.float32), num_classes,
                              best_l2, max_iter, PROBE_TOL, init)
  test = predict_topk_accuracy(w, b, (x_test - mean) / std, test_y_np, ks=(1, 5))
  return {
      'top1': test['top1'],
      'top5': test['top5'],
      'l2': float(best_l2),
      'num_train': int(x.shape[0]),
      'num_test': int(x_test.shape[0]),
      'feature_dim': int(x.shape[1]),
      'num_classes': int(num_classes),
      'val_top1': (100.0 * sweep[best_l2][0] / num_val) if num_val else None,
      'num_iter': int(num_iter),
      'sweep': [{'l2': float(l2), 'val_top1': 100.0 * sweep[l2][0] / num_val}
                for l2 in sorted(sweep)],
  }
