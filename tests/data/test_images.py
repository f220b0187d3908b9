"""Every pixel mode Pillow opens decodes to its faithful 8-bit RGB rendering, or is refused with a
reason: the one decoder is shared by validate, features and the served model."""

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import UNSUPPORTED, ImageError, check_image, load_rgb

SIZE = 16


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def grey(values: np.ndarray) -> np.ndarray:
    """An (S, S) 8-bit rendering as the (S, S, 3) RGB array load_rgb returns."""
    return np.repeat(values.astype(np.uint8)[:, :, None], 3, axis=2)


RAMP16 = np.linspace(0, 65535, SIZE * SIZE).reshape(SIZE, SIZE).astype(np.uint16)
EXPECTED16 = grey(np.rint(RAMP16 / 257))  # 16 bits -> 8: x 255 / 65535


def test_a_16_bit_greyscale_png_is_its_8_bit_rendering_not_white():
    data = encoded(Image.fromarray(RAMP16), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    got = load_rgb(data, SIZE, None)
    np.testing.assert_array_equal(got, EXPECTED16)
    assert got.min() == 0 and got.max() == 255 and got.mean() == pytest.approx(127.5, abs=1)


def test_32_bit_integers_within_16_bits_read_as_16_bit_and_others_are_refused():
    tiff = encoded(Image.fromarray(RAMP16.astype(np.int32)), "TIFF")
    assert Image.open(io.BytesIO(tiff)).mode == "I"
    np.testing.assert_array_equal(load_rgb(tiff, SIZE, None), EXPECTED16)
    too_wide = encoded(Image.fromarray(RAMP16.astype(np.int32) * 1000), "TIFF")
    with pytest.raises(ImageError, match="32-bit integer pixels") as err:
        load_rgb(too_wide, SIZE, None)
    assert err.value.category == UNSUPPORTED


def test_floats_from_0_to_1_are_scaled_and_others_refused():
    ramp = np.linspace(0, 1, SIZE * SIZE).reshape(SIZE, SIZE).astype(np.float32)
    tiff = encoded(Image.fromarray(ramp), "TIFF")
    assert Image.open(io.BytesIO(tiff)).mode == "F"
    np.testing.assert_array_equal(load_rgb(tiff, SIZE, None), grey(np.rint(ramp * 255)))
    with pytest.raises(ImageError, match="floating-point pixels outside 0..1"):
        load_rgb(encoded(Image.fromarray(ramp * 300), "TIFF"), SIZE, None)


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_transparency_is_laid_over_white(mode):
    alpha = np.linspace(0, 255, SIZE * SIZE).reshape(SIZE, SIZE).astype(np.uint8)
    value = np.full((SIZE, SIZE), 40, np.uint8)
    bands = [value, alpha] if mode == "LA" else [value, value, value, alpha]
    img = Image.merge(mode, [Image.fromarray(b) for b in bands])
    a = alpha / 255.0
    expected = np.rint(40 * a + 255 * (1 - a))  # over a white page
    got = load_rgb(encoded(img, "PNG"), SIZE, None)
    np.testing.assert_allclose(got, grey(expected), atol=1)
    assert got[0, 0].tolist() == [255, 255, 255]  # fully transparent: the page, not the hidden grey


def test_a_palette_image_with_a_transparent_colour_shows_white_there():
    img = Image.new("P", (SIZE, SIZE), 0)
    img.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    img.paste(1, (0, 0, SIZE, SIZE // 2))
    img.info["transparency"] = 0
    got = load_rgb(encoded(img, "PNG"), SIZE, None)
    assert got[0, 0].tolist() == [200, 0, 0] and got[-1, -1].tolist() == [255, 255, 255]


def test_cmyk_and_one_bit_images_are_rendered_as_pillow_renders_them():
    cmyk = Image.new("CMYK", (SIZE, SIZE), (0, 255, 255, 0))  # red ink
    assert load_rgb(encoded(cmyk, "JPEG"), SIZE, None)[SIZE // 2, SIZE // 2].tolist() == pytest.approx(
        [255, 0, 0], abs=3)
    one = Image.new("1", (SIZE, SIZE), 0)
    one.paste(1, (0, 0, SIZE // 2, SIZE))
    got = load_rgb(encoded(one, "PNG"), SIZE, None)
    assert got[0, 0].tolist() == [255, 255, 255] and got[0, -1].tolist() == [0, 0, 0]


def test_validation_refuses_what_features_could_not_render(tmp_path):
    path = tmp_path / "wide.tif"
    path.write_bytes(encoded(Image.fromarray(RAMP16.astype(np.int32) * 1000), "TIFF"))
    category, detail = check_image(path, None)
    assert category == UNSUPPORTED and "32-bit" in detail
    ok = tmp_path / "deep.png"
    ok.write_bytes(encoded(Image.fromarray(RAMP16), "PNG"))
    assert check_image(ok, None) == ("ok", "")
