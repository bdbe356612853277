"""Dataset readers: datasets as downloaded -> (key, RGB image, coarse label, metadata) samples.

The shard builder (``python -m eagle_dist.shard``) is the main user.  Direct use::

    from eagle_dist.data.sources import open_source
    src = open_source("cocostuff", root="/data/cocostuff", split="val")
    for item in src.items():
        key, image, label, meta = src.load(item)[:4]   # PIL RGB, int64 HxW (-1 = ignore), dict

Sources and the layouts they read (facts from the official/STEGO loaders):

==============  ===============================================================================
``cocostuff``   ``images/{train2017,val2017}/<id>.jpg``, ``annotations/<same>/<id>.png`` (ids
                0..181, 255 unlabeled); lists ``curated/train2017/Coco164kFull_Stuff_Coarse.txt``
                (train) and ``curated/val2017/Coco164kFull_Stuff_Coarse_7.txt`` (val).
``cityscapes``  ``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png``,
                ``gtFine/<split>/<city>/<name>_gtFine_labelIds.png``; class = labelId - 7.
``potsdam``     ``imgs/<id>.mat`` (key ``img``, HxWx4 RGB+IR) and ``gt/<id>.mat`` (key ``gt``);
                split lists ``labelled_train.txt``, ``labelled_test.txt``, ``unlabelled_train.txt``,
                ``all.txt``.  A tile without a ``gt`` file is all-ignore (as in STEGO).
``potsdamraw``  ``processed/{imgs,gt}/<i>_<h>_<w>.mat``, every tile (no split lists).
``folder``      any image folder; optional label PNGs with the same relative stem elsewhere.
``synthetic``   generated, deterministic from a seed (no files).
==============  ===============================================================================

Labels come out already mapped to coarse classes, int64, with ``IGNORE`` (-1) for unlabelled
pixels.  A label value outside the dataset's known fine ids is an error (:class:`BadInput`), not
silently class 0 as in the official code, so the shard builder can report the file.
"""

from __future__ import annotations

import io
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, NamedTuple

import numpy as np
from PIL import Image

from eagle_dist.errors import EagleError

IGNORE = -1

# Sentinel in fine->coarse lookup tables for ids the dataset does not define.
_INVALID = -2


class SourceLayoutError(EagleError, FileNotFoundError):
    """The dataset root or one of its list files is not where the layout says it must be."""


class BadInput(Exception):
    """One input sample cannot be used; the shard builder skips and counts it (or stops, --strict).

    ``reason`` is one of ``missing``, ``unreadable``, ``size_mismatch``, ``label_out_of_range``,
    ``bad_format``; ``path`` names the offending file relative to the dataset root.
    """

    REASONS = ("missing", "unreadable", "size_mismatch", "label_out_of_range", "bad_format")

    def __init__(self, reason: str, path: str, detail: str = ""):
        assert reason in self.REASONS, reason
        self.reason, self.path, self.detail = reason, path, detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


class Item(NamedTuple):
    """What a worker needs to load one sample: paths relative to the root, or an index."""

    key: str
    image: str | None  # None only for generated samples (synthetic)
    label: str | None  # None for generated samples and images without a label file
    # Its place in the source's items(). Not `index`: that name hid tuple.index().
    source_index: int

    @property
    def image_file(self) -> str:
        """`image` for the sources that read files, which always name one."""
        if self.image is None:
            raise ValueError(f"item {self.key} names no image file")
        return self.image

    @property
    def label_file(self) -> str:
        """`label` where the source always names a label file."""
        if self.label is None:
            raise ValueError(f"item {self.key} names no label file")
        return self.label


class SourceSample(NamedTuple):
    key: str
    image: Image.Image  # RGB
    label: np.ndarray  # int64 [H, W], coarse ids, IGNORE where unlabelled
    meta: dict
    # Original encoded bytes when the file on disk is already a JPEG: the builder can store them
    # unchanged for uncropped splits, so validation sees exactly the pixels the official code reads.
    jpeg: bytes | None = None


# --------------------------------------------------------------------------- label spaces

# COCO-Stuff 182 -> 27 (ALGORITHM.md 2.1): coarse id -> (name, fine ids).
_COCO_COARSE: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("electronic", tuple(range(71, 77))),
    ("appliance", tuple(range(77, 83))),
    ("food (things)", tuple(range(51, 61))),
    ("furniture (things)", tuple(range(61, 71))),
    ("indoor", tuple(range(83, 91))),
    ("kitchen", tuple(range(43, 51))),
    ("accessory", tuple(range(25, 33))),
    ("animal", tuple(range(15, 25))),
    ("outdoor", tuple(range(9, 15))),
    ("person", (0,)),
    ("sports", tuple(range(33, 43))),
    ("vehicle", tuple(range(1, 9))),
    ("ceiling", (101, 102)),
    ("floor", (100, 113, 114, 115, 116, 117)),
    ("food (stuff)", (120, 121, 152, 169)),
    ("furniture (stuff)", (97, 106, 107, 109, 111, 122, 129, 132, 155, 160, 164)),
    ("raw material", (99, 131, 138, 142)),
    ("textile", (91, 92, 103, 104, 108, 130, 136, 140, 151, 166, 167)),
    ("wall", tuple(range(170, 177))),
    ("window", (179, 180)),
    ("building", (94, 95, 127, 150, 157, 165)),
    ("ground", (110, 124, 125, 135, 139, 143, 144, 146, 148, 153, 158)),
    ("plant", (93, 96, 118, 123, 128, 133, 141, 162, 168)),
    ("sky", (105, 156)),
    ("solid", (126, 134, 149, 159, 161, 181)),
    ("structural", (98, 112, 137, 145, 163)),
    ("water", (119, 147, 154, 177, 178)),
)
COCOSTUFF27_CLASSES: tuple[str, ...] = tuple(name for name, _ in _COCO_COARSE)

CITYSCAPES27_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail",
    "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train",
    "motorcycle", "bicycle",
)
CITYSCAPES_FIRST_CLASS_LABEL_ID = 7  # labelIds 0..6 are void classes -> ignore
CITYSCAPES_MAX_LABEL_ID = 33

POTSDAM3_CLASSES: tuple[str, ...] = ("roads and cars", "buildings and clutter", "trees and vegetation")
_POTSDAM_FINE_TO_COARSE = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}


def _lut(size: int, pairs: dict[int, int], ignore_ids: tuple[int, ...] = ()) -> np.ndarray:
    lut = np.full(size, _INVALID, dtype=np.int64)
    for fine, coarse in pairs.items():
        lut[fine] = coarse
    lut[list(ignore_ids)] = IGNORE
    return lut


COCOSTUFF_FINE_TO_COARSE = _lut(
    256, {fine: coarse for coarse, (_, fines) in enumerate(_COCO_COARSE) for fine in fines}, ignore_ids=(255,)
)
CITYSCAPES_FINE_TO_COARSE = _lut(
    CITYSCAPES_MAX_LABEL_ID + 1,
    {lid: lid - CITYSCAPES_FIRST_CLASS_LABEL_ID
     for lid in range(CITYSCAPES_FIRST_CLASS_LABEL_ID, CITYSCAPES_MAX_LABEL_ID + 1)},
    ignore_ids=tuple(range(CITYSCAPES_FIRST_CLASS_LABEL_ID)),
)
POTSDAM_FINE_TO_COARSE = _lut(256, _POTSDAM_FINE_TO_COARSE, ignore_ids=(255,))


def map_labels(fine: np.ndarray, lut: np.ndarray, path: str) -> np.ndarray:
    """Fine ids -> coarse int64 through `lut`; any id the table does not define raises BadInput."""
    fine = np.asarray(fine)
    if fine.ndim != 2:
        raise BadInput("bad_format", path, f"label must be a single-channel 2-D map, got shape {fine.shape}")
    if fine.dtype.kind == "f":
        if not np.all(np.isfinite(fine)) or not np.all(fine == np.round(fine)):
            raise BadInput("label_out_of_range", path, "label map holds non-integer values")
    elif fine.dtype.kind not in "iub":
        raise BadInput("bad_format", path, f"label dtype {fine.dtype} is not an integer type")
    ids = fine.astype(np.int64)
    inside = (ids >= 0) & (ids < len(lut))
    coarse = np.full(ids.shape, _INVALID, dtype=np.int64)
    coarse[inside] = lut[ids[inside]]
    bad = coarse == _INVALID
    if bad.any():
        values = np.unique(ids[bad])
        shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
        raise BadInput("label_out_of_range", path, f"{int(bad.sum())} pixels with unknown ids {shown}")
    return coarse


# --------------------------------------------------------------------------- five-crop

def five_crop_boxes(height: int, width: int, ratio: float = 0.5) -> list[tuple[int, int, int, int]]:
    """Official five-crop boxes (top, left, h, w): top-left, top-right, bottom-left, bottom-right, centre.

    The crop size truncates (``int(H * ratio)``) and the centre offset uses Python's round (half
    to even), exactly as ``RandomCropComputer.five_crops`` via torchvision's ``five_crop``.
    """
    h, w = int(height * ratio), int(width * ratio)
    if h < 1 or w < 1:
        raise ValueError(f"crop ratio {ratio} gives an empty crop for a {height}x{width} image")
    centre = (int(round((height - h) / 2.0)), int(round((width - w) / 2.0)))
    corners = [(0, 0), (0, width - w), (height - h, 0), (height - h, width - w), centre]
    return [(top, left, h, w) for top, left in corners]


# --------------------------------------------------------------------------- helpers

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
MAX_KEY_LEN = 80


def safe_key(text: str) -> str:
    """A tar-member-safe sample key: only [A-Za-z0-9_-], never empty, never a path.

    WebDataset splits a member name at the first dot of its basename, so keys carry no dots;
    no slashes means a member can never leave the shard's top level.  Long names keep a hash of
    the full text so two long names that share a prefix stay distinct.
    """
    key = _UNSAFE.sub("_", text).strip("_") or "sample"
    if len(key) > MAX_KEY_LEN:
        key = f"{key[:MAX_KEY_LEN - 9]}_{zlib.crc32(text.encode()):08x}"
    return key


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise SourceLayoutError(f"{what} not found: expected {path}")
    return path


def _read_list(path: Path) -> list[str]:
    _require(path, "image list")
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def _open_image(root: Path, rel: str) -> tuple[Image.Image, bytes | None]:
    """Decode an image file to RGB; returns the raw bytes too when the file is a JPEG."""
    path = root / rel
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadInput("missing", rel, f"expected {path}") from None
    except OSError as exc:
        raise BadInput("unreadable", rel, str(exc)) from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()
            rgb = im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadInput("unreadable", rel, f"cannot decode image: {exc}") from None
    return rgb, (data if fmt == "JPEG" else None)


def _open_label_png(root: Path, rel: str) -> np.ndarray:
    path = root / rel
    if not path.is_file():
        raise BadInput("missing", rel, f"expected {path}")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "P", "I", "I;16", "1"):
                raise BadInput("bad_format", rel, f"label PNG must be single-channel, got mode {im.mode}")
            return np.asarray(im)
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadInput("unreadable", rel, f"cannot decode label: {exc}") from None


def _load_mat(root: Path, rel: str, key: str) -> np.ndarray:
    from scipy.io import loadmat  # scipy is only needed for Potsdam

    path = root / rel
    if not path.is_file():
        raise BadInput("missing", rel, f"expected {path}")
    try:
        content = loadmat(str(path))
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError, ... on damaged files
        raise BadInput("unreadable", rel, f"cannot read .mat: {exc}") from None
    if key not in content:
        raise BadInput("bad_format", rel, f"no variable '{key}' in the .mat file")
    return np.asarray(content[key])


def _mat_rgb(array: np.ndarray, rel: str) -> Image.Image:
    """Potsdam tiles: HxWx(3|4), uint8 or float in [0, 1] (STEGO's to_pil_image scales floats by 255)."""
    if array.ndim != 3 or array.shape[2] < 3:
        raise BadInput("bad_format", rel, f"image must be HxWx3 or HxWx4, got shape {array.shape}")
    rgb = array[:, :, :3]
    if rgb.dtype != np.uint8:
        if rgb.dtype.kind not in "fiu":
            raise BadInput("bad_format", rel, f"image dtype {rgb.dtype} is not numeric")
        # to_pil_image truncates x*255 to a byte; clip first so out-of-range values do not wrap.
        scale = 255.0 if rgb.dtype.kind == "f" else 1.0
        rgb = np.clip(rgb.astype(np.float64) * scale, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(rgb), "RGB")


def _check_sizes(image: Image.Image, label: np.ndarray, rel: str) -> None:
    if label.shape != (image.height, image.width):
        raise BadInput(
            "size_mismatch", rel,
            f"label is {label.shape[0]}x{label.shape[1]} but image is {image.height}x{image.width}",
        )


# --------------------------------------------------------------------------- sources

class Source:
    """Base class: a fixed, ordered list of items and a loader for one item.

    ``items()`` is deterministic (sorted or in list-file order) so that shard contents do not
    depend on directory iteration order or on which worker loads what.
    """

    name: ClassVar[str]
    splits: ClassVar[tuple[str, ...]]
    dataset: str
    classes: tuple[str, ...]
    root: Path  # the dataset folder; the synthetic source reads no files and has none

    def __init__(self, root: str | Path | None, split: str):
        if split not in self.splits:
            raise ValueError(f"source '{self.name}' has splits {', '.join(self.splits)}; got '{split}'")
        self.split = split
        if root is None:
            raise SourceLayoutError(f"source '{self.name}' needs --root (the dataset folder)")
        self.root = Path(root)
        _require(self.root, f"{self.name} root folder")

    def items(self) -> list[Item]:
        raise NotImplementedError

    def load(self, item: Item) -> SourceSample:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """Source settings that change the output (recorded in the manifest)."""
        return {}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def samples(self) -> Iterator[SourceSample]:
        """Every item in order; raises BadInput on the first bad one (the builder handles skipping)."""
        for item in self.items():
            yield self.load(item)

    def _meta(self, item: Item, image: Image.Image) -> dict[str, Any]:
        return {
            "dataset": self.dataset, "split": self.split, "source_file": item.image,
            "label_file": item.label, "source_index": item.source_index, "size": [image.height, image.width],
        }


class CocoStuff(Source):
    name = "cocostuff"
    splits = ("train", "val")
    dataset = "cocostuff27"
    classes = COCOSTUFF27_CLASSES
    LISTS = {
        "train": ("train2017", "Coco164kFull_Stuff_Coarse.txt"),
        "val": ("val2017", "Coco164kFull_Stuff_Coarse_7.txt"),
    }

    def items(self) -> list[Item]:
        folder, list_name = self.LISTS[self.split]
        ids = _read_list(self.root / "curated" / folder / list_name)
        _require(self.root / "images" / folder, "COCO image folder")
        _require(self.root / "annotations" / folder, "COCO annotation folder")
        return [
            Item(safe_key(i), f"images/{folder}/{i}.jpg", f"annotations/{folder}/{i}.png", n)
            for n, i in enumerate(ids)
        ]

    def load(self, item: Item) -> SourceSample:
        image, jpeg = _open_image(self.root, item.image_file)
        fine = _open_label_png(self.root, item.label_file)
        _check_sizes(image, fine, item.label_file)
        label = map_labels(fine, COCOSTUFF_FINE_TO_COARSE, item.label_file)
        return SourceSample(item.key, image, label, self._meta(item, image), jpeg)


class Cityscapes(Source):
    name = "cityscapes"
    splits = ("train", "val")
    dataset = "cityscapes27"
    classes = CITYSCAPES27_CLASSES

    def items(self) -> list[Item]:
        img_dir = _require(self.root / "leftImg8bit" / self.split, "Cityscapes image folder")
        _require(self.root / "gtFine" / self.split, "Cityscapes gtFine folder")
        suffix = "_leftImg8bit.png"
        items = []
        for n, path in enumerate(sorted(img_dir.glob(f"*/*{suffix}"))):
            city, name = path.parent.name, path.name[: -len(suffix)]
            items.append(Item(
                safe_key(name), f"leftImg8bit/{self.split}/{city}/{path.name}",
                f"gtFine/{self.split}/{city}/{name}_gtFine_labelIds.png", n,
            ))
        if not items:
            raise SourceLayoutError(f"no Cityscapes images: expected {img_dir}/<city>/<name>{suffix}")
        return items

    def load(self, item: Item) -> SourceSample:
        image, _ = _open_image(self.root, item.image_file)
        fine = _open_label_png(self.root, item.label_file)
        _check_sizes(image, fine, item.label_file)
        label = map_labels(fine, CITYSCAPES_FINE_TO_COARSE, item.label_file)
        return SourceSample(item.key, image, label, self._meta(item, image))


class _PotsdamBase(Source):
    classes = POTSDAM3_CLASSES

    @property
    def labelled_only(self) -> bool:
        """Splits that promise ground truth report a missing gt file instead of ignoring it."""
        return False

    def load(self, item: Item) -> SourceSample:
        image = _mat_rgb(_load_mat(self.root, item.image_file, "img"), item.image_file)
        label_file: str | None = item.label_file
        if (self.root / item.label_file).exists() or self.labelled_only:
            gt = _load_mat(self.root, item.label_file, "gt")
            if gt.ndim == 3 and gt.shape[2] == 1:
                gt = gt[:, :, 0]
            _check_sizes(image, gt, item.label_file)
            label = map_labels(gt, POTSDAM_FINE_TO_COARSE, item.label_file)
        else:
            # STEGO's loader treats a tile without ground truth as unlabelled (all ignore).
            label = np.full((image.height, image.width), IGNORE, dtype=np.int64)
            label_file = None
        meta = self._meta(item, image)
        meta["label_file"] = label_file
        return SourceSample(item.key, image, label, meta)


class Potsdam(_PotsdamBase):
    name = "potsdam"
    dataset = "potsdam3"
    LISTS = {
        "train": ("labelled_train.txt",),
        "val": ("labelled_test.txt",),
        "unlabelled_train": ("unlabelled_train.txt",),
        "train+val": ("labelled_train.txt", "labelled_test.txt"),
        "all": ("all.txt",),
    }
    splits = tuple(LISTS)

    @property
    def labelled_only(self) -> bool:
        return self.split in ("train", "val", "train+val")

    def items(self) -> list[Item]:
        ids = [i for list_name in self.LISTS[self.split] for i in _read_list(self.root / list_name)]
        _require(self.root / "imgs", "Potsdam imgs folder")
        return [Item(safe_key(i), f"imgs/{i}.mat", f"gt/{i}.mat", n) for n, i in enumerate(ids)]


class PotsdamRaw(_PotsdamBase):
    name = "potsdamraw"
    dataset = "potsdamraw3"
    # One tile set without split lists; "train" and "all" read the same tiles ("train" is five-cropped
    # by the builder's default crop rule).
    splits = ("all", "train")
    _TILE = re.compile(r"^(\d+)_(\d+)_(\d+)\.mat$")

    def items(self) -> list[Item]:
        img_dir = _require(self.root / "processed" / "imgs", "PotsdamRaw processed/imgs folder")
        tiles = []
        for path in img_dir.iterdir():
            m = self._TILE.match(path.name)
            if m:
                tiles.append((tuple(int(g) for g in m.groups()), path.name))
        if not tiles:
            raise SourceLayoutError(f"no PotsdamRaw tiles: expected {img_dir}/<i>_<h>_<w>.mat")
        tiles.sort()  # numeric (image, row, column) order, as STEGO enumerates them
        return [
            Item(safe_key(name[:-4]), f"processed/imgs/{name}", f"processed/gt/{name}", n)
            for n, (_, name) in enumerate(tiles)
        ]


class Folder(Source):
    """Users' own data: every image under ``root``; optional label PNGs in ``labels`` with the same
    relative path and stem (values 0..num_classes-1, 255 = ignore).  Without labels every pixel is
    ignore: the shards then list no classes and training runs without labels (EAGLE is
    unsupervised; only the linear probe and the scores need labels).

    Mixed folders are accepted: with ``labels``, an image without a label PNG is stored with every
    pixel ignored (its pixels train EAGLE and the cluster probe, not the linear probe, and are
    not scored), and ``note`` says how many such images there are."""

    name = "folder"
    splits = ("train", "val", "test", "all")
    IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

    def __init__(self, root, split, labels: str | Path | None = None, num_classes: int | None = None,
                 class_names: list[str] | None = None):
        super().__init__(root, split)
        self.labels = Path(labels) if labels is not None else None
        if self.labels is not None:
            _require(self.labels, "label folder")
            if not num_classes and not class_names:
                raise ValueError("the folder source with labels needs --num-classes (or --class-names)")
        if class_names and num_classes and len(class_names) != num_classes:
            raise ValueError(f"--class-names gives {len(class_names)} names but --num-classes is {num_classes}")
        n = len(class_names) if class_names else int(num_classes or 0)
        if n > 255:
            raise ValueError("at most 255 classes fit a uint8 label PNG (255 is the ignore value)")
        self.classes = tuple(class_names) if class_names else tuple(f"class_{i}" for i in range(n))
        self.dataset = f"folder{n}" if n else "folder"
        self._lut = _lut(256, {i: i for i in range(n)}, ignore_ids=(255,))
        self.note: str | None = None  # set by items(): what the build summary should say about labels

    def options(self) -> dict[str, Any]:
        return {"labels": self.labels is not None, "classes": list(self.classes)}

    def items(self) -> list[Item]:
        paths = sorted(
            p.relative_to(self.root).as_posix() for p in self.root.rglob("*")
            if p.is_file() and p.suffix.lower() in self.IMAGE_SUFFIXES
        )
        if not paths:
            raise SourceLayoutError(f"no images ({', '.join(self.IMAGE_SUFFIXES)}) under {self.root}")
        used: set[str] = set()
        items = []
        for n, rel in enumerate(paths):
            stem = rel.rsplit(".", 1)[0]
            key = base = safe_key(stem)
            dup = 0
            while key in used:  # 'a/b.jpg' and 'a_b.png' collide after sanitising
                dup += 1
                key = f"{base[:MAX_KEY_LEN - 10]}-dup{dup}"
            used.add(key)
            label = f"{stem}.png" if self.labels is not None and (self.labels / f"{stem}.png").is_file() else None
            items.append(Item(key, rel, label, n))
        unlabelled = sum(1 for it in items if it.label is None)
        if self.labels is None:
            self.note = ("no labels: training on these shards runs without labels (the cluster probe finds "
                         "model.n_clusters segments)")
        elif unlabelled:
            self.note = (f"{unlabelled} of {len(items)} images have no label PNG in {self.labels}: they are stored "
                         "with every pixel ignored (they train EAGLE, not the linear probe, and are not scored)")
        return items

    def load(self, item: Item) -> SourceSample:
        image, jpeg = _open_image(self.root, item.image_file)
        if item.label is None:
            label = np.full((image.height, image.width), IGNORE, dtype=np.int64)
        else:
            assert self.labels is not None  # items() names a label file only inside the label folder
            fine = _open_label_png(self.labels, item.label)
            _check_sizes(image, fine, item.label)
            label = map_labels(fine, self._lut, item.label)
        return SourceSample(item.key, image, label, self._meta(item, image), jpeg)


_HUE_NAMES = ("red", "orange", "yellow", "lime", "green", "teal", "cyan", "azure", "blue", "violet",
              "magenta", "pink")


@dataclass(frozen=True)
class SyntheticSpec:
    """Knobs of the synthetic set.  Every class has a texture (oriented stripes of its own angle and
    frequency) and a colour; ``colour_groups`` < ``num_classes`` makes classes share colours, so only
    texture tells them apart (harder for per-pixel colour clustering, fine for a ViT)."""

    count: int = 200
    height: int = 160
    width: int = 224
    num_classes: int = 6
    seed: int = 0
    min_regions: int = 3
    max_regions: int = 7
    colour_groups: int | None = None
    colour_jitter: float = 0.06  # per-region shift of the class colour, fraction of full scale
    noise: float = 0.04  # per-pixel Gaussian noise, fraction of full scale


class Synthetic(Source):
    """Textured Voronoi-blob images of K classes, regenerated from (seed, split, index) on demand.

    Each item is independent of the others, so workers can build any shard without the rest and
    the output does not depend on the worker count.
    """

    name = "synthetic"
    splits = ("train", "val", "test")

    def __init__(self, root=None, split: str = "train", spec: SyntheticSpec | None = None):
        if split not in self.splits:
            raise ValueError(f"source 'synthetic' has splits {', '.join(self.splits)}; got '{split}'")
        self.split = split
        self.spec = spec = spec or SyntheticSpec()
        if not 2 <= spec.num_classes <= 255:
            raise ValueError(f"synthetic num_classes must be in 2..255, got {spec.num_classes}")
        if spec.count < 1 or spec.height < 8 or spec.width < 8:
            raise ValueError("synthetic count must be >= 1 and images at least 8x8")
        if not 1 <= spec.min_regions <= spec.max_regions:
            raise ValueError("synthetic regions need 1 <= min_regions <= max_regions")
        self.dataset = f"synthetic{spec.num_classes}"
        self._appearance()

    def _appearance(self) -> None:
        """Class colours and textures: from the seed only, so every split shares them."""
        spec, k = self.spec, self.spec.num_classes
        groups = spec.colour_groups or k
        if not 1 <= groups <= k:
            raise ValueError(f"colour_groups must be in 1..{k}, got {groups}")
        rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 0x5EED]))
        group_of = np.arange(k) % groups
        hue = (np.arange(groups) + rng.uniform(-0.2, 0.2, groups)) / groups % 1.0
        sat = rng.uniform(0.45, 0.8, groups)
        val = rng.uniform(0.45, 0.85, groups)
        self.colour = _hsv_to_rgb(hue, sat, val)[group_of]  # [K, 3] in [0, 1]
        # Classes of one colour group differ in angle; frequencies are spread over a range the
        # 5-crop + resize to 224 keeps visible (0.06..0.3 cycles per source pixel).
        self.angle = (np.arange(k) * math.pi / k + rng.uniform(0, math.pi / (2 * k), k)) % math.pi
        self.freq = rng.permutation(np.linspace(0.06, 0.3, k))
        self.amplitude = rng.uniform(0.08, 0.16, k)
        names = []
        for c in range(k):
            hue_name = _HUE_NAMES[int(hue[group_of[c]] * len(_HUE_NAMES)) % len(_HUE_NAMES)]
            names.append(f"c{c:02d} {hue_name} stripes {round(math.degrees(self.angle[c])):d}deg")
        self.classes = tuple(names)

    def options(self) -> dict[str, Any]:
        return {"synthetic": dict(vars(self.spec))}

    def items(self) -> list[Item]:
        return [Item(f"{self.split}_{i:07d}", None, None, i) for i in range(self.spec.count)]

    def load(self, item: Item) -> SourceSample:
        image, label = self.render(item.source_index)
        meta = {"dataset": self.dataset, "split": self.split, "source_file": None, "label_file": None,
                "source_index": item.source_index, "size": [self.spec.height, self.spec.width]}
        return SourceSample(item.key, Image.fromarray(image, "RGB"), label, meta)

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [H, W, 3] image and int64 [H, W] label of sample `index` (vectorised over pixels)."""
        spec = self.spec
        split_code = zlib.crc32(self.split.encode())
        rng = np.random.default_rng(np.random.SeedSequence([spec.seed, split_code, index]))
        h, w = spec.height, spec.width
        m = int(rng.integers(spec.min_regions, spec.max_regions + 1))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        # Warp the coordinates with a slow sinusoid so the Voronoi cells become blobs, not polygons.
        wy = yy + 0.08 * h * np.sin(2 * math.pi * xx / w * rng.uniform(0.5, 2) + rng.uniform(0, 2 * math.pi))
        wx = xx + 0.08 * w * np.sin(2 * math.pi * yy / h * rng.uniform(0.5, 2) + rng.uniform(0, 2 * math.pi))
        centres = rng.uniform((0, 0), (h, w), size=(m, 2)).astype(np.float32)
        dist2 = (wy[None] - centres[:, 0, None, None]) ** 2 + (wx[None] - centres[:, 1, None, None]) ** 2
        region = dist2.argmin(0)  # [H, W] in 0..m-1
        region_class = rng.integers(0, spec.num_classes, m)
        region_colour = self.colour[region_class] + rng.normal(0, spec.colour_jitter, (m, 3))
        region_phase = rng.uniform(0, 2 * math.pi, m)

        label = region_class[region]
        angle, freq = self.angle[label], self.freq[label]
        wave = np.sin(2 * math.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + region_phase[region])
        img = region_colour[region] + (self.amplitude[label] * wave)[..., None]
        img = img + rng.normal(0, spec.noise, img.shape)
        return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), label.astype(np.int64)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([
        np.stack([v, t, p], -1), np.stack([q, v, p], -1), np.stack([p, v, t], -1),
        np.stack([p, q, v], -1), np.stack([t, p, v], -1), np.stack([v, p, q], -1),
    ])  # [6, n, 3]
    return table[i, np.arange(len(h))]


SOURCES: dict[str, type[Source]] = {
    cls.name: cls for cls in (CocoStuff, Cityscapes, Potsdam, PotsdamRaw, Folder, Synthetic)
}


def open_source(name: str, root: str | Path | None = None, split: str = "train", **options) -> Source:
    """Build a source by name; `options` go to sources that take them (folder, synthetic)."""
    if name not in SOURCES:
        raise ValueError(f"unknown source '{name}'; choose one of {', '.join(SOURCES)}")
    return SOURCES[name](root, split, **options)
