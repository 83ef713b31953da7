"""Image decoding and resizing shared by conversion, training and serving.

``decode_image`` is the strict gate every data-set file passes (at validation and again at
conversion). It turns whatever the user stored into one canonical form, an RGB uint8 array
[height, width, 3], by these rules:

* Only JPEG (``.jpg``/``.jpeg``) and PNG (``.png``) files are accepted, extension case-insensitive,
  and the bytes must really be of that format: a PNG, GIF, BMP or WebP named ``.jpg`` is rejected.
* Zero-byte, truncated or corrupt files, animated images (APNG) and images with more than
  ``max_pixels`` pixels are rejected. The pixel limit is checked from the header, before any
  pixel is decoded, so a decompression bomb costs nothing. Pillow's own process-wide guard
  (``PIL.Image.MAX_IMAGE_PIXELS``) is deliberately left as it is: changing it would be a race
  between threads and would affect every other user of Pillow in the process. It stays as a
  second line of defence (Pillow warns above its limit and refuses images above twice it), so a
  ``max_pixels`` above 2 x 89,478,485 only takes effect if the process raises Pillow's limit too.
* Multi-picture JPEGs (MPO, from phone cameras) are JPEGs: their first picture, the photo, is used,
  as TensorFlow's ``decode_jpeg`` does.
* EXIF orientation 2-8 is applied (TensorFlow's decoders ignore it), so width and height are those
  of the picture as a person sees it.
* Grayscale, bilevel and palette images are expanded to RGB. Transparent images (RGBA, LA, PA and
  palette or grayscale/RGB images with a ``tRNS`` transparency key) are composited onto an opaque
  WHITE background: the pixels a viewer shows for a transparent image, rather than whatever colour
  happens to be stored under alpha = 0. Serving must apply the same rule.
* CMYK and YCCK JPEGs are converted to RGB with Pillow's conversion (Adobe-inverted CMYK handled by
  the JPEG plugin).
* Embedded ICC colour profiles are ignored (values are taken as sRGB), as TensorFlow's decoders do.
* 16-bit PNGs are reduced to 8 bits by keeping the high byte (v >> 8). That maps 0 -> 0 and
  65535 -> 255, is within one level of exact rounding, and is exactly what TensorFlow's
  ``decode_png`` and Pillow's 16-bit RGB(A) readers do, so a 16-bit picture gives the same pixels
  at conversion and at serving. (Pillow's own ``convert("L")`` would clip every value above 255.)

Anything refused raises ``ImageRejected`` with a short ``reason`` and a machine-readable ``code``.
"""

from __future__ import annotations

import dataclasses
import io
import posixpath

import numpy as np
import tensorflow as tf
from PIL import Image, ImageOps, UnidentifiedImageError

from trainer.errors import DataError

# TensorFlow's names for the resize methods the reference algorithm offers.
RESIZE_METHODS = (
    "bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5", "gaussian", "mitchellcubic",
)

# Extension (lower case) -> the only format Pillow may detect for such a file.
SUPPORTED_EXTENSIONS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}

# The default pixel limit: Pillow's own default, about 9,459 x 9,459 pixels (a 256 MiB RGBA image).
DEFAULT_MAX_PIXELS = 89_478_485

# White, the background transparent pixels are composited onto.
_BACKGROUND = (255, 255, 255, 255)


class ImageRejected(DataError):
    """A file cannot be used as a training image; ``reason`` says why in a few words.

    ``code`` is a stable keyword for grouping (e.g. ``truncated``, ``format_mismatch``); ``str()`` of
    the exception names the file when the name is known.
    """

    def __init__(self, reason: str, code: str = "invalid", name: str | None = None):
        self.reason = reason
        self.code = code
        self.name = name
        super().__init__(f"{name}: {reason}" if name else reason)


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What decoding learnt about a file besides its pixels."""

    format: str  # "JPEG" or "PNG", as detected from the content
    mode: str  # Pillow's colour mode as stored, e.g. "RGB", "L", "P", "RGBA", "CMYK", "I;16"
    width: int  # after EXIF orientation
    height: int
    exif_orientation: int  # 1 (or absent) means none was applied


def expected_format(name: str) -> str:
    """Return the format ("JPEG"/"PNG") a file of this name must contain, or raise ImageRejected."""
    ext = posixpath.splitext(name)[1].lower()
    if ext not in SUPPORTED_EXTENSIONS:
        shown = f"extension {ext!r}" if ext else "no extension"
        raise ImageRejected(
            f"unsupported file type ({shown}); only .jpg, .jpeg and .png are used: convert it or remove it",
            "unsupported_extension", name)
    return SUPPORTED_EXTENSIONS[ext]


def decode_image(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode JPEG/PNG bytes to an RGB uint8 array [H, W, 3] by the rules in the module docstring.

    Args:
      data: the file's bytes.
      name: the file's name or relative path; its extension decides the format the bytes must have,
        and it appears in error messages.
      max_pixels: largest accepted width * height.

    Raises:
      ImageRejected: the file cannot be used; ``reason`` says why.
    """
    return decode_image_with_info(data, name, max_pixels)[0]


def decode_image_with_info(data: bytes, name: str,
                           max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, ImageInfo]:
    """Like ``decode_image``, and also return what was learnt about the file (format, mode, size)."""
    expected = expected_format(name)
    if not data:
        raise ImageRejected("empty file (0 bytes): re-copy it from its source or remove it", "empty", name)
    try:
        image = _open(data, expected, name, max_pixels)
        # Pillow reads only the header in open(); the pixels are decoded (and truncation noticed) here.
        image.load()
        mode = image.mode
        orientation = _exif_orientation(image, name)
        if orientation not in (0, 1):
            image = ImageOps.exif_transpose(image)
        array = _to_rgb(image)
    except ImageRejected:
        raise
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure inside Pillow means the file is unusable.
        raise _decode_failure(e, expected, name) from e
    height, width = array.shape[:2]
    return array, ImageInfo(expected, mode, width, height, orientation or 1)


def _open(data: bytes, expected: str, name: str, max_pixels: int) -> Image.Image:
    """Open (header only) and check format, animation and size before any pixel is decoded."""
    try:
        # No `formats=` restriction: letting Pillow identify any format gives a precise message
        # ("GIF content") instead of a vague "cannot identify".
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageRejected(f"too many pixels, possible decompression bomb ({e}); shrink the image",
                            "too_large", name) from e
    except UnidentifiedImageError as e:
        raise ImageRejected(
            f"not a readable {expected} image (content not recognised, or the file is corrupt or truncated);"
            " re-export it as a real .jpg or .png", "unreadable", name) from e
    actual = image.format or "unknown"
    if actual == "MPO":
        # Multi-picture JPEGs (phone cameras' depth or stereo shots) are JPEG files whose first
        # picture is the photo; TensorFlow's decode_jpeg also reads just that one.
        actual = "JPEG"
    if actual != expected:
        raise ImageRejected(
            f"content is {actual} but the extension says {expected}; re-save it as a real "
            f"{'.png' if expected == 'PNG' else '.jpg'} or fix the extension", "format_mismatch", name)
    if image.format != "MPO" and getattr(image, "n_frames", 1) > 1:
        raise ImageRejected(
            f"animated image ({image.n_frames} frames); save the frame you want as a still image",
            "animated", name)
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageRejected(f"image has no pixels ({width}x{height})", "unreadable", name)
    if width * height > max_pixels:
        raise ImageRejected(
            f"{width}x{height} = {width * height:,} pixels is above the limit of {max_pixels:,}"
            " (max_pixels); shrink the image or raise max_pixels", "too_large", name)
    if expected == "PNG":
        # PNG's load() stops once the image data is complete, so a file cut off in its last chunks
        # or with a corrupt chunk loads silently. verify() walks every chunk checking CRCs up to
        # IEND without decompressing; it consumes the image object, hence the second open.
        image.verify()
        image = Image.open(io.BytesIO(data))
    return image


def _exif_orientation(image: Image.Image, name: str) -> int:
    """The EXIF orientation tag (1-8), or 0 when the image has none."""
    try:
        orientation = int(image.getexif().get(0x0112, 0) or 0)
    except Exception as e:  # noqa: BLE001 - a broken EXIF block leaves the orientation unknown.
        raise ImageRejected(f"unreadable EXIF metadata ({e}); re-save the image without EXIF or fix it",
                            "corrupt", name) from e
    if orientation not in range(9):
        raise ImageRejected(f"invalid EXIF orientation {orientation} (valid: 1-8); fix or strip the tag",
                            "corrupt", name)
    return orientation


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Convert any decoded mode to a C-contiguous RGB uint8 array."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit grayscale: keep the high byte (see the module docstring for why).
        gray = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode == "I":
        # 32-bit integer images hold 16-bit data when they come from PNG; treat them the same way.
        gray = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND)
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def _decode_failure(error: Exception, expected: str, name: str) -> ImageRejected:
    """Map a Pillow exception to a short, actionable rejection."""
    text = str(error) or type(error).__name__
    lowered = text.lower()
    if isinstance(error, Image.DecompressionBombError):
        return ImageRejected(f"too many pixels, possible decompression bomb ({text}); shrink the image",
                             "too_large", name)
    if "truncat" in lowered or "incomplete" in lowered or isinstance(error, EOFError):
        return ImageRejected(
            f"truncated {expected} file ({text}); the copy is incomplete: re-copy it from its source",
            "truncated", name)
    return ImageRejected(
        f"corrupt {expected} file ({text}); re-export it from its source or remove it", "corrupt", name)


def resize_image(image: tf.Tensor, image_size: int, interpolation: str) -> tf.Tensor:
    """Resize an RGB uint8 image [H, W, 3] to [image_size, image_size, 3] uint8.

    The single resize used at conversion time and inside the serving signature, so that a
    picture reaches the network with the same pixels in training and in production.
    Antialiasing is on: most inputs are larger than the model's input and are shrunk.
    """
    if interpolation not in RESIZE_METHODS:
        raise ValueError(f"unknown image_resize_interpolation {interpolation!r};"
                         f" use one of {', '.join(RESIZE_METHODS)}")
    resized = tf.image.resize(
        tf.cast(image, tf.float32), (image_size, image_size), method=interpolation,
        antialias=interpolation != "nearest",
    )
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)
