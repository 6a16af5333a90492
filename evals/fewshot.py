"""`python -m evals.fewshot --checkpoint DIR --dataset SOURCE [--shots 1,5,10,25]
[--seeds 0,1,2] [--l2 1024] [--output FILE.json]`

Few-shot ridge regression on frozen features (EVALUATION.md; big_vision `fewshot_lsr`,
`evals.knn.fewshot_ridge`): for each shot count, the mean top-1 over the seeds and its
spread (standard deviation), printed as one JSON object like the linear probe's.
"""

import time

from absl import flags

from evals import linear_probe
from evals.knn import fewshot_ridge
from selfsup import cli
from selfsup.errors import UserError


def _ints(text: str, flag: str) -> list:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise UserError(f"{flag} must be comma-separated integers, not {text!r}") from None
  if not values:
    raise UserError(f"{flag} is empty")
  return values


def fewshot_checkpoint(run, *, shots=(1, 5, 10, 25), seeds=(0, 1, 2), l2=2.0 ** 10,
                       feature_cache=None) -> dict:
  """Few-shot ridge regression on a loaded run (`linear_probe.load_checkpoint`)."""
  t0 = time.perf_counter()
  splits = run.splits(cache_dir=feature_cache)
  (tx, ty), (sx, sy) = splits["train"], splits["test"]
  t1 = time.perf_counter()
  result = fewshot_ridge(tx, ty, sx, sy, shots=shots, seeds=seeds, l2=l2)
  result.update(shots=list(shots), seeds=list(seeds), l2=float(l2), num_train=int(len(ty)),
                num_test=int(len(sy)), feature_dim=int(tx.shape[1]), feature_seconds=t1 - t0,
                fewshot_seconds=time.perf_counter() - t1, **run.meta())
  return result


def main(argv):
  del argv
  f = flags.FLAGS
  linear_probe.check_data_flags(f, "usage: python -m evals.fewshot --checkpoint DIR --dataset "
                                   "SOURCE [--shots 1,5,10,25] [--seeds 0,1,2]")
  shots, seeds = _ints(f.shots, "--shots"), _ints(f.seeds, "--seeds")
  if min(shots) < 1 or f.l2 <= 0:
    raise UserError(f"--shots must be >= 1 and --l2 > 0; got {f.shots} and {f.l2}")
  result = fewshot_checkpoint(linear_probe.loaded_from_flags(f), shots=shots, seeds=seeds,
                              l2=f.l2, feature_cache=f.feature_cache)
  linear_probe.emit(result, f.output)


if __name__ == "__main__":
  linear_probe.define_data_flags()
  flags.DEFINE_string("shots", "1,5,10,25", "examples per class, comma-separated")
  flags.DEFINE_string("seeds", "0,1,2", "one draw of the shots per seed")
  flags.DEFINE_float("l2", 2.0 ** 10, "ridge penalty")
  cli.run_main(main)
