"""Combining objectives (Doersch & Zisserman 2017): one encoder, a weighted sum of losses."""

import pytest

from conftest import tiny_config
from selfsup import config as config_lib
from selfsup.errors import UserError
from selfsup.metrics_log import read_metrics
from selfsup.model import build_model
from selfsup.trainer import Trainer


def test_combination_trains_and_logs_the_weighted_sum(tmp_path):
  c = tiny_config("rotation+context", steps=3, batch_size=8)
  c.objectives.rotation.weight = 1.0
  c.objectives.context.weight = 0.5
  c.objectives.context.head_hidden = (32,)
  c.objectives.context.patch_input_size = 8
  c.train.checkpoint_every = 100
  Trainer(c, str(tmp_path)).run()
  rows = read_metrics(str(tmp_path))
  assert [r["step"] for r in rows] == [1, 2, 3]
  for r in rows:
    assert r["rotation/loss"] > 0 and r["context/loss"] > 0
    assert r["loss"] == pytest.approx(1.0 * r["rotation/loss"] + 0.5 * r["context/loss"],
                                      rel=1e-5)
    # The weight is not ignored: the unweighted sum is clearly different.
    assert abs(r["loss"] - (r["rotation/loss"] + r["context/loss"])) > 0.1


def test_unknown_member_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match=r"unknown objective 'nosuch'; valid objectives: .*"
                                      r"context.*rotation"):
    tiny_config("rotation+nosuch")
  c = tiny_config("rotation")
  c.objectives.nosuch = {"weight": 1.0}
  with pytest.raises(UserError, match="unknown objective 'nosuch'"):
    Trainer(c, str(tmp_path))


def test_zero_or_negative_total_weight_is_a_user_error(tmp_path):
  c = tiny_config("rotation+context")
  c.objectives.rotation.weight = 0.0
  c.objectives.context.weight = 0.0
  with pytest.raises(UserError, match="sum to zero"):
    config_lib.validate(c)
  with pytest.raises(UserError, match="sum to zero"):
    Trainer(c, str(tmp_path))
  c.objectives.context.weight = -1.0
  with pytest.raises(UserError, match=r"context\.weight must be >= 0"):
    config_lib.validate(c)


def test_multitask_cifar10_config():
  from experiments import multitask_cifar10
  c = multitask_cifar10.get_config()
  config_lib.validate(c)
  model = build_model(c)
  assert dict(zip(model.names, model.weights)) == {"rotation": 1.0, "context": 1.0,
                                                   "simclr": 1.0}
  assert c.encoder.name == "resnet18" and c.encoder.cifar_stem
  model = build_model(multitask_cifar10.get_config("context=0.5, simclr=0"))
  assert dict(zip(model.names, model.weights)) == {"rotation": 1.0, "context": 0.5}
  with pytest.raises(UserError, match="NAME=WEIGHT"):
    multitask_cifar10.get_config("jigsaw=1")
