"""Per-layer features of any encoder, from its generic outputs (no per-encoder code).

Layers are named:
  strideS   the global average of `EncoderOutput.maps[S]` (a convnet's stage output at
            stride S; ViT's final token grid),
  NAME      a direct sub-module of the encoder whose output is a token sequence
            (B, T, D), averaged over tokens, in call order: ViT's `block0`, ...,
            `block11`, `ln_final` (found with
            Flax's `capture_intermediates`, so any encoder built of blocks gets them),
  pooled    the encoder's pooled output (what every other probe reads).

`layer_specs` lists them with their widths; `layer_feature_fn` returns one jittable
function giving the chosen layers' features side by side, so one pass over the images
serves every layer's probe.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from selfsup import augment
from selfsup.errors import UserError


def _direct_child(module, method_name) -> bool:
  scope = getattr(module, "scope", None)
  return method_name == "__call__" and scope is not None and len(scope.path) == 1


def _all_layers(encoder, variables, images):
  """{name: (B, D) features} of every layer, in network order, then `pooled`."""
  out, state = encoder.apply(variables, images, train=False,
                             capture_intermediates=_direct_child, mutable=["intermediates"])
  layers = {}
  for stride in sorted(out.maps):
    layers[f"stride{stride}"] = jnp.mean(out.maps[stride].astype(jnp.float32), axis=(1, 2))
  blocks = []
  for name, value in state.get("intermediates", {}).items():
    if name == "__call__" or not isinstance(value, dict) or "__call__" not in value:
      continue
    y = value["__call__"][0]
    if hasattr(y, "ndim") and y.ndim == 3:
      blocks.append((name, jnp.mean(y.astype(jnp.float32), axis=1)))
  layers.update(blocks)  # in call order
  layers["pooled"] = out.pooled.astype(jnp.float32)
  return layers


def layer_specs(encoder, variables, image_size: int) -> list[tuple[str, int]]:
  """[(layer name, feature width)] of the encoder, in network order."""
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  names = []

  def fn(v, x):
    layers = _all_layers(encoder, v, x)
    names.extend(layers)  # the network order (pytrees would sort a dict's keys)
    return list(layers.values())

  shapes = jax.eval_shape(fn, variables, x)
  return [(name, int(s.shape[-1])) for name, s in zip(names, shapes)]


def select_layers(specs, choice: str) -> list[tuple[str, int]]:
  """`all` or a comma-separated list of layer names -> the chosen (name, width)."""
  available = dict(specs)
  if choice.strip() == "all":
    return list(specs)
  names = [c.strip() for c in choice.split(",") if c.strip()]
  for n in names:
    if n not in available:
      raise UserError(f"--layers: this encoder has no layer {n!r}; its layers: "
                      f"{', '.join(available)} (or all)")
  if not names:
    raise UserError("--layers is empty; give all or layer names")
  return [(n, available[n]) for n in names]


def layer_feature_fn(encoder, names):
  """(variables, uint8 images) -> (B, sum of widths): the chosen layers side by side."""
  names = list(names)

  def fn(variables, images):
    layers = _all_layers(encoder, variables, augment.eval_view(images))
    return jnp.concatenate([layers[n] for n in names], axis=-1)
  return fn


def split_columns(x: np.ndarray, specs) -> dict:
  """Concatenated features -> {layer name: its columns}."""
  out, start = {}, 0
  for name, width in specs:
    out[name] = x[:, start:start + width]
    start += width
  return out
