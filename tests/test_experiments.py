"""Experiment configs: every objective option is written out (overridable from the command
line), and the SimCLR CIFAR recipe is the reference command's."""

import glob
import importlib
import os

import pytest

import objectives as objectives_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(
    os.path.join(ROOT, "experiments", "*.py")) if not p.endswith("__init__.py"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_objective_option_is_in_the_config(name):
  """Written with config.objective(...): all of the objective's fields are listed."""
  module = importlib.import_module(f"experiments.{name}")
  config = module.get_config()
  assert config.objectives
  for objective_name, options in config.objectives.items():
    fields = set(objectives_lib.objective_fields(objective_name))
    missing = fields - set(options.keys())
    assert not missing, f"{name}: objective {objective_name} lacks options {sorted(missing)}"
    assert "weight" in options


def test_simclr_cifar10_follows_the_reference_command():
  from selfsup.optim import learning_rate
  c = importlib.import_module("experiments.simclr_cifar10").get_config()
  s = c.objectives.simclr
  assert (s.temperature, s.jitter_strength, s.blur_prob, s.proj_dim) == (0.5, 0.5, 0.0, 128)
  assert tuple(s.proj_hidden) == (512, 512)
  assert c.train.batch_size == 512 and c.train.steps == 1000 * (50000 // 512)
  assert c.optimizer.name == "lars" and c.optimizer.weight_decay == 1e-4
  schedule = learning_rate(c.optimizer, c.train.batch_size, c.train.steps)
  assert float(schedule(c.optimizer.warmup_steps)) == pytest.approx(2.0)  # 1.0 x 512/256
  assert c.optimizer.warmup_steps == 10 * (50000 // 512)
