"""images.prepare: pass-through, resizing, orientation, colour modes, and each image skip reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from data_prep.images import ImageOptions, prepare
from data_prep.records import Skip
from data_prep_helpers import bomb_png, encode, photo

OPTS = ImageOptions(max_side=128, min_side=16, image_format="keep", quality=90, check="decode")


def opts(**changes) -> ImageOptions:
    return ImageOptions(**{**OPTS.__dict__, **changes})


def decoded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@pytest.mark.parametrize("check", ["decode", "structure"])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_unchanged_images_keep_their_bytes(fmt, check):
    data = encode(photo(96, 64), fmt)
    out = prepare(data, opts(check=check))
    assert out.data is data
    assert (out.ext, out.width, out.height) == (
        {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt],
        96,
        64,
    )


def test_large_jpeg_is_downscaled_keeping_aspect():
    out = prepare(encode(photo(300, 200)), opts(max_side=96))
    assert (out.ext, out.width, out.height) == ("jpg", 96, 64)
    assert decoded(out.data).size == (96, 64)


def test_max_side_zero_never_resizes():
    data = encode(photo(300, 200))
    assert prepare(data, opts(max_side=0)).data is data


@pytest.mark.parametrize("fmt,ext", [("jpg", "jpg"), ("webp", "webp")])
def test_image_format_converts(fmt, ext):
    out = prepare(encode(photo(64, 64), "PNG"), opts(image_format=fmt))
    assert out.ext == ext and decoded(out.data).format == {"jpg": "JPEG", "webp": "WEBP"}[fmt]


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (80, 40), (255, 0, 0))
    img.paste((0, 0, 255), (40, 0, 80, 40))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90 degrees clockwise
    out = prepare(encode(img, exif=exif.tobytes()), OPTS)
    shown = decoded(out.data)
    assert shown.size == (40, 80) and (out.width, out.height) == (40, 80)
    top, bottom = shown.getpixel((20, 10)), shown.getpixel((20, 70))
    assert top[0] > 200 and top[2] < 60  # red on top after rotating clockwise
    assert bottom[2] > 200 and bottom[0] < 60


def test_exif_orientation_with_downscale_swaps_target():
    exif = Image.Exif()
    exif[0x0112] = 8
    out = prepare(encode(photo(300, 150), exif=exif.tobytes()), opts(max_side=100))
    assert (out.width, out.height) == (50, 100) == decoded(out.data).size


def test_cmyk_jpeg_becomes_rgb():
    out = prepare(encode(photo(64, 64).convert("CMYK")), OPTS)
    assert decoded(out.data).mode == "RGB" and out.ext == "jpg"


def test_greyscale_becomes_rgb():
    img = decoded(prepare(encode(photo(64, 64).convert("L")), OPTS).data)
    assert img.mode == "RGB"


def test_palette_with_transparency_flattened_on_white():
    img = Image.new("P", (64, 64), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (32, 0, 64, 64))
    out = decoded(prepare(encode(img, "PNG", transparency=0), OPTS).data)
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == (255, 255, 255) and out.getpixel((50, 5)) == (255, 0, 0)


def test_alpha_flattened_on_white():
    img = Image.new("RGBA", (64, 64), (0, 0, 255, 0))
    img.paste((0, 0, 255, 255), (0, 0, 32, 64))
    out = decoded(prepare(encode(img, "PNG"), OPTS).data)
    assert out.getpixel((50, 5)) == (255, 255, 255) and out.getpixel((5, 5)) == (0, 0, 255)


def test_sixteen_bit_is_scaled_not_clipped():
    img = Image.fromarray(np.full((64, 64), 32768, dtype=np.uint16))
    assert img.mode.startswith("I;16")
    out = decoded(prepare(encode(img, "PNG"), OPTS).data)
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (128, 128, 128)


def test_first_frame_of_animation():
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    out = prepare(data, OPTS)
    img = decoded(out.data)
    assert (
        out.ext == "png"
        and getattr(img, "n_frames", 1) == 1
        and img.getpixel((5, 5)) == (255, 0, 0)
    )


def _skip_reason(data: bytes, **changes) -> str:
    with pytest.raises(Skip) as info:
        prepare(data, opts(**changes))
    return info.value.reason


def test_zero_bytes():
    assert _skip_reason(b"") == "empty_image"


def test_text_named_jpg():
    assert _skip_reason(b"this is a caption, not a picture\n") == "not_an_image"


@pytest.mark.parametrize("check", ["decode", "structure"])
def test_truncated_jpeg(check):
    data = encode(photo(96, 64))
    assert _skip_reason(data[: len(data) * 2 // 3], check=check) == "truncated_image"


@pytest.mark.parametrize("check", ["decode", "structure"])
def test_truncated_png(check):
    data = encode(photo(96, 64), "PNG")
    assert _skip_reason(data[: len(data) - 100], check=check) == "truncated_image"


def test_decompression_bomb():
    assert _skip_reason(bomb_png()) == "decompression_bomb"


def test_below_min_side():
    assert _skip_reason(encode(photo(200, 12)), min_side=16) == "too_small"


def test_truncated_jpeg_with_an_embedded_thumbnail_is_caught_by_structure_check():
    data = encode(
        photo(96, 64), comment=encode(photo(32, 32))
    )  # the thumbnail brings an early end marker
    assert prepare(data, opts(check="structure")).data is data
    assert _skip_reason(data[: len(data) * 3 // 4], check="structure") == "truncated_image"
