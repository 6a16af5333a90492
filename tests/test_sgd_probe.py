"""The SGD linear protocol (evals.sgd_probe): reaches the L-BFGS probe on separable toy
features, and a run stopped and resumed from its checkpoint ends exactly where an
uninterrupted one does."""

import numpy as np
import pytest

from evals import sgd_probe
from evals.logreg import linear_probe


def _toy(seed, n_per_class, classes=3, dim=8):
  rng = np.random.default_rng(seed)
  centres = 3.0 * np.eye(classes, dim)
  y = np.repeat(np.arange(classes), n_per_class)
  x = centres[y] + 0.5 * rng.normal(size=(len(y), dim))
  return x.astype(np.float32), y.astype(np.int32)


def _identity(variables, x, key, train):
  del variables, key, train
  return x


@pytest.fixture(scope="module")
def toy():
  return _toy(0, 32), _toy(1, 16)


def test_sgd_reaches_the_lbfgs_accuracy_on_separable_features(toy):
  (tx, ty), (sx, sy) = toy
  lbfgs = linear_probe(tx, ty, sx, sy)
  cfg = sgd_probe.SgdConfig(epochs=20, batch_size=32, lr=0.8, augment=False)
  fit = sgd_probe.fit_head(_identity, {}, tx, ty, 3, cfg)
  assert fit["step"] == fit["steps"] == 20 * 3
  sgd = sgd_probe.evaluate_head(_identity, {}, fit["head"], sx, sy, batch_size=32)
  assert lbfgs["top1"] >= 95.0
  assert sgd["top1"] >= lbfgs["top1"] - 1e-9, (sgd, lbfgs["top1"])


def test_sgd_resume_is_exact(toy, tmp_path):
  (tx, ty), _ = toy
  cfg = sgd_probe.SgdConfig(epochs=4, batch_size=20, lr=0.5, augment=False,
                            checkpoint_every=1000)
  whole = sgd_probe.fit_head(_identity, {}, tx, ty, 3, cfg)
  # Stopped mid-epoch (5 steps per epoch: the last batch is padded and masked).
  part = sgd_probe.fit_head(_identity, {}, tx, ty, 3, cfg, checkpoint_dir=str(tmp_path),
                            stop_after=7)
  assert part["step"] == 7
  resumed = sgd_probe.fit_head(_identity, {}, tx, ty, 3, cfg, checkpoint_dir=str(tmp_path))
  assert resumed["step"] == whole["step"] == 20
  for k in ("w", "b"):
    np.testing.assert_array_equal(resumed["head"][k], whole["head"][k])
  assert not np.allclose(part["head"]["w"], whole["head"]["w"])
  # A checkpoint made with other settings is refused, not silently continued.
  from selfsup.errors import UserError
  other = sgd_probe.SgdConfig(epochs=5, batch_size=20, lr=0.5, augment=False)
  with pytest.raises(UserError, match="other SGD settings"):
    sgd_probe.fit_head(_identity, {}, tx, ty, 3, other, checkpoint_dir=str(tmp_path))
