"""Tests for the feature-level probes: L-BFGS logistic regression, kNN, few-shot ridge.

The logistic regression is checked against scikit-learn's `LogisticRegression` (same
objective with l2 = 1 / (2 C)), kNN and few-shot ridge against plain NumPy references.
Problem shapes are shared between tests so that each jitted solver compiles once.
"""

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
import threadpoolctl

from evals import knn
from evals import logreg

NUM_CLASSES = 10
DIM = 64


def _blobs(seed, num_train=2000, num_test=1000, dim=DIM, num_classes=NUM_CLASSES):
  """Overlapping Gaussian blobs: ~85% accuracy, so C really matters."""
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(num_classes, dim)) * 3.0 / np.sqrt(dim)
  y = rng.integers(0, num_classes, num_train + num_test)
  # Non-unit scales and offsets so that standardisation is not a no-op.
  x = (centers[y] + rng.normal(size=(y.size, dim))) * rng.uniform(0.5, 3.0, dim) + 2.0
  x = x.astype(np.float32)
  return x[:num_train], y[:num_train], x[num_train:], y[num_train:]


@pytest.fixture(scope='module')
def blobs():
  return _blobs(0)


def _np_objective(w, b, x, y, l2):
  """Our loss in float64: sum_i [logsumexp(z_i) - z_i[y_i]] + l2 ||W||^2."""
  z = x.astype(np.float64) @ w.astype(np.float64) + b.astype(np.float64)
  zmax = z.max(axis=1, keepdims=True)
  lse = np.log(np.exp(z - zmax).sum(axis=1)) + zmax[:, 0]
  penalty = l2 * np.sum(np.square(w.astype(np.float64)))
  return np.sum(lse - z[np.arange(y.size), y]) + penalty


def test_standardize_uses_training_statistics():
  rng = np.random.default_rng(1)
  train = rng.normal(3.0, 2.0, size=(50, 4)).astype(np.float32)
  train[:, 2] = 7.0  # A constant feature must not divide by zero.
  test = rng.normal(size=(20, 4)).astype(np.float32)
  train_s, test_s = logreg.standardize(train, test)
  mean, std = train.mean(0), np.maximum(train.std(0), logreg.STD_FLOOR)
  np.testing.assert_allclose(train_s, (train - mean) / std, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(test_s, (test - mean) / std, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(train_s)[:, 2], 0.0)
  assert len(logreg.standardize(train)) == 1


@pytest.mark.parametrize('c', [1.0, 0.01])
def test_fit_matches_sklearn(blobs, c):
  train_x, train_y, test_x, test_y = blobs
  train_s, test_s = (np.asarray(a) for a in logreg.standardize(train_x, test_x))
  l2 = 1.0 / (2.0 * c)
  w, b = logreg.fit_logistic_regression(train_s, train_y, NUM_CLASSES, l2)
  w, b = np.asarray(w), np.asarray(b)
  ours = logreg.predict_topk_accuracy(w, b, test_s, test_y)['top1']

  # One BLAS thread: on a small shared machine, multi-threaded BLAS inside scipy's
  # L-BFGS is up to ~100x slower from contention, for no gain at this size.
  with threadpoolctl.threadpool_limits(1):
    sk = LogisticRegression(C=c, max_iter=5000, tol=1e-8).fit(
        train_s.astype(np.float64), train_y)
  sk_acc = 100.0 * np.mean(sk.predict(test_s.astype(np.float64)) == test_y)
  assert abs(ours - sk_acc) <= 0.5, (ours, sk_acc)

  sk_w = sk.coef_.T
  rel_err = np.linalg.norm(w - sk_w) / np.linalg.norm(sk_w)
  assert rel_err < 1e-3, rel_err
  # The bias is only defined up to a shared constant (softmax shift), so compare the
  # centred biases.
  np.testing.assert_allclose(b - b.mean(), sk.intercept_ - sk.intercept_.mean(),
                             atol=1e-3)

  # Our solution is at least as good as sklearn's under our objective (float64 eval).
  ours_obj = _np_objective(w, b, train_s, train_y, l2)
  sk_obj = _np_objective(sk_w, sk.intercept_, train_s, train_y, l2)
  assert ours_obj <= sk_obj * (1 + 1e-6), (ours_obj, sk_obj)


def test_fit_warm_start_reaches_same_solution(blobs):
  train_x, train_y, _, _ = blobs
  train_s, = logreg.standardize(train_x)
  cold = logreg.fit_logistic_regression(train_s, train_y, NUM_CLASSES, 0.5)
  start = logreg.fit_logistic_regression(train_s, train_y, NUM_CLASSES, 50.0)
  warm = logreg.fit_logistic_regression(train_s, train_y, NUM_CLASSES, 0.5, init=start)
  np.testing.assert_allclose(warm[0], cold[0], rtol=0, atol=2e-3)


def test_predict_topk_accuracy_matches_numpy():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(300, 8)).astype(np.float32)
  y = rng.integers(0, 7, 300)
  w = rng.normal(size=(8, 7)).astype(np.float32)
  b = rng.normal(size=7).astype(np.float32)
  ranked = np.argsort(-(x @ w + b), axis=1)
  got = logreg.predict_topk_accuracy(w, b, x, y, ks=(1, 3, 5))
  for k in (1, 3, 5):
    want = 100.0 * np.mean(np.any(ranked[:, :k] == y[:, None], axis=1))
    assert got[f'top{k}'] == pytest.approx(want)
  # With at most k classes top-k is trivially 100; the key is still there.
  few = logreg.predict_topk_accuracy(w[:, :4], b[:4], x, y % 4)
  assert few['top5'] == 100.0


def _isotropic_noise(seed, n=400, dim=64, num_classes=4):
  """Weak mean shifts under isotropic noise, few samples: needs strong l2."""
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(num_classes, dim)) * 0.15
  y = rng.integers(0, num_classes, 2 * n)
  x = centers[y] + rng.normal(size=(2 * n, dim))
  return x[:n], y[:n], x[n:], y[n:]


def _buried_signal(seed, n=400, dim=64, num_classes=4):
  """Class signal in small feature differences under a large shared nuisance.

  Reading it out needs large, cancelling weights, which strong l2 forbids (its limit
  is the class-mean-difference direction, dominated by the nuisance): needs weak l2.
  """
  rng = np.random.default_rng(seed)
  y = rng.integers(0, num_classes, 2 * n)
  x = 0.3 * np.eye(dim)[y] + 5.0 * rng.normal(size=(2 * n, 1))
  x += rng.normal(size=(2 * n, dim)) * np.linspace(0.05, 5.0, dim)
  return x[:n], y[:n], x[n:], y[n:]


def test_linear_probe_picks_sensible_l2():
  strong = logreg.linear_probe(*_isotropic_noise(0))
  weak = logreg.linear_probe(*_buried_signal(0))
  assert strong['l2'] >= 10.0, strong['sweep']
  assert weak['l2'] <= 0.1, weak['sweep']
  # Both beat chance (25%) clearly with the chosen l2.
  assert strong['top1'] > 45.0 and weak['top1'] > 60.0
  # The chosen l2 is the best of the sweep (ties going to the larger l2).
  for result in (strong, weak):
    best = max(result['sweep'], key=lambda s: (s['val_top1'], s['l2']))
    assert result['l2'] == best['l2'] and result['val_top1'] == best['val_top1']


def test_linear_probe_report_is_complete_json_and_deterministic(blobs):
  compiled_before = logreg._fit_lbfgs._cache_size()
  first = logreg.linear_probe(*blobs, l2_grid=(1e-2, 1.0, 1e2), seed=3)
  compiled_first = logreg._fit_lbfgs._cache_size()
  second = logreg.linear_probe(*blobs, l2_grid=(1e-2, 1.0, 1e2), seed=3)
  assert first == second
  assert json.loads(json.dumps(first)) == first
  expected = {'top1', 'top5', 'l2', 'num_train', 'num_test', 'feature_dim',
              'num_classes', 'val_top1', 'sweep'}
  assert expected <= set(first)
  assert (first['num_train'], first['num_test'], first['feature_dim'],
          first['num_classes']) == (2000, 1000, DIM, NUM_CLASSES)
  assert 75.0 < first['top1'] <= first['top5'] <= 100.0
  # 3 grid values + 4 refinements around the best.
  assert len(first['sweep']) == 7
  assert [s['l2'] for s in first['sweep']] == sorted(s['l2'] for s in first['sweep'])
  # The sweep (on a train subset) and the refit (on all rows) share one compilation
  # (none new if another test in this worker already compiled this shape), and the
  # second probe compiles nothing. (Counted per call, so the test does not depend on
  # which tests ran before it in this worker.)
  assert compiled_first <= compiled_before + 1
  assert logreg._fit_lbfgs._cache_size() == compiled_first


def _np_knn(train_x, train_y, test_x, k, temperature, num_classes):
  train_x = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
  test_x = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
  sims = test_x @ train_x.T
  scores = np.zeros((test_x.shape[0], num_classes))
  for i, row in enumerate(sims):
    nearest = np.argsort(-row)[:k]
    np.add.at(scores[i], train_y[nearest], np.exp(row[nearest] / temperature))
  return np.argsort(-scores, axis=1, kind='stable')


def test_knn_matches_numpy_reference():
  rng = np.random.default_rng(4)
  centers = rng.normal(size=(7, 16))
  train_y = rng.integers(0, 7, 300)
  test_y = rng.integers(0, 7, 90)
  train_x = centers[train_y] + 1.5 * rng.normal(size=(300, 16))
  test_x = centers[test_y] + 1.5 * rng.normal(size=(90, 16))
  # batch_size 32 does not divide 90: exercises the padded last batch.
  got = knn.knn_classify(train_x, train_y, test_x, test_y, k=10, batch_size=32)
  ranked = _np_knn(train_x, train_y, test_x, 10, 0.07, 7)
  assert got['top1'] == pytest.approx(100.0 * np.mean(ranked[:, 0] == test_y))
  assert got['top5'] == pytest.approx(
      100.0 * np.mean(np.any(ranked[:, :5] == test_y[:, None], axis=1)))
  assert 30.0 < got['top1'] < 100.0  # Neither trivial nor hopeless.


def _np_fewshot(train_x, train_y, test_x, test_y, shots, seed, l2, num_classes):
  """big_vision fewshot_lsr recipe in float64 with a direct solve."""
  rng = np.random.default_rng(seed)
  class_rows = [rng.permutation(np.flatnonzero(train_y == c))
                for c in range(num_classes)]
  rows = np.concatenate([r[:shots] for r in class_rows])
  x, y = train_x[rows].astype(np.float64), train_y[rows]
  mean, std = x.mean(0), x.std(0) + 1e-5
  bias = lambda a: np.concatenate([(a - mean) / std, np.full((len(a), 1), 100.0)], 1)
  x, xt = bias(x), bias(test_x.astype(np.float64))
  targets = 2.0 * np.eye(num_classes)[y] - 1.0
  w = np.linalg.solve(x.T @ x + l2 * np.eye(x.shape[1]), x.T @ targets)
  return 100.0 * np.mean(np.argmax(xt @ w, axis=1) == test_y)


def test_fewshot_ridge_matches_numpy_reference():
  rng = np.random.default_rng(5)
  centers = 2.0 * rng.normal(size=(6, 12))
  train_y = rng.integers(0, 6, 240)
  test_y = rng.integers(0, 6, 200)
  train_x = centers[train_y] + rng.normal(size=(240, 12))
  test_x = centers[test_y] + rng.normal(size=(200, 12))
  # Draws are zero-padded to the largest one. Shots (1, 2): 12 padded rows < 13
  # columns, the x x^T branch; shots (1, 5): 30 rows, the x^T x branch. The 1-shot
  # draws are padded in both.
  seeds, l2 = (0, 1), 8.0
  for shots in ((1, 2), (1, 5)):
    got = knn.fewshot_ridge(train_x, train_y, test_x, test_y, shots=shots,
                            seeds=seeds, l2=l2)
    for n in shots:
      want = [_np_fewshot(train_x, train_y, test_x, test_y, n, s, l2, 6)
              for s in seeds]
      assert got[f'{n}shot'] == pytest.approx(np.mean(want)), (shots, n)
      assert got[f'{n}shot_std'] == pytest.approx(np.std(want)), (shots, n)
  assert got['5shot'] > 50.0
