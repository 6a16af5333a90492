"""Pretext objectives by name, and how a config turns into objective modules."""

import dataclasses

from objectives.base import HostContext, Objective, ObjectiveOutput
from objectives.rotation import Rotation
from objectives.simclr import SimCLR
from selfsup.errors import UserError, unknown_name

REGISTRY: dict[str, type] = {
    "rotation": Rotation,
    "simclr": SimCLR,
}


def objective_fields(name: str) -> list[str]:
  """The configurable fields of an objective (its dataclass fields)."""
  cls = REGISTRY[name]
  return [f.name for f in dataclasses.fields(cls)
          if f.init and f.name not in ("parent", "name", "dtype", "image_size")]


def build_objective(name: str, options: dict, *, image_size: int, dtype) -> Objective:
  """Instantiates objective `name` with `options` (unknown options are an error)."""
  if name not in REGISTRY:
    raise unknown_name("objective", name, REGISTRY)
  valid = objective_fields(name)
  kwargs = {}
  for key, value in options.items():
    if key not in valid:
      raise UserError(f"objective {name!r} has no option {key!r}; valid options: "
                      f"{', '.join(valid)}")
    kwargs[key] = tuple(value) if isinstance(value, list) else value
  try:
    return REGISTRY[name](image_size=image_size, dtype=dtype, **kwargs)
  except (TypeError, ValueError) as e:
    raise UserError(f"objective {name!r}: {e}") from e


__all__ = ["HostContext", "Objective", "ObjectiveOutput", "REGISTRY", "build_objective",
           "objective_fields"]
