"""G-SimCLR: the cluster-balanced order against a plain reference, in the pipeline
(resumable, sharded per process), the autoencoder loss, bad input, both phases killed and
resumed bit-exact, and SIGTERM in either phase under `evals.compare`."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_cli, tiny_config
from objectives.autoencoder import reconstruction_loss
from selfsup import data as data_lib
from selfsup import phases
from selfsup.data.order import _SALT, balanced_permutation
from selfsup.errors import UserError


def balanced_reference(clusters, seed, epoch):
  """The order written out with loops: cluster k's members, randomly permuted, at
  positions (j + u_k) / n_k; everything sorted by (position, random tie-break)."""
  rng = np.random.default_rng([seed, epoch, _SALT])
  ids = sorted(set(int(c) for c in clusters))
  members = {k: [i for i, c in enumerate(clusters) if c == k] for k in ids}
  offsets = rng.random(len(ids))
  placed = []
  for k, u in zip(ids, offsets):
    perm = rng.permutation(len(members[k]))
    for j, p in enumerate(perm):
      placed.append(((j + u) / len(members[k]), members[k][p]))
  ties = rng.random(len(clusters))
  keyed = [(pos, ties[n], idx) for n, (pos, idx) in enumerate(placed)]
  return np.array([idx for _, _, idx in sorted(keyed)])


@pytest.mark.parametrize("seed,epoch", [(0, 0), (3, 2)])
def test_order_matches_the_reference_and_is_a_permutation(seed, epoch):
  clusters = np.random.default_rng(9).integers(0, 5, 37)
  order = balanced_permutation(clusters, seed, epoch)
  np.testing.assert_array_equal(order, balanced_reference(clusters, seed, epoch))
  np.testing.assert_array_equal(np.sort(order), np.arange(37))


def test_equal_clusters_give_one_image_per_cluster_per_batch():
  k, n = 8, 6                                             # K = batch = 8, 48 examples
  clusters = np.random.default_rng(0).permutation(np.repeat(np.arange(k), n))
  for epoch in range(3):
    order = balanced_permutation(clusters, 0, epoch)
    for b in range(n):
      assert sorted(clusters[order[b * k:(b + 1) * k]]) == list(range(k))
  assert not np.array_equal(balanced_permutation(clusters, 0, 0),
                            balanced_permutation(clusters, 0, 1))
  # A uniform shuffle repeats clusters within batches; the balanced order never does here.
  shuffled = np.random.default_rng(1).permutation(48)
  assert any(len(set(clusters[shuffled[b * k:(b + 1) * k]])) < k for b in range(n))


def test_unequal_clusters_are_spread_evenly():
  clusters = np.concatenate([np.zeros(30, int), np.ones(10, int), np.full(8, 2)])
  order = balanced_permutation(clusters, 1, 0)
  for b in range(6):                                      # batches of 8 of 48
    counts = np.bincount(clusters[order[b * 8:(b + 1) * 8]], minlength=3)
    assert abs(counts[0] - 5) <= 1 and abs(counts[1] - 10 / 6) <= 1


def _pipeline(source, clusters, **kw):
  return data_lib.make_pipeline(source, batch_size=8, image_size=16, seed=0,
                                canvas_size=16, clusters=clusters, **kw)


def test_pipeline_reads_the_order_resumes_and_shards_per_process():
  source = data_lib.make_source("synthetic:shapes", "train[:40]", image_size=16)
  clusters = np.arange(40) % 8
  it = _pipeline(source, clusters, process_index=0, process_count=1)
  first = [next(it)["index"] for _ in range(5)]           # one epoch of 40
  np.testing.assert_array_equal(np.concatenate(first), balanced_permutation(clusters, 0, 0))
  state = data_lib.iterator_state_to_json(it)
  ahead = [next(it)["index"] for _ in range(3)]           # into epoch 1
  np.testing.assert_array_equal(np.concatenate(ahead),
                                balanced_permutation(clusters, 0, 1)[:24])
  again = data_lib.restore_iterator_state(_pipeline(source, clusters, process_index=0,
                                                    process_count=1), state)
  for want in ahead:
    np.testing.assert_array_equal(next(again)["index"], want)
  # Two processes: their local batches together are the one-process global batches.
  halves = [_pipeline(source, clusters, process_index=p, process_count=2) for p in range(2)]
  for want in first[:3]:
    got = np.concatenate([next(h)["index"] for h in halves])
    assert sorted(got) == sorted(want)


def test_reconstruction_loss_matches_numpy():
  rng = np.random.default_rng(4)
  a, b = rng.normal(size=(2, 4, 4, 3)), rng.normal(size=(2, 4, 4, 3))
  assert float(reconstruction_loss(jnp.asarray(a), jnp.asarray(b))) == pytest.approx(
      np.mean((a - b) ** 2), rel=1e-5)


def test_cluster_file_that_does_not_match_is_refused(tmp_path):
  path = str(tmp_path / "c.npy")
  np.save(path, np.zeros(7, np.int32))
  with pytest.raises(UserError, match="7 cluster ids .* 40 examples"):
    data_lib.load_clusters(path, 40)
  np.save(path, np.zeros((40, 2), np.int32))
  with pytest.raises(UserError, match="1-D integer"):
    data_lib.load_clusters(path, 40)


def test_bad_cluster_file_on_the_command_line_writes_nothing(tmp_path):
  path = str(tmp_path / "c.npy")
  np.save(path, np.zeros(7, np.int32))
  workdir = tmp_path / "w"
  proc = run_cli(["-m", "selfsup.train", "--config", "experiments/quickstart.py:simclr",
                  "--workdir", str(workdir), "--config.data.order=cluster_balanced",
                  f"--config.data.cluster_file={path}", "--config.data.train_split=train[:40]"])
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "cluster_file" in lines[0] and "40 examples" in lines[0]
  assert not workdir.exists()


def test_config_checks():
  from selfsup import config as config_lib
  c = tiny_config("simclr")
  c.data.order = "clustered"
  with pytest.raises(UserError, match="shuffle, cluster_balanced"):
    config_lib.validate(c)
  c.data.order = "cluster_balanced"
  with pytest.raises(UserError, match="cluster_file"):
    config_lib.validate(c)
  c.clusters.enabled = True
  c.clusters.k = -1
  with pytest.raises(UserError, match="clusters.k must be >= 1"):
    config_lib.validate(c)


def _gsimclr_config():
  c = tiny_config("gsimclr", steps=5, batch_size=8)
  c.data.train_split = "train[:48]"
  c.train.online_probe = False
  c.clusters.steps = 5
  c.clusters.batch_size = 8
  return c


def _leaves(trainer):
  return jax.tree.leaves(jax.device_get(trainer.state))


@pytest.mark.slow   # six Trainers of two kinds: minutes on 2 cores
def test_both_phases_killed_and_resumed_match_the_uninterrupted_run(tmp_path):
  from selfsup.trainer import Trainer
  c = _gsimclr_config()
  assert c.data.order == "cluster_balanced" and c.clusters.enabled
  # Uninterrupted: phase 1, k-means, phase 2.
  full_dir = str(tmp_path / "full")
  main, ready = phases.prepare(c, full_dir, log=lambda m: None)
  assert ready and main.data.cluster_file == phases.cluster_file(full_dir)
  labels = np.load(main.data.cluster_file)
  assert labels.shape == (48,) and len(set(labels.tolist())) == 8     # K = the batch
  full = Trainer(main, full_dir)
  full.run()

  # Interrupted: phase 1 dies after 4 steps (checkpoint 3), the command is rerun ...
  cut_dir = str(tmp_path / "cut")
  first = Trainer(phases.phase_config(c), os.path.join(cut_dir, "clusters", "autoencoder"))
  first.run(stop_after=4)
  assert first.checkpointer.latest_step() == 3
  del first
  main_cut, ready = phases.prepare(c, cut_dir, log=lambda m: None)
  np.testing.assert_array_equal(np.load(main_cut.data.cluster_file), labels)
  # ... then phase 2 dies after 4 steps and the command is rerun once more.
  second = Trainer(main_cut, cut_dir)
  second.run(stop_after=4)
  del second
  main_again, _ = phases.prepare(c, cut_dir, log=lambda m: None)   # k-means not redone
  resumed = Trainer(main_again, cut_dir)
  assert int(resumed.state["step"]) == 3
  resumed.run()
  for x, y in zip(_leaves(full), _leaves(resumed)):
    np.testing.assert_array_equal(x, y)
  phase1 = [Trainer(phases.phase_config(c), os.path.join(d, "clusters", "autoencoder"))
            for d in (full_dir, cut_dir)]
  for x, y in zip(_leaves(phase1[0]), _leaves(phase1[1])):
    np.testing.assert_array_equal(x, y)
  for t in phase1:
    t.close()


# ---- SIGTERM under `evals.compare`, which trains the runs in-process -------------------------
_SMALL_PHASE = ("from experiments.quickstart import get_config as quickstart\n"
                "def get_config(arg):\n  c = quickstart(arg)\n"
                "  c.data.train_split = 'train[:64]'\n"
                "  c.clusters.steps = 3\n  c.clusters.batch_size = 8\n  return c\n")


def _steps(workdir):
  from selfsup.metrics_log import read_metrics
  return [row["step"] for row in read_metrics(workdir)]


class _CompareRuns:
  """`compare(["gsimclr"])` with a 3-step clustering phase, where a SIGTERM can be sent to
  this process right after the first step in a given run directory (as a scheduler would
  send it); records the step each train_step call starts from, per directory."""

  def __init__(self, tmp_path, monkeypatch, capsys):
    from selfsup.trainer import Trainer
    self.config = tmp_path / "gsimclr_small.py"
    self.config.write_text(_SMALL_PHASE)
    self.workdir = tmp_path / "w"
    self.run_dir = self.workdir / "gsimclr"
    self.phase_dir = self.run_dir / "clusters" / "autoencoder"
    self.capsys = capsys
    self.kill_in = None
    self.started = []
    real_step = Trainer.train_step

    def train_step(trainer, batch):
      import signal
      self.started.append((os.path.relpath(trainer.workdir, self.workdir),
                           int(jax.device_get(trainer.state["step"]))))
      out = real_step(trainer, batch)
      if self.kill_in is not None and os.path.samefile(trainer.workdir, self.kill_in):
        self.kill_in = None
        # Only into the trainer's own handler: never the default action on the test run.
        assert callable(signal.getsignal(signal.SIGTERM)), "the trainer handles SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)
      return out

    monkeypatch.setattr(Trainer, "train_step", train_step)

  def __call__(self, kill_in=None):
    from evals.compare import compare
    self.kill_in, self.started = kill_in, []
    rows = compare(["gsimclr"], config=str(self.config), workdir=str(self.workdir), steps=4,
                   batch_size=8, image_size=16, encoder={"width_multiplier": 0.5},
                   max_train=64, max_test=32, log=lambda *a, **k: None)
    return [r["objectives"] for r in rows], self.capsys.readouterr().err


def _sigterm_in_the_clustering_phase(runs):
  names, err = runs(kill_in=runs.phase_dir)
  assert names == ["random-init"]                   # no row for the interrupted run
  assert "clustering phase was stopped by SIGTERM, saved" in err and "rerun" in err
  assert runs.started == [("gsimclr/clusters/autoencoder", 0)]
  assert os.listdir(runs.phase_dir / "checkpoints") == ["1"]
  assert not os.path.exists(phases.cluster_file(str(runs.run_dir)))
  assert not (runs.run_dir / "config.json").exists()   # the main run never started


@pytest.mark.ci   # trains the autoencoder: ~35 s of CPU on a cold compile cache
def test_compare_sigterm_in_the_clustering_phase_saves_and_stops(tmp_path, monkeypatch,
                                                                  capsys):
  """Was a crash: compare passed phase 1's "stopped" (None) on to a Trainer."""
  _sigterm_in_the_clustering_phase(_CompareRuns(tmp_path, monkeypatch, capsys))


@pytest.mark.ci   # three compares, two kinds of Trainer: ~100 s on 2 busy cores
def test_compare_sigterm_in_either_phase_resumes_that_phase(tmp_path, monkeypatch, capsys):
  runs = _CompareRuns(tmp_path, monkeypatch, capsys)
  _sigterm_in_the_clustering_phase(runs)
  # Rerun: the phase resumes at step 1 and finishes, k-means; SIGTERM in the main run.
  names, err = runs(kill_in=runs.run_dir)
  assert names == ["random-init"]
  assert runs.started == [("gsimclr/clusters/autoencoder", 1),
                          ("gsimclr/clusters/autoencoder", 2), ("gsimclr", 0)]
  assert "k-means" in err and "stopped by SIGTERM at step 1 of 4, saved; not probed" in err
  labels = np.load(phases.cluster_file(str(runs.run_dir)))
  # Rerun: neither the phase nor the k-means is redone; the main run resumes, is probed.
  names, err = runs()
  assert names == ["random-init", "gsimclr"]
  assert runs.started == [("gsimclr", 1), ("gsimclr", 2), ("gsimclr", 3)]
  assert "k-means" not in err
  np.testing.assert_array_equal(np.load(phases.cluster_file(str(runs.run_dir))), labels)
  assert _steps(runs.run_dir) == [1, 2, 3, 4] and _steps(runs.phase_dir) == [1, 2, 3]


def test_compare_refuses_a_cluster_file_that_does_not_match_before_anything(tmp_path):
  from evals.compare import compare
  bad = tmp_path / "c.npy"
  np.save(bad, np.zeros(7, np.int32))
  config = tmp_path / "ordered.py"
  config.write_text("from experiments.quickstart import get_config as quickstart\n"
                    "def get_config(arg):\n  c = quickstart(arg)\n"
                    "  c.data.train_split = 'train[:40]'\n"
                    "  c.data.order = 'cluster_balanced'\n"
                    f"  c.data.cluster_file = {str(bad)!r}\n  return c\n")
  with pytest.raises(UserError, match=r"config.data.cluster_file=.* 7 cluster ids .* 40 "
                                      "examples"):
    compare(["simclr"], config=str(config), workdir=str(tmp_path / "w"), steps=2,
            batch_size=8, image_size=16, max_train=40, max_test=16)
  assert not (tmp_path / "w").exists()


@pytest.mark.ci   # a subprocess that compiles the probe and the phase: ~1 min on 2 busy cores
def test_compare_cli_sigterm_in_the_clustering_phase_exits_0(tmp_path):
  import signal
  import subprocess
  import sys
  import time

  from conftest import ROOT
  config = tmp_path / "gsimclr_long_phase.py"
  config.write_text(_SMALL_PHASE.replace("c.clusters.steps = 3", "c.clusters.steps = 100000"))
  workdir = tmp_path / "w"
  phase_dir = workdir / "gsimclr" / "clusters" / "autoencoder"
  proc = subprocess.Popen(
      [sys.executable, "-m", "evals.compare", "--config", str(config), "--objectives",
       "gsimclr", "--steps", "4", "--batch_size", "8", "--image_size", "16", "--max_train",
       "64", "--max_test", "32", "--workdir", str(workdir)],
      cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = phase_dir / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and metrics.read_text().count("\n") >= 2:   # phase 1 is training
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
  assert "SIGTERM: saved step" in err
  assert (f"{workdir / 'gsimclr'}: run incomplete (its clustering phase was stopped by "
          "SIGTERM, saved)") in err
  assert [l.split()[0] for l in out.splitlines()[-2:]] == ["objectives", "random-init"]
  assert any(d.isdigit() for d in os.listdir(phase_dir / "checkpoints"))
  assert not (workdir / "gsimclr" / "config.json").exists()
