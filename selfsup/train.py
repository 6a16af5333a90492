"""`python -m selfsup.train --config experiments/NAME.py[:ARG] --workdir DIR [--config.KEY=VALUE]`

Trains (or resumes, when DIR holds checkpoints) the run the config describes, writing
DIR/metrics.jsonl, DIR/tensorboard, DIR/checkpoints and DIR/config.json, and prints one
JSON line (also kept in DIR/result.json). With `config.probe.enabled` the end-of-run
probe's splits are checked before training, and the probe runs only when the run
finishes: after SIGTERM the run saves, says it is incomplete, and exits 0 without
probing. Rerunning a finished run trains nothing: it says so and prints the saved result.
"""

import json
import sys

from absl import flags
from ml_collections import config_flags

from selfsup import cli

config_flags.DEFINE_config_file("config", None, "experiment config file [:ARG]",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, config)")


def main(argv):
  del argv
  from selfsup.errors import UserError
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if config is None or not workdir:
    raise UserError("usage: python -m selfsup.train --config experiments/NAME.py[:ARG] "
                    "--workdir DIR [--config.KEY=VALUE ...]")
  from selfsup import distributed
  distributed.maybe_initialize()
  from selfsup import config as config_lib
  config_lib.validate(config)
  config_lib.check_probe_splits(config)
  from selfsup import phases
  phases.check(config)
  from selfsup import workdir as workdir_lib
  from selfsup.trainer import Trainer
  # G-SimCLR's first phase (config.clusters), resumed or skipped when already done.
  config, ready = phases.prepare(config, workdir, log=lambda m: print(m, file=sys.stderr))
  if not ready:
    print(f"{workdir}: run incomplete (the clustering phase was stopped by SIGTERM, saved); "
          "rerun the same command to resume", file=sys.stderr)
    return
  trainer = Trainer(config, workdir)
  last = trainer.run()
  if trainer.finished_before:
    saved = workdir_lib.load_result(workdir)
    print(f"{workdir}: this run is already finished (step {trainer.start_step} of "
          f"{config.train.steps}); nothing to do. Results: {workdir}/metrics.jsonl"
          + (f", {workdir}/{workdir_lib.RESULT_FILE}" if saved else "")
          + f", checkpoints in {workdir}/checkpoints (use a new --workdir to train again)",
          file=sys.stderr)
    print(saved or _line({"step": trainer.start_step, **last}))
    return
  if trainer.preempted:
    step = trainer.checkpointer.latest_step()
    print(_line({"step": step, "total_steps": config.train.steps, "finished": False, **last}))
    print(f"{workdir}: run incomplete (stopped by SIGTERM at step {step} of "
          f"{config.train.steps}, saved)" + ("; the end-of-run probe was not run"
                                            if config.probe.enabled else "")
          + "; rerun the same command to resume", file=sys.stderr)
    return
  if config.probe.enabled:
    from evals.linear_probe import probe_trainer
    result = probe_trainer(trainer)
    last.update(result)
  text = _line(last)
  workdir_lib.save_result(workdir, text)
  print(text)


def _line(row: dict) -> str:
  from selfsup.metrics_log import format_line
  return format_line({k: round(v, 6) if isinstance(v, float) else v
                      for k, v in row.items()}).strip()


if __name__ == "__main__":
  cli.run_main(main)
