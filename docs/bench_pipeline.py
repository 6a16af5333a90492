"""Host input-pipeline throughput: images/s of `make_pipeline` on an image folder.

Run from the repository root with PYTHONPATH=. (python puts docs/, not the working
directory, first on sys.path, so without it an installed `selfsup` is imported), e.g.

  PYTHONPATH=. python docs/bench_pipeline.py --dataset folder:/work/data/caltech101 \
      --split train --image_size 224 --num_workers 0 1 [--canvas_size 288]

Without --canvas_size it times the evaluation path (shorter side resized + centre crop,
which before the whole-image change was also the training path); with it, the training
path that fits the whole image into a canvas. Reports images/s (after the first batch,
so worker start-up is excluded) and the bytes of one batch as it leaves the host.

Wall-clock rates on a shared machine swing with the other load; --cpu_images N also
reports the process CPU time per image of decode + resize (+ fit to canvas) in one
thread over N images, i.e. the images/s one worker process reaches with a core of its
own, which is far less sensitive to the neighbours.
"""

import argparse
import time

import numpy as np

from selfsup import data as data_lib


def run(dataset, split, image_size, canvas_size, num_workers, batch_size, epochs):
  source = data_lib.make_source(dataset, split, image_size=image_size)
  kwargs = {} if canvas_size is None else {'canvas_size': canvas_size}
  it = data_lib.make_pipeline(source, batch_size=batch_size, image_size=image_size, seed=0,
                              shuffle=True, num_epochs=epochs, drop_remainder=True,
                              num_workers=num_workers, process_index=0, process_count=1,
                              **kwargs)
  first = next(it)
  batch_bytes = sum(np.asarray(v).nbytes for v in first.values())
  start, n = time.perf_counter(), 0
  for batch in it:
    n += len(batch['image'])
  elapsed = time.perf_counter() - start
  return n / elapsed, n, elapsed, batch_bytes, first['image'].shape


def cpu_rate(dataset, split, image_size, canvas_size, n):
  """Images per CPU-second of one thread: decode + preprocess, no batching or threads."""
  from selfsup.data import pipeline  # pylint: disable=g-import-not-at-top
  source = data_lib.make_source(dataset, split, image_size=image_size)
  if canvas_size is None:  # Also the signature of the code before canvases existed.
    prep, sized = pipeline._Preprocess(image_size), pipeline._sized(source, image_size)
  else:
    prep = pipeline._Preprocess(image_size, canvas_size)
    sized = pipeline._sized(source, image_size, 1.0, canvas_size)
  order = np.random.default_rng(0).permutation(len(sized))[:n]
  start = time.process_time()
  for i in order:
    prep(sized[int(i)])
  return n / (time.process_time() - start)


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--dataset', default='folder:/work/data/caltech101')
  p.add_argument('--split', default='train')
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--canvas_size', type=int, default=None)
  p.add_argument('--num_workers', type=int, nargs='*', default=[0, 1])
  p.add_argument('--batch_size', type=int, default=64)
  p.add_argument('--epochs', type=int, default=1)
  p.add_argument('--cpu_images', type=int, default=0)
  a = p.parse_args()
  if a.cpu_images:
    rate = cpu_rate(a.dataset, a.split, a.image_size, a.canvas_size, a.cpu_images)
    print(f'one thread, canvas_size={a.canvas_size} image_size={a.image_size}: '
          f'{rate:.1f} images per CPU-second ({a.cpu_images} images)')
  for w in a.num_workers:
    rate, n, secs, nbytes, shape = run(a.dataset, a.split, a.image_size, a.canvas_size, w,
                                       a.batch_size, a.epochs)
    print(f'num_workers={w} canvas_size={a.canvas_size} image_size={a.image_size}: '
          f'{rate:.1f} images/s ({n} images in {secs:.1f} s), batch {shape} '
          f'{nbytes / 2**20:.1f} MiB')


if __name__ == '__main__':
  main()
