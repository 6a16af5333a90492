"""Memory controls: remat keeps the encoder's function, accumulation is the mean of the
micro-batch gradients, the trainer reports the step's memory and refuses what cannot fit."""

import functools
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from conftest import run_script_json, tiny_config
from encoders import build_encoder
from encoders.vit import ViT
from selfsup import trainer as trainer_lib
from selfsup.config import validate
from selfsup.errors import UserError


def _small(kind, remat):
  if kind == "resnet":   # every remat path of build_encoder's ResNet, at its smallest
    return build_encoder(ConfigDict(dict(name="resnet18", cifar_stem=True,
                                         width_multiplier=0.125)), remat=remat)
  return ViT(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8, remat=remat)


@pytest.mark.parametrize("kind", [pytest.param("resnet", marks=pytest.mark.ci),
                                  pytest.param("vit", marks=pytest.mark.slow)])
def test_remat_changes_neither_names_nor_gradients(kind):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 16, 3)), jnp.float32)
  grads, trees = {}, {}
  for remat in ("none", "blocks", "full"):
    enc = _small(kind, remat)
    v = enc.init(jax.random.key(0), x, train=True)
    rest = {k: a for k, a in v.items() if k != "params"}

    def loss(p, enc=enc, rest=rest):
      out, _ = enc.apply({"params": p, **rest}, x, train=True, mutable=list(rest))
      return jnp.sum(out.pooled ** 2)

    g = jax.jit(jax.grad(loss))(v["params"])
    trees[remat] = jax.tree_util.tree_structure(v["params"])
    grads[remat] = np.concatenate([np.ravel(a) for a in jax.tree.leaves(g)])
  assert trees["blocks"] == trees["full"] == trees["none"]   # checkpoints interchange
  for remat in ("blocks", "full"):
    np.testing.assert_allclose(grads[remat], grads["none"], rtol=1e-5, atol=1e-6)


def test_remat_lowers_the_compiled_memory_and_keeps_batch_norm_statistics(monkeypatch):
  """XLA's memory analysis of the compiled CPU gradient: `blocks` keeps each block's input
  only, and its recomputation runs in the backward pass. (With `jax.checkpoint` alone,
  XLA's CPU scheduler recomputed each block in the forward pass, and `blocks` and `full`
  needed more memory than `none`.) Same gradients, same new BatchNorm statistics."""
  from encoders import resnet
  monkeypatch.setitem(resnet.STAGES, 7, ("basic", (3,)))   # stem + 3 blocks, 16 channels
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16, 16, 3)), jnp.float32)
  temp, grads, stats = {}, {}, {}
  for remat in ("none", "blocks", "full"):
    enc = resnet.ResNet(depth=7, width_multiplier=0.25, cifar_stem=True, remat=remat)
    v = enc.init(jax.random.key(0), x, train=True)

    def loss(p, s, enc=enc):
      out, new = enc.apply({"params": p, "batch_stats": s}, x, train=True,
                           mutable=["batch_stats"])
      return jnp.sum(out.pooled ** 2), new["batch_stats"]

    compiled = jax.jit(jax.grad(loss, has_aux=True)).lower(
        v["params"], v["batch_stats"]).compile()
    temp[remat] = compiled.memory_analysis().temp_size_in_bytes
    grads[remat], stats[remat] = compiled(v["params"], v["batch_stats"])
  # Measured: none 3.02 MB, blocks 1.58, full 1.61 (with jax.checkpoint: 3.02 / 3.42 / 3.31).
  assert temp["blocks"] < 0.7 * temp["none"], temp
  # Both peak at the start of the backward pass, holding every block's input; `full`
  # keeps only the images between the passes, which counts when something else runs
  # between them (nothing here). 5%: XLA packs the two programs' buffers differently.
  assert temp["full"] <= 1.05 * temp["blocks"], temp
  assert not any(np.allclose(a, b) for a, b in zip(jax.tree.leaves(stats["none"]),
                                                   jax.tree.leaves(v["batch_stats"])))
  for remat in ("blocks", "full"):
    for got, want in ((grads, grads["none"]), (stats, stats["none"])):
      for a, b in zip(jax.tree.leaves(got[remat]), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_remat_is_refused_where_an_encoder_has_none():
  with pytest.raises(UserError, match="no activation rematerialisation"):
    build_encoder(ConfigDict(dict(name="tiny_cnn")), remat="blocks")
  with pytest.raises(UserError, match="remat must be one of"):
    build_encoder(ConfigDict(dict(name="resnet18")), remat="some")
  c = tiny_config()
  c.train.accumulate = 3   # does not divide 16
  with pytest.raises(UserError, match="accumulate"):
    validate(c)


@pytest.mark.ci
def test_accumulation_is_the_mean_of_the_micro_batch_gradients():
  # SGD with lr 1, no momentum or decay: new params = params - mean of micro gradients.
  c = tiny_config("rotation", batch_size=8)
  c.train.online_probe = False
  t = trainer_lib.Trainer(c, None)
  tx = optax.sgd(1.0)
  state = dict(t.state)
  state["opt_state"] = tx.init(state["params"])
  batch = {k: jnp.asarray(v) for k, v in next(t.iterator).items()
           if k in ("image", "label", "index", "valid")}
  step = jax.jit(functools.partial(trainer_lib.train_step, model=t.model, tx=tx,
                                   lr_schedule=lambda s: 1.0, accumulate=2))
  new, metrics, _ = step(state, batch)

  # Reference: micro-batch i = rows i, i+2, ...; rng fold_in(step rng, i); BatchNorm
  # running statistics carried from micro-batch 0 to 1.
  rng = jax.random.fold_in(state["rng"], state["step"])

  @jax.jit
  @functools.partial(jax.value_and_grad, has_aux=True)
  def micro_grad(p, stats, micro, key):
    (loss, _, _), up = t.model.apply(
        {"params": p, "batch_stats": stats, "objective_state": state["objective_state"]},
        micro, train=True, step=state["step"], rngs={"augment": key},
        mutable=["batch_stats", "objective_state"])
    return loss, up

  stats, grads, losses = state["batch_stats"], [], []
  for i in range(2):
    micro = jax.tree.map(lambda a: a[i::2], batch)

    (loss, up), g = micro_grad(state["params"], stats, micro, jax.random.fold_in(rng, i))
    stats = up["batch_stats"]
    grads.append(g)
    losses.append(float(loss))
  expected = jax.tree.map(lambda p, a, b: p - (a + b) / 2, state["params"], *grads)
  for got, want in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  for got, want in zip(jax.tree.leaves(new["batch_stats"]), jax.tree.leaves(stats)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(metrics["pretext_loss"]), np.mean(losses), rtol=1e-5)


def test_the_step_memory_is_reported_and_a_batch_too_large_is_refused(tmp_path, capsys):
  c = tiny_config("rotation", steps=1)
  t = trainer_lib.Trainer(c, str(tmp_path))
  t.run()
  assert "compiled step:" in capsys.readouterr().err
  _, memory = t.compile_step(next(t.iterator))
  assert memory["peak_bytes_per_device"] >= memory["argument_size"] > 0
  assert "GiB per device" in trainer_lib.check_fits(memory, None, c)
  with pytest.raises(UserError, match="cannot fit.*train.remat.*train.accumulate"):
    trainer_lib.check_fits(memory, memory["peak_bytes_per_device"] - 1, c)


def test_compile_cache_folders(tmp_path, monkeypatch):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert trainer_lib.compile_cache_dir("user", "w") == str(tmp_path / "xdg" / "selfsup" / "jax")
  assert trainer_lib.compile_cache_dir("workdir", "w") == "w/jax_cache"
  assert trainer_lib.compile_cache_dir("off", "w") is None
  assert trainer_lib.compile_cache_dir(str(tmp_path / "c"), "w") == str(tmp_path / "c")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
  assert trainer_lib.compile_cache_dir("user", "w") == str(tmp_path / "env")


REMAT_EIGHT_DEVICES = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    import jax, numpy as np
    from conftest import tiny_config
    from selfsup.trainer import Trainer
    out = {{}}
    for name, devices, remat, sharding in (("one", jax.devices()[:1], "none", "replicate"),
                                           ("blocks", jax.devices(), "blocks", "fsdp"),
                                           ("full", jax.devices(), "full", "replicate")):
      c = tiny_config("rotation", steps=2, batch_size=8, image_size=16)
      c.encoder = {{"name": "resnet18", "width_multiplier": 0.125, "cifar_stem": True}}
      c.optimizer.name = "sgd"
      c.train.online_probe = False
      c.train.remat = remat
      c.mesh.sharding = sharding
      c.mesh.fsdp_min_size = 0     # shard every parameter that divides
      t = Trainer(c, None, devices=devices)
      losses = [float(t.train_step(next(t.iterator))[0]["loss"]) for _ in range(2)]
      leaves = [np.asarray(x).ravel() for x in jax.tree.leaves(jax.device_get(
          {{"params": t.state["params"], "stats": t.state["batch_stats"]}}))]
      out[name] = dict(losses=losses, params=np.concatenate(leaves).tolist())
    print(json.dumps(out))
""")


@pytest.mark.ci   # three ResNet-18 trainers compiled: ~1 min on 2 cores
def test_remat_on_eight_devices_with_fsdp_matches_one_device_without():
  """The recomputation's tie to the cotangent (row by row, plus a scalar for the
  parameters) under a batch-sharded mesh and FSDP-sharded parameters: same losses, same
  parameters and BatchNorm statistics as one device without remat."""
  out = run_script_json(REMAT_EIGHT_DEVICES, timeout=1200)
  for name in ("blocks", "full"):
    np.testing.assert_allclose(out[name]["losses"], out["one"]["losses"], rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(out[name]["params"], out["one"]["params"], rtol=1e-3, atol=2e-5)
