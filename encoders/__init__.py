"""Encoders by name: ResNet family, ConvNeXt, ViT, and a tiny CNN for tests.

Every encoder is a Flax module called as `encoder(images, *, train, mask=None)` and
returning an `EncoderOutput(pooled, maps)`.
"""

import inspect
from typing import Any, Callable

import jax.numpy as jnp

from encoders.common import EncoderOutput, PatchMask
from encoders.convnext import REMAT as CONVNEXT_REMAT
from encoders.convnext import SIZES as CONVNEXT_SIZES
from encoders.convnext import ConvNeXt
from encoders.resnet import REMAT, ResNet, check_remat
from encoders.tiny_cnn import TinyCNN
from encoders.vit import SIZES as VIT_SIZES
from encoders.vit import ViT
from selfsup.errors import UserError, unknown_name


def _resnet(depth):
  def build(dtype, width_multiplier=1.0, cifar_stem=False, zero_init_residual=True,
            remat="none", scan_blocks=False):
    return ResNet(depth=depth, width_multiplier=float(width_multiplier),
                  cifar_stem=bool(cifar_stem), dtype=dtype,
                  zero_init_residual=bool(zero_init_residual), remat=remat,
                  scan_blocks=bool(scan_blocks))
  return build


def _vit(size):
  width, depth, mlp_dim, heads = VIT_SIZES[size]

  def build(dtype, patch_size=16, pooling="cls", remat="none", scan_blocks=False):
    if pooling not in ("cls", "mean"):
      raise UserError(f"encoder.pooling must be 'cls' or 'mean', not {pooling!r}")
    return ViT(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads,
               patch_size=int(patch_size), pooling=pooling, dtype=dtype, remat=remat,
               scan_blocks=bool(scan_blocks))
  return build


def _convnext(size):
  depths, widths = CONVNEXT_SIZES[size]

  def build(dtype, drop_path=0.0, layer_scale_init=1e-6, remat="none"):
    if remat not in CONVNEXT_REMAT:
      raise UserError(f"encoder.remat must be one of {', '.join(CONVNEXT_REMAT)}, not {remat!r}")
    if not 0 <= float(drop_path) < 1:
      raise UserError(f"encoder.drop_path must be in [0, 1), got {drop_path}")
    return ConvNeXt(depths=depths, widths=widths, drop_path=float(drop_path),
                    layer_scale_init=float(layer_scale_init), remat=remat, dtype=dtype)
  return build


def _tiny_cnn(dtype, width_multiplier=1.0):
  return TinyCNN(widths=tuple(max(4, int(w * width_multiplier)) for w in (16, 32, 64, 128)),
                 dtype=dtype)


REGISTRY: dict[str, Callable[..., Any]] = {
    "tiny_cnn": _tiny_cnn,
    **{f"resnet{d}": _resnet(d) for d in (18, 34, 50, 101, 152)},
    **{f"vit_{s}": _vit(s) for s in VIT_SIZES},
    **{f"convnext_{s}": _convnext(s) for s in CONVNEXT_SIZES},
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_encoder(cfg, dtype: str = "float32", remat: str = "none", scan_blocks: bool = False):
  """Builds the encoder named `cfg.name` with the remaining fields of `cfg` as options.

  `remat` (config.train.remat: none | blocks | full) goes to every encoder whose builder
  takes a `remat` option, unless `cfg` sets that option itself; an encoder without one
  accepts only "none". `scan_blocks` (config.train.scan_blocks) likewise goes to the
  encoders that have it (ResNets, ViTs) and is ignored by the others: it changes only how the
  step compiles, not the parameters or the result.
  """
  check_remat(remat)
  options = dict(cfg)
  name = options.pop("name")
  if name not in REGISTRY:
    raise unknown_name("encoder", name, REGISTRY)
  if dtype not in DTYPES:
    raise unknown_name("compute dtype", dtype, DTYPES)
  allowed = encoder_options(name)
  for key in options:
    if key not in allowed:
      raise UserError(f"encoder {name!r} has no option {key!r}; valid options: "
                      f"{', '.join(allowed) or 'none'}")
  if "scan_blocks" in allowed:
    options.setdefault("scan_blocks", scan_blocks)
  if "remat" in allowed:
    options.setdefault("remat", remat)
  elif remat != "none":
    raise UserError(f"encoder {name!r} has no activation rematerialisation; use "
                    "train.remat=none with it (encoders with one: "
                    f"{', '.join(n for n in REGISTRY if 'remat' in encoder_options(n))})")
  return REGISTRY[name](DTYPES[dtype], **options)


def encoder_options(name: str) -> list[str]:
  """The options encoder `name` takes in its config (its builder's keyword arguments)."""
  return [p for p in inspect.signature(REGISTRY[name]).parameters if p != "dtype"]


__all__ = ["EncoderOutput", "PatchMask", "REGISTRY", "REMAT", "build_encoder"]
