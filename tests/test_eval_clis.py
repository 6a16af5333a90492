"""`python -m evals.knn` and `python -m evals.fewshot` against the functions they wrap, and
per-layer features (evals.layers) for ResNet, ViT and the tiny CNN."""

import glob
import json

import numpy as np
import pytest

from conftest import run_cli, tiny_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  from selfsup.trainer import Trainer
  workdir = str(tmp_path_factory.mktemp("clis") / "run")
  Trainer(tiny_config("rotation", steps=1), workdir).run()
  return workdir


def _cached_features(cache):
  """{split name: (x, y)} from the float16 feature cache the CLI wrote."""
  out = {}
  for path in glob.glob(f"{cache}/*.npz"):
    with np.load(path) as f:
      out[json.loads(str(f["key"]))["split"]] = (f["x"].astype(np.float32), f["y"])
  return out


@pytest.mark.parametrize("module,extra", [
    ("evals.knn", ["--k", "5", "--temperature", "0.1"]),
    ("evals.fewshot", ["--shots", "1,3", "--seeds", "0,1"]),
])
def test_knn_and_fewshot_clis_match_the_functions(run_dir, tmp_path, module, extra):
  from evals.knn import fewshot_ridge, knn_classify
  cache, out = tmp_path / "cache", tmp_path / "out.json"
  proc = run_cli(["-m", module, "--checkpoint", run_dir, "--dataset", "synthetic:shapes",
                  "--max_train", "96", "--max_test", "48", "--feature_cache", str(cache),
                  "--output", str(out)] + extra)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert json.loads(out.read_text()) == result
  assert (result["num_train"], result["num_test"], result["step"]) == (96, 48, 1)
  feats = _cached_features(cache)
  (tx, ty), (sx, sy) = feats["train"], feats["test"]
  if module == "evals.knn":
    expected = knn_classify(tx, ty, sx, sy, k=5, temperature=0.1)
    assert (result["top1"], result["top5"], result["k"]) == (expected["top1"],
                                                              expected["top5"], 5)
  else:
    expected = fewshot_ridge(tx, ty, sx, sy, shots=(1, 3), seeds=(0, 1))
    for key in ("1shot", "3shot", "1shot_std", "3shot_std"):
      assert result[key] == pytest.approx(expected[key])


def test_fewshot_bad_shots_are_refused():
  from evals.fewshot import _ints
  from selfsup.errors import UserError
  assert _ints("1,5, 10", "--shots") == [1, 5, 10]
  with pytest.raises(UserError, match="--shots must be comma-separated integers"):
    _ints("1,x", "--shots")


@pytest.mark.parametrize("name,options,size,expected", [
    ("tiny_cnn", {"width_multiplier": 0.5}, 16,
     [("stride2", 8), ("stride4", 16), ("stride8", 32), ("stride16", 64), ("pooled", 64)]),
    ("resnet18", {"width_multiplier": 0.25}, 32,
     [("stride4", 16), ("stride8", 32), ("stride16", 64), ("stride32", 128), ("pooled", 128)]),
    ("vit_ti", {"patch_size": 8}, 16,
     [("stride8", 192)] + [(f"block{i}", 192) for i in range(12)]
     + [("ln_final", 192), ("pooled", 192)]),
])
def test_per_layer_feature_shapes(name, options, size, expected):
  import jax
  from ml_collections import ConfigDict

  import encoders
  from evals import features as features_lib
  from evals import layers
  encoder = encoders.build_encoder(ConfigDict({"name": name, **options}))
  variables = jax.eval_shape(lambda: features_lib.random_init_variables(encoder, size))
  specs = layers.layer_specs(encoder, variables, size)
  assert specs == expected
  chosen = layers.select_layers(specs, "pooled," + expected[0][0])
  out = jax.eval_shape(layers.layer_feature_fn(encoder, [n for n, _ in chosen]), variables,
                       jax.ShapeDtypeStruct((3, size, size, 3), np.uint8))
  assert out.shape == (3, expected[-1][1] + expected[0][1])
  from selfsup.errors import UserError
  with pytest.raises(UserError, match="no layer 'stride3'"):
    layers.select_layers(specs, "stride3")


def test_layer_probe_rows(run_dir):
  from evals.linear_probe import probe_layers
  result = probe_layers(run_dir, "synthetic:shapes", "stride16,pooled", max_train=96,
                        max_test=48)
  rows = {r["layer"]: r for r in result["layers"]}
  assert list(rows) == ["stride16", "pooled"] and result["best_layer"] in rows
  # The tiny CNN's pooled output is the average of its deepest map: the same probe.
  assert rows["stride16"]["top1"] == pytest.approx(rows["pooled"]["top1"], abs=1e-6)
  assert rows["pooled"]["feature_dim"] == 64 and result["num_train"] == 96
