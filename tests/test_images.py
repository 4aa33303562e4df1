"""Image input: every PIL mode converts to the right RGB, and unusable files fail clearly."""

import numpy as np
import pytest
import torch
from PIL import Image

import blip2rt
from blip2rt.images import CLIP_MEAN, CLIP_STD, pixel_values, to_rgb


def rgb_array(img):
    return np.asarray(to_rgb(img))


def test_grayscale_becomes_equal_channels():
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = rgb_array(Image.fromarray(gray, "L"))
    assert out.shape == (16, 16, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_16bit_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16).repeat(8, 0).repeat(2, 1)  # (8, 8)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    out = rgb_array(img)[0, ::2, 0]
    np.testing.assert_array_equal(out, [0, 1, 128, 255])  # v / 65535 * 255, rounded


def test_16bit_png_roundtrip(tmp_path):
    values = (np.linspace(0, 65535, 64).astype(np.uint16)).reshape(8, 8)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    out = rgb_array(Image.open(path))[..., 0]
    np.testing.assert_array_equal(out, np.rint(values / 65535 * 255).astype(np.uint8))


def test_rgba_opaque_equals_rgb_and_transparent_is_white():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
    alpha = np.full((10, 10, 1), 255, dtype=np.uint8)
    alpha[:5] = 0  # top half fully transparent
    alpha[5, :] = 128  # one row half transparent
    out = rgb_array(Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA")).astype(int)
    np.testing.assert_array_equal(out[6:], rgb[6:])
    np.testing.assert_array_equal(out[:5], 255)
    # alpha 128 over white: c * a + 255 * (1 - a)
    expected = rgb[5].astype(float) * 128 / 255 + 255 * (1 - 128 / 255)
    assert np.abs(out[5] - expected).max() <= 1


def test_palette_image_keeps_its_colours():
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[:4] = (200, 30, 60)
    rgb[4:] = (10, 220, 90)
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    assert pal.mode == "P"
    np.testing.assert_array_equal(rgb_array(pal), rgb)


def test_palette_with_transparency_composites_on_white():
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 255] + [255, 0, 0] * 255)
    pal.info["transparency"] = 0
    np.testing.assert_array_equal(rgb_array(pal), 255)


def test_pixel_values_normalise_with_clip_statistics():
    img = Image.new("RGB", (20, 30), (255, 0, 128))
    px = pixel_values([img], 14)
    assert px.shape == (1, 3, 14, 14) and px.dtype == torch.float32
    want = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), CLIP_MEAN, CLIP_STD)]
    torch.testing.assert_close(px[0, :, 7, 7], torch.tensor(want), atol=1e-6, rtol=0)


def test_one_pixel_image_is_refused():
    with pytest.raises(blip2rt.ImageError, match=r"1x1 pixels"):
        pixel_values([Image.new("RGB", (1, 1))], 28)


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(blip2rt.ImageError, match=r"cut\.jpg is corrupt or truncated"):
        pixel_values([path], 28)


def test_non_image_and_missing_files_are_refused(tmp_path):
    bogus = tmp_path / "notes.jpg"
    bogus.write_text("not an image")
    with pytest.raises(blip2rt.ImageError, match="not an image format"):
        pixel_values([bogus], 28)
    with pytest.raises(blip2rt.ImageError, match="does not exist"):
        pixel_values([tmp_path / "absent.png"], 28)


def test_model_accepts_mixed_modes_in_one_batch(tmp_path):
    m = blip2rt.from_pretrained("tiny", device="cpu")
    imgs = [Image.new("L", (30, 40), 128), Image.new("RGBA", (64, 64), (0, 255, 0, 255)),
            Image.fromarray(np.full((20, 20), 40000, np.uint16))]
    out = m.itc(imgs, ["a green square"])
    assert out.shape == (3, 1) and torch.isfinite(out).all()


def test_normalisation_follows_the_encoder():
    from blip2rt.config import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, Blip2Config
    from blip2rt.presets import preset_config

    img = Image.new("RGB", (20, 20), (51, 102, 204))
    rgb = np.array([51, 102, 204]) / 255.0
    for mean, std in [(CLIP_MEAN, CLIP_STD), (IMAGENET_MEAN, IMAGENET_STD)]:
        px = pixel_values([img], 14, mean, std)
        np.testing.assert_allclose(px[0, :, 7, 7].numpy(), (rgb - np.array(mean)) / np.array(std), rtol=1e-5)
    vc = preset_config("blip2-mini").vision_config  # DINOv2 was trained with ImageNet's
    assert (vc.image_mean, vc.image_std) == (IMAGENET_MEAN, IMAGENET_STD)
    again = Blip2Config.from_hf_dict(preset_config("blip2-mini").to_hf_dict()).vision_config
    assert (again.image_mean, again.image_std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert preset_config("tiny").vision_config.image_mean == CLIP_MEAN
