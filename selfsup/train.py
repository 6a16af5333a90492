"""`python -m selfsup.train --config experiments/NAME.py[:ARG] --workdir DIR [--config.KEY=VALUE]`

Trains (or resumes, when DIR holds checkpoints) the run the config describes, writing
DIR/metrics.jsonl, DIR/tensorboard, DIR/checkpoints and DIR/config.json.
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
  from selfsup.trainer import Trainer
  trainer = Trainer(config, workdir)
  last = trainer.run()
  if config.probe.enabled:
    from evals.linear_probe import probe_trainer
    result = probe_trainer(trainer)
    last.update(result)
  print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in last.items()}))


if __name__ == "__main__":
  cli.run_main(main)
