"""Where metrics go: `metrics.jsonl` (the contract), TensorBoard, and a progress bar.

Only process 0 writes. On resume, lines for steps after the restored checkpoint (written
by the run that was cut short) are dropped, so the file reads as one uninterrupted run.
"""

import json
import os
import sys

import jax


class MetricsLogger:
  def __init__(self, workdir: str, *, total_steps: int, start_step: int, progress_bar: bool):
    self.main = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._bar = None
    self._tb = None
    if not self.main:
      return
    os.makedirs(workdir, exist_ok=True)
    _truncate_after(self.path, start_step)
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:  # TensorBoard is optional: metrics.jsonl is the record.
      self._tb = None
    if progress_bar:
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                       file=sys.stderr, mininterval=1.0)

  def log(self, step: int, metrics: dict) -> None:
    if not self.main:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **metrics}) + "\n")
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, v, step)
    if self._bar is not None:
      self._bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                            img_s=f"{metrics['images_per_s']:.0f}", refresh=False)

  def advance(self, step: int) -> None:
    if self._bar is not None:
      self._bar.update(step - self._bar.n)

  def message(self, text: str) -> None:
    if self.main:
      print(text, file=sys.stderr)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()


def _truncate_after(path: str, step: int) -> None:
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
  with open(path + ".tmp", "w") as f:
    f.writelines(lines)
  os.replace(path + ".tmp", path)


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
