"""A run directory's config file: written by the trainer, read by evaluation.

Kept apart from the trainer so evaluation (`evals/`) reads a run's configuration
without importing the training loop.
"""

import json
import os

import jax
import ml_collections

from selfsup.errors import UserError

CONFIG_FILE = "config.json"


def check_workdir_config(workdir: str, config) -> None:
  """A workdir belongs to one encoder/objective setup: refuse to resume another."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  for section in ("encoder", "objectives"):
    now = json.loads(config[section].to_json())
    if saved.get(section) != now:
      raise UserError(
          f"{workdir} holds a run with {section} {json.dumps(saved.get(section))}, not "
          f"{json.dumps(now)}; use a new --workdir or the original config")


def save_config(workdir: str, config) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
  with open(tmp, "w") as f:
    f.write(config.to_json(indent=2))
  os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise UserError(f"{workdir} is not a training workdir (no {CONFIG_FILE}); pass the "
                    "--workdir given to selfsup.train")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
