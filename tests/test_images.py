"""Image conversion and I/O against independent references: numpy float64 arithmetic for the
uint8 maps, a numpy block construction (and torchvision where installed) for the grid, and PIL
reading back what was written."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from sdiff.data.images import from_uint8, load_image, make_grid, save_folder, save_grid, to_uint8

LEVELS = torch.arange(256, dtype=torch.int32).to(torch.uint8)  # (256,) every uint8 level


def random_images(n, c, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g) * 2 - 1  # (N, C, H, W) in [-1, 1]


def test_uint8_round_trip_is_exact_on_all_levels():
    x = from_uint8(LEVELS)
    assert x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), np.arange(256) / 127.5 - 1, rtol=0, atol=1e-7)
    assert x[0] == -1 and x[-1] == 1
    assert torch.equal(to_uint8(x), LEVELS)
    # (N, C, H, W) layout and numpy input work the same
    batch = LEVELS.view(4, 1, 8, 8)
    assert torch.equal(to_uint8(from_uint8(batch.numpy())), batch)


def test_to_uint8_rounds_to_nearest_like_numpy():
    x = random_images(8, 3, 16, 16, seed=1) * 1.2  # some values outside [-1, 1]
    ref = np.clip(np.rint((x.double().numpy() + 1) * 127.5), 0, 255).astype(np.uint8)
    out = to_uint8(x)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    np.testing.assert_array_equal(out.numpy(), ref)
    # just below / above the midpoint between two levels
    k = torch.arange(255, dtype=torch.float64)
    assert torch.equal(to_uint8((k + 0.45) / 127.5 - 1).long(), k.long())
    assert torch.equal(to_uint8((k + 0.55) / 127.5 - 1).long(), k.long() + 1)


def test_to_uint8_clamps_and_rejects_nan_and_wrong_dtypes():
    x = torch.tensor([-5.0, -1.0001, -float("inf"), 1.0001, 7.0, float("inf")])
    assert to_uint8(x).tolist() == [0, 0, 0, 255, 255, 255]
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="floating-point"):
        to_uint8(LEVELS)
    with pytest.raises(ValueError, match="uint8"):
        from_uint8(torch.zeros(3))


def reference_grid(images_u8, ncols, pad, value=0):
    """Pad every tile on its bottom and right, assemble with np.block, pad the top-left edge."""
    n, c, h, w = images_u8.shape
    tiles = [np.pad(im, ((0, 0), (0, pad), (0, pad)), constant_values=value) for im in images_u8]
    rows = -(-n // ncols)
    blank = np.full((c, h + pad, w + pad), value, np.uint8)
    tiles += [blank] * (rows * ncols - n)
    grid = np.block([[tiles[r * ncols + q] for q in range(ncols)] for r in range(rows)])
    return np.pad(grid, ((0, 0), (pad, 0), (pad, 0)), constant_values=value)


@pytest.mark.parametrize(("n", "nrow", "ncols"), [(5, 3, 3), (5, None, 3), (1, None, 1), (4, 8, 4)])
def test_make_grid_layout_matches_block_reference(n, nrow, ncols):
    x = random_images(n, 3, 5, 7, seed=n)
    grid = make_grid(x, nrow)
    rows = -(-n // ncols)
    assert grid.dtype == torch.uint8
    assert grid.shape == (3, rows * (5 + 2) + 2, ncols * (7 + 2) + 2)
    np.testing.assert_array_equal(grid.numpy(), reference_grid(to_uint8(x).numpy(), ncols, 2))
    # uint8 input gives the same grid; padding value and width are honoured
    assert torch.equal(make_grid(to_uint8(x), nrow), grid)
    wide = make_grid(x, nrow, padding=3, pad_value=255).numpy()
    np.testing.assert_array_equal(wide, reference_grid(to_uint8(x).numpy(), ncols, 3, 255))


def test_make_grid_matches_torchvision():
    tvu = pytest.importorskip("torchvision.utils")
    u8 = to_uint8(random_images(7, 3, 6, 4, seed=3))
    assert torch.equal(make_grid(u8, 3), tvu.make_grid(u8, nrow=3, padding=2, pad_value=0))


def test_make_grid_rejects_bad_input():
    with pytest.raises(ValueError, match="channels"):
        make_grid(torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        make_grid(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="nrow"):
        make_grid(torch.zeros(2, 3, 4, 4), nrow=0)


@pytest.mark.parametrize(("channels", "mode"), [(1, "L"), (3, "RGB")])
def test_save_grid_reads_back_equal_and_leaves_no_temp_files(tmp_path, channels, mode):
    x = random_images(6, channels, 9, 5, seed=channels)
    path = save_grid(x, tmp_path / "sub" / "grid.png", nrow=4)
    assert path == tmp_path / "sub" / "grid.png"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == mode
        back = np.asarray(img)
    expected = make_grid(x, 4).permute(1, 2, 0).numpy()  # (H', W', C)
    np.testing.assert_array_equal(back, expected[:, :, 0] if channels == 1 else expected)
    save_grid(-x, path, nrow=4)  # overwriting replaces the file
    assert os.listdir(tmp_path / "sub") == ["grid.png"]
    with pytest.raises(ValueError, match=r"\.png"):
        save_grid(x, tmp_path / "grid.jpg")


def test_save_folder_names_sort_in_index_order(tmp_path):
    x = random_images(5, 3, 4, 4, seed=7)
    paths = save_folder(x, tmp_path / "samples", start_index=998)
    assert [p.name for p in paths] == [f"{i:06d}.png" for i in range(998, 1003)]
    paths += save_folder(x[:2], tmp_path / "samples", start_index=1003)
    listing = sorted(os.listdir(tmp_path / "samples"))
    assert listing == [p.name for p in paths]  # no temporary files left either
    for k, p in enumerate(paths[:5]):
        np.testing.assert_array_equal(np.asarray(Image.open(p)), to_uint8(x[k]).permute(1, 2, 0))
    gray = save_folder(to_uint8(x[:, :1]), tmp_path / "gray", prefix="s_")
    assert gray[1].name == "s_000001.png" and Image.open(gray[1]).mode == "L"
    with pytest.raises(ValueError, match="digits"):
        save_folder(x, tmp_path / "big", start_index=999_998)
    with pytest.raises(ValueError, match="start_index"):
        save_folder(x, tmp_path / "neg", start_index=-1)


def noise_png(path, size=(64, 48)):
    rng = np.random.default_rng(0)  # noise does not compress: truncation cuts into pixel data
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def test_load_image_converts_modes(tmp_path):
    rgba = np.random.default_rng(1).integers(0, 256, (6, 5, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), rgba[:, :, :3])  # alpha dropped
    gray = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)  # 16-bit PNG
    Image.fromarray(gray).save(tmp_path / "g16.png")
    back = np.asarray(load_image(tmp_path / "g16.png", mode="L"))
    np.testing.assert_array_equal(back, np.arange(256).reshape(16, 16))  # scaled, not clipped


def test_load_image_raises_naming_truncated_and_fake_files(tmp_path):
    noise_png(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.png").write_text("this is not an image\n")
    assert load_image(tmp_path / "whole.png").size == (48, 64)
    for name in ("cut.png", "notes.png", "missing.png"):
        path = tmp_path / name
        with pytest.raises(ValueError, match="cannot read image") as info:
            load_image(path)
        assert str(path) in str(info.value)
