"""OBoW: BoW targets, the generated head and the vocabulary FIFO against NumPy; the EMA
teacher gets no gradient; a killed run resumes to the same vocabulary and teacher."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_cli, tiny_config
from objectives import obow
from selfsup.errors import UserError
from selfsup.metrics_log import read_metrics
from selfsup.trainer import Trainer


def _np_softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def np_bow_targets(features, words, inv_delta, mu_prev, decay):
  """Plain NumPy: distances by explicit differences, EMA of the mean nearest distance,
  soft codes, max over positions, L1 normalisation."""
  d = ((features[:, :, :, None, :] - words[None, None, None]) ** 2).sum(-1)  # B,H,W,K
  mu = decay * mu_prev + (1 - decay) * d.min(-1).mean()
  codes = _np_softmax(-inv_delta / mu * d)
  bow = codes.max(axis=(1, 2))
  return bow / bow.sum(-1, keepdims=True), mu


def test_bow_targets_match_numpy():
  rng = np.random.default_rng(0)
  features = np.maximum(rng.normal(size=(3, 4, 5, 6)), 0).astype(np.float32)
  words = np.maximum(rng.normal(size=(7, 6)), 0).astype(np.float32)
  for mu_prev, decay in ((0.5, 0.99), (2.0, 1.0), (1.3, 0.0)):
    bow, mu = obow.bow_targets(jnp.asarray(features), jnp.asarray(words), 15.0, mu_prev, decay)
    want, want_mu = np_bow_targets(features.astype(np.float64), words.astype(np.float64),
                                   15.0, mu_prev, decay)
    np.testing.assert_allclose(float(mu), want_mu, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(bow), want, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bow).sum(-1), 1.0, rtol=1e-5)
  # Perplexity of the batch BoW: exp(entropy) of its normalised sum.
  p = want.sum(0) / want.sum()
  np.testing.assert_allclose(float(obow.perplexity(jnp.asarray(want.sum(0)))),
                             np.exp(-(p * np.log(p + 1e-5)).sum()), rtol=1e-5)


def test_generated_head_matches_numpy():
  rng = np.random.default_rng(1)
  words = rng.normal(size=(9, 5)).astype(np.float32)
  feats = rng.normal(size=(4, 6)).astype(np.float32)
  head = obow.BoWHead(hidden=8, out=6, kappa=3.0)
  variables = head.init(jax.random.key(0), feats, words, train=True)
  params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32),
                        variables["params"])
  logits, _ = head.apply({"params": params, "batch_stats": variables["batch_stats"]},
                         feats, words, train=True, mutable=["batch_stats"])
  g = {k: {n: np.asarray(v, np.float64) for n, v in d.items()}
       for k, d in params["generator"].items()}
  w = words / np.linalg.norm(words, axis=1, keepdims=True)
  hdn = w @ g["Dense_0"]["kernel"]
  # BatchNorm in training mode normalises over the words (biased variance, eps 1e-5).
  hdn = (hdn - hdn.mean(0)) / np.sqrt(hdn.var(0) + 1e-5) * g["BatchNorm_0"]["scale"] \
      + g["BatchNorm_0"]["bias"]
  out = np.maximum(hdn, 0) @ g["Dense_1"]["kernel"] + g["Dense_1"]["bias"]
  out = out / np.linalg.norm(out, axis=1, keepdims=True)
  np.testing.assert_allclose(np.asarray(logits), 3.0 * feats @ out.T, rtol=2e-4, atol=2e-5)


def test_vocabulary_fifo_and_pooled_local_words_match_numpy():
  rng = np.random.default_rng(2)
  fmap = rng.normal(size=(3, 5, 4, 2)).astype(np.float32)
  key = jax.random.key(7)
  got = np.asarray(obow.local_words(jnp.asarray(fmap), key, 3))
  # NumPy: 3x3 VALID average pooling, then the position each image drew.
  pooled = np.zeros((3, 3, 2, 2), np.float32)                       # (B, i, j, C)
  for i in range(3):
    for j in range(2):
      pooled[:, i, j] = fmap[:, i:i + 3, j:j + 3].mean(axis=(1, 2))
  matches = [[np.allclose(got[b], pooled[b, i, j], atol=1e-6) for i in range(3)
              for j in range(2)] for b in range(3)]
  assert all(sum(m) >= 1 for m in matches)
  # The same key gives the same words whatever the batch: image b's draw uses fold_in(b).
  np.testing.assert_array_equal(np.asarray(obow.local_words(jnp.asarray(fmap[:2]), key, 3)),
                                got[:2])
  # FIFO: writes from the pointer on, wrapping round, and advances the pointer.
  words = np.arange(10, dtype=np.float32).reshape(5, 2)
  new = -np.arange(6, dtype=np.float32).reshape(3, 2) - 1
  out, ptr = obow.fifo_push(jnp.asarray(words), jnp.asarray(4, jnp.int32), jnp.asarray(new))
  want = words.copy()
  for n, slot in enumerate([4, 0, 1]):
    want[slot] = new[n]
  np.testing.assert_array_equal(np.asarray(out), want)
  assert int(ptr) == 2


def _obow_config(steps=6):
  c = tiny_config("obow", steps=steps, batch_size=8)
  c.objectives.obow.update(num_words=16, num_patches=1, head_hidden=16)
  c.train.online_probe = False
  return c


@pytest.mark.ci
def test_ema_teachers_get_no_gradient():
  """Gradients reach the encoder and heads, never the teachers (OBoW's and PixPro's)."""
  from selfsup.model import build_model
  c = tiny_config("obow+pixpro", batch_size=4)
  c.encoder.width_multiplier = 0.25
  c.objectives.obow.update(num_words=8, num_crops=1, num_patches=0, head_hidden=8)
  c.objectives.pixpro.update(view_size=24, proj_hidden=8, proj_dim=8)
  model = build_model(c)
  batch = {"image": jnp.asarray(np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3)),
                                jnp.uint8)}
  variables = jax.jit(model.init)(
      {"params": jax.random.key(0), "augment": jax.random.key(1)}, batch)
  state = variables["objective_state"]
  # The teachers start as copies of what they follow.
  for name in ("obow", "pixpro"):
    for t, p in zip(jax.tree.leaves(state[name]["teacher"]["encoder"]),
                    jax.tree.leaves(variables["params"]["encoder"])):
      np.testing.assert_array_equal(t, p)
  np.testing.assert_array_equal(
      jax.tree.leaves(state["pixpro"]["teacher"]["pixpro"]["projector"])[0],
      jax.tree.leaves(variables["params"]["pixpro"]["projector"])[0])

  def loss(params, teachers):
    objective_state = {n: {**state[n], "teacher": teachers[n]} for n in state}
    (total, _, _), _ = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"],
         "objective_state": objective_state}, batch, train=True,
        rngs={"augment": jax.random.key(2)}, mutable=["batch_stats", "objective_state"])
    return total

  teachers = {n: state[n]["teacher"] for n in state}
  g_params, g_teachers = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], teachers)
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(g_teachers))
  for name in ("encoder", "obow", "pixpro"):
    assert any(np.any(np.asarray(x)) for x in jax.tree.leaves(g_params[name])), name


@pytest.mark.slow  # ~25 s alone on an idle core (two Trainers); 306 s on the shared CPU
def test_killed_run_resumes_to_the_same_vocabulary_and_teacher(tmp_path):
  c = _obow_config(steps=6)
  run = Trainer(c, str(tmp_path / "run"))
  before = jax.device_get(run.state)
  run.run(stop_after=1)
  after = jax.device_get(run.state)
  # post_update: teacher <- m teacher + (1 - m) student, m = 0.99 at step 0.
  for t0, t1, p1 in zip(jax.tree.leaves(before["objective_state"]["obow"]["teacher"]),
                        jax.tree.leaves(after["objective_state"]["obow"]["teacher"]),
                        jax.tree.leaves(after["params"]["encoder"])):
    np.testing.assert_allclose(t1, 0.99 * t0 + 0.01 * p1, rtol=1e-5, atol=1e-7)
  state = after["objective_state"]["obow"]
  assert int(state["ptr_L0"]) == 8 and int(state["ptr_L1"]) == 8
  assert not np.array_equal(state["words_L0"][:8], before["objective_state"]["obow"]["words_L0"][:8])
  np.testing.assert_array_equal(state["words_L0"][8:],
                                before["objective_state"]["obow"]["words_L0"][8:])
  assert float(state["min_dist_L0"]) != 0.5
  run.run(stop_after=3)          # dies after step 4; the newest checkpoint is step 3
  assert run.checkpointer.latest_step() == 3
  shutil.copytree(tmp_path / "run", tmp_path / "cut")
  resumed = Trainer(c, str(tmp_path / "cut"))
  assert int(resumed.state["step"]) == 3
  resumed.run()
  run.run()
  a, b = jax.device_get(run.state), jax.device_get(resumed.state)
  assert int(a["step"]) == int(b["step"]) == 6
  assert sorted(a["objective_state"]["obow"]) == [
      "min_dist_L0", "min_dist_L1", "ptr_L0", "ptr_L1", "teacher", "words_L0", "words_L1"]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  # 6 steps of 8 words into 16 slots: the pointer wrapped round.
  assert int(a["objective_state"]["obow"]["ptr_L0"]) == 48 % 16
  rows = read_metrics(str(tmp_path / "cut"))
  assert all(r["obow/perplexity"] >= 1 for r in rows)
  assert [r["loss"] for r in rows] == [r["loss"] for r in read_metrics(str(tmp_path / "run"))]


def test_bad_options_are_one_line():
  c = _obow_config()
  c.objectives.obow.num_words = 0
  with pytest.raises(UserError, match="num_words=0 must be >= 1"):
    Trainer(c, None)
  c.objectives.obow.num_words = 4
  with pytest.raises(UserError, match="num_words=4 is below the global batch 8"):
    Trainer(c, None)


def test_encoder_without_the_needed_maps_exits_2_and_writes_nothing(tmp_path):
  # A ViT has one token grid, not the two levels OBoW reads.
  workdir = tmp_path / "w"
  proc = run_cli(["-m", "selfsup.train", "--config", "experiments/quickstart.py:obow",
                  "--workdir", str(workdir), "--config.train.progress_bar=False",
                  "--config.train.steps=2", "--config.train.batch_size=8",
                  "--config.data.image_size=16", "--config.probe.enabled=False",
                  "--config.encoder.name=vit_ti"])
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "levels=(-2, -1)" in lines[0] and "1 map(s)" in lines[0]
  assert not (workdir / "checkpoints").exists() or not list((workdir / "checkpoints").iterdir())
  assert not (workdir / "metrics.jsonl").exists() and not (workdir / "config.json").exists()
