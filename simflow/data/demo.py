"""Real demo images available offline (issue 2 item 7).

Two sources, both real images that ship with software already on the machine (nothing is downloaded):

* ``fashion_mnist``: Debian's ``dataset-fashion-mnist`` package (70,000 real 28x28 grayscale product photos,
  10 classes, MIT licence), gzipped IDX files under ``/usr/share/datasets/fashion-mnist/``. Each image is padded
  28 -> 32 with the background value 0 (2 pixels on every side) and replicated to 3 channels.
* ``photos``: 32x32 crops of the colour photos shipped inside the scikit-image wheel (``skimage.data``) and the
  scikit-learn wheel (``load_sample_images``), one class per photo. Used where apt cannot be used, or on request.

The result is written as ``demo.npz`` (train split) and ``demo_test.npz`` (test split), each holding
``images`` uint8 (N, 32, 32, 3) in [0, 255], ``labels`` int64 (N,) in [0, 10) and ``class_names`` (10,) str.
"""

from __future__ import annotations

import gzip
import os
import struct
from typing import Dict, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from simflow import storage

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_APT = "dataset-fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Class names in label order, as published with Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv 1708.07747).
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# (library, name): the colour photos used by the ``photos`` source, one class each.
PHOTO_SOURCES = (
    ("skimage", "astronaut"),
    ("skimage", "chelsea"),
    ("skimage", "coffee"),
    ("skimage", "rocket"),
    ("skimage", "hubble_deep_field"),
    ("skimage", "retina"),
    ("skimage", "immunohistochemistry"),
    ("skimage", "colorwheel"),
    ("sklearn", "china"),
    ("sklearn", "flower"),
)
DEMO_RESOLUTION = 32
SOURCES = ("fashion_mnist", "photos")

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4")}


class DemoDataError(RuntimeError):
    """A demo-data source file is missing or malformed. The message names the path (and the apt package)."""


def read_idx(path: str) -> np.ndarray:
    """Read a (gzipped) IDX file, the format Fashion-MNIST/MNIST ship in.

    Layout (LeCun et al., MNIST page): 2 zero bytes, a type code byte, a rank byte, ``rank`` big-endian uint32 sizes,
    then the row-major data.

    Args:
        path: ``*.gz`` or plain IDX file.

    Returns:
        array of the stored dtype and shape, e.g. uint8 (60000, 28, 28) for images, uint8 (60000,) for labels.

    Raises:
        DemoDataError: the file is missing, has a bad magic number or a size that does not match its header.
    """
    if not os.path.isfile(path):
        raise DemoDataError(
            f"Fashion-MNIST file not found: {path}. Install it with `apt-get install {FASHION_MNIST_APT}` "
            f"or build the demo set from photos with --source photos"
        )
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DemoDataError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DemoDataError(f"{path}: not an IDX file (magic bytes {raw[:4]!r})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    count = int(np.prod(shape)) if shape else 1
    if len(body) != count * dtype.itemsize:
        raise DemoDataError(f"{path}: header says shape {shape} ({count * dtype.itemsize} bytes) but body has {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def pad_to_rgb32(images: np.ndarray) -> np.ndarray:
    """Pad 28x28 grayscale images to 32x32 with the background value 0 and replicate to RGB.

    Args:
        images: uint8 (N, 28, 28).

    Returns:
        uint8 (N, 32, 32, 3); the original pixels sit at [2:30, 2:30] in every channel.
    """
    if images.ndim != 3:
        raise ValueError(f"expected grayscale images (N, H, W), got shape {images.shape}")
    n, h, w = images.shape
    ph, pw = DEMO_RESOLUTION - h, DEMO_RESOLUTION - w
    if ph < 0 or pw < 0:
        raise ValueError(f"images of {h}x{w} are larger than {DEMO_RESOLUTION}x{DEMO_RESOLUTION}")
    padded = np.pad(images, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)), constant_values=0)
    return np.repeat(padded[..., None], 3, axis=-1)


def load_fashion_mnist(split: str, root: str = FASHION_MNIST_DIR, limit: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Load one Fashion-MNIST split as 32x32 RGB.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        root: folder holding the four gzipped IDX files.
        limit: keep only the first ``limit`` images (file order), or all when None.

    Returns:
        dict with ``images`` uint8 (N, 32, 32, 3), ``labels`` int64 (N,), ``class_names`` str (10,).
    """
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split={split!r}: must be one of {list(FASHION_MNIST_FILES)}")
    img_name, lab_name = FASHION_MNIST_FILES[split]
    images = read_idx(os.path.join(root, img_name))
    labels = read_idx(os.path.join(root, lab_name))
    if images.shape[0] != labels.shape[0]:
        raise DemoDataError(f"{root}: {img_name} has {images.shape[0]} images but {lab_name} has {labels.shape[0]} labels")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    out = np.empty((images.shape[0], DEMO_RESOLUTION, DEMO_RESOLUTION, 3), np.uint8)
    chunk = 5000
    for s in tqdm(range(0, images.shape[0], chunk), desc=f"fashion-mnist {split}", unit="chunk", leave=False):
        out[s : s + chunk] = pad_to_rgb32(images[s : s + chunk])
    return {
        "images": out,
        "labels": labels.astype(np.int64),
        "class_names": np.array(FASHION_MNIST_CLASSES),
    }


def load_photo(library: str, name: str) -> np.ndarray:
    """One colour photo shipped inside an installed wheel: uint8 (H, W, 3).

    Args:
        library: ``"skimage"`` (``skimage.data.<name>()``) or ``"sklearn"`` (``load_sample_image(name + ".jpg")``).
        name: photo name, e.g. ``"astronaut"`` or ``"china"``.
    """
    try:
        if library == "skimage":
            import skimage.data

            img = getattr(skimage.data, name)()
        elif library == "sklearn":
            from sklearn.datasets import load_sample_image

            img = load_sample_image(f"{name}.jpg")
        else:
            raise ValueError(f"unknown photo library {library!r}")
    except (ImportError, AttributeError, OSError, ValueError) as e:
        raise DemoDataError(f"photo {library}:{name} is not available offline ({e}); install scikit-image and scikit-learn") from None
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def _photo_crops(photo: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` deterministic 32x32 crops: a random scale (short side 48..160 px, bilinear via PIL), then a random
    window. uint8 (count, 32, 32, 3)."""
    from PIL import Image

    pil = Image.fromarray(photo)
    h, w = photo.shape[:2]
    scales = [48, 64, 96, 128, 160]
    resized = {}
    for s in scales:
        f = s / min(h, w)
        resized[s] = np.asarray(pil.resize((max(32, round(w * f)), max(32, round(h * f))), Image.BILINEAR))
    out = np.empty((count, DEMO_RESOLUTION, DEMO_RESOLUTION, 3), np.uint8)
    which = rng.integers(0, len(scales), size=count)
    for i in range(count):
        img = resized[scales[which[i]]]
        y = int(rng.integers(0, img.shape[0] - DEMO_RESOLUTION + 1))
        x = int(rng.integers(0, img.shape[1] - DEMO_RESOLUTION + 1))
        out[i] = img[y : y + DEMO_RESOLUTION, x : x + DEMO_RESOLUTION]
    return out


def load_photo_crops(split: str, per_class: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """Crops of the shipped photos, one class per photo (:data:`PHOTO_SOURCES` order).

    The crop positions come from ``numpy.random.default_rng([seed, split_id, class])``, so the set is identical on
    every machine. Train and test crops come from different streams of the same photos (they may overlap; this is
    a demo set, not a benchmark).

    Args:
        split: ``"train"`` or ``"test"``.
        per_class: crops per photo.
        seed: crop-position seed.

    Returns:
        dict with ``images`` uint8 (10 * per_class, 32, 32, 3), ``labels`` int64 (class-major order) and
        ``class_names`` str (10,).
    """
    split_id = {"train": 0, "test": 1}.get(split)
    if split_id is None:
        raise ValueError(f"split={split!r}: must be 'train' or 'test'")
    images: List[np.ndarray] = []
    labels: List[np.ndarray] = []
    for cls, (lib, name) in enumerate(tqdm(PHOTO_SOURCES, desc=f"photo crops {split}", unit="photo", leave=False)):
        rng = np.random.default_rng([seed, split_id, cls])
        images.append(_photo_crops(load_photo(lib, name), per_class, rng))
        labels.append(np.full(per_class, cls, np.int64))
    return {
        "images": np.concatenate(images),
        "labels": np.concatenate(labels),
        "class_names": np.array([name for _, name in PHOTO_SOURCES]),
    }


def fashion_mnist_available(root: str = FASHION_MNIST_DIR) -> bool:
    """True when all four Fashion-MNIST files exist under ``root``."""
    return all(os.path.isfile(os.path.join(root, f)) for pair in FASHION_MNIST_FILES.values() for f in pair)


def build_demo(
    out_dir: str,
    source: Optional[str] = None,
    limit: Optional[int] = None,
    root: str = FASHION_MNIST_DIR,
    photo_train_per_class: int = 1000,
    photo_test_per_class: int = 200,
) -> Tuple[str, str, str]:
    """Write ``out_dir/demo.npz`` (train) and ``out_dir/demo_test.npz`` (test).

    Args:
        out_dir: destination folder (created).
        source: ``"fashion_mnist"``, ``"photos"``, or None = Fashion-MNIST when its files exist, else photos.
            Asking for ``fashion_mnist`` explicitly when the files are missing is an error naming the path.
        limit: cap on images per split (the first ``limit`` for Fashion-MNIST; for photos, ``limit // 10`` per class).
        root: Fashion-MNIST folder.
        photo_train_per_class / photo_test_per_class: crops per class for the photo source.

    Returns:
        (train_path, test_path, source_used).
    """
    if source is None:
        source = "fashion_mnist" if fashion_mnist_available(root) else "photos"
    if source not in SOURCES:
        raise ValueError(f"source={source!r}: must be one of {list(SOURCES)}")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for split, npz_name in (("train", "demo.npz"), ("test", "demo_test.npz")):
        if source == "fashion_mnist":
            data = load_fashion_mnist(split, root=root, limit=limit)
        else:
            per = photo_train_per_class if split == "train" else photo_test_per_class
            if limit is not None:
                per = max(1, min(per, limit // len(PHOTO_SOURCES)))
            data = load_photo_crops(split, per)
        path = os.path.join(out_dir, npz_name)
        with storage.open_atomic(path) as out:
            np.savez(out.f, source=np.array(source), **data)
        paths.append(path)
    return paths[0], paths[1], source


def load_npz(path: str) -> Dict[str, np.ndarray]:
    """Load a demo-format NPZ and check it.

    Returns:
        dict with ``images`` uint8 (N, H, W, 3), ``labels`` int64 (N,), ``class_names`` str (C,).

    Raises:
        FileNotFoundError / ValueError naming the path and the key at fault.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path} (build it with `python tools/make_demo_data.py {os.path.dirname(path) or '.'}`)")
    with np.load(path, allow_pickle=False) as z:
        for key in ("images", "labels"):
            if key not in z.files:
                raise ValueError(f"{path}: missing array {key!r} (has {z.files})")
        images, labels = z["images"], z["labels"].astype(np.int64)
        class_names = z["class_names"] if "class_names" in z.files else np.array([str(i) for i in range(int(labels.max()) + 1)])
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: 'images' must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{path}: 'labels' shape {labels.shape} does not match {images.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"{path}: labels span [{labels.min()}, {labels.max()}] but there are {len(class_names)} class names")
    return {"images": images, "labels": labels, "class_names": class_names}


__all__ = [
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "PHOTO_SOURCES",
    "DemoDataError",
    "read_idx",
    "pad_to_rgb32",
    "load_fashion_mnist",
    "load_photo",
    "load_photo_crops",
    "fashion_mnist_available",
    "build_demo",
    "load_npz",
]
