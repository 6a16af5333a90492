"""Non-parametric probes on frozen features: weighted kNN and few-shot ridge regression.

From the command line (one JSON object, like the linear probe):

    python -m evals.knn --checkpoint DIR --dataset SOURCE [--k 20] [--temperature 0.07]
    python -m evals.fewshot --checkpoint DIR --dataset SOURCE [--shots 1,5,10,25]

Both take precomputed features and integer labels and return accuracies in percent as
python floats (EVALUATION.md, "Weighted kNN" and "Few-shot ridge regression").

References:
  Wu, Xiong, Yu and Lin, "Unsupervised Feature Learning via Non-Parametric Instance
  Discrimination", CVPR 2018 (weighted kNN with exp(s / T) votes).
  Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021
  (k = 20, T = 0.07).
  big_vision `evaluators/fewshot_lsr.py` (few-shot least-squares regression with a bias
  column of 100, {-1, 1} targets, l2 = 2^10, eigendecomposition of the smaller Gram
  matrix).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from objectives.base import l2_normalize

# The bias column of the few-shot regression: large, so its weight is almost
# unregularised by the shared ridge penalty (big_vision's BIAS_CONSTANT).
FEWSHOT_BIAS = 100.0

# Added to the few-shot standard deviation, as in big_vision (not a floor): with one or
# a few shots per class some features are constant.
FEWSHOT_STD_EPS = 1e-5

# Full float32 matmuls: GPUs may default to TF32, which reorders near-tied neighbours
# and degrades the few-shot Gram matrix.
_PRECISION = jax.lax.Precision.HIGHEST


def _num_classes(num_classes: int | None, *labels: np.ndarray) -> int:
  if num_classes is not None:
    return int(num_classes)
  return int(max(np.max(y, initial=0) for y in labels)) + 1


@functools.partial(jax.jit, static_argnames=('k', 'num_classes', 'batch_size'))
def _knn_correct(train_x, train_y, test_x, test_y, temperature, *, k, num_classes,
                 batch_size):
  """Counts test rows whose label is the top-1 / among the top-5 kNN class scores.

  The test set is padded to a multiple of `batch_size` and scanned with `lax.map`, so
  only a [batch_size, N_train] similarity block is alive at a time and the whole
  evaluation is one device program.
  """
  train_x = l2_normalize(train_x)
  num_test = test_x.shape[0]
  num_batches = -(-num_test // batch_size)
  pad = num_batches * batch_size - num_test
  test_x = jnp.pad(l2_normalize(test_x), ((0, pad), (0, 0)))
  test_y = jnp.pad(test_y, (0, pad))
  valid = jnp.arange(num_batches * batch_size) < num_test
  num_ranked = min(5, num_classes)

  def one_batch(batch):
    x, y, keep = batch
    sims = jnp.dot(x, train_x.T, precision=_PRECISION)
    top_sims, top_idx = jax.lax.top_k(sims, k)
    votes = jnp.exp(top_sims / temperature)
    # Scatter-add rather than a [batch, k, classes] one-hot: stays small with 20k
    # classes.
    rows = jnp.arange(batch_size)[:, None]
    scores = jnp.zeros((batch_size, num_classes), votes.dtype)
    scores = scores.at[rows, train_y[top_idx]].add(votes)
    _, ranked = jax.lax.top_k(scores, num_ranked)
    hits = ranked == y[:, None]
    return (jnp.sum(keep & hits[:, 0]), jnp.sum(keep & jnp.any(hits, axis=1)))

  shape = (num_batches, batch_size)
  top1, top5 = jax.lax.map(
      one_batch, (test_x.reshape(*shape, -1), test_y.reshape(shape),
                  valid.reshape(shape)))
  return jnp.sum(top1), jnp.sum(top5)


def knn_classify(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    batch_size: int = 1024,
) -> dict[str, float]:
  """Weighted k-nearest-neighbour classification (Wu et al. 2018).

  Features are L2-normalised; each test point takes its k most cosine-similar training
  points, each voting for its class with weight exp(s / T); the class scores are the
  summed votes.

  Args:
    train_x: [N, D] training features.
    train_y: [N] integer training labels.
    test_x: [M, D] test features.
    test_y: [M] integer test labels.
    k: neighbours per test point (clamped to N).
    temperature: T of the exp(s / T) vote weights.
    num_classes: K; defaults to 1 + the largest label seen.
    batch_size: test rows per similarity block (memory: batch_size x N floats).

  Returns:
    `{'top1': ..., 'top5': ...}` in percent; 'top5' is 100.0 with at most 5 classes.
  """
  train_y = np.asarray(train_y).reshape(-1)
  test_y = np.asarray(test_y).reshape(-1)
  num_classes = _num_classes(num_classes, train_y, test_y)
  train_x = jnp.asarray(train_x, jnp.float32)
  test_x = jnp.asarray(test_x, jnp.float32)
  num_test = test_x.shape[0]
  if train_x.shape[0] == 0 or num_test == 0:
    raise ValueError(f'kNN needs training and test rows; got {train_x.shape[0]} '
                     f'and {num_test}')
  top1, top5 = _knn_correct(
      train_x, jnp.asarray(train_y, jnp.int32), test_x,
      jnp.asarray(test_y, jnp.int32), jnp.float32(temperature),
      k=min(int(k), train_x.shape[0]), num_classes=num_classes,
      batch_size=max(1, min(int(batch_size), num_test)))
  return {'top1': 100.0 * int(top1) / max(num_test, 1),
          'top5': 100.0 * int(top5) / max(num_test, 1)}


@functools.partial(jax.jit, static_argnames=('num_classes',))
def _fewshot_ridge_correct(x, y, mask, test_x, test_y, l2, *, num_classes):
  """Test top-1 count of few-shot ridge regression (big_vision fewshot_lsr).

  With a bias column appended, solves W = argmin ||X W - T||^2 + l2 ||W||^2 for
  T = 2 onehot(y) - 1 through whichever Gram matrix is smaller:
    N >= D:  W = (X^T X + l2 I)^-1 X^T T,
    N <  D:  W = X^T (X X^T + l2 I)^-1 T,
  each via the eigendecomposition Q diag(e) Q^T of that Gram matrix.

  Rows with `mask` 0 are padding: they are left out of the statistics and zeroed
  (features, bias and targets), which leaves both formulas' W exactly unchanged, so
  every shot count can share one padded shape and one compilation.
  """
  count = jnp.sum(mask)
  mean = jnp.sum(mask[:, None] * x, axis=0) / count
  var = jnp.sum(mask[:, None] * jnp.square(x - mean), axis=0) / count
  std = jnp.sqrt(var) + FEWSHOT_STD_EPS

  def prepare(a):
    a = (a - mean) / std
    return jnp.pad(a, ((0, 0), (0, 1)), constant_values=FEWSHOT_BIAS)

  x = mask[:, None] * prepare(x)
  test_x = prepare(test_x)
  targets = mask[:, None] * (2.0 * jax.nn.one_hot(y, num_classes) - 1.0)
  dot = functools.partial(jnp.dot, precision=_PRECISION)
  if x.shape[0] >= x.shape[1]:
    eigs, q = jnp.linalg.eigh(dot(x.T, x))
    lhs, rhs = q, dot(q.T, dot(x.T, targets))
  else:
    eigs, q = jnp.linalg.eigh(dot(x, x.T))
    lhs, rhs = dot(x.T, q), dot(q.T, targets)
  w = dot(lhs / (eigs + l2)[None, :], rhs)
  return jnp.sum(jnp.argmax(dot(test_x, w), axis=1) == test_y)


def fewshot_ridge(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    *,
    shots: Sequence[int] = (1, 5, 10, 25),
    seeds: Sequence[int] = (0, 1, 2),
    l2: float = 2.0**10,
    num_classes: int | None = None,
) -> dict[str, float]:
  """Few-shot linear regression probe, as big_vision's `fewshot_lsr`.

  For each seed, every class's training rows are permuted with
  `np.random.default_rng(seed)` (classes in increasing order, one generator per seed)
  and the first `shots` of each are taken (all of them for a class with fewer). The
  features are standardised with those rows' statistics (std + 1e-5), a bias column of
  100 is appended, the targets are 2 onehot - 1, the ridge solution with penalty `l2`
  is computed in closed form, and test points take the argmax.

  Args:
    train_x: [N, D] training features to draw the shots from.
    train_y: [N] integer training labels.
    test_x: [M, D] test features.
    test_y: [M] integer test labels.
    shots: examples per class.
    seeds: one draw of the shots per seed.
    l2: ridge penalty.
    num_classes: K; defaults to 1 + the largest label seen.

  Returns:
    `{f'{n}shot': mean top-1 over seeds}` in percent for each n in `shots`, plus
    `{f'{n}shot_std': standard deviation over seeds}`.
  """
  train_y = np.asarray(train_y).reshape(-1)
  test_y = np.asarray(test_y).reshape(-1)
  num_classes = _num_classes(num_classes, train_y, test_y)
  train_x = np.asarray(train_x, np.float32)
  test_x_dev = jnp.asarray(test_x, jnp.float32)
  test_y_dev = jnp.asarray(test_y, jnp.int32)
  num_test = max(test_y.size, 1)
  class_sizes = np.bincount(train_y, minlength=num_classes)[:num_classes]
  # Every draw is padded to the largest one: one compiled solve for all shot counts
  # (a new shape costs seconds of GEMM autotuning on a GPU, the solve milliseconds).
  padded = int(np.minimum(class_sizes, max(shots)).sum())
  per_shot = {n: [] for n in shots}
  for seed in seeds:
    rng = np.random.default_rng(seed)
    class_rows = [rng.permutation(np.flatnonzero(train_y == c))
                  for c in range(num_classes)]
    for n in shots:
      rows = np.concatenate([r[:n] for r in class_rows])
      pad = padded - rows.size
      correct = _fewshot_ridge_correct(
          jnp.asarray(np.pad(train_x[rows], ((0, pad), (0, 0)))),
          jnp.asarray(np.pad(train_y[rows], (0, pad)), jnp.int32),
          jnp.asarray(np.arange(padded) < rows.size, jnp.float32),
          test_x_dev, test_y_dev, jnp.float32(l2), num_classes=num_classes)
      per_shot[n].append(100.0 * int(correct) / num_test)
  result = {}
  for n, accs in per_shot.items():
    result[f'{n}shot'] = float(np.mean(accs))
    result[f'{n}shot_std'] = float(np.std(accs))
  return result


# ----------------------------------------------------------------------------------------
# `python -m evals.knn`


def knn_checkpoint(run, *, k: int = 20, temperature: float = 0.07, feature_cache=None) -> dict:
  """Weighted kNN on a loaded run (`evals.linear_probe.load_checkpoint`)."""
  import time
  t0 = time.perf_counter()
  splits = run.splits(cache_dir=feature_cache)
  (tx, ty), (sx, sy) = splits['train'], splits['test']
  t1 = time.perf_counter()
  result = knn_classify(tx, ty, sx, sy, k=k, temperature=temperature)
  result.update(k=int(k), temperature=float(temperature), num_train=int(len(ty)),
                num_test=int(len(sy)), feature_dim=int(tx.shape[1]),
                feature_seconds=t1 - t0, knn_seconds=time.perf_counter() - t1, **run.meta())
  return result


def _main(argv):
  del argv
  from absl import flags

  from evals import linear_probe
  from selfsup.errors import UserError
  f = flags.FLAGS
  linear_probe.check_data_flags(f, 'usage: python -m evals.knn --checkpoint DIR --dataset '
                                   'SOURCE [--k 20] [--temperature 0.07] [--output FILE.json]')
  if f.k < 1 or f.temperature <= 0:
    raise UserError(f'--k must be >= 1 and --temperature > 0; got {f.k} and {f.temperature}')
  result = knn_checkpoint(linear_probe.loaded_from_flags(f), k=f.k, temperature=f.temperature,
                          feature_cache=f.feature_cache)
  linear_probe.emit(result, f.output)


if __name__ == '__main__':
  from absl import flags as _flags

  from evals import linear_probe as _lp
  from selfsup import cli as _cli
  _lp.define_data_flags()
  _flags.DEFINE_integer('k', 20, 'neighbours')
  _flags.DEFINE_float('temperature', 0.07, 'T of the exp(s / T) votes')
  _cli.run_main(_main)
