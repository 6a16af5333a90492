"""Bad input: one line naming the problem and the valid choices, exit status 2."""

import os

import pytest
from PIL import Image

from conftest import run_cli

TRAIN = ["-m", "selfsup.train", "--config", "experiments/quickstart.py:rotation",
         "--config.train.progress_bar=False", "--config.train.steps=2",
         "--config.train.batch_size=8", "--config.data.image_size=16",
         "--config.probe.enabled=False", "--config.optimizer.warmup_steps=0"]


def _assert_one_line_error(proc, *fragments):
  assert proc.returncode == 2, (proc.stdout, proc.stderr[-2000:])
  lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("extra,fragments", [
    (["--config.objectives.rotaton.weight=1.0"], ["rotaton", "rotation", "simclr"]),
    (["--config.encoder.name=resnet19"], ["resnet19", "resnet18", "tiny_cnn"]),
    (["--config.data.source=imagenet"], ["imagenet", "folder:PATH", "tfds:NAME"]),
    (["--config.data.source=synthetic:blobs"], ["blobs", "shapes"]),
    (["--config.train.batchsize=8"], ["batchsize"]),
    (["--config.optimizer.name=adam"], ["adam", "adamw", "lars"]),
])
def test_bad_names_and_keys(tmp_path, extra, fragments):
  proc = run_cli(TRAIN + ["--workdir", str(tmp_path / "w")] + extra)
  _assert_one_line_error(proc, *fragments)


def test_batch_that_does_not_divide_over_devices(tmp_path):
  proc = run_cli(TRAIN + ["--workdir", str(tmp_path / "w"), "--config.train.batch_size=12"],
                 env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  _assert_one_line_error(proc, "batch_size=12", "8")


def test_missing_and_empty_image_folder(tmp_path):
  proc = run_cli(TRAIN + ["--workdir", str(tmp_path / "w"),
                          f"--config.data.source=folder:{tmp_path / 'nothing'}"])
  _assert_one_line_error(proc, str(tmp_path / "nothing"))
  (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
  proc = run_cli(TRAIN + ["--workdir", str(tmp_path / "w2"),
                          f"--config.data.source=folder:{tmp_path / 'empty'}"])
  _assert_one_line_error(proc, "empty")


def test_corrupt_image_in_strict_mode(tmp_path):
  root = tmp_path / "imgs" / "train"
  for cls in ("a", "b"):
    (root / cls).mkdir(parents=True)
    for i in range(4):
      Image.new("RGB", (16, 16), (i * 40, 10, 10)).save(root / cls / f"{i}.png")
  (root / "a" / "0.png").write_bytes(b"not an image at all")
  proc = run_cli(TRAIN + ["--workdir", str(tmp_path / "w"), "--config.data.strict=True",
                          f"--config.data.source=folder:{tmp_path / 'imgs'}"])
  _assert_one_line_error(proc, "0.png")


def test_resuming_with_another_encoder_is_refused_and_loses_nothing(tmp_path):
  workdir = str(tmp_path / "w")
  assert run_cli(TRAIN + ["--workdir", workdir]).returncode == 0
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  proc = run_cli(TRAIN + ["--workdir", workdir, "--config.encoder.name=resnet18"])
  _assert_one_line_error(proc, "encoder", "tiny_cnn")
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_probe_on_a_folder_that_is_not_a_run(tmp_path):
  proc = run_cli(["-m", "evals.linear_probe", "--checkpoint", str(tmp_path),
                  "--dataset", "synthetic:shapes"])
  _assert_one_line_error(proc, "not a training workdir")


@pytest.mark.parametrize("config,extra,fragments", [
    ("quickstart.py:rotation+jigsaw", [], ["jigsaw", "context", "nat"]),
    ("quickstart.py:inpainting", ["--config.objectives.inpainting.mask_fraction=1.5"],
     ["mask_fraction=1.5", "(0, 1)"]),
    ("quickstart.py:context", ["--config.objectives.context.patch_size=20"],
     ["patch_size=20", "valid patch_size"]),
    ("quickstart.py:rotation+simclr", ["--config.objectives.rotation.weight=0",
                                       "--config.objectives.simclr.weight=0"], ["sum to zero"]),
])
def test_bad_objective_settings(tmp_path, config, extra, fragments):
  args = [a if not a.startswith("experiments/quickstart.py") else f"experiments/{config}"
          for a in TRAIN]
  proc = run_cli(args + ["--workdir", str(tmp_path / "w")] + extra)
  _assert_one_line_error(proc, *fragments)
