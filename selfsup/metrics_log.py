"""Where metrics go: `metrics.jsonl` (the contract), TensorBoard, and a progress bar.

Only process 0 writes. On resume, lines for steps after the restored checkpoint (written
by the run that was cut short) are dropped, so the file reads as one uninterrupted run.

The file is strict JSON Lines: a non-finite value (a diverged loss) is written as
`null`, never as a bare `NaN`/`Infinity`. Each line goes out in one `write` on a file
opened for appending, so a reader sees whole lines; a line torn by a kill (or a full
disk) in the middle of that write is tolerated by `read_metrics` and dropped on resume.
"""

import json
import math
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
    _append_line(self.path, format_line({"step": step, **metrics}))
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, v, step)
    if self._bar is not None:
      self._bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                            img_s=f"{metrics['images_per_s']:.0f}", refresh=False)

  def image(self, step: int, name: str, image) -> str | None:
    """Writes a uint8 (H, W, 3) image to WORKDIR/images/NAME_STEP.png and TensorBoard."""
    if not self.main:
      return None
    import numpy as np
    from PIL import Image
    folder = os.path.join(os.path.dirname(self.path), "images")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}_{step:07d}.png")
    Image.fromarray(np.asarray(image, np.uint8)).save(path)
    if self._tb is not None:
      self._tb.add_image(f"images/{name}", np.asarray(image), step, dataformats="HWC")
    return path

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


def format_line(row: dict) -> str:
  """One strict-JSON line: non-finite floats become null."""
  clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
           for k, v in row.items()}
  return json.dumps(clean, allow_nan=False) + "\n"


def _append_line(path: str, line: str) -> None:
  data = line.encode()
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    written = os.write(fd, data)     # one write(2) of a whole line on an O_APPEND file
    while written < len(data):       # only after a signal or a full disk
      written += os.write(fd, data[written:])
  finally:
    os.close(fd)


def _parse(path: str):
  """(rows, problems): whole JSON lines, and a note for each line that is not one."""
  rows, problems = [], []
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  for number, raw in enumerate(lines, 1):
    if not raw.strip():
      continue
    try:
      row = json.loads(raw)
      if not isinstance(row, dict) or "step" not in row:
        raise ValueError("not an object with a step")
    except ValueError:
      torn = number == len(lines)   # no newline after it: a write cut short
      problems.append(f"{'a torn last line' if torn else f'a damaged line {number}'} "
                      f"({raw[:40]!r}...)")
      continue
    rows.append(row)
  return rows, problems


def _truncate_after(path: str, step: int) -> None:
  if not os.path.exists(path):
    return
  rows, problems = _parse(path)
  for problem in problems:
    print(f"warning: {path}: dropped {problem}", file=sys.stderr)
  with open(path + ".tmp", "w") as f:
    f.writelines(format_line(r) for r in rows if r["step"] <= step)
  os.replace(path + ".tmp", path)


def read_metrics(workdir: str) -> list[dict]:
  """The rows of a run's metrics.jsonl (a torn last line, from a kill, is left out)."""
  return _parse(os.path.join(workdir, "metrics.jsonl"))[0]
