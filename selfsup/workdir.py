"""A run directory: its config file, its lock, and start-up checks.

Kept apart from the trainer so evaluation (`evals/`) reads a run's configuration
without importing the training loop.

- `config.json` records the run's configuration. A rerun resumes only with the settings
  its checkpoints were made with (`check_workdir_config` names what differs).
- `prepare_workdir` fails in a second, with one line, when the directory (or its
  `checkpoints/`) is a file, cannot be created or is not writable, before anything is
  compiled (orbax would otherwise retry for minutes).
- `WorkdirLock`: one training process per run directory (an advisory `flock` on
  `DIR/.lock`, released by the kernel when the process dies; the lock file records who
  holds it, so a stale one is reported when taken over).
- `result.json` holds the final line a finished run printed, so a rerun can show it.
"""

import errno
import fcntl
import json
import os
import socket
import sys
import time

import jax
import ml_collections

from selfsup.errors import UserError

CONFIG_FILE = "config.json"
RESULT_FILE = "result.json"
LOCK_FILE = ".lock"

# Settings a checkpoint was made with: a resumed run must keep them, or config.json and
# the checkpoints would describe different runs (the schedule depends on train.steps; the
# data iterator's saved position means something only in the same batch order).
RESUME_FIXED = ("optimizer", "train.steps", "train.batch_size", "seed", "data.image_size",
                "data.order", "data.cluster_file", "clusters")
# What a config.json written before these settings existed ran with.
_BEFORE_ORDERS = {"data.order": "shuffle", "data.cluster_file": "", "clusters.enabled": False}


# ---- start-up checks -----------------------------------------------------------------
def prepare_workdir(workdir: str) -> None:
  """Creates `workdir` and checks that it and `checkpoints/` can be written."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir {workdir} is a file, not a directory; pass a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create --workdir {workdir}: {e.strerror or e}") from e
  _check_writable(workdir, "--workdir")
  ckdir = os.path.join(workdir, "checkpoints")
  if os.path.exists(ckdir):
    if not os.path.isdir(ckdir):
      raise UserError(f"{ckdir} is a file, not a directory; move it away (checkpoints go there)")
    _check_writable(ckdir, "the checkpoint folder")


def _check_writable(directory: str, what: str) -> None:
  probe = os.path.join(directory, f".write_test.{os.getpid()}")
  try:
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserError(f"{what} {directory} is not writable ({e.strerror or e}); "
                    "fix its permissions or use another --workdir") from e


# ---- the lock --------------------------------------------------------------------------
_HELD = {}   # realpath -> WorkdirLock held by this process


class WorkdirLock:
  """An exclusive advisory lock on a run directory for this process (process 0 only)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.fd = None
    self.users = 0

  @classmethod
  def acquire(cls, workdir: str) -> "WorkdirLock":
    key = os.path.realpath(workdir)
    lock = _HELD.get(key)
    if lock is None:
      lock = cls(workdir)
      lock._take()
      _HELD[key] = lock
    lock.users += 1
    return lock

  def _take(self) -> None:
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
      os.close(fd)
      if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise UserError(f"{os.path.dirname(self.path)} is in use by another training process "
                        f"({_describe(holder)}); wait for it to finish, stop it, or use "
                        "another --workdir") from e
      # A file system without locks (some network mounts): carry on, but say so.
      print(f"warning: cannot lock {self.path} ({e.strerror}); make sure no other run "
            "uses this workdir", file=sys.stderr)
      return
    previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
    if previous and not previous.startswith(f"{os.getpid()} {socket.gethostname()} "):
      print(f"warning: took over the stale lock of {os.path.dirname(self.path)} "
            f"({_describe(previous)}, which is no longer running)", file=sys.stderr)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {time.time():.0f}\n".encode(), 0)
    self.fd = fd

  def release(self) -> None:
    self.users -= 1
    if self.users > 0:
      return
    _HELD.pop(os.path.realpath(os.path.dirname(self.path)), None)
    if self.fd is not None:
      try:
        os.ftruncate(self.fd, 0)   # an empty lock file: released cleanly
        fcntl.flock(self.fd, fcntl.LOCK_UN)
      finally:
        os.close(self.fd)
        self.fd = None


def _describe(holder: str) -> str:
  parts = holder.split()
  if len(parts) >= 3:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(parts[2])))
    return f"process {parts[0]} on {parts[1]}, started {started}"
  return f"lock file says {holder!r}" if holder else "unknown process"


# ---- config.json -----------------------------------------------------------------------
def has_checkpoints(workdir: str) -> bool:
  ckdir = os.path.join(workdir, "checkpoints")
  return os.path.isdir(ckdir) and any(d.isdigit() for d in os.listdir(ckdir))


def read_saved_config(workdir: str) -> dict | None:
  """The run's config.json as a dict (None if absent); one line if it is damaged."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError("not a JSON object")
  except (ValueError, OSError) as e:
    raise UserError(f"{path} is damaged ({' '.join(str(e).split())[:100]}); it records the "
                    "run's configuration: restore it, or delete it to continue with the "
                    "config given on the command line") from e
  return saved


def check_workdir_config(workdir: str, config) -> None:
  """A workdir belongs to one run: refuse to resume it with other settings.

  The encoder and objectives may never change; once a checkpoint exists, neither may
  the settings it was made with (RESUME_FIXED: optimizer, steps, batch size, seed,
  image size, and the batch order: data.order, with data.cluster_file where the order is
  cluster_balanced and the clustering phase's `clusters` settings where it made the
  file). Logging, checkpoint cadence, data loading and mesh may change. The cluster file
  counts as the same when both names resolve to one file (`runs/x` or `./runs/x/`).
  """
  saved = read_saved_config(workdir)
  if saved is None:
    return
  now = json.loads(config.to_json())
  for section in ("encoder", "objectives"):
    if saved.get(section) != now[section]:
      raise UserError(
          f"{workdir} holds a run with {section} {json.dumps(saved.get(section))}, not "
          f"{json.dumps(now[section])}; use a new --workdir or the original config")
  if not has_checkpoints(workdir):
    return
  old, new = _fixed_settings(saved, now)
  differ = []
  for k in sorted(set(old) | set(new), key=_key_order):
    a, b = old.get(k, "(unset)"), new.get(k, "(unset)")
    if a != b and not (k == "data.cluster_file" and _same_file(a, b)):
      differ.append(f"{k} {json.dumps(a)} -> {json.dumps(b)}")
  if differ:
    raise UserError(
        f"{workdir} holds checkpoints made with other settings ({', '.join(differ)}); a run "
        "resumes only with its own settings (train.steps fixes the schedule, the batch order "
        "what the saved data position means): use a new --workdir or the original values")


def _fixed_settings(saved: dict, now: dict) -> tuple[dict, dict]:
  """RESUME_FIXED of both configs, flat, with the order's settings only where they define
  the order in either: data.cluster_file under cluster_balanced, clusters.* when enabled."""
  old, new = {}, {}
  for key in RESUME_FIXED:
    old.update(_flat(_get(saved, key), key))
    new.update(_flat(_get(now, key), key))
  for flat in (old, new):
    for k, v in _BEFORE_ORDERS.items():
      flat.setdefault(k, v)
  both = (old, new)
  if not any(f["data.order"] == "cluster_balanced" for f in both):
    for f in both:
      f.pop("data.cluster_file")
  if not any(f["clusters.enabled"] for f in both):
    for f in both:
      for k in [k for k in f if k.startswith("clusters.")]:
        f.pop(k)
  return old, new


def _key_order(key: str) -> tuple:
  """Differences listed in RESUME_FIXED's order, then by name."""
  for i, prefix in enumerate(RESUME_FIXED):
    if key == prefix or key.startswith(prefix + "."):
      return (i, key)
  return (len(RESUME_FIXED), key)


def _same_file(a, b) -> bool:
  return (isinstance(a, str) and isinstance(b, str) and bool(a) and bool(b)
          and os.path.realpath(a) == os.path.realpath(b))


def _get(tree: dict, dotted: str):
  for part in dotted.split("."):
    tree = tree.get(part) if isinstance(tree, dict) else None
  return tree


def _flat(value, prefix: str) -> dict:
  if isinstance(value, dict):
    out = {}
    for k, v in value.items():
      out.update(_flat(v, f"{prefix}.{k}"))
    return out
  return {} if value is None else {prefix: value}


def save_config(workdir: str, config) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  _write_atomic(os.path.join(workdir, CONFIG_FILE), config.to_json(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  saved = read_saved_config(workdir)
  if saved is None:
    raise UserError(f"{workdir} is not a training workdir (no {CONFIG_FILE}); pass the "
                    "--workdir given to selfsup.train")
  return ml_collections.ConfigDict(saved)


# ---- the final result ------------------------------------------------------------------
def save_result(workdir: str, text: str) -> None:
  if jax.process_index() == 0:
    _write_atomic(os.path.join(workdir, RESULT_FILE), text + "\n")


def load_result(workdir: str) -> str | None:
  path = os.path.join(workdir, RESULT_FILE)
  try:
    with open(path) as f:
      text = f.read().strip()
    json.loads(text)
    return text
  except (OSError, ValueError):
    return None


def _write_atomic(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)
