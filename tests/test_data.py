"""Tests for selfsup.data: sources, the grain pipeline and its checkpointing."""

import json
import os
import warnings

import numpy as np
from PIL import Image
import pytest

from selfsup import data
from selfsup.errors import UserError


def _take(it, n):
  return [next(it) for _ in range(n)]


def _pipeline(source, **kw):
  args = dict(batch_size=8, image_size=32, seed=0, process_index=0, process_count=1)
  args.update(kw)
  return data.make_pipeline(source, **args)


# ---------------------------------------------------------------------------------------
# synthetic:shapes


def test_shapes_deterministic_and_distinct():
  src = data.ShapesSource('train', length=50)
  a, b = src[3], data.ShapesSource('train', length=50)[3]
  np.testing.assert_array_equal(a['image'], b['image'])
  assert a['label'] == b['label'] and a['index'] == 3
  assert not np.array_equal(src[3]['image'], src[4]['image'])
  test = data.ShapesSource('test', length=50)
  assert not np.array_equal(src[3]['image'], test[3]['image'])


def test_shapes_types_labels_and_classes():
  src = data.ShapesSource('train', image_size=24, length=200)
  assert len(src) == 200 and src.num_classes >= 10 and src.stable_indices
  assert src.split == 'train' and src.name == 'synthetic:shapes'
  examples = [src[i] for i in range(200)]
  for i, ex in enumerate(examples):
    assert ex['image'].dtype == np.uint8 and ex['image'].shape == (24, 24, 3)
    assert 0 <= ex['label'] < src.num_classes
    assert ex['index'] == i and ex['count'] == 1
    assert 0 <= ex['position'] < 9 and 0 <= ex['orientation'] < 8
  assert len({ex['label'] for ex in examples}) >= 10
  # Objects and backgrounds are not flat: each image has real contrast.
  assert min(int(ex['image'].max()) - int(ex['image'].min()) for ex in examples) > 40


def test_shapes_default_lengths_and_slicing():
  assert len(data.ShapesSource('train')) == 20000
  assert len(data.ShapesSource('test')) == 2000
  sliced = data.ShapesSource('train[10:20]')
  assert len(sliced) == 10
  np.testing.assert_array_equal(sliced[0]['image'], data.ShapesSource('train')[10]['image'])
  assert sliced[0]['index'] == 0
  with pytest.raises(UserError, match='split'):
    data.ShapesSource('train[a:b:c]')


def test_shapes_linearly_learnable():
  # A ridge probe on raw pixels must beat chance clearly (it is the floor that learned
  # features are compared against). Everything is deterministic, so this cannot flake.
  size, classes = 16, data.ShapesSource.num_classes
  xtr, ytr = data.load_arrays(data.ShapesSource('train', image_size=size, length=2000), size)
  xte, yte = data.load_arrays(data.ShapesSource('test', image_size=size, length=500), size)
  a, b = xtr.reshape(len(xtr), -1) / 255.0, xte.reshape(len(xte), -1) / 255.0
  mean = a.mean(0)
  a, b = a - mean, b - mean
  w = np.linalg.solve(a.T @ a + 100 * np.eye(a.shape[1]), a.T @ np.eye(classes)[ytr])
  accuracy = (np.argmax(b @ w, 1) == yte).mean()
  assert accuracy > 1.8 / classes, accuracy


def test_shapes_multiple_objects():
  src = data.ShapesSource('train', length=40, max_objects=4)
  counts = [src[i]['count'] for i in range(40)]
  assert max(counts) > 1 and min(counts) >= 1 and max(counts) <= 4
  assert data.make_source('synthetic:shapes_multi', 'train').max_objects > 1


# ---------------------------------------------------------------------------------------
# folder:PATH


def _make_tree(root):
  """2 classes (cat, dog) in train: PNG, JPEG and one corrupt .jpg among the dogs."""
  rng = np.random.default_rng(0)
  for cls, n in (('dog', 2), ('cat', 3)):
    d = os.path.join(root, 'train', cls)
    os.makedirs(d)
    for k in range(n):
      img = Image.fromarray(rng.integers(0, 255, (20 + k, 30, 3), dtype=np.uint8))
      if k % 2:
        img.save(os.path.join(d, f'im{k}.JPEG'))
      else:
        img.convert('L').save(os.path.join(d, f'im{k}.png'))  # Grayscale -> RGB on read.
  with open(os.path.join(root, 'train', 'dog', 'bad.jpg'), 'wb') as f:
    f.write(rng.integers(0, 255, 200, dtype=np.uint8).tobytes())
  with open(os.path.join(root, 'train', 'dog', 'notes.txt'), 'w') as f:
    f.write('not an image')
  os.makedirs(os.path.join(root, 'test', 'cat'))


def test_folder_labels_and_corrupt_skipping(tmp_path):
  root = str(tmp_path)
  _make_tree(root)
  src = data.FolderSource(root, 'train')
  assert src.classes == ['cat', 'dog'] and src.num_classes == 2
  assert len(src) == 6  # 3 cats + 2 dogs + the corrupt file; notes.txt is not an image.
  names = [os.path.basename(f) for f in src.files]
  bad = names.index('bad.jpg')
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    examples = [src[i] for i in range(len(src))]
    src[bad]  # A second visit neither warns again nor recounts.
  assert src.num_corrupt == 1
  relevant = [w for w in caught if 'unreadable' in str(w.message)]
  assert len(relevant) == 1 and 'bad.jpg' in str(relevant[0].message)
  # The corrupt slot holds the next readable example, with that example's own index.
  assert examples[bad]['index'] == (bad + 1) % len(src)
  assert sorted({ex['index'] for ex in examples}) == [i for i in range(6) if i != bad]
  for i, ex in enumerate(examples):
    assert ex['image'].dtype == np.uint8 and ex['image'].ndim == 3
    assert ex['image'].shape[2] == 3
    assert ex['label'] == (0 if src.files[ex['index']].split(os.sep)[-2] == 'cat' else 1)
  # load_arrays keeps each readable image once and resizes it.
  images, labels = data.load_arrays(src, 16)
  assert images.shape == (5, 16, 16, 3) and labels.tolist() == [0, 0, 0, 1, 1]
  batches = list(_pipeline(src, batch_size=2, image_size=16, num_epochs=1))
  assert [b['image'].shape for b in batches] == [(2, 16, 16, 3)] * 3
  assert src.num_corrupt == 1  # The pipeline's sized copy shares the count.


def test_folder_draft_decoding_keeps_the_output_size(tmp_path):
  d = tmp_path / 'train' / 'a'
  d.mkdir(parents=True)
  Image.new('RGB', (200, 120), (200, 30, 30)).save(d / 'big.jpg')
  src = data.FolderSource(str(tmp_path), 'train')
  assert src[0]['image'].shape == (120, 200, 3)
  small = src.for_image_size(20)[0]['image']
  assert min(small.shape[:2]) >= 20 and small.shape[0] < 120
  images, _ = data.load_arrays(src, 20)
  assert images.shape == (1, 20, 20, 3) and abs(int(images[0, 10, 10, 0]) - 200) < 8


def test_folder_strict_and_layout_errors(tmp_path):
  root = str(tmp_path)
  _make_tree(root)
  strict = data.make_source(f'folder:{root}', 'train', strict=True)
  bad = [os.path.basename(f) for f in strict.files].index('bad.jpg')
  with pytest.raises(UserError, match='bad.jpg'):
    strict[bad]
  with pytest.raises(UserError, match='no such directory'):
    data.FolderSource(os.path.join(root, 'missing'), 'train')
  with pytest.raises(UserError, match='splits found: test, train'):
    data.FolderSource(root, 'validation')
  with pytest.raises(UserError, match='no images'), \
       pytest.warns(UserWarning, match="without images .* skipped: cat"):
    data.FolderSource(root, 'test')


def test_folder_labels_come_from_one_class_list_for_all_splits(tmp_path):
  # train has a, b, c; test has b, c, d: 'b' must be the same class in both splits.
  for split, classes in (('train', 'abc'), ('test', 'bcd')):
    for cls in classes:
      d = tmp_path / split / cls
      d.mkdir(parents=True)
      Image.new('RGB', (4, 4), (10 * ord(cls) % 256, 0, 0)).save(d / 'x.png')
  with pytest.warns(UserWarning, match=r"split 'train' has classes other splits lack \(a not in 'test'\)"):
    train = data.FolderSource(str(tmp_path), 'train')
  with pytest.warns(UserWarning, match=r"d not in 'train'"):
    test = data.FolderSource(str(tmp_path), 'test')
  assert train.classes == test.classes == ['a', 'b', 'c', 'd']
  assert train.num_classes == test.num_classes == 4
  label_of = lambda src: {f.split(os.sep)[-2]: src[i]['label'] for i, f in enumerate(src.files)}
  assert label_of(train) == {'a': 0, 'b': 1, 'c': 2}
  assert label_of(test) == {'b': 1, 'c': 2, 'd': 3}  # Never renumbered onto a, b, c.


def _save_mode(path, mode):
  """Writes a 2x2 image in `mode` whose top-left pixel is mid-grey-ish; returns the
  expected uint8 RGB of all four pixels."""
  if mode == 'I;16':
    arr = np.array([[32768, 65535], [0, 257 * 10]], np.uint16)
    Image.fromarray(arr).save(path + '.png')  # uint16 -> mode I;16.
    grey = np.array([[128, 255], [0, 10]])
  elif mode == 'I':
    arr = np.array([[32768, 65535], [0, 257 * 10]], np.int32)
    Image.fromarray(arr, 'I').save(path + '.tif')
    grey = np.array([[128, 255], [0, 10]])
  elif mode == 'F':
    arr = np.array([[0.5, 1.0], [0.0, 0.1]], np.float32)
    Image.fromarray(arr, 'F').save(path + '.tif')
    grey = np.array([[128, 255], [0, 26]])
  elif mode == 'P':
    img = Image.new('P', (2, 2))
    img.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    img.putdata([1, 0, 0, 1])
    img.save(path + '.png')
    return np.array([[[200, 100, 50], [0, 0, 0]], [[0, 0, 0], [200, 100, 50]]])
  elif mode == 'CMYK':
    Image.new('CMYK', (2, 2), (0, 255, 255, 0)).save(path + '.tif')  # Pure red.
    return np.broadcast_to(np.array([255, 0, 0]), (2, 2, 3))
  elif mode in ('LA', 'RGBA'):
    colour = (90, 7) if mode == 'LA' else (90, 90, 90, 7)
    Image.new(mode, (2, 2), colour).save(path + '.png')
    return np.full((2, 2, 3), 90)
  elif mode == '1':
    img = Image.new('1', (2, 2))
    img.putdata([1, 0, 0, 1])
    img.save(path + '.bmp')
    grey = np.array([[255, 0], [0, 255]])
  elif mode == 'L':
    Image.fromarray(np.array([[128, 255], [0, 10]], np.uint8)).save(path + '.png')
    grey = np.array([[128, 255], [0, 10]])
  return np.repeat(grey[..., None], 3, -1)


@pytest.mark.parametrize('mode', ['I;16', 'I', 'F', 'P', 'CMYK', 'LA', 'RGBA', '1', 'L'])
def test_folder_decodes_every_mode_to_8bit_rgb(tmp_path, mode):
  d = tmp_path / 'train' / 'a'
  d.mkdir(parents=True)
  expected = _save_mode(str(d / 'img'), mode)
  src = data.FolderSource(str(tmp_path), 'train')
  assert len(src) == 1, src.files
  with Image.open(src.files[0]) as img:
    assert img.mode == mode or (mode == 'I;16' and img.mode.startswith('I'))
  image = src[0]['image']
  assert image.dtype == np.uint8 and image.shape == (2, 2, 3)
  np.testing.assert_array_equal(image, expected)


def test_folder_reads_nested_folders_and_warns_about_empty_classes(tmp_path):
  for rel in ('train/a/x.png', 'train/a/deep/er/y.PNG', 'train/b/z.jpg'):
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', (4, 4)).save(tmp_path / rel, format='PNG' if 'png' in rel.lower() else 'JPEG')
  (tmp_path / 'train' / 'empty' / 'sub').mkdir(parents=True)
  (tmp_path / 'train' / 'void').mkdir()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    src = data.FolderSource(str(tmp_path), 'train')
  messages = [str(w.message) for w in caught if 'without images' in str(w.message)]
  assert len(messages) == 1 and 'empty, void' in messages[0]
  assert src.classes == ['a', 'b'] and len(src) == 3
  rel = [os.path.relpath(f, tmp_path) for f in src.files]
  assert rel == [os.path.join('train', 'a', 'deep', 'er', 'y.PNG'),
                 os.path.join('train', 'a', 'x.png'), os.path.join('train', 'b', 'z.jpg')]
  assert [src[i]['label'] for i in range(3)] == [0, 0, 1]


# ---------------------------------------------------------------------------------------
# tfds:NAME


def test_tfds_under_mock_data(monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  calls = []
  real_data_source = tfds.data_source

  def spy(name, **kwargs):
    calls.append((name, kwargs['split']))
    return real_data_source(name, **kwargs)

  # mock_data ignores slicing (its fake source always has num_examples records), so the
  # slice is checked by what reaches tfds; num_examples=8 matches the slice's length.
  with tfds.testing.mock_data(num_examples=8):
    monkeypatch.setattr(tfds, 'data_source', spy)
    src = data.make_source('tfds:mnist', 'train[:8]')
    assert calls == [('mnist', 'train[:8]')]
    assert len(src) == 8 and src.num_classes == 10 and src.name == 'tfds:mnist'
    ex = src[5]
    assert ex['image'].shape == (28, 28, 3) and ex['image'].dtype == np.uint8
    assert ex['index'] == 5 and isinstance(ex['label'], int) and 0 <= ex['label'] < 10
    # Grayscale is tiled, so the three channels are equal.
    np.testing.assert_array_equal(ex['image'][..., 0], ex['image'][..., 2])
    batch = next(_pipeline(src, batch_size=4, image_size=32))
    assert batch['image'].shape == (4, 32, 32, 3) and batch['label'].dtype == np.int32
    cifar = data.TfdsSource('cifar10', 'test')
    assert cifar[0]['image'].shape == (32, 32, 3) and cifar.num_classes == 10


def test_tfds_unknown_and_unprepared(tmp_path):
  with pytest.raises(UserError, match='unknown TFDS dataset'):
    data.TfdsSource('no_such_dataset_xyz', 'train', data_dir=str(tmp_path))
  with pytest.raises(UserError, match='not prepared.*tfds build mnist'):
    data.TfdsSource('mnist', 'train', data_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------
# make_source


def test_make_source_errors_list_valid_choices():
  with pytest.raises(UserError) as e:
    data.make_source('hdf5:/tmp/x', 'train')
  for form in ('synthetic:NAME', 'folder:PATH', 'tfds:NAME[/CONFIG][:VERSION]'):
    assert form in str(e.value)
  with pytest.raises(UserError, match='synthetic:NAME'):
    data.make_source('shapes', 'train')
  with pytest.raises(UserError) as e:
    data.make_source('synthetic:blobs', 'train')
  assert 'blobs' in str(e.value) and 'shapes' in str(e.value)
  src = data.make_source('synthetic:shapes', 'test', image_size=16)
  assert src[0]['image'].shape == (16, 16, 3) and data.dataset_size(src) == 2000


# ---------------------------------------------------------------------------------------
# Pipeline


def test_pipeline_shapes_and_resize():
  src = data.ShapesSource('train', image_size=40, length=64)
  batch = next(_pipeline(src, batch_size=8, image_size=32))
  assert set(batch) == {'image', 'label', 'index'}
  assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.uint8
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  assert batch['index'].shape == (8,) and batch['index'].dtype == np.int32
  rect = data.resize_and_crop(np.zeros((20, 60, 3), np.uint8), 10)
  assert rect.shape == (10, 10, 3)


def test_pipeline_seeded_order_and_epochs():
  src = data.ShapesSource('train', image_size=8, length=32)
  a = [b['index'] for b in _take(_pipeline(src, image_size=8, seed=1), 8)]
  b = [b['index'] for b in _take(_pipeline(src, image_size=8, seed=1), 8)]
  c = [b['index'] for b in _take(_pipeline(src, image_size=8, seed=2), 8)]
  np.testing.assert_array_equal(np.stack(a), np.stack(b))
  assert not np.array_equal(np.stack(a), np.stack(c))
  # Two epochs of 4 batches: each a full permutation, the second a different one.
  first, second = np.concatenate(a[:4]), np.concatenate(a[4:])
  assert sorted(first) == sorted(second) == list(range(32))
  assert not np.array_equal(first, second)
  # No shuffle: source order; finite epochs stop; drop_remainder=False keeps the rest.
  ordered = list(_pipeline(src, image_size=8, shuffle=False, num_epochs=1, batch_size=5,
                           drop_remainder=False))
  assert [len(b['index']) for b in ordered] == [5] * 6 + [2]
  assert np.concatenate([b['index'] for b in ordered]).tolist() == list(range(32))


def test_pipeline_processes_are_disjoint():
  src = data.ShapesSource('train', image_size=8, length=33)
  seen = []
  for p in range(2):
    it = data.make_pipeline(src, batch_size=8, image_size=8, seed=3, num_epochs=1,
                            process_index=p, process_count=2)
    batches = list(it)
    assert all(b['image'].shape[0] == 4 for b in batches)
    seen.append(set(np.concatenate([b['index'] for b in batches]).tolist()))
  assert not seen[0] & seen[1]
  assert len(seen[0]) == len(seen[1]) == 16  # Both cut to the same length.
  with pytest.raises(UserError, match='multiple of the number of processes'):
    data.make_pipeline(src, batch_size=9, image_size=8, seed=0, process_index=0,
                       process_count=2)


def _check_resume(src, **kw):
  it = _pipeline(src, **kw)
  _take(it, 3)
  state = data.iterator_state_to_json(it)
  json.loads(state)  # Plain JSON: the trainer stores it next to the checkpoint.
  expected = _take(it, 2)
  fresh = data.restore_iterator_state(_pipeline(src, **kw), state)
  got = _take(fresh, 2)
  for e, g in zip(expected, got):
    for k in ('image', 'label', 'index'):
      np.testing.assert_array_equal(e[k], g[k])
  for i in (it, fresh):
    i.close()


def test_pipeline_checkpoint_resume():
  src = data.ShapesSource('train', image_size=16, length=20)  # 2.5 batches per epoch.
  _check_resume(src, image_size=16, seed=5)


def test_pipeline_checkpoint_resume_with_workers():
  src = data.ShapesSource('train', image_size=16, length=40)
  _check_resume(src, image_size=16, seed=5, num_workers=1)
  # A state from a pipeline without workers does not fit one with workers.
  plain = _pipeline(src, image_size=16)
  next(plain)
  with pytest.raises(UserError, match='num_workers'):
    data.restore_iterator_state(_pipeline(src, image_size=16, num_workers=1),
                                data.iterator_state_to_json(plain))


def test_iterator_state_json_roundtrip_of_odd_types():
  state = {'a': np.int64(3), 'b': b'\x00\x01', 'c': {1: [2, 3]}, 'd': (4,)}
  back = data.pipeline._from_jsonable(json.loads(json.dumps(data.pipeline._to_jsonable(state))))
  assert back == {'a': 3, 'b': b'\x00\x01', 'c': {1: [2, 3]}, 'd': [4]}


def test_load_arrays_in_order():
  src = data.ShapesSource('test', image_size=16, length=30)
  images, labels = data.load_arrays(src, 16)
  assert images.shape == (30, 16, 16, 3) and images.dtype == np.uint8
  assert labels.dtype == np.int32
  assert labels.tolist() == [src[i]['label'] for i in range(30)]
  np.testing.assert_array_equal(images[7], src[7]['image'])


def test_load_arrays_subset_is_a_seeded_spread_not_a_prefix():
  src = data.ShapesSource('test', image_size=16, length=300)
  images, labels = data.load_arrays(src, 16, max_examples=20)
  again, _ = data.load_arrays(src, 16, max_examples=20)
  other, _ = data.load_arrays(src, 16, max_examples=20, seed=1)
  assert images.shape == (20, 16, 16, 3)
  np.testing.assert_array_equal(images, again)
  assert not np.array_equal(images, other)
  full = [src[i]['image'] for i in range(300)]
  positions = [next(j for j, f in enumerate(full) if np.array_equal(f, im)) for im in images]
  assert positions == sorted(positions) and max(positions) >= 20
