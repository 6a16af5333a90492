"""Pretext objectives by name, and how a config turns into objective modules."""

import dataclasses
import importlib

from objectives.base import HostContext, Objective, ObjectiveOutput
from selfsup.errors import UserError, unknown_name

# name -> "module:Class", imported on first use so one objective's import cost or
# optional dependency never burdens the others.
REGISTRY: dict[str, str] = {
    "rotation": "objectives.rotation:Rotation",
    "simclr": "objectives.simclr:SimCLR",
    "context": "objectives.context:ContextPrediction",
    "inpainting": "objectives.inpainting:Inpainting",
    "counting": "objectives.counting:Counting",
    "nat": "objectives.nat:NoiseAsTargets",
    "swav": "objectives.swav:SwAV",
    "autoencoder": "objectives.autoencoder:Autoencoder",
    "gsimclr": "objectives.gsimclr:GSimCLR",
    "obow": "objectives.obow:OBoW",
    "pixpro": "objectives.pixpro:PixPro",
    "spark": "objectives.spark:SparK",
    "mae": "objectives.mae:MAE",
}


def objective_class(name: str) -> type:
  if name not in REGISTRY:
    raise unknown_name("objective", name, REGISTRY)
  module, cls = REGISTRY[name].split(":")
  return getattr(importlib.import_module(module), cls)


# Fields the trainer fills in from the run (not user options): the training image size,
# the compute dtype, the number of training examples (NAT's target table), the run's
# length in steps (the EMA teachers' momentum schedule) and the global batch size (NAT's
# epochs in steps).
RUN_FIELDS = ("image_size", "dtype", "dataset_size", "total_steps", "batch_size")


def objective_fields(name: str) -> list[str]:
  """The configurable fields of an objective (its dataclass fields)."""
  cls = objective_class(name)
  return [f.name for f in dataclasses.fields(cls)
          if f.init and f.name not in ("parent", "name") + RUN_FIELDS]


def check_options(name: str, options) -> list[str]:
  """Raises UserError for an option `name` does not have; returns the valid options."""
  valid = objective_fields(name)
  for key in options:
    if key not in valid:
      raise UserError(f"objective {name!r} has no option {key!r}; valid options: "
                      f"{', '.join(valid)}")
  return valid


def build_objective(name: str, options: dict, *, image_size: int, dtype,
                    dataset_size: int = 0, total_steps: int = 0,
                    batch_size: int = 0) -> Objective:
  """Instantiates objective `name` with `options` (unknown options are an error)."""
  check_options(name, options)
  declared = {f.name for f in dataclasses.fields(objective_class(name))}
  run = {k: v for k, v in dict(image_size=image_size, dtype=dtype, dataset_size=dataset_size,
                               total_steps=total_steps, batch_size=batch_size).items()
         if k in declared}
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
  try:
    return objective_class(name)(**run, **kwargs)
  except (TypeError, ValueError) as e:
    raise UserError(f"objective {name!r}: {e}") from e


__all__ = ["HostContext", "Objective", "ObjectiveOutput", "REGISTRY", "build_objective",
           "check_options", "objective_class", "objective_fields"]
