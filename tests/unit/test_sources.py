"""Dataset readers on tiny generated trees in the layouts the datasets ship with.

The ``make_*_tree`` helpers are also used by test_shard.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from eagle_dist.data import sources
from eagle_dist.data.sources import BadInput, SourceLayoutError, SyntheticSpec, five_crop_boxes, open_source

H, W = 40, 56


def _rgb(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _fine_map(values: np.ndarray, h: int = H, w: int = W) -> np.ndarray:
    """A label map that contains every value of `values` (tiled row-major)."""
    return np.resize(values, (h, w)).astype(values.dtype)


def make_coco_tree(root, n_train: int = 2, n_val: int = 2):
    """cocostuff layout; image 0 of each split holds every fine id 0..181 plus 255."""
    ids = {"train2017": [f"{i:012d}" for i in range(n_train)], "val2017": [f"{100 + i:012d}" for i in range(n_val)]}
    lists = {"train2017": "Coco164kFull_Stuff_Coarse.txt", "val2017": "Coco164kFull_Stuff_Coarse_7.txt"}
    all_ids = np.concatenate([np.arange(182), [255]]).astype(np.uint8)
    for folder, names in ids.items():
        (root / "images" / folder).mkdir(parents=True)
        (root / "annotations" / folder).mkdir(parents=True)
        (root / "curated" / folder).mkdir(parents=True)
        (root / "curated" / folder / lists[folder]).write_text("".join(n + "\n" for n in names))
        for k, name in enumerate(names):
            Image.fromarray(_rgb(k)).save(root / "images" / folder / f"{name}.jpg", quality=90)
            fine = np.roll(_fine_map(all_ids), k)
            Image.fromarray(fine, "L").save(root / "annotations" / folder / f"{name}.png")
    return ids


def make_cityscapes_tree(root, cities=("aachen", "bonn"), per_city: int = 1):
    """cityscapes layout; every label map holds all labelIds 0..33."""
    names = []
    for split in ("train", "val"):
        for city in cities:
            (root / "leftImg8bit" / split / city).mkdir(parents=True)
            (root / "gtFine" / split / city).mkdir(parents=True)
            for j in range(per_city):
                name = f"{city}_{j:06d}_000019"
                Image.fromarray(_rgb(j)).save(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
                fine = _fine_map(np.arange(34, dtype=np.uint8))
                Image.fromarray(fine, "L").save(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png")
                names.append((split, city, name))
    return names


def make_potsdam_tree(root, float_images: bool = False):
    """potsdam layout: .mat tiles (RGB+IR), gt 0..5 and 255; one unlabelled tile without gt."""
    (root / "imgs").mkdir(parents=True)
    (root / "gt").mkdir(parents=True)
    lists = {"labelled_train.txt": ["t0", "t1"], "labelled_test.txt": ["v0"], "unlabelled_train.txt": ["u0"]}
    lists["all.txt"] = [i for v in lists.values() for i in v]
    for name, ids in lists.items():
        (root / name).write_text("".join(i + "\n" for i in ids))
    for k, i in enumerate(lists["all.txt"]):
        rgbir = np.concatenate([_rgb(k), _rgb(k + 50)[:, :, :1]], axis=2)
        img = rgbir.astype(np.float32) / 255 if float_images else rgbir
        savemat(root / "imgs" / f"{i}.mat", {"img": img})
        if not i.startswith("u"):
            savemat(root / "gt" / f"{i}.mat", {"gt": _fine_map(np.array([0, 1, 2, 3, 4, 5, 255], np.uint8))})
    return lists


def make_potsdamraw_tree(root):
    (root / "processed" / "imgs").mkdir(parents=True)
    (root / "processed" / "gt").mkdir(parents=True)
    names = ["10_0_0", "2_0_1", "2_0_0", "2_1_0"]
    for k, n in enumerate(names):
        savemat(root / "processed" / "imgs" / f"{n}.mat", {"img": np.concatenate([_rgb(k), _rgb(k)[:, :, :1]], 2)})
        savemat(root / "processed" / "gt" / f"{n}.mat", {"gt": _fine_map(np.array([0, 4, 1, 5, 2, 3, 255], np.uint8))})
    return names


# --------------------------------------------------------------------------- five-crop

@pytest.mark.parametrize("hw, expected", [
    ((480, 640), [(0, 0, 240, 320), (0, 320, 240, 320), (240, 0, 240, 320), (240, 320, 240, 320),
                  (120, 160, 240, 320)]),
    # odd sizes: the crop truncates and the centre offset rounds half to even (120.5 -> 120, 160.5 -> 160)
    ((481, 641), [(0, 0, 240, 320), (0, 321, 240, 320), (241, 0, 240, 320), (241, 321, 240, 320),
                  (120, 160, 240, 320)]),
    ((427, 640), [(0, 0, 213, 320), (0, 320, 213, 320), (214, 0, 213, 320), (214, 320, 213, 320),
                  (107, 160, 213, 320)]),
    ((7, 9), [(0, 0, 3, 4), (0, 5, 3, 4), (4, 0, 3, 4), (4, 5, 3, 4), (2, 2, 3, 4)]),
])
def test_five_crop_boxes_follow_the_official_rule(hw, expected):
    assert five_crop_boxes(*hw, 0.5) == expected


def test_five_crop_rejects_an_empty_crop():
    with pytest.raises(ValueError, match="empty crop"):
        five_crop_boxes(1, 10, 0.5)


# --------------------------------------------------------------------------- label spaces

def test_coco_table_maps_all_182_ids_and_names_27_classes():
    lut = sources.COCOSTUFF_FINE_TO_COARSE
    assert len(sources.COCOSTUFF27_CLASSES) == 27 == len(set(sources.COCOSTUFF27_CLASSES))
    assert (lut[:182] >= 0).all() and set(lut[:182].tolist()) == set(range(27))
    assert lut[255] == -1 and (lut[182:255] == sources._INVALID).all()
    # spot checks against ALGORITHM.md 2.1
    assert lut[0] == 9 and lut[1] == lut[8] == 11 and lut[71] == 0 and lut[100] == lut[117] == 13
    assert lut[105] == lut[156] == 23 and lut[181] == 24 and lut[177] == lut[178] == 26 and lut[97] == 15


def test_coco_reader_maps_every_fine_id(tmp_path):
    ids = make_coco_tree(tmp_path)
    src = open_source("cocostuff", tmp_path, "val")
    items = src.items()
    assert [it.key for it in items] == ids["val2017"]
    sample = src.load(items[0])
    fine = np.asarray(Image.open(tmp_path / items[0].label))
    expected = np.where(fine == 255, -1, sources.COCOSTUFF_FINE_TO_COARSE[fine])
    assert sample.label.dtype == np.int64 and np.array_equal(sample.label, expected)
    assert set(np.unique(sample.label).tolist()) == set(range(-1, 27))
    assert sample.image.mode == "RGB" and sample.image.size == (W, H)
    assert sample.jpeg == (tmp_path / items[0].image).read_bytes()
    assert sample.meta["source_file"] == f"images/val2017/{ids['val2017'][0]}.jpg"


def test_coco_unknown_id_and_size_mismatch_are_reported_with_the_file(tmp_path):
    ids = make_coco_tree(tmp_path, n_train=2)
    src = open_source("cocostuff", tmp_path, "train")
    bad_label = tmp_path / "annotations" / "train2017" / f"{ids['train2017'][0]}.png"
    Image.fromarray(np.full((H, W), 200, np.uint8), "L").save(bad_label)
    with pytest.raises(BadInput, match="unknown ids 200") as err:
        src.load(src.items()[0])
    assert err.value.reason == "label_out_of_range" and err.value.path.endswith(".png")
    Image.fromarray(np.zeros((H + 1, W), np.uint8), "L").save(bad_label)
    with pytest.raises(BadInput) as err:
        src.load(src.items()[0])
    assert err.value.reason == "size_mismatch"
    (tmp_path / "images" / "train2017" / f"{ids['train2017'][1]}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(BadInput) as err:
        src.load(src.items()[1])
    assert err.value.reason == "unreadable" and ids["train2017"][1] in err.value.path


def test_cityscapes_reader_subtracts_7_and_ignores_void(tmp_path):
    make_cityscapes_tree(tmp_path)
    src = open_source("cityscapes", tmp_path, "train")
    items = src.items()
    assert [it.key for it in items] == ["aachen_000000_000019", "bonn_000000_000019"]
    sample = src.load(items[0])
    fine = np.asarray(Image.open(tmp_path / items[0].label)).astype(np.int64)
    expected = np.where(fine < 7, -1, fine - 7)
    assert np.array_equal(sample.label, expected)
    assert set(np.unique(sample.label).tolist()) == set(range(-1, 27))
    assert len(sources.CITYSCAPES27_CLASSES) == 27
    Image.fromarray(np.full((H, W), 34, np.uint8), "L").save(tmp_path / items[1].label)
    with pytest.raises(BadInput, match="unknown ids 34"):
        src.load(items[1])


@pytest.mark.parametrize("float_images", [False, True])
def test_potsdam_reader(tmp_path, float_images):
    make_potsdam_tree(tmp_path, float_images=float_images)
    src = open_source("potsdam", tmp_path, "train")
    assert [it.key for it in src.items()] == ["t0", "t1"]
    sample = src.load(src.items()[0])
    # RGB only (IR dropped); float tiles are scaled by 255 and truncated like to_pil_image
    assert np.array_equal(np.asarray(sample.image), _rgb(0))
    fine = _fine_map(np.array([0, 1, 2, 3, 4, 5, 255]))
    coarse = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2, 255: -1}
    assert np.array_equal(sample.label, np.vectorize(coarse.get)(fine))
    assert open_source("potsdam", tmp_path, "val").items()[0].key == "v0"
    unl = open_source("potsdam", tmp_path, "unlabelled_train")
    s = unl.load(unl.items()[0])
    assert (s.label == -1).all() and s.meta["label_file"] is None
    savemat(tmp_path / "gt" / "t1.mat", {"gt": _fine_map(np.array([0, 7], np.uint8))})
    with pytest.raises(BadInput, match="unknown ids 7"):
        src.load(src.items()[1])
    (tmp_path / "gt" / "t1.mat").unlink()
    with pytest.raises(BadInput) as err:  # a labelled split promises ground truth
        src.load(src.items()[1])
    assert err.value.reason == "missing"


def test_potsdamraw_lists_tiles_in_numeric_order(tmp_path):
    make_potsdamraw_tree(tmp_path)
    src = open_source("potsdamraw", tmp_path, "all")
    assert [it.key for it in src.items()] == ["2_0_0", "2_0_1", "2_1_0", "10_0_0"]
    sample = src.load(src.items()[0])
    assert set(np.unique(sample.label).tolist()) == {-1, 0, 1, 2}


def test_folder_source_with_and_without_labels(tmp_path):
    images, labels = tmp_path / "img", tmp_path / "lab"
    (images / "sub").mkdir(parents=True)
    (labels / "sub").mkdir(parents=True)
    Image.fromarray(_rgb(0)).save(images / "a.png")
    Image.fromarray(_rgb(1)).save(images / "sub" / "b.jpg")
    Image.fromarray(_rgb(2)).save(images / "sub_b.png")  # collides with sub/b after sanitising
    for stem, value in (("a", 1), ("sub/b", 255), ("sub_b", 2)):
        Image.fromarray(np.full((H, W), value, np.uint8), "L").save(labels / f"{stem}.png")
    src = open_source("folder", images, "train", labels=labels, num_classes=3)
    keys = [it.key for it in src.items()]
    assert len(set(keys)) == 3 and all(k.replace("-", "").replace("_", "").isalnum() for k in keys)
    by_file = {it.image: src.load(it) for it in src.items()}
    assert (by_file["a.png"].label == 1).all() and (by_file["sub/b.jpg"].label == -1).all()
    assert src.classes == ("class_0", "class_1", "class_2")
    Image.fromarray(np.full((H, W), 3, np.uint8), "L").save(labels / "a.png")
    with pytest.raises(BadInput, match="unknown ids 3"):
        src.load(src.items()[0])
    plain = open_source("folder", images, "train")
    assert all((plain.load(it).label == -1).all() for it in plain.items())
    with pytest.raises(ValueError, match="num-classes"):
        open_source("folder", images, "train", labels=labels)


def test_missing_root_and_list_name_the_expected_path(tmp_path):
    with pytest.raises(SourceLayoutError, match=str(tmp_path / "nope")):
        open_source("cocostuff", tmp_path / "nope", "train")
    (tmp_path / "coco").mkdir()
    src = open_source("cocostuff", tmp_path / "coco", "train")
    with pytest.raises(SourceLayoutError, match="curated/train2017/Coco164kFull_Stuff_Coarse.txt"):
        src.items()
    with pytest.raises(SourceLayoutError, match="leftImg8bit/val"):
        open_source("cityscapes", tmp_path / "coco", "val").items()
    with pytest.raises(SourceLayoutError, match="labelled_test.txt"):
        open_source("potsdam", tmp_path / "coco", "val").items()
    with pytest.raises(ValueError, match="splits"):
        open_source("cocostuff", tmp_path / "coco", "test")


def test_safe_key_never_yields_a_path():
    for text in ("../../etc/passwd", "a/b.c", "", "x" * 300, "ü.png"):
        key = sources.safe_key(text)
        assert key and len(key) <= sources.MAX_KEY_LEN
        assert all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
    assert sources.safe_key("x" * 300 + "a") != sources.safe_key("x" * 300 + "b")


# --------------------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_and_splits_differ():
    spec = SyntheticSpec(count=3, height=H, width=W, num_classes=5, seed=7)
    a, b = open_source("synthetic", split="train", spec=spec), open_source("synthetic", split="train", spec=spec)
    for item in a.items():
        ia, la = a.render(item.source_index)
        ib, lb = b.render(item.source_index)
        assert np.array_equal(ia, ib) and np.array_equal(la, lb)
        assert la.dtype == np.int64 and la.min() >= 0 and la.max() < 5
    val = open_source("synthetic", split="val", spec=spec)
    assert not np.array_equal(val.render(0)[0], a.render(0)[0])
    assert np.array_equal(val.colour, a.colour)  # same classes in every split
    other_spec = SyntheticSpec(count=3, height=H, width=W, num_classes=5, seed=8)
    other = open_source("synthetic", split="train", spec=other_spec)
    assert not np.array_equal(other.render(0)[0], a.render(0)[0])


def test_synthetic_classes_are_named_and_distinguishable():
    spec = SyntheticSpec(count=8, height=64, width=64, num_classes=6, seed=0)
    src = open_source("synthetic", split="train", spec=spec)
    assert len(src.classes) == 6 == len(set(src.classes)) and all(src.classes)
    pixels = {c: [] for c in range(6)}
    for i in range(spec.count):
        img, lab = src.render(i)
        for c in np.unique(lab):
            pixels[int(c)].append(img[lab == c].reshape(-1, 3).astype(np.float64))
    means = np.stack([np.concatenate(p).mean(0) for p in pixels.values() if p])
    assert len(means) >= 4  # a few images already show most classes
    gaps = np.linalg.norm(means[:, None] - means[None], axis=-1)[np.triu_indices(len(means), 1)]
    assert gaps.min() > 10  # distinct class colours (0..255 scale)
    # texture: each class has its own stripe angle and frequency
    assert len(set(np.round(src.angle, 6))) == 6 and len(set(np.round(src.freq, 6))) == 6


def test_synthetic_colour_groups_share_colours():
    src = open_source("synthetic", split="train", spec=SyntheticSpec(num_classes=6, colour_groups=3))
    assert np.array_equal(src.colour[0], src.colour[3]) and not np.array_equal(src.colour[0], src.colour[1])
