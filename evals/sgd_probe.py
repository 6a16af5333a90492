"""The SGD linear protocol (EVALUATION.md; SimCLR / solo-learn style).

A zero-initialised linear head on frozen pooled features, trained with Nesterov SGD
(momentum 0.9), learning rate `lr x B / 256` on a cosine schedule, no weight decay by
default, for `epochs` epochs; at train time every image is a fresh random resized crop +
horizontal flip made on the device (so features are recomputed every step, through the
frozen encoder with BatchNorm in inference mode); at test time the centre view.

The step is jitted over all devices (the batch split over the mesh's `data` axis, the last
batch of an epoch padded and masked). Every step is a pure function of (seed, step): the
epoch's permutation is `default_rng([seed, epoch])` and the crop keys are
`fold_in(key(seed), step)`, so a run resumed from its checkpoint (`checkpoint_dir`, written
atomically every `checkpoint_every` steps and at the end) continues exactly as if it had
not stopped. Images are held on the host as uint8 (CIFAR-sized data; an ImageNet-sized
training set would need the streamed pipeline instead).

`fit_head` is the generic loop on any inputs and any embedding, which the tests drive with
toy features; `sgd_probe_checkpoint` is the run-directory entry point.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from selfsup import augment
from selfsup.errors import UserError


@dataclasses.dataclass
class SgdConfig:
  epochs: int = 90
  batch_size: int = 256
  lr: float = 0.1               # x batch_size / 256
  momentum: float = 0.9
  weight_decay: float = 0.0
  crop_scale: tuple = (0.08, 1.0)
  augment: bool = True
  checkpoint_every: int = 500   # steps
  seed: int = 0

  def check(self):
    if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
      raise UserError(f"--sgd_epochs, --sgd_batch_size and --sgd_lr must be positive; got "
                      f"{self.epochs}, {self.batch_size}, {self.lr}")


def augmented_view(key, images, out_size: int, crop_scale=(0.08, 1.0)):
  """Random resized crop + horizontal flip of each uint8 image, normalised, on device."""
  def one(k, image):
    k1, k2 = jax.random.split(k)
    crop, _ = augment.random_resized_crop(k1, augment.to_float(image), out_size,
                                          scale=crop_scale)
    crop, _ = augment.random_flip(k2, crop)
    return crop
  keys = jax.random.split(key, images.shape[0])
  x = jax.vmap(one)(keys, images)
  return augment.eval_view(x)  # already square at out_size: only the normalisation


def _loss(head, feats, labels, mask):
  logits = feats @ head["w"] + head["b"]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _flatten(tree):
  leaves, _ = jax.tree_util.tree_flatten(tree)
  return {f"a{i}": np.asarray(x) for i, x in enumerate(leaves)}


def _unflatten(like, arrays):
  leaves, treedef = jax.tree_util.tree_flatten(like)
  return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(arrays[f"a{i}"])
                                                for i in range(len(leaves))])


def fit_head(embed: Callable, variables, train_x: np.ndarray, train_y: np.ndarray,
             num_classes: int, cfg: SgdConfig, *, checkpoint_dir: str | None = None,
             stop_after: int | None = None, devices=None, log=None) -> dict:
  """Trains the linear head; returns {"head": {w, b}, "step", "steps", "loss"}.

  embed(variables, inputs, key, train) -> (B, D) float32 features; key is None when
  train is False. `stop_after` stops (after checkpointing) at that step, for tests of
  the resume. A checkpoint made with other settings is refused.
  """
  from selfsup import sharding as sharding_lib
  cfg.check()
  mesh = sharding_lib.make_mesh(devices=devices)
  ndev = mesh.devices.size
  batch = -(-cfg.batch_size // ndev) * ndev
  n = len(train_y)
  steps_per_epoch = -(-n // batch)
  total = steps_per_epoch * cfg.epochs
  schedule = optax.cosine_decay_schedule(cfg.lr * batch / 256, total)
  tx = optax.sgd(schedule, momentum=cfg.momentum, nesterov=True)
  if cfg.weight_decay:
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay, lambda p: {"w": True,
                                                                            "b": False}), tx)
  dim = jax.eval_shape(lambda v, x: embed(v, x, None, False), variables,
                       jax.ShapeDtypeStruct((1,) + train_x.shape[1:], train_x.dtype)).shape[-1]
  head = {"w": jnp.zeros((dim, num_classes), jnp.float32),
          "b": jnp.zeros((num_classes,), jnp.float32)}
  opt_state = tx.init(head)
  step = 0
  fingerprint = json.dumps(dict(dataclasses.asdict(cfg), checkpoint_every=None, n=n,
                                num_classes=num_classes, dim=dim, batch=batch), sort_keys=True,
                           default=str)
  path = os.path.join(checkpoint_dir, "sgd_probe.npz") if checkpoint_dir else None
  if path and os.path.exists(path):
    with np.load(path) as f:
      if str(f["fingerprint"]) != fingerprint:
        raise UserError(f"{path} was made with other SGD settings or data; remove it or "
                        "give another --sgd_checkpoint_dir")
      step = int(f["step"])
      head = _unflatten(head, {k[5:]: f[k] for k in f.files if k.startswith("head_")})
      opt_state = _unflatten(opt_state, {k[4:]: f[k] for k in f.files if k.startswith("opt_")})
    if log:
      log(f"resuming the SGD probe at step {step} of {total}")

  def save():
    if not path:
      return
    os.makedirs(checkpoint_dir, exist_ok=True)
    tmp = path + ".tmp.npz"
    arrays = {f"head_{k}": v for k, v in _flatten(head).items()}
    arrays.update({f"opt_{k}": v for k, v in _flatten(opt_state).items()})
    np.savez(tmp, step=step, fingerprint=fingerprint, **arrays)
    os.replace(tmp, path)

  shard = sharding_lib.batch_sharding(mesh)
  rep = sharding_lib.replicated(mesh)

  def train_step(head, opt_state, variables, x, y, mask, key):
    feats = jax.lax.stop_gradient(embed(variables, x, key, True))
    loss, grads = jax.value_and_grad(_loss)(head, feats, y, mask)
    updates, opt_state = tx.update(grads, opt_state, head)
    return optax.apply_updates(head, updates), opt_state, loss

  jstep = jax.jit(train_step, in_shardings=(rep, rep, rep, shard, shard, shard, rep),
                  out_shardings=(rep, rep, rep), donate_argnums=(0, 1))
  variables = jax.device_put(variables, rep)
  base_key = jax.random.PRNGKey(cfg.seed)
  loss = float("nan")
  order, order_epoch = None, -1
  while step < total:
    epoch, i = divmod(step, steps_per_epoch)
    if epoch != order_epoch:
      order, order_epoch = np.random.default_rng([cfg.seed, epoch]).permutation(n), epoch
    rows = order[i * batch:(i + 1) * batch]
    pad = batch - len(rows)
    x = train_x[np.concatenate([rows, np.zeros(pad, rows.dtype)])]
    y = train_y[np.concatenate([rows, np.zeros(pad, rows.dtype)])].astype(np.int32)
    mask = (np.arange(batch) < len(rows)).astype(np.float32)
    head, opt_state, loss_arr = jstep(head, opt_state, variables, x, y, mask,
                                      jax.random.fold_in(base_key, step))
    step += 1
    if step % max(1, cfg.checkpoint_every) == 0 or step == total or step == stop_after:
      loss = float(loss_arr)
      save()
      if log:
        log(f"sgd probe step {step}/{total} loss {loss:.4f}")
    if stop_after is not None and step >= stop_after:
      break
  return {"head": jax.device_get(head), "step": step, "steps": total, "loss": loss}


def evaluate_head(embed: Callable, variables, head, x: np.ndarray, y: np.ndarray,
                  batch_size: int = 256, devices=None) -> dict:
  """Top-1 / top-5 (percent) of the head on the centre views of x (padded last batch)."""
  from selfsup import sharding as sharding_lib
  mesh = sharding_lib.make_mesh(devices=devices)
  ndev = mesh.devices.size
  batch = -(-batch_size // ndev) * ndev
  k = min(5, head["w"].shape[1])
  shard, rep = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)

  def correct(head, variables, xb, yb, mask):
    logits = embed(variables, xb, None, False) @ head["w"] + head["b"]
    _, top = jax.lax.top_k(logits, k)
    hits = top == yb[:, None]
    return jnp.sum(mask * hits[:, 0]), jnp.sum(mask * jnp.any(hits, axis=1))

  jc = jax.jit(correct, in_shardings=(rep, rep, shard, shard, shard), out_shardings=(rep, rep))
  c1 = c5 = 0
  for start in range(0, len(y), batch):
    rows = np.arange(start, min(start + batch, len(y)))
    pad = batch - len(rows)
    idx = np.concatenate([rows, np.zeros(pad, rows.dtype)])
    a, b = jc(head, variables, x[idx], y[idx].astype(np.int32),
              (np.arange(batch) < len(rows)).astype(np.float32))
    c1, c5 = c1 + int(a), c5 + int(b)
  return {"top1": 100.0 * c1 / max(len(y), 1), "top5": 100.0 * c5 / max(len(y), 1)}


def encoder_embed(encoder, image_size: int, crop_scale=(0.08, 1.0), augment_train=True):
  """embed(variables, uint8 images, key, train) for a frozen encoder: a random resized
  crop + flip when training, the centre view otherwise; pooled features."""
  def embed(variables, images, key, train):
    if train and augment_train:
      x = augmented_view(key, images, image_size, crop_scale)
    else:
      x = augment.eval_view(images)
    return encoder.apply(variables, x, train=False).pooled.astype(jnp.float32)
  return embed


def sgd_probe_checkpoint(run, cfg: SgdConfig, *, checkpoint_dir=None, log=None) -> dict:
  """The SGD protocol on a loaded run (`evals.linear_probe.load_checkpoint`)."""
  from selfsup import data as data_lib
  data = run.data
  data.check()
  train_source, test_source = data.sources()
  t0 = time.perf_counter()
  tx, ty = data_lib.load_arrays(train_source, data.image_size, data.max_train,
                                seed=data.subset_seed, crop_fraction=data.crop_fraction)
  sx, sy = data_lib.load_arrays(test_source, data.image_size, data.max_test,
                                seed=data.subset_seed, crop_fraction=data.crop_fraction)
  num_classes = int(getattr(train_source, "num_classes", 0) or max(ty.max(), sy.max()) + 1)
  embed = encoder_embed(run.encoder, data.image_size, cfg.crop_scale, cfg.augment)
  t1 = time.perf_counter()
  fit = fit_head(embed, run.variables, tx, ty, num_classes, cfg, checkpoint_dir=checkpoint_dir,
                 log=log)
  result = evaluate_head(embed, run.variables, fit["head"], sx, sy, batch_size=cfg.batch_size)
  result.update(protocol="sgd", epochs=cfg.epochs, steps=fit["steps"], final_loss=fit["loss"],
                batch_size=cfg.batch_size, lr=cfg.lr, num_train=int(len(ty)),
                num_test=int(len(sy)), num_classes=num_classes, load_seconds=t1 - t0,
                probe_seconds=time.perf_counter() - t1, **run.meta())
  return result
