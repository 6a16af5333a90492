"""Faults a long run meets (issue 7, training side): nothing saved is lost, nothing is
silently wrong, and a bad input is one line.

Most tests work on copies of one finished 6-step run (checkpoints 3 and 6), so only a
few of them compile a step.
"""

import errno
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from conftest import ROOT, run_cli, tiny_config
from selfsup import checkpoint as ckpt_lib
from selfsup import config as config_lib
from selfsup import metrics_log
from selfsup import optim
from selfsup import workdir as workdir_lib
from selfsup.errors import UserError
from selfsup.trainer import NonFiniteError, Trainer


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A finished 6-step run with checkpoints 3 and 6 (trained once per module)."""
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  Trainer(tiny_config("rotation", steps=6), workdir).run()
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  return workdir


def _copy(run, tmp_path, name="run"):
  target = str(tmp_path / name)
  shutil.copytree(run, target)
  return target


def _all_finite(tree):
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


# ---- 1, and the start-up value checks ---------------------------------------------------
@pytest.mark.parametrize("key,value", [
    ("keep_checkpoints", 0), ("keep_checkpoints", -1), ("log_every", 0),
    ("checkpoint_every", 0), ("on_nonfinite", "ignore")])
def test_bad_train_values_are_refused_before_anything_runs(tmp_path, key, value):
  c = tiny_config()
  c.train[key] = value
  with pytest.raises(UserError, match=f"train.{key}"):
    Trainer(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")   # refused before the workdir is touched


# ---- 2: divergence ----------------------------------------------------------------------
def _diverging(steps=4, mode="stop"):
  c = tiny_config("rotation", steps=steps)
  c.optimizer.lr = 1e10
  c.train.checkpoint_every = 2
  c.train.on_nonfinite = mode
  return c


def _strict_rows(workdir):
  def refuse(token):
    raise AssertionError(f"bare {token} in metrics.jsonl")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line, parse_constant=refuse) for line in f]


def test_divergence_stops_or_skips_and_no_checkpoint_is_nonfinite(tmp_path):
  # One Trainer (one compile) for both modes: on_nonfinite is read by the host loop.
  workdir = str(tmp_path / "w")
  trainer = Trainer(_diverging(steps=4, mode="stop"), workdir)
  with pytest.raises(NonFiniteError, match="diverged.*on_nonfinite=skip"):
    trainer.run()
  rows = _strict_rows(workdir)
  assert rows[-1]["nonfinite_steps"] >= 1 and rows[-1]["loss"] is None
  stopped_at = rows[-1]["step"]
  assert stopped_at < 4
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert all(s < stopped_at for s in checkpointer.steps())  # nothing saved after divergence

  trainer.config.unlock()
  trainer.config.train.on_nonfinite = "skip"
  trainer.run()                                   # carries on in memory to step 4
  rows = _strict_rows(workdir)
  assert rows[-1]["step"] == 4 and sum(r["nonfinite_steps"] for r in rows) >= 2
  assert _all_finite(jax.device_get(trainer.state))
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert checkpointer.steps()[-1] == 4
  for step in checkpointer.steps():
    assert _all_finite(checkpointer.restore_state_only(step)), step


def test_nan_metrics_are_written_as_null():
  line = metrics_log.format_line({"step": 3, "loss": float("nan"), "lr": float("inf"), "x": 1.5})
  assert json.loads(line) == {"step": 3, "loss": None, "lr": None, "x": 1.5}


# ---- 3: torn last line in metrics.jsonl ------------------------------------------------
def test_torn_last_metrics_line_is_tolerated_and_dropped_on_resume(tmp_path, capsys):
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
  path.write_text("".join(metrics_log.format_line(r) for r in rows) + '{"step": 4, "lo')
  assert metrics_log.read_metrics(str(tmp_path)) == rows
  logger = metrics_log.MetricsLogger(str(tmp_path), total_steps=10, start_step=3,
                                     progress_bar=False)
  logger.log(4, {"loss": 0.25, "images_per_s": 1.0})
  logger.close()
  assert [r["step"] for r in _strict_rows(str(tmp_path))] == [1, 2, 3, 4]
  assert "torn last line" in capsys.readouterr().err


# ---- 9: the workdir lock -----------------------------------------------------------------
HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()} otherhost {time.time():.0f}\\n".encode())
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_process_cannot_train_in_a_locked_workdir(tmp_path):
  workdir = tmp_path / "w"
  workdir.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(workdir / ".lock")],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(UserError, match=f"in use by another training process.*{holder.pid}"):
      Trainer(tiny_config(), str(workdir))
  finally:
    holder.kill()
    holder.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (tmp_path / ".lock").write_text(f"{dead.pid} somehost {time.time():.0f}\n")
  lock = workdir_lib.WorkdirLock.acquire(str(tmp_path))
  try:
    assert "stale lock" in capsys.readouterr().err
    assert (tmp_path / ".lock").read_text().startswith(f"{os.getpid()} ")
  finally:
    lock.release()
  assert (tmp_path / ".lock").read_text() == ""   # released cleanly: nothing stale next time


# ---- 10: damaged checkpoints -------------------------------------------------------------
def _damage(workdir, kind, step=6):
  folder = os.path.join(workdir, "checkpoints", str(step))
  if kind == "truncated array file":
    biggest = max(glob.glob(os.path.join(folder, "state", "**", "d", "*"), recursive=True),
                  key=os.path.getsize)
    with open(biggest, "r+b") as f:
      f.truncate(64)
  elif kind == "missing metadata":
    os.remove(os.path.join(folder, "state", "_METADATA"))
  elif kind == "empty step folder":
    shutil.rmtree(folder)
    os.makedirs(folder)


@pytest.mark.parametrize("kind", ["truncated array file", "missing metadata",
                                  "empty step folder"])
def test_probe_falls_back_from_a_damaged_newest_checkpoint(finished_run, tmp_path, kind, capsys):
  from evals.features import load_encoder
  workdir = _copy(finished_run, tmp_path)
  _damage(workdir, kind)
  _, _, variables, step = load_encoder(workdir)
  assert step == 3 and _all_finite(variables)
  assert "skipped damaged checkpoint step 6" in capsys.readouterr().err
  with pytest.raises(UserError, match="--step 6: the checkpoint cannot be read"):
    load_encoder(workdir, step=6)


def test_probe_step_that_does_not_exist_lists_the_steps(finished_run):
  from evals.features import load_encoder
  with pytest.raises(UserError, match="no checkpoint for that step; available steps: 3, 6"):
    load_encoder(finished_run, step=5)


def test_training_resumes_from_the_newest_readable_checkpoint(finished_run, tmp_path, capsys):
  workdir = _copy(finished_run, tmp_path)
  _damage(workdir, "truncated array file")
  trainer = Trainer(tiny_config("rotation", steps=6), workdir)
  assert int(trainer.state["step"]) == 3
  err = capsys.readouterr().err
  assert "checkpoint step 6" in err and "damaged" in err and "resumed from step 3" in err
  # Moved aside, not deleted; and step 6 can be written again.
  assert os.listdir(os.path.join(workdir, "checkpoints.damaged")) == ["6"]
  trainer.save(6)
  trainer.checkpointer.wait()
  assert trainer.checkpointer.steps() == [3, 6]
  trainer.close()


# ---- 11 and disk full: what cannot be written fails fast ---------------------------------
def test_workdir_that_is_a_file_or_cannot_be_written(tmp_path, monkeypatch):
  (tmp_path / "file").write_text("x")
  with pytest.raises(UserError, match="is a file, not a directory"):
    workdir_lib.prepare_workdir(str(tmp_path / "file"))
  with pytest.raises(UserError, match="cannot create --workdir"):
    workdir_lib.prepare_workdir(str(tmp_path / "file" / "sub"))
  (tmp_path / "w").mkdir()
  (tmp_path / "w" / "checkpoints").write_text("x")
  with pytest.raises(UserError, match="checkpoints is a file"):
    workdir_lib.prepare_workdir(str(tmp_path / "w"))

  def read_only(path, *args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system", path)
  monkeypatch.setattr(workdir_lib, "open", read_only, raising=False)
  with pytest.raises(UserError, match="not writable .Read-only file system"):
    workdir_lib.prepare_workdir(str(tmp_path / "ro"))


def test_disk_full_while_saving_keeps_the_previous_checkpoint(finished_run, tmp_path,
                                                              monkeypatch):
  workdir = _copy(finished_run, tmp_path)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  trainer = Trainer(tiny_config("rotation", steps=6), workdir, async_checkpoints=False)
  real_save = trainer.checkpointer.manager.save

  def full(step, *args, **kwargs):
    if step == 6:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(step, *args, **kwargs)
  monkeypatch.setattr(trainer.checkpointer.manager, "save", full)
  with pytest.raises(ckpt_lib.CheckpointWriteError,
                     match="disk full.*newest intact checkpoint is step 3.*rerun"):
    trainer.save(6)
  trainer.close()
  assert ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")).steps() == [3]
  resumed = Trainer(tiny_config("rotation", steps=6), workdir)   # space freed: resumes
  assert int(resumed.state["step"]) == 3
  resumed.close()


SINGLE_SLURM_PROCESS = {"SLURM_JOB_ID": "123", "SLURM_STEP_NODELIST": "localhost",
                        "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                        "SELFSUP_DISTRIBUTED_TIMEOUT": "3"}


def test_slurm_with_one_of_two_processes_fails_within_the_timeout():
  t0 = time.time()
  proc = run_cli(["-c", "from selfsup import distributed; distributed.maybe_initialize()"],
                 env_extra=SINGLE_SLURM_PROCESS, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith("error: 2 processes were expected")
  assert time.time() - t0 < 60


# ---- resuming: settings, finished runs ---------------------------------------------------
def test_resuming_with_another_optimizer_or_length_is_refused(finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path)
  before = open(os.path.join(workdir, "config.json")).read()
  c = tiny_config("rotation", steps=6)
  c.optimizer.lr = 0.5
  c.optimizer.name = "sgd"
  with pytest.raises(UserError) as refused:
    Trainer(c, workdir)
  assert "optimizer.lr 0.002 -> 0.5" in str(refused.value)
  assert 'optimizer.name "adamw" -> "sgd"' in str(refused.value)
  longer = tiny_config("rotation", steps=12)
  with pytest.raises(UserError, match="train.steps 6 -> 12"):
    Trainer(longer, workdir)
  assert open(os.path.join(workdir, "config.json")).read() == before  # never rewritten


def _saved_run(tmp_path, config, name="run"):
  """A workdir as a run leaves it once it has a checkpoint: its config.json, checkpoint 3."""
  workdir = str(tmp_path / name)
  workdir_lib.save_config(workdir, config)
  os.makedirs(os.path.join(workdir, "checkpoints", "3"))
  return workdir


def _gsimclr_phases(workdir):
  """G-SimCLR's two configs as `phases.prepare` makes them for this workdir."""
  from selfsup import phases
  c = tiny_config("gsimclr")
  main = ml_collections.ConfigDict(c.to_dict())
  main.data.cluster_file = phases.cluster_file(workdir)
  return c, phases.phase_config(c), main


def test_resuming_with_another_batch_order_is_refused(tmp_path):
  # A run on the uniform shuffle, resumed on a cluster-balanced order.
  plain = _saved_run(tmp_path, tiny_config("simclr"))
  ordered = tiny_config("simclr")
  ordered.data.order = "cluster_balanced"
  ordered.data.cluster_file = "c.npy"
  with pytest.raises(UserError) as refused:
    workdir_lib.check_workdir_config(plain, ordered)
  message = str(refused.value)
  assert len(message.splitlines()) == 1
  assert 'data.order "shuffle" -> "cluster_balanced", data.cluster_file "" -> "c.npy"' in message
  # G-SimCLR: another cluster file, another clustering, or the clustering phase switched
  # off, each refused with every difference named.
  workdir = str(tmp_path / "gsimclr")
  _, _, main = _gsimclr_phases(workdir)
  _saved_run(tmp_path, main, "gsimclr")
  other = ml_collections.ConfigDict(main.to_dict())
  other.data.cluster_file = str(tmp_path / "elsewhere.npy")
  other.clusters.k = 4
  other.clusters.steps = 7
  with pytest.raises(UserError) as refused:
    workdir_lib.check_workdir_config(workdir, other)
  assert (f'data.cluster_file "{main.data.cluster_file}" -> "{other.data.cluster_file}", '
          'clusters.k 0 -> 4, clusters.steps 300 -> 7') in str(refused.value)
  off = ml_collections.ConfigDict(main.to_dict())
  off.clusters.enabled = False
  with pytest.raises(UserError, match=r"\(clusters.enabled true -> false\)"):
    workdir_lib.check_workdir_config(workdir, off)
  # Through the Trainer (before it builds anything): config.json is not rewritten.
  before = open(os.path.join(workdir, "config.json")).read()
  with pytest.raises(UserError, match="clusters.k 0 -> 4"):
    Trainer(other, workdir)
  assert open(os.path.join(workdir, "config.json")).read() == before


def test_an_unchanged_order_still_resumes(tmp_path, monkeypatch):
  from selfsup import phases
  # G-SimCLR rerun with the same command: both phases' configs as saved.
  workdir = str(tmp_path / "gsimclr")
  command, phase1, main = _gsimclr_phases(workdir)
  phase_dir = _saved_run(tmp_path, phase1, os.path.join("gsimclr", phases.CLUSTER_DIR,
                                                         "autoencoder"))
  _saved_run(tmp_path, main, "gsimclr")
  workdir_lib.check_workdir_config(phase_dir, phases.phase_config(command))
  workdir_lib.check_workdir_config(workdir, _gsimclr_phases(workdir)[2])
  # The same cluster file named another way: from another directory, with ./ and /.
  monkeypatch.chdir(tmp_path)
  respelled = ml_collections.ConfigDict(main.to_dict())
  respelled.data.cluster_file = os.path.join(".", "gsimclr", "", "clusters", "clusters.npy")
  workdir_lib.check_workdir_config(workdir, respelled)
  # Settings that do not define the order here may change: the clustering settings of a
  # run without the phase, and (phase 1) the k-means' K, used only after it.
  plain = tiny_config("simclr")
  plain_dir = _saved_run(tmp_path, plain, "plain")
  plain.clusters.k = 5
  workdir_lib.check_workdir_config(plain_dir, plain)
  command.clusters.k = 5
  workdir_lib.check_workdir_config(phase_dir, phases.phase_config(command))
  # A config.json written before the batch orders existed: it ran on the shuffle.
  with open(os.path.join(plain_dir, "config.json")) as f:
    saved = json.load(f)
  del saved["data"]["order"], saved["data"]["cluster_file"], saved["clusters"]
  with open(os.path.join(plain_dir, "config.json"), "w") as f:
    json.dump(saved, f)
  workdir_lib.check_workdir_config(plain_dir, tiny_config("simclr"))


def test_damaged_config_json_is_one_line(finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path)
  path = os.path.join(workdir, "config.json")
  text = open(path).read()
  open(path, "w").write(text[: len(text) // 2])
  with pytest.raises(UserError, match="config.json is damaged"):
    Trainer(tiny_config("rotation", steps=6), workdir)
  with pytest.raises(UserError, match="config.json is damaged"):
    workdir_lib.load_config(workdir)


def test_rerunning_a_finished_run_returns_its_last_metrics(finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path)
  trainer = Trainer(tiny_config("rotation", steps=6), workdir)
  last = trainer.run()
  assert trainer.finished_before and trainer.start_step == 6
  assert last["loss"] == metrics_log.read_metrics(workdir)[-1]["loss"]


# ---- sensible behaviour --------------------------------------------------------------------
def test_warmup_in_epochs_follows_a_shortened_run(capsys):
  from experiments import simclr_cifar10
  c = simclr_cifar10.get_config()
  c.train.steps = 6
  schedule = optim.learning_rate(c.optimizer, c.train.batch_size, c.train.steps)
  assert "is not below train.steps=6" in capsys.readouterr().err
  lrs = [float(schedule(s)) for s in range(6)]
  assert max(lrs) > 0 and all(np.isfinite(lrs))


def test_the_probe_splits_are_checked_before_training():
  c = tiny_config()
  c.probe.enabled = True
  c.data.test_split = "test[:x]"
  with pytest.raises(UserError, match="data.test_split"):
    config_lib.check_probe_splits(c)


# ---- one line, exit 2, from the command line ------------------------------------------------
TRAIN = ["-m", "selfsup.train", "--config", "experiments/quickstart.py:rotation",
         "--config.train.progress_bar=False", "--config.train.steps=2",
         "--config.train.batch_size=8", "--config.data.image_size=16",
         "--config.probe.enabled=False"]


def _one_line(proc, *fragments):
  assert proc.returncode == 2, (proc.stdout, proc.stderr[-2000:])
  lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("case", ["missing config", "config syntax", "keep -1",
                                  "checkpoints is a file", "bench steps 0"])
def test_one_line_errors(tmp_path, case):
  workdir = str(tmp_path / "w")
  args, fragments = TRAIN + ["--workdir", workdir], []
  if case == "missing config":
    args[3], fragments = str(tmp_path / "nope.py"), ["nope.py", "No such file"]
  elif case == "config syntax":
    (tmp_path / "bad.py").write_text("def get_config(:\n")
    args[3], fragments = str(tmp_path / "bad.py"), ["bad.py", "syntax error on line 1"]
  elif case == "keep -1":
    args, fragments = args + ["--config.train.keep_checkpoints=-1"], ["keep_checkpoints", ">= 1"]
  elif case == "checkpoints is a file":
    os.makedirs(workdir)
    open(os.path.join(workdir, "checkpoints"), "w").close()
    fragments = ["checkpoints is a file"]
  else:
    args = ["-m", "selfsup.bench", "--config", "experiments/simclr_cifar10.py", "--steps", "0"]
    fragments = ["--steps must be >= 1"]
  t0 = time.time()
  _one_line(run_cli(args, timeout=120), *fragments)
  assert time.time() - t0 < 60


# ---- issue 6 item 8: the bench needs no dataset ----------------------------------------------
def test_bench_runs_on_synthetic_batches_of_the_configs_shape(tmp_path):
  from experiments import simclr_cifar10
  from selfsup import bench
  c = simclr_cifar10.get_config()           # tfds:cifar10, which this machine may not have
  c.data.data_dir = str(tmp_path / "no_tfds_here")
  c.data.num_workers = 0
  c.train.batch_size = 8
  c.train.progress_bar = False
  c.encoder = {"name": "tiny_cnn", "width_multiplier": 0.5}   # the data path is what is tested
  result = bench.benchmark(bench.with_data(c, "synthetic"), steps=1)
  assert result["data"] == "synthetic:shapes" and result["image_size"] == 32
  assert result["batch_size"] == 8 and result["images_per_s"] > 0
  # The compile split: trace+lower and XLA compile, cold; the warm one loads the cache.
  assert 0 < result["trace_s"] < result["compile_s"] and result["xla_compile_s"] > 0
  assert result["cache_hit_warm"] is True
  with pytest.raises(UserError, match="--steps must be >= 1"):
    bench.benchmark(c, steps=-3)


def test_bench_of_a_cluster_ordered_config_needs_no_cluster_file():
  """G-SimCLR's config orders batches by a cluster file made in its first phase; the
  bench times the step, so it skips that phase and shuffles (it failed on the missing
  file before)."""
  from experiments import gsimclr_cifar10
  from selfsup import bench
  c = gsimclr_cifar10.get_config()
  assert c.data.order == "cluster_balanced" and c.clusters.enabled
  c = bench.with_data(c, "synthetic")
  assert c.data.order == "shuffle" and not c.clusters.enabled and c.data.cluster_file == ""
