"""Multi-host start-up: `jax.distributed.initialize()` when launched on several hosts.

On TPU pods and SLURM/Open MPI GPU clusters JAX detects the coordinator by itself; the
environment variable SELFSUP_DISTRIBUTED=1 forces initialisation elsewhere (with
JAX's own COORDINATOR_ADDRESS/NUM_PROCESSES/PROCESS_ID variables), =0 disables it.
"""

import os

import jax


def maybe_initialize() -> None:
  flag = os.environ.get("SELFSUP_DISTRIBUTED", "auto")
  if flag == "0":
    return
  auto = any(v in os.environ for v in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
                                        "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS"))
  if flag == "1" or (auto and int(os.environ.get("SLURM_NTASKS",
                                                  os.environ.get("OMPI_COMM_WORLD_SIZE", "2"))) > 1):
    jax.distributed.initialize()
