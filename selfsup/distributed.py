"""Multi-host start-up: `jax.distributed.initialize()` when launched on several hosts.

On TPU pods and SLURM/Open MPI GPU clusters JAX detects the coordinator by itself; the
environment variable SELFSUP_DISTRIBUTED=1 forces initialisation elsewhere (with
JAX's own COORDINATOR_ADDRESS/NUM_PROCESSES/PROCESS_ID variables), =0 disables it.

The processes must all check in within SELFSUP_DISTRIBUTED_TIMEOUT seconds (default
60). If they do not (e.g. `python` started once inside a 2-task SLURM allocation
instead of `srun python`), the process prints one line and exits with status 2 after
that time, instead of JAX's silent 300 s wait followed by an abort.
"""

import os
import sys
import threading

import jax

DEFAULT_TIMEOUT_S = 60


def maybe_initialize() -> None:
  flag = os.environ.get("SELFSUP_DISTRIBUTED", "auto")
  if flag == "0":
    return
  auto = any(v in os.environ for v in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
                                        "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS"))
  expected = os.environ.get("SLURM_NTASKS", os.environ.get("OMPI_COMM_WORLD_SIZE", "2"))
  if flag == "1" or (auto and int(expected) > 1):
    initialize_with_timeout(expected)


def initialize_with_timeout(expected: str = "?") -> None:
  """jax.distributed.initialize(), or one line and exit 2 after the stated timeout."""
  timeout = float(os.environ.get("SELFSUP_DISTRIBUTED_TIMEOUT", DEFAULT_TIMEOUT_S))
  launcher = ("SLURM" if "SLURM_NTASKS" in os.environ else
              "Open MPI" if "OMPI_COMM_WORLD_SIZE" in os.environ else "the launcher")
  # JAX aborts the process (a C++ fatal error, no exception) when its own timeout
  # passes, so a watchdog thread says what is wrong first and ends the process.
  def give_up():
    print(f"error: {expected} processes were expected ({launcher} environment) but not all "
          f"of them reached the coordinator within {timeout:g} s; start every process "
          "(e.g. `srun python -m ...`), raise SELFSUP_DISTRIBUTED_TIMEOUT, or set "
          "SELFSUP_DISTRIBUTED=0 to run as a single process", file=sys.stderr, flush=True)
    os._exit(2)

  watchdog = threading.Timer(timeout, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(initialization_timeout=int(timeout) + 60)
  except (ValueError, RuntimeError) as e:  # e.g. a cluster environment JAX cannot read
    from selfsup.errors import UserError
    raise UserError(f"multi-host start-up failed ({launcher} environment, {expected} processes "
                    f"expected): {' '.join(str(e).split())[:200]}; set SELFSUP_DISTRIBUTED=0 "
                    "to run as a single process") from e
  finally:
    watchdog.cancel()
