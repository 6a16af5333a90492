"""Data: sources (what an example is) and the pipeline (how examples become batches).

The data path runs in one direction (see docs/design.md):

  source (random access) -> grain host pipeline -> device (augment, encoder, loss)

`selfsup.data.sources` holds the random-access sources (`synthetic:NAME`, `folder:PATH`,
`tfds:NAME[/CONFIG][:VERSION]`) and `make_source`; `selfsup.data.pipeline` turns a source
into batches (grain), saves and restores the iterator position, and loads small sources
as arrays for evaluation. Both are re-exported here, so `from selfsup import data` is
all a caller needs.
"""

from selfsup.data.order import ORDERS, balanced_permutation, load_clusters
from selfsup.data.pipeline import (fit_to_canvas, iterator_state_to_json, load_arrays,
                                   make_pipeline, resize_and_crop, restore_iterator_state,
                                   subset_positions)
from selfsup.data.sources import (IMAGE_EXTENSIONS, SHAPE_NAMES, SOURCE_FORMS,
                                  SYNTHETIC_SOURCES, DataSource, FolderSource, ShapesSource,
                                  TfdsSource, dataset_size, make_source, to_rgb8)

__all__ = [
    'DataSource',
    'IMAGE_EXTENSIONS',
    'ORDERS',
    'balanced_permutation',
    'load_clusters',
    'FolderSource',
    'ShapesSource',
    'SHAPE_NAMES',
    'SOURCE_FORMS',
    'SYNTHETIC_SOURCES',
    'TfdsSource',
    'dataset_size',
    'fit_to_canvas',
    'iterator_state_to_json',
    'load_arrays',
    'make_pipeline',
    'make_source',
    'resize_and_crop',
    'restore_iterator_state',
    'subset_positions',
    'to_rgb8',
]
