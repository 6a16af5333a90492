"""The probe's API: feature protocols, refusals before work, and evals.compare."""

import json

import numpy as np
import pytest

from conftest import run_cli, tiny_config


def _random_encoder(config):
  import encoders
  from evals import features as features_lib
  encoder = encoders.build_encoder(config.encoder, "float32")
  return encoder, features_lib.random_init_variables(encoder, config.data.image_size)


def test_context_eval_features_average_the_centred_patch_grid():
  import jax.numpy as jnp
  import objectives
  from objectives import context
  images = np.random.default_rng(0).integers(0, 255, (2, 30, 30, 3)).astype(np.uint8)
  template = objectives.build_objective("context", {}, image_size=30, dtype=jnp.float32)
  seen = []

  def encoder_fn(x):
    seen.append(x.shape)
    return jnp.mean(x, axis=(1, 2))

  got = template.eval_features(encoder_fn, jnp.asarray(images))
  cell, patch, lo, hi = context.patch_grid(30)
  assert seen == [(18, patch, patch, 3)] and got.shape == (2, 3)
  off = (lo + hi) // 2  # no jitter: every patch centred in its cell
  x = images.astype(np.float32) / 255.0
  for b in range(2):
    feats = []
    for p in range(9):
      r, c = divmod(p, 3)
      crop = x[b, r * cell + off:r * cell + off + patch, c * cell + off:c * cell + off + patch]
      crop = (crop - crop.mean()) / max(crop.std(), 1 / np.sqrt(crop.size))
      feats.append(crop.mean((0, 1)))
    np.testing.assert_allclose(got[b], np.mean(feats, 0), atol=1e-5)
  # The base class declares no protocol of its own.
  rotation = objectives.build_objective("rotation", {}, image_size=30, dtype=jnp.float32)
  assert rotation.eval_features(encoder_fn, images) is None


def test_probe_features_image_or_objective(tmp_path):
  from evals.linear_probe import ProbeData, feature_function, probe_encoder
  config = tiny_config("rotation+context")
  encoder, variables = _random_encoder(config)
  data = ProbeData("synthetic:shapes", 16, max_train=48, max_test=24, batch_size=16)
  fn, what = feature_function(encoder, "objective", config)
  assert what == "objective:context"
  by_patches = probe_encoder(encoder, variables, data, feature_fn=fn, features=what,
                             save_features=str(tmp_path / "f.npz"))
  assert by_patches["features"] == "objective:context" and by_patches["num_train"] == 48
  by_image = probe_encoder(encoder, variables, data, save_features=str(tmp_path / "i.npz"))
  assert by_image["features"] == "image"
  # The grid-of-patches features differ from whole-image features.
  patches, whole = np.load(tmp_path / "f.npz")["train_x"], np.load(tmp_path / "i.npz")["train_x"]
  assert patches.shape == whole.shape and not np.allclose(patches, whole)
  _, only_image = feature_function(encoder, "objective", tiny_config("rotation"))
  assert only_image == "image"


def test_probe_refuses_nonfinite_features_and_says_diverged():
  import jax
  from evals.linear_probe import ProbeData, probe_encoder
  from selfsup.errors import UserError
  config = tiny_config("rotation")
  encoder, variables = _random_encoder(config)
  nan = jax.tree_util.tree_map(lambda v: v * np.nan, variables)
  data = ProbeData("synthetic:shapes", 16, max_train=16, max_test=16, batch_size=16)
  with pytest.raises(UserError, match="not finite.*diverged") as e:
    probe_encoder(encoder, nan, data, nonfinite_hint=": the checkpoint diverged")
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("value", [0, -3])
def test_max_examples_must_be_positive(value):
  from evals.linear_probe import ProbeData
  from selfsup.errors import UserError
  with pytest.raises(UserError, match="positive"):
    ProbeData("synthetic:shapes", 16, max_train=value).check()


def test_check_writable_creates_the_directory(tmp_path):
  from evals.linear_probe import check_writable
  from selfsup.errors import UserError
  check_writable(str(tmp_path / "a" / "b" / "out.json"), "--output")
  assert (tmp_path / "a" / "b").is_dir()
  with pytest.raises(UserError, match="is a directory"):
    check_writable(str(tmp_path / "a"), "--output")
  (tmp_path / "file").write_text("x")
  with pytest.raises(UserError, match="cannot write"):
    check_writable(str(tmp_path / "file" / "out.json"), "--output")


def test_compare_validates_names_steps_and_config_before_training(tmp_path):
  from evals.compare import compare, run_configs
  from selfsup.errors import UserError
  kw = dict(workdir=str(tmp_path / "w"), dataset="synthetic:shapes")
  with pytest.raises(UserError, match="jigsaw.*context"):
    compare(["rotation", "rotation+jigsaw"], **kw)
  with pytest.raises(UserError, match="steps"):
    compare(["rotation"], steps=0, **kw)
  with pytest.raises(UserError, match="no such file"):
    compare(["rotation"], config=str(tmp_path / "nope.py"), **kw)
  with pytest.raises(UserError, match="patch_size"):  # an objective's own start-up check
    bad = tmp_path / "bad_context.py"
    bad.write_text("from experiments.quickstart import get_config as g\n"
                   "def get_config(arg):\n  c = g(arg)\n"
                   "  c.objectives.context.patch_size = 20\n  return c\n")
    compare(["context"], config=str(bad), **kw)
  assert not (tmp_path / "w").exists()  # nothing trained
  # The config file's settings, overridden only where asked.
  # A combination named out of alphabetical order (the config lists its keys sorted).
  (name, c), = run_configs("experiments/quickstart.py", ["simclr+rotation"])
  assert name == "simclr+rotation" and sorted(c.objectives.keys()) == ["rotation", "simclr"]
  (name, c), = run_configs("experiments/quickstart.py", ["simclr"], steps=7)
  assert (name, c.train.steps, c.train.batch_size, c.encoder.name) == ("simclr", 7, 128, "tiny_cnn")
  assert c.objectives.simclr.temperature == 0.2  # the quickstart's per-objective setting
  (name, c), = run_configs("experiments/simclr_cifar10.py", None, dataset="synthetic:shapes")
  assert name == "simclr" and c.encoder.cifar_stem and c.data.source == "synthetic:shapes"
  with pytest.raises(UserError, match="does not take its objectives"):
    run_configs("experiments/simclr_cifar10.py", ["rotation"])


def test_compare_trains_and_probes_from_a_config(tmp_path):
  from evals.compare import compare
  rows = compare(["rotation"], workdir=str(tmp_path), dataset="synthetic:shapes", steps=2,
                 batch_size=16, image_size=16, encoder={"width_multiplier": 0.5},
                 max_train=64, max_test=32, log=lambda *a, **k: None)
  assert [r["objectives"] for r in rows] == ["random-init", "rotation"]
  assert rows[1]["steps"] == 2 and rows[1]["features"] == "image"
  saved = json.loads((tmp_path / "rotation" / "config.json").read_text())
  assert saved["encoder"] == {"name": "tiny_cnn", "width_multiplier": 0.5}


def test_compare_cli_fails_early_with_one_line(tmp_path):
  from test_errors import _assert_one_line_error
  out = tmp_path / "missing" / "rows.json"
  proc = run_cli(["-m", "evals.compare", "--objectives", "rotation,jigsaw", "--workdir",
                  str(tmp_path / "w"), "--output", str(out)])
  _assert_one_line_error(proc, "jigsaw", "rotation")
  assert not (tmp_path / "w").exists()


def test_compare_set_overrides_any_config_field_and_names_unknown_ones():
  from evals.compare import parse_overrides, run_configs
  from selfsup.errors import UserError
  sets = parse_overrides(["objectives.swav.epsilon=0.02", "objectives.swav.large_scale=(0.2, 1.0)",
                          "data.order=shuffle"])
  assert sets == {"objectives.swav.epsilon": 0.02, "objectives.swav.large_scale": (0.2, 1.0),
                  "data.order": "shuffle"}
  (_, c), = run_configs("experiments/quickstart.py", ["swav"], overrides=sets)
  assert c.objectives.swav.epsilon == 0.02 and tuple(c.objectives.swav.large_scale) == (0.2, 1.0)
  with pytest.raises(UserError, match="run 'rotation' has no 'swav' in objectives; valid: rotation"):
    run_configs("experiments/quickstart.py", ["rotation"], overrides=sets)
  with pytest.raises(UserError, match="KEY=VALUE"):
    parse_overrides(["objectives.swav.epsilon"])


def test_compare_warns_when_an_objective_trains_at_another_size_than_the_probe():
  from evals.compare import parse_overrides, run_configs, view_size_warnings
  # The quickstart's PixPro trains on 36 px views of 32 px images.
  configs = run_configs("experiments/quickstart.py", ["rotation", "pixpro"])
  (line,) = view_size_warnings(configs)
  assert "'pixpro' trains pixpro on 36 px views" in line and "reads 32 px" in line
  assert "--image_size 36 --set objectives.pixpro.view_size=0" in line
  # Following the advice silences it; so does any objective trained at the probe's size.
  fixed = run_configs("experiments/quickstart.py", ["pixpro"], image_size=36,
                      overrides=parse_overrides(["objectives.pixpro.view_size=0"]))
  assert view_size_warnings(fixed) == []
  assert view_size_warnings(run_configs("experiments/quickstart.py", ["swav", "obow"])) == []


def test_compare_seeds_reads_each_gain_against_its_own_seeds_baseline(tmp_path):
  from evals.compare import compare_seeds, seed_summary
  from selfsup.errors import UserError
  rows = compare_seeds(["rotation"], seeds=(0, 1), workdir=str(tmp_path),
                       dataset="synthetic:shapes", steps=2, batch_size=16, image_size=16,
                       max_train=64, max_test=32, log=lambda *a, **k: None)
  per_seed = [r for r in rows if not r.get("summary")]
  assert [(r["objectives"], r["seed"]) for r in per_seed] == [
      ("random-init", 0), ("rotation", 0), ("random-init", 1), ("rotation", 1)]
  assert (tmp_path / "seed_0" / "rotation").is_dir() and (tmp_path / "seed_1" / "rotation").is_dir()
  # The two seeds are two runs: other random-init weights (so, in general, other probes).
  assert json.loads((tmp_path / "seed_1" / "rotation" / "config.json").read_text())["seed"] == 1
  summary = [r for r in rows if r.get("summary")]
  assert summary == seed_summary(per_seed) and [r["objectives"] for r in summary] == [
      "random-init", "rotation"]
  gains = [per_seed[1]["probe_top1"] - per_seed[0]["probe_top1"],
           per_seed[3]["probe_top1"] - per_seed[2]["probe_top1"]]
  assert summary[1]["gains"] == [round(g, 2) for g in gains]
  # A plain NumPy reference on fixed rows: gains against each seed's own baseline.
  fixed = [{"objectives": "random-init", "seed": s, "probe_top1": b, "probe_top5": 80.0}
           for s, b in ((0, 30.0), (1, 32.0), (2, 31.0))]
  fixed += [{"objectives": "swav", "seed": s, "probe_top1": t, "probe_top5": 85.0}
            for s, t in ((0, 33.0), (1, 33.0), (2, 35.5))]
  swav = seed_summary(fixed)[1]
  ref = np.array([3.0, 1.0, 4.5])
  assert swav["gains"] == [3.0, 1.0, 4.5] and swav["gain"] == round(ref.mean(), 2)
  assert swav["gain_std"] == round(float(np.std(ref, ddof=1)), 2) and swav["gain_min"] == 1.0
  assert swav["probe_top1"] == round(float(np.mean([33.0, 33.0, 35.5])), 2)
  with pytest.raises(UserError, match="distinct"):
    compare_seeds(["rotation"], seeds=(0, 0), workdir=str(tmp_path / "x"))
  assert not (tmp_path / "x").exists()


def test_compare_cli_refuses_seed_with_seeds(tmp_path):
  from test_errors import _assert_one_line_error
  proc = run_cli(["-m", "evals.compare", "--objectives", "rotation", "--seed", "1",
                  "--seeds", "0,1", "--workdir", str(tmp_path / "w")])
  _assert_one_line_error(proc, "--seed and --seeds")
  proc = run_cli(["-m", "evals.compare", "--objectives", "rotation", "--seeds", "0,x",
                  "--workdir", str(tmp_path / "w")])
  _assert_one_line_error(proc, "--seeds")
  assert not (tmp_path / "w").exists()
