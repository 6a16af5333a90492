"""`python -m evals.linear_probe` on a run directory: the contract's JSON and files."""

import json

import numpy as np

from conftest import run_cli, tiny_config
from selfsup.trainer import Trainer


def test_probe_cli_on_a_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  Trainer(tiny_config("rotation", steps=2), workdir).run()
  # Into directories that do not exist yet: created before the work, not after it.
  out, feats = tmp_path / "new" / "probe.json", tmp_path / "also" / "new" / "feats.npz"
  common = ["-m", "evals.linear_probe", "--checkpoint", workdir, "--dataset",
            "synthetic:shapes", "--max_train", "200", "--max_test", "100"]
  proc = run_cli(common + ["--output", str(out), "--save_features", str(feats)])
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(out.read_text())
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == result
  for key in ("top1", "top5", "num_train", "num_test", "feature_dim", "l2"):
    assert key in result
  assert (result["num_train"], result["num_test"], result["step"]) == (200, 100, 2)
  saved = np.load(feats)
  assert saved["train_x"].shape == (200, result["feature_dim"])
  assert saved["test_y"].shape == (100,)

  proc = run_cli(common + ["--random_init"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  baseline = json.loads(proc.stdout.strip().splitlines()[-1])
  assert baseline["random_init"] and baseline["step"] is None
  assert baseline["feature_dim"] == result["feature_dim"]


def test_probe_cli_refuses_bad_max_train_before_any_work(tmp_path):
  from test_errors import _assert_one_line_error
  proc = run_cli(["-m", "evals.linear_probe", "--checkpoint", str(tmp_path / "none"),
                  "--dataset", "synthetic:shapes", "--max_train", "0"])
  _assert_one_line_error(proc, "--max_train", "positive", "0")
