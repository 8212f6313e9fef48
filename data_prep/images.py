"""Check one image and bring it to the stored form: RGB, upright, at most ``max_side`` pixels.

Bytes pass through untouched when nothing has to change and the format is allowed; otherwise the
image is decoded (JPEG at the smallest DCT scale that still covers the target size, which is
most of the speed-up over a plain open + resize) and re-encoded.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from data_prep.records import Skip

IMAGE_FORMATS = ("keep", "jpg", "webp")
CHECKS = ("decode", "structure")

_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # formats that may pass through
_SAVE_AS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


@dataclass(frozen=True)
class ImageOptions:
    max_side: int  # 0: no limit
    min_side: int
    image_format: str  # one of IMAGE_FORMATS
    quality: int
    check: str  # one of CHECKS


@dataclass(frozen=True)
class PreparedImage:
    data: bytes
    ext: str  # one of schema.IMAGE_EXTENSIONS
    width: int
    height: int


def prepare(data: bytes, opts: ImageOptions) -> PreparedImage:
    """Check and normalise one encoded image; raises :class:`Skip` with the reason it is unusable."""
    if not data:
        raise Skip("empty_image", "the file has zero bytes")
    img = _open(data)
    try:
        return _prepare(img, data, opts)
    except Skip:
        raise
    except Exception as e:  # Pillow signals corrupt data with many exception types
        raise _decode_error(e) from None


def _open(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise Skip("decompression_bomb", str(e)) from None
        except UnidentifiedImageError:
            head = data[:16].decode("ascii", "replace").encode("unicode_escape").decode()
            raise Skip(
                "not_an_image", f"not a recognised image format (starts with {head!r})"
            ) from None
        except Exception as e:
            raise _decode_error(e) from None


def _prepare(img: Image.Image, data: bytes, opts: ImageOptions) -> PreparedImage:
    width, height = img.size
    if min(width, height) < opts.min_side:
        raise Skip("too_small", f"{width}x{height} px; --min-side is {opts.min_side}")
    orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    animated = getattr(img, "n_frames", 1) > 1
    source_ext = _EXT.get(img.format or "")
    ext = opts.image_format if opts.image_format != "keep" else source_ext or "png"
    target = _target_size(width, height, opts.max_side)
    if (
        source_ext == ext
        and target == (width, height)
        and orientation == 1
        and not animated
        and _plain_rgb(img)
    ):
        if opts.check == "decode":
            img.draft(None, (1, 1))  # JPEG: still reads every coefficient, skips the IDCT work
            img.load()
        else:
            _check_structure(img, data)
        return PreparedImage(data, ext, width, height)

    keep_icc = img.mode == "RGB"
    img.draft(None, target)  # only JPEG acts on it
    img.load()
    icc = img.info.get("icc_profile") if keep_icc else None
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
        if orientation in _SWAPS_SIDES:
            target = target[::-1]
    img = _to_rgb(img)
    if img.size != target:
        img = img.resize(target, Image.Resampling.LANCZOS)
    return PreparedImage(_encode(img, ext, opts.quality, icc), ext, *img.size)


def _target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    longest = max(width, height)
    if not max_side or longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def _plain_rgb(img: Image.Image) -> bool:
    """8-bit RGB without transparency (a 16-bit RGB PNG also opens as mode RGB)."""
    if img.mode != "RGB" or "transparency" in img.info:
        return False
    return img.format != "PNG" or all(tile.args == "RGB" for tile in img.tile)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _SIXTEEN_BIT or img.mode == "I":
        values = np.asarray(img).astype(np.int64)
        if img.mode in _SIXTEEN_BIT or values.max() > 255:
            values = values >> 8
        img = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8))
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return img if img.mode == "RGB" else img.convert("RGB")


def _check_structure(img: Image.Image, data: bytes) -> None:
    """Cheap integrity checks for pass-through without decoding (``--check structure``)."""
    if img.format in ("JPEG", "MPO"):
        end = data.rfind(b"\xff\xd9")  # a scan cannot contain this marker, so a truncated file has
        if end < 0 or data.find(b"\xff\xda", end) >= 0:  # none after its last start-of-scan
            raise Skip("truncated_image", "JPEG data ends before its end-of-image marker")
    elif img.format == "PNG":
        with Image.open(io.BytesIO(data)) as fresh:  # verify() must come straight after open()
            fresh.verify()  # walks every chunk and checks its CRC, without inflating
    elif img.format == "WEBP" and int.from_bytes(data[4:8], "little") + 8 > len(data):
        raise Skip("truncated_image", "WebP data is shorter than its RIFF header says")


def _encode(img: Image.Image, ext: str, quality: int, icc: bytes | None) -> bytes:
    img.info = {}  # never carry EXIF (the orientation is applied) or a profile of another mode
    buf = io.BytesIO()
    options: dict[str, object] = {"icc_profile": icc} if icc else {}
    if ext != "png":
        options["quality"] = quality
    img.save(buf, _SAVE_AS[ext], **options)
    return buf.getvalue()


def _decode_error(e: Exception) -> Skip:
    message = f"{type(e).__name__}: {e}"
    if "truncated" in str(e).lower():
        return Skip("truncated_image", message)
    return Skip("corrupt_image", message)
