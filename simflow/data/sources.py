"""Raw image sources for the offline writers (``tools/make_shards.py``, ``tools/make_beton.py``).

* :class:`FolderSource`: an ImageNet-style folder, one sub-folder per class (the layout of the real ImageNet train
  split, ``train/n01440764/n01440764_10026.JPEG``). Classes are the sorted sub-folder names, samples the sorted image
  files in each (so class-major order); label = position of the class name.
* :class:`NpzImageSource`: the demo NPZ (``images`` uint8 (N, H, W, 3), ``labels``, ``class_names``).

Both give a stable sample order, a WebDataset-safe key per sample, and the encoded image for a shard.
"""

from __future__ import annotations

import io
import os
import re
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image

from .demo import load_npz
from .transforms import center_crop

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class ImageSource:
    """Common interface. Attributes: ``class_names`` (C,), ``description``."""

    class_names: List[str]
    description: str

    def __len__(self) -> int:
        raise NotImplementedError

    def key(self, i: int) -> str:
        """WebDataset key of sample i: no dots (WebDataset splits the extension at the first dot), unique."""
        raise NotImplementedError

    def label(self, i: int) -> int:
        raise NotImplementedError

    def origin(self, i: int) -> str:
        """Where the sample came from (relative path or NPZ row), stored in the sample's ``.json``."""
        raise NotImplementedError

    def load(self, i: int, resolution: Optional[int]) -> np.ndarray:
        """Decoded RGB image uint8 (H, W, 3); ADM centre crop to ``resolution`` when given (method §2).
        Raises on an unreadable image."""
        raise NotImplementedError

    def encoded(self, i: int, resolution: Optional[int], image_format: str) -> Tuple[str, bytes]:
        """``(extension, bytes)`` of the image as stored in a shard.

        ``image_format``: ``keep`` (original file bytes when no crop is asked and the file is a JPEG/PNG -- still
        fully decoded once to reject corrupt files), ``jpg`` (quality 95) or ``png``. Raises on an unreadable image.
        """
        img = self.load(i, resolution)
        fmt = "png" if image_format == "keep" else image_format
        return fmt, encode_image(img, fmt)


def encode_image(img: np.ndarray, fmt: str) -> bytes:
    """uint8 (H, W, 3) -> JPEG (quality 95, 4:2:0) or PNG bytes."""
    buf = io.BytesIO()
    if fmt == "jpg":
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
    elif fmt == "png":
        Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    else:
        raise ValueError(f"image format {fmt!r}: must be jpg or png")
    return buf.getvalue()


def _safe_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-/]", "_", text)


class FolderSource(ImageSource):
    """ImageNet-style class folders under ``root``.

    Raises:
        FileNotFoundError / ValueError naming ``root`` when it is missing or has no class folders with images.
    """

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder not found: {root}")
        self.root = root
        self.class_names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not self.class_names:
            raise ValueError(f"{root}: no class sub-folders (expected ImageNet layout root/<class>/<image>)")
        self.items: List[Tuple[str, int]] = []
        for label, cls in enumerate(self.class_names):
            files = sorted(f for f in os.listdir(os.path.join(root, cls)) if f.lower().endswith(IMAGE_SUFFIXES))
            self.items.extend((os.path.join(cls, f), label) for f in files)
        if not self.items:
            raise ValueError(f"{root}: the class folders hold no images ({', '.join(IMAGE_SUFFIXES)})")
        self.description = f"folder {root} ({len(self.items)} images, {len(self.class_names)} classes)"

    def __len__(self) -> int:
        return len(self.items)

    def key(self, i: int) -> str:
        rel = self.items[i][0]
        return _safe_key(os.path.splitext(rel)[0])

    def label(self, i: int) -> int:
        return self.items[i][1]

    def origin(self, i: int) -> str:
        return self.items[i][0]

    def load(self, i: int, resolution: Optional[int]) -> np.ndarray:
        path = os.path.join(self.root, self.items[i][0])
        with Image.open(path) as im:
            im.load()
            im = im.convert("RGB")
            if resolution:
                im = center_crop(im, resolution)
            return np.asarray(im)

    def encoded(self, i: int, resolution: Optional[int], image_format: str) -> Tuple[str, bytes]:
        path = os.path.join(self.root, self.items[i][0])
        suffix = os.path.splitext(path)[1].lower()
        if image_format == "keep" and resolution is None and suffix in (".jpg", ".jpeg", ".png"):
            with open(path, "rb") as f:
                data = f.read()
            with Image.open(io.BytesIO(data)) as im:  # full decode: reject corrupt or truncated files now
                im.load()
                if im.mode not in ("RGB", "L", "RGBA", "P", "CMYK"):
                    raise ValueError(f"unsupported image mode {im.mode}")
            return ("jpg" if suffix in (".jpg", ".jpeg") else "png"), data
        fmt = "jpg" if image_format == "keep" else image_format
        return fmt, encode_image(self.load(i, resolution), fmt)


class NpzImageSource(ImageSource):
    """The demo NPZ written by ``tools/make_demo_data.py``; lossless PNG by default."""

    def __init__(self, path: str):
        data = load_npz(path)
        self.path = path
        self.images, self.labels = data["images"], data["labels"]
        self.class_names = [str(c) for c in data["class_names"]]
        self.description = f"npz {path} ({len(self.labels)} images, {len(self.class_names)} classes)"

    def __len__(self) -> int:
        return len(self.labels)

    def key(self, i: int) -> str:
        return f"{i:08d}"

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def origin(self, i: int) -> str:
        return f"{os.path.basename(self.path)}[{i}]"

    def load(self, i: int, resolution: Optional[int]) -> np.ndarray:
        img = self.images[i]
        if resolution and img.shape[:2] != (resolution, resolution):
            img = np.asarray(center_crop(Image.fromarray(img), resolution))
        return img


def open_image_source(src: str) -> ImageSource:
    """:class:`NpzImageSource` for a ``.npz`` file, :class:`FolderSource` for a folder."""
    if src.endswith(".npz"):
        return NpzImageSource(src)
    return FolderSource(src)


__all__ = ["ImageSource", "FolderSource", "NpzImageSource", "open_image_source", "encode_image", "IMAGE_SUFFIXES"]
