"""Multi-host start-up and the few host-side helpers a multi-process run needs.

Start-up: `jax.distributed.initialize()` when launched on several hosts. On TPU pods and
SLURM/Open MPI clusters JAX detects the coordinator by itself; the environment variable
SELFSUP_DISTRIBUTED=1 forces initialisation elsewhere (with JAX's own
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables, e.g. two
processes on one machine), =0 disables it.

The processes must all check in within SELFSUP_DISTRIBUTED_TIMEOUT seconds (default
60). If they do not (e.g. `python` started once inside a 2-task SLURM allocation
instead of `srun python`), the process prints one line and exits with status 2 after
that time, instead of JAX's silent 300 s wait followed by an abort.

A process that dies (preemption, OOM kill) is noticed by the others within
SELFSUP_HEARTBEAT_TIMEOUT seconds (default 10): `PeerWatchdog` asks JAX's coordination
service every second and ends the process with one line (exit status 3), and
`stop_message` turns the error a collective may raise first into one line.
Rerunning every process resumes from the newest checkpoint.

Host helpers (any number of processes, the same answer on every one): `to_host`
(a whole global array as NumPy, gathered when it spans processes), `RowReader` (rows
of a large sharded table, without gathering the table) and `put_global` (a NumPy
value, identical on every process, onto a sharding).
"""

import os
import sys
import threading

import jax
import numpy as np

DEFAULT_TIMEOUT_S = 60
DEFAULT_HEARTBEAT_S = 10


def maybe_initialize() -> None:
  flag = os.environ.get("SELFSUP_DISTRIBUTED", "auto")
  if flag == "0":
    return
  auto = any(v in os.environ for v in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
                                        "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS"))
  expected = os.environ.get("SLURM_NTASKS", os.environ.get(
      "OMPI_COMM_WORLD_SIZE", os.environ.get("JAX_NUM_PROCESSES", "2")))
  if flag == "1" or (auto and int(expected) > 1):
    initialize_with_timeout(expected)


def initialize_with_timeout(expected: str = "?") -> None:
  """jax.distributed.initialize(), or one line and exit 2 after the stated timeout."""
  timeout = float(os.environ.get("SELFSUP_DISTRIBUTED_TIMEOUT", DEFAULT_TIMEOUT_S))
  heartbeat = int(os.environ.get("SELFSUP_HEARTBEAT_TIMEOUT", DEFAULT_HEARTBEAT_S))
  launcher = _launcher()
  # JAX aborts the process (a C++ fatal error, no exception) when its own timeout
  # passes, so a watchdog thread says what is wrong first and ends the process.
  def give_up():
    print(f"error: {expected} processes were expected ({launcher} environment) but not all "
          f"of them reached the coordinator within {timeout:g} s; start every process "
          "(e.g. `srun python -m ...`), raise SELFSUP_DISTRIBUTED_TIMEOUT, or set "
          "SELFSUP_DISTRIBUTED=0 to run as a single process", file=sys.stderr, flush=True)
    os._exit(2)

  # CPU processes exchange collectives over TCP (gloo); accelerators ignore this.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  watchdog = threading.Timer(timeout, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    explicit = {}   # JAX reads only the address from the environment; these two too
    if "JAX_NUM_PROCESSES" in os.environ and "JAX_PROCESS_ID" in os.environ:
      explicit = {"num_processes": int(os.environ["JAX_NUM_PROCESSES"]),
                  "process_id": int(os.environ["JAX_PROCESS_ID"])}
    jax.distributed.initialize(initialization_timeout=int(timeout) + 60,
                               heartbeat_timeout_seconds=heartbeat, **explicit)
  except (ValueError, RuntimeError) as e:  # e.g. a cluster environment JAX cannot read
    from selfsup.errors import UserError
    raise UserError(f"multi-host start-up failed ({launcher} environment, {expected} processes "
                    f"expected): {' '.join(str(e).split())[:200]}; set SELFSUP_DISTRIBUTED=0 "
                    "to run as a single process") from e
  finally:
    watchdog.cancel()
  use_coordination_barriers()


def use_coordination_barriers() -> None:
  """Orbax's barriers through the coordination service, not collectives.

  Orbax's default barrier is a collective (`sync_global_devices`); run from its
  background save thread while the training loop issues the step's collectives, the
  two orders can differ between processes and the run deadlocks after a save (seen
  with 2 CPU processes). The coordination service's barriers do not interleave.
  """
  import orbax.checkpoint  # noqa: F401 - defines the flag
  from absl import flags
  name = "experimental_orbax_use_distributed_barrier"
  if name in flags.FLAGS:
    flags.FLAGS[name].value = True


def _launcher() -> str:
  return ("SLURM" if "SLURM_NTASKS" in os.environ else
          "Open MPI" if "OMPI_COMM_WORLD_SIZE" in os.environ else
          "TPU pod" if "TPU_WORKER_HOSTNAMES" in os.environ else "the launcher")


class PeerWatchdog:
  """While training, checks every `interval` s that every process is alive.

  JAX's coordination service notices a process that stopped sending heartbeats
  (SELFSUP_HEARTBEAT_TIMEOUT s) and then aborts the others with a C++ fatal error among
  pages of log; this thread asks the service first and ends this process with one line
  and exit status 3 instead. Stopped before the processes finish at different times.
  """

  def __init__(self, interval: float = 1.0):
    self._stop = threading.Event()
    self._thread = None
    if jax.process_count() < 2:
      return
    from jax._src import distributed as jax_distributed  # the runtime client
    self._client = getattr(jax_distributed.global_state, "client", None)
    if self._client is None or not hasattr(self._client, "get_live_nodes"):
      return
    self._interval = interval
    self._thread = threading.Thread(target=self._watch, name="peer-watchdog", daemon=True)
    self._thread.start()

  def _watch(self):
    everyone = list(range(jax.process_count()))
    while not self._stop.wait(self._interval):
      try:
        live = self._client.get_live_nodes(everyone)
      except Exception:  # noqa: BLE001 - the service itself is gone (process 0 died)
        live = {}
      if self._stop.is_set():
        return
      missing = [p for p in everyone if p not in live]
      if missing:
        print(f"error: process {jax.process_index()} of {jax.process_count()} stopped: "
              f"process(es) {', '.join(map(str, missing)) if live else '0 (the coordinator)'} "
              "of the run went away (killed, preempted or crashed; see that host's log); "
              "the newest complete checkpoint is intact: restart every process with the "
              "same command to resume", file=sys.stderr, flush=True)
        os._exit(3)

  def stop(self):
    self._stop.set()


_BARRIERS = [0]


def barrier(name: str, timeout_s: float = 1800) -> None:
  """Waits until every process gets here (the coordination service, not a collective).

  On CPU the first collective of a run sets up gloo, which gives up when the processes
  arrive more than 30 s apart (a compile that is slower on one host, or one that hit
  the compilation cache); the trainer waits here after compiling the step instead.
  """
  if jax.process_count() < 2:
    return
  from jax._src import distributed as jax_distributed
  client = getattr(jax_distributed.global_state, "client", None)
  if client is None:
    return
  _BARRIERS[0] += 1
  client.wait_at_barrier(f"selfsup:{name}:{_BARRIERS[0]}", int(timeout_s * 1000))


def stop_message(error: BaseException) -> str | None:
  """One line when `error` says another process of a multi-process run went away."""
  if jax.process_count() < 2:
    return None
  text = " ".join(str(error).split())
  signs = ("Connection reset", "connection reset", "Connection closed", "closed by peer",
           "heartbeat", "Heartbeat", "UNAVAILABLE", "DEADLINE_EXCEEDED", "Gloo", "gloo",
           "coordination service", "task has died", "failed to connect", "Broken pipe")
  if not any(s in text for s in signs):
    return None
  return (f"error: process {jax.process_index()} of {jax.process_count()} stopped: another "
          f"process of the run went away ({type(error).__name__}: {text[:160]}); the newest "
          "checkpoint is intact: restart every process with the same command to resume")


# ---- host helpers ------------------------------------------------------------------------
def to_host(x) -> np.ndarray:
  """A whole (global) array as NumPy on every process: gathered if it spans processes."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


class RowReader:
  """`reader[rows]` = table[rows] as NumPy, for a table that may span processes.

  Only the rows asked for travel: a jitted gather whose result is replicated, so every
  process reads the same rows of a table that no single host holds whole (a
  per-example table on ImageNet). `rows` must be the same on every process.
  """

  def __init__(self, table):
    self.table = table

  def __getitem__(self, rows):
    t = self.table
    if not isinstance(t, jax.Array) or t.is_fully_addressable:
      return np.asarray(t[rows])
    sharding = t.sharding
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    rows = np.asarray(rows)
    index = put_global(rows, replicated)
    out = jax.jit(lambda a, i: a[i], out_shardings=replicated)(t, index)
    return np.asarray(out.addressable_data(0))


def put_global(value, sharding):
  """A value identical on every process, as a global array with `sharding`."""
  if isinstance(value, jax.Array):
    return jax.device_put(value, sharding)
  value = np.asarray(value)
  if jax.process_count() == 1:
    return jax.device_put(value, sharding)
  return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])
