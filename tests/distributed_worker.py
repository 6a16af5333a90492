"""A training process for tests/test_distributed.py (not a test module itself).

    python tests/distributed_worker.py train  --config ... --workdir W [--config.K=V ...]
    python tests/distributed_worker.py single --config ... --workdir BASE [--config.K=V ...]

`train` is `python -m selfsup.train` as a user runs it (so SLURM's or JAX's variables
start the multi-process run); `single` trains the same config in ONE process on one
device (BASE/one) and on all devices with FSDP (BASE/eight). Test hooks, from the
environment: RECORD_DIR: each process appends the dataset indices of every local batch
to RECORD_DIR/<workdir name>.p<process>.jsonl; KILL_AT_STEP=k (with KILL_PROCESS=p,
default 1): process p kills itself with SIGKILL just before step k, as a preempted or
OOM-killed host would die. The toy objective `host_memory` (tests/host_hook_objective.py)
is registered in every worker, so configs can exercise the host-hook seam.
"""

import json
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _hook_train_step():
  import jax

  from selfsup import trainer as trainer_lib
  original = trainer_lib.Trainer.train_step
  record = os.environ.get("RECORD_DIR")
  kill = int(os.environ.get("KILL_AT_STEP", "0"))
  victim = int(os.environ.get("KILL_PROCESS", "1"))

  def train_step(self, batch):
    step = int(jax.device_get(self.state["step"])) + 1
    if kill and step == kill and jax.process_index() == victim:
      os.kill(os.getpid(), signal.SIGKILL)
    if record:
      name = os.path.basename(os.path.normpath(self.workdir or "none"))
      with open(os.path.join(record, f"{name}.p{jax.process_index()}.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "index": [int(i) for i in batch["index"]]}) + "\n")
    return original(self, batch)

  trainer_lib.Trainer.train_step = train_step


def _single(argv):
  del argv
  import jax
  from absl import flags

  from selfsup.trainer import Trainer
  config, base = flags.FLAGS.config, flags.FLAGS.workdir
  for name, devices, strategy in (("one", jax.devices()[:1], "replicate"),
                                  ("eight", jax.devices(), "fsdp")):
    c = config.copy_and_resolve_references()
    c.unlock()
    c.mesh.sharding = strategy
    Trainer(c, os.path.join(base, name), devices=devices).run()


def main():
  mode, argv = sys.argv[1], [sys.argv[0]] + sys.argv[2:]
  import host_hook_objective
  host_hook_objective.register()   # the configs name `host_memory` (a host-hook objective)
  _hook_train_step()
  from selfsup import cli
  if mode == "train":
    from selfsup import train
    cli.run_main(train.main, argv)
  else:
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "config", lock_config=True)
    flags.DEFINE_string("workdir", None, "base directory")
    cli.run_main(_single, argv)


if __name__ == "__main__":
  main()
