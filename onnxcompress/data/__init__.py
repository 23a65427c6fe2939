"""Datasets for calibration, retraining and evaluation, named by one short spec string.

Every command that needs data takes such a spec, so passes, trainers and the evaluator see the
same images with the same preprocessing, whatever format the user keeps them in.

Spec grammar::

    KIND[:PATH][SLICE][?key=value&key=value...]

Kinds:

``digits``
    scikit-learn's built-in 8x8 handwritten digits: 1797 grey images with values 0..16 (default
    scale 1/16), labels 0..9. No file, no download; the default when no data is given.
``mnist:DIR``
    A folder with MNIST idx files, gzipped or not: ``t10k-images-idx3-ubyte[.gz]`` and
    ``t10k-labels-idx1-ubyte[.gz]`` (test split) and/or ``train-images-idx3-ubyte[.gz]`` and
    ``train-labels-idx1-ubyte[.gz]``. Option ``split=test|train`` (default: test when present).
    ``mnist:FILE`` names an images file directly. Pixels are uint8 (default scale 1/255).
``npz:FILE``
    A NumPy ``.npz`` with an array ``x`` of shape (N, C, H, W), (N, H, W, C) with
    ``layout=NHWC``, or (N, H, W) for grey images; optional integer labels ``y`` (N,) and
    class names ``classes`` (K,). uint8 ``x`` gets default scale 1/255, float ``x`` scale 1.
    Pickled (object) arrays are refused.
``folder:DIR``
    An image-folder tree: one subfolder per class (sorted names give labels 0..K-1), image
    files sorted by name inside each; a folder holding only images is read without labels.
    Images are decoded with Pillow as RGB, or as grey (Pillow's luma) with ``channels=1``;
    default scale 1/255. ``folder:ARCHIVE.tar.gz[/SUB/DIR]`` reads such a tree from a tar
    archive (``.tar``, ``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``) whose folder
    ``SUB/DIR`` is the tree's root: that folder is extracted once, safely (plain files and
    folders only, no absolute or '..' paths, size and member caps), into a cache folder:
    ``$ONNXCOMPRESS_CACHE/datasets`` (default ``~/.cache/onnxcompress/datasets``, or the
    ``cache_dir`` argument), keyed by the archive's path, size and mtime.

``SLICE`` is Python slice syntax, ``[a:b]``, ``[a:b:c]`` or ``[:n]``, applied to the image list
after ``per_class`` and before decoding or preprocessing, so only the chosen images are read.

Options (``?key=value&...``):

- ``scale=F`` multiply raw pixels by F first (``1/255`` style fractions allowed);
- ``mean=0.485,0.456,0.406`` and ``std=0.229,0.224,0.225``: per channel, or one value for all;
- ``resize=32`` or ``resize=32x32`` (H x W): bilinear, with Pillow's antialiasing when shrinking;
- ``channels=1|3``: 1 -> 3 repeats the grey channel, 3 -> 1 averages (images: Pillow's luma);
- ``layout=NCHW|NHWC`` (npz only): layout of the stored array, the result is always NCHW;
- ``split=test|train`` (mnist only);
- ``per_class=a:b`` (or ``per_class=n`` for ``0:n``): slice taken within each class, in order,
  e.g. ``per_class=500:1000`` keeps files 0500..0999 of every CIFAR-10 test class;
- ``limit=N``: keep the first N images after every other selection (same as a trailing ``[:N]``).

Preprocessing runs in this order: to float32, times scale, resize, channel conversion, then
``(x - mean) / std`` per channel. A ``Preprocess`` given to ``load_dataset`` (for instance read
from a model's metadata) supplies defaults; options in the spec override it.

Examples: ``digits[:1400]``; ``mnist:data/mnist[8000:]?mean=0.5&std=0.5`` (the slice comes
before the options); ``npz:calib.npz?layout=NHWC&resize=224``;
``folder:cifar10-jpeg.tar.gz/cifar10-jpeg/test?per_class=500:1000&mean=0.485,0.456,0.406&std=0.229,0.224,0.225``.
A ``?`` always starts the options, so it cannot appear in a path.

The package holds one module per idea: ``spec`` (the grammar), ``option_values``,
``preprocess``, ``load`` (source, selection, preprocessing), one module per source kind
(``digits``, ``mnist``, ``npz``, ``image_folder`` over ``archive``), ``dataset`` and
``model_input`` (matching a data set to a model's input).
"""

# The names the other layers use; everything else is imported from its own module.
from onnxcompress.data.archive import default_cache_dir, extract_archive
from onnxcompress.data.dataset import Dataset, spread_index
from onnxcompress.data.load import load_dataset
from onnxcompress.data.model_input import fit_to_input
from onnxcompress.data.preprocess import METADATA_PREFIX, Preprocess
from onnxcompress.data.spec import DEFAULT_SPEC, KINDS, DataSpec, parse_spec

__all__ = [
    "DEFAULT_SPEC",
    "KINDS",
    "METADATA_PREFIX",
    "DataSpec",
    "Dataset",
    "Preprocess",
    "default_cache_dir",
    "extract_archive",
    "fit_to_input",
    "load_dataset",
    "parse_spec",
    "spread_index",
]
