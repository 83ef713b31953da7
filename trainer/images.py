"""Image decoding and resizing shared by validation, training, evaluation, prediction and serving.

``decode_image`` (Pillow) is the strict gate every data-set file passes at validation. It turns
whatever the user stored into one canonical form,
an RGB uint8 array [height, width, 3], by these rules:

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
  happens to be stored under alpha = 0. ``decode_tensor`` applies the same rule.
* CMYK and YCCK JPEGs are converted to RGB with Pillow's conversion (Adobe-inverted CMYK handled by
  the JPEG plugin).
* Embedded ICC colour profiles are ignored (values are taken as sRGB), as TensorFlow's decoders do.
* 16-bit PNGs are reduced to 8 bits by keeping the high byte (v >> 8). That maps 0 -> 0 and
  65535 -> 255, is within one level of exact rounding, and is exactly what TensorFlow's
  ``decode_png`` and Pillow's 16-bit RGB(A) readers do, so a 16-bit picture gives the same pixels
  to both decoders. (Pillow's own ``convert("L")`` would clip every value above 255.)

Anything refused raises ``ImageRejected`` with a short ``reason`` and a machine-readable ``code``.

``decode_tensor`` is the one TensorFlow decoder, used inside tf.data by training and evaluation and
inside the SavedModel's serving signature. It applies the same rules in TensorFlow ops and gives
pixel for pixel the array ``decode_image`` gives (JPEG with libjpeg's accurate integer IDCT, as
Pillow's libjpeg uses; transparency composited with Pillow's integer arithmetic; EXIF orientation
parsed from the bytes). The two decoders are separate code. Validation (``check_image``) decodes
every file with Pillow, and also with TensorFlow, rejecting it when the two disagree
(``check_tensorflow_decode``), wherever they can disagree (``second_decoder_reason``): everywhere but
plain 8-bit JPEGs and PNGs, which both decode with the same libjpeg-turbo and zlib code (the evidence
is in the comment above ``second_decoder_reason``). What training and serving see is then exactly what
validation checked. The one disagreement known is a 16-bit PNG with a ``tRNS`` transparency key, which
Pillow reads without its transparency; and TensorFlow's libpng refuses PNGs more than 1,000,000 pixels
wide or high. Validation rejects both.

TensorFlow is imported on first use (``LazyModule``), so that validating plain files and converting
do not pay its import.

``resize_image`` is the one resize, used by training, evaluation, batch prediction and serving.

``model_input`` is the one preparation of a picture for the network (``decode_tensor``, then
``resize_image``), in TensorFlow ops: the training input pipeline, evaluation and the SavedModel's
serving signature run it in their graphs, and ``model_input_array`` runs it for ``predict``, batch
prediction, the host side of a TFLite app and a model server, after Pillow's header checks. A JPEG at
least twice the model's input in both sides is decoded scaled down in the DCT domain (1/2, 1/4 or 1/8:
``jpeg_scale``, the one rule), so big photos cost a fraction of a full decode and every path sees the
same pixels.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import os
import posixpath
import re
import struct
import sys
import threading
from types import ModuleType

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from trainer.errors import DataError


class LazyModule:
    """A module imported on first attribute access.

    TensorFlow takes about 5 s of CPU to import on the development machine, more than validating and
    converting 2,000 photos takes. Validation needs it only for the few files whose TensorFlow decode
    must be compared with Pillow's (``second_decoder_reason``), and conversion not at all, so both steps
    import it only when it is used. ``tf.x`` in this module (and ``trainer.data.reader``) then works as usual.
    """

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        module: ModuleType = importlib.import_module(self._name)  # sys.modules caches it
        return getattr(module, attr)


tf = LazyModule("tensorflow")

# TensorFlow's names for the resize methods the reference algorithm offers.
RESIZE_METHODS = (
    "bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5", "gaussian", "mitchellcubic",
)
# Methods whose every output pixel is a weighted mean of input pixels with non-negative weights, so
# it never leaves the input's range ("nearest" copies pixels).
_WITHIN_RANGE_METHODS = ("bilinear", "area", "gaussian")

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
    array, info, _ = _decode(data, name, max_pixels, pixels=True)
    return array, info


def check_image(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[ImageInfo, str | None]:
    """Validation's check of one file: every rule of ``decode_image``, and TensorFlow's agreement where needed.

    The file is decoded once, with Pillow, applying every check ``decode_image`` applies (so it is refused
    exactly when and as ``decode_image`` refuses it), but without building the RGB array. Then, only when
    ``second_decoder_reason`` names a reason, it is also decoded with ``decode_tensor`` and the two arrays
    compared (``check_tensorflow_decode``), as validation did for every file before.

    Returns the file's ``ImageInfo`` and the reason it was cross-checked with TensorFlow (None when it
    was not: a plain 8-bit JPEG or PNG, which both decoders decode alike; see ``second_decoder_reason``).

    Raises:
      ImageRejected: the file cannot be used; ``reason`` says why.
    """
    _, info, reason = _decode(data, name, max_pixels, pixels=False)
    if reason is not None:
        pixels, _ = decode_image_with_info(data, name, max_pixels)
        check_tensorflow_decode(data, name, pixels)
    return info, reason


def _decode(data: bytes, name: str, max_pixels: int, *,
            pixels: bool) -> tuple[np.ndarray | None, ImageInfo, str | None]:
    """Decode with Pillow; the RGB array only when ``pixels``, the second-decoder reason only when not."""
    expected = expected_format(name)
    if not data:
        raise ImageRejected("empty file (0 bytes): re-copy it from its source or remove it", "empty", name)
    try:
        image = _open(data, expected, name, max_pixels)
        # Pillow reads only the header in open(); the pixels are decoded (and truncation noticed) here.
        image.load()
        mode, (width, height) = image.mode, image.size
        orientation = _exif_orientation(image, name)
        array, reason = None, None
        if pixels:
            if orientation not in (0, 1):
                image = ImageOps.exif_transpose(image)
            array = _to_rgb(image)
        else:
            reason = second_decoder_reason(image, data, orientation or 1)
    except ImageRejected:
        raise
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure inside Pillow means the file is unusable.
        raise _decode_failure(e, expected, name) from e
    if orientation in (5, 6, 7, 8):
        width, height = height, width  # a quarter turn: the picture as a person sees it
    return array, ImageInfo(expected, mode, width, height, orientation or 1), reason


# --- which files need TensorFlow's decode as well ----------------------------------------------------------
#
# Evidence (measured on this code's Pillow 12 with libjpeg-turbo 3.2 and zlib 1.2, and TensorFlow 2.21):
# both decoders decode JPEG with libjpeg-turbo, with the same accurate integer IDCT and the same "fancy"
# chroma upsampling, and PNG with zlib, which is lossless. 477 JPEGs (1x1 to 501x333 pixels, quality
# 30-100, 4:4:4, 4:2:2 and 4:2:0, grayscale, baseline, optimised and progressive, restart markers) and
# the benchmark's photos decoded to identical pixels in both; a truncated file, or one missing its end
# marker, is refused by both. Where the two can differ is in what each library does around the codec,
# and those files still get both decoders and a pixel comparison: CMYK and YCCK JPEGs (Pillow's colour
# conversion), multi-picture JPEGs, arithmetic, lossless, hierarchical or 12-bit JPEGs and unusual chroma
# subsampling (codec paths the two builds may not share), 16-bit, palette, transparent and interlaced
# PNGs (each library's own conversion rules), images too large for TensorFlow's decoders, and EXIF
# orientation that TensorFlow's parser (``exif_orientation``, mirrored in ``tensorflow_orientation``)
# would read differently from Pillow's.

# Chroma subsampling of plain 3-component JPEGs: (h, v) of the luma component, chroma being 1x1.
_PLAIN_SAMPLING = {(1, 1), (2, 1), (2, 2)}  # 4:4:4, 4:2:2, 4:2:0
# Baseline, extended sequential and progressive Huffman-coded frames (SOF0, SOF1, SOF2).
_PLAIN_FRAMES = {0xC0, 0xC1, 0xC2}
# TensorFlow's JPEG decoder refuses outputs of 2**29 bytes or more, its PNG decoder sides above
# 1,000,000 pixels; anything near those limits is decoded by both.
_PLAIN_MAX_PIXELS = (1 << 29) // 4
_PLAIN_MAX_SIDE = 1_000_000


def second_decoder_reason(image: Image.Image, data: bytes, orientation: int) -> str | None:
    """Why a file Pillow decoded must also be decoded with TensorFlow and compared; None when it need not.

    ``image`` is Pillow's opened image of ``data``, ``orientation`` the EXIF orientation Pillow found
    (1 when none). The reasons and the evidence behind them are in the comment above.
    """
    width, height = image.size
    if width * height > _PLAIN_MAX_PIXELS or max(width, height) >= _PLAIN_MAX_SIDE:
        return "very large image"
    if image.format == "MPO":
        return "multi-picture JPEG"
    if image.format == "JPEG":
        reason = _jpeg_reason(image, data)
    else:
        reason = _png_reason(image, data)
    if reason is None and tensorflow_orientation(data) != orientation:
        reason = "EXIF orientation read differently by TensorFlow"
    return reason


def _jpeg_reason(image: Image.Image, data: bytes) -> str | None:
    if image.mode not in ("RGB", "L"):
        return f"{image.mode} JPEG"
    frame = _jpeg_frame(data)
    if frame is None:
        return "JPEG markers not understood"
    marker, precision, components = frame
    if marker not in _PLAIN_FRAMES:
        return f"JPEG coding SOF{marker - 0xC0}"
    if precision != 8:
        return f"{precision}-bit JPEG"
    if len(components) == 1:
        return None if image.mode == "L" else "JPEG colour space"
    ids = tuple(c[0] for c in components)
    if len(components) != 3 or image.mode != "RGB" or ids == (ord("R"), ord("G"), ord("B")) \
            or image.info.get("adobe_transform") == 0:
        return "JPEG colour space"
    luma, *chroma = [(c[1], c[2]) for c in components]
    if luma not in _PLAIN_SAMPLING or chroma != [(1, 1), (1, 1)]:
        return "JPEG chroma subsampling"
    return None


def _jpeg_frame(data: bytes) -> tuple[int, int, list[tuple[int, int, int]]] | None:
    """(SOF marker, sample precision, [(component id, h, v)]) from the JPEG's markers, or None."""
    position, end = 2, len(data)
    while position + 4 <= end:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0xDA:  # start of scan: no frame header before it
            return None
        length = struct.unpack_from(">H", data, position + 2)[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if position + 10 > end:
                return None
            precision, count = data[position + 4], data[position + 9]
            table = data[position + 10: position + 10 + 3 * count]
            if len(table) < 3 * count:
                return None
            components = [(table[i], table[i + 1] >> 4, table[i + 1] & 0x0F) for i in range(0, len(table), 3)]
            return marker, precision, components
        position += 2 + length
    return None


def _png_reason(image: Image.Image, data: bytes) -> str | None:
    depth, colour_type, interlace = data[24], data[25], data[28]
    if depth != 8:
        return f"{depth}-bit PNG"
    if colour_type not in (0, 2):  # grayscale, RGB; palette and alpha types follow conversion rules
        return {3: "palette PNG", 4: "grayscale+alpha PNG", 6: "RGBA PNG"}.get(colour_type, "PNG colour type")
    if "transparency" in image.info:
        return "PNG with a transparent colour"
    if interlace:
        return "interlaced PNG"
    return None


def tensorflow_orientation(data: bytes) -> int:
    """The EXIF orientation ``exif_orientation`` (TensorFlow ops) finds in ``data``, computed in Python.

    The same search, byte for byte: the first ``Exif\\0\\0`` in a JPEG's first 64 KiB (the first
    ``eXIf`` anywhere in other files), the TIFF header after it, the first ``_MAX_IFD_ENTRIES`` entries of
    IFD0 (no more than its count), the first orientation tag among them; 1 when any step fails or the
    value is not 1-8. A unit test checks it against ``exif_orientation`` on crafted and broken blocks.
    """
    if data[:3] == b"\xff\xd8\xff":
        found = data[: 1 << 16].find(_JPEG_EXIF_MARKER)
        start = found + len(_JPEG_EXIF_MARKER)
    else:
        found = data.find(_PNG_EXIF_MARKER)
        start = found + len(_PNG_EXIF_MARKER)
    if found < 0:
        return 1
    tiff = data[start: start + (1 << 16)]

    def read(position: int, length: int) -> bytes:
        position = min(max(position, 0), len(tiff))
        return (tiff[position: position + length] + b"\0" * length)[:length]

    header = tuple(read(0, 4))
    if header not in (_TIFF_LITTLE_ENDIAN, _TIFF_BIG_ENDIAN):
        return 1
    order = "little" if header == _TIFF_LITTLE_ENDIAN else "big"
    ifd = int.from_bytes(read(4, 4), order)
    count = int.from_bytes(read(ifd, 2), order)
    entries = read(ifd + 2, 12 * _MAX_IFD_ENTRIES)
    for index in range(min(count, _MAX_IFD_ENTRIES)):
        entry = entries[12 * index: 12 * index + 12]
        if int.from_bytes(entry[0:2], order) == _ORIENTATION_TAG:
            value = int.from_bytes(entry[8:10], order)
            return value if 1 <= value <= 8 else 1
    return 1


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

    The single resize used by the training input pipeline, evaluation, prediction and the serving
    signature, so that a picture reaches the network with the same pixels in training and in production.
    Without antialiasing, as the reference algorithm resizes (``image_dataset_from_directory``): with it,
    TensorFlow's resize costs about 2 ms per photo instead of 0.3 ms, which made the first epoch of a
    run three times slower than the reference's (benchmarks/input_pipeline.py). For photos many times
    larger than the model input, ``image_resize_interpolation="area"`` averages every source pixel.
    """
    if interpolation not in RESIZE_METHODS:
        raise ValueError(f"unknown image_resize_interpolation {interpolation!r};"
                         f" use one of {', '.join(RESIZE_METHODS)}")
    # The uint8 pixels go to the resize kernel as they are: it reads each one as a float, which gives the
    # same result as casting the whole picture first, without writing a float copy of it (about 0.1 ms of
    # a photo's first-epoch cost). "nearest" returns uint8 pixels unchanged.
    resized = tf.image.resize(image, (image_size, image_size), method=interpolation)
    if resized.dtype == tf.uint8:
        return resized
    if interpolation in _WITHIN_RANGE_METHODS:
        # Weighted means of 0-255 pixels stay within 0-255: no clipping (two ops fewer per picture).
        return tf.cast(tf.round(resized), tf.uint8)
    # Kernels with negative lobes overshoot: saturate_cast clips to 0-255 and casts.
    return tf.saturate_cast(tf.round(resized), tf.uint8)


# ---------------------------------------------------------------------------------------------
# The TensorFlow decoder: training, evaluation and serving
# ---------------------------------------------------------------------------------------------

# JPEG decoding scaled in the DCT domain: libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 of its size,
# computing each 8x8 block's pixels from its lowest frequencies only (a 4x4, 2x2 or 1x1 inverse DCT), so
# a 4000x3000 photo costs about a tenth of its full decode and never exists at full size.
JPEG_SCALES = (1, 2, 4, 8)


def jpeg_scale(height, width, image_size: int):
    """THE rule for how much a JPEG is scaled down while it is decoded: the denominator 1, 2, 4 or 8.

    The largest of ``JPEG_SCALES`` at which the picture still has at least ``image_size`` pixels in both
    sides; so a photo is scaled only when it is at least twice the model's input in both sides, and the
    resize that follows always shrinks (never enlarges) the scaled picture. ``height`` and ``width`` are
    the picture's stored size (the JPEG header's, ``tf.image.extract_jpeg_shape``); its EXIF orientation
    does not change the result: a quarter turn swaps the two sides, the model's input is square, and the
    rule depends on the shorter side only.

    Training, evaluation, the serving signature, ``predict`` and batch prediction all decode through
    ``model_input``, which applies this rule; an app that feeds the TFLite file decodes the same way
    (Android's ``BitmapFactory.Options.inSampleSize`` is the same libjpeg scaling). Python ints or
    TensorFlow integer tensors in; an int64 tensor out.
    """
    shorter = tf.minimum(tf.cast(height, tf.int64), tf.cast(width, tf.int64))
    scale = tf.constant(JPEG_SCALES[0], tf.int64)
    for candidate in JPEG_SCALES[1:]:
        scale = tf.where(shorter >= candidate * image_size, tf.constant(candidate, tf.int64), scale)
    return scale


def _decode_jpeg(data: tf.Tensor, image_size: int | None) -> tf.Tensor:
    """JPEG bytes -> RGB uint8, scaled by ``jpeg_scale`` of its header's size when ``image_size`` is given."""
    def at(scale: int) -> tf.Tensor:
        # INTEGER_ACCURATE is libjpeg's JDCT_ISLOW, the IDCT Pillow uses; TF's default is faster but
        # differs by a level here and there. The scale is an attribute of the op, hence one op per scale.
        return tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE", ratio=scale)

    if image_size is None:
        return at(1)
    shape = tf.image.extract_jpeg_shape(data)
    scale = jpeg_scale(shape[0], shape[1], image_size)
    index = tf.reduce_sum(tf.cast(scale >= tf.constant(JPEG_SCALES[1:], tf.int64), tf.int32))
    image = tf.switch_case(index, [lambda s=s: at(s) for s in JPEG_SCALES])
    image.set_shape([None, None, 3])
    return image


def model_input(data: tf.Tensor, image_size: int, interpolation: str,
                orientation: tf.Tensor | None = None, *, upright_jpeg: bool = False,
                scaled: bool = True) -> tf.Tensor:
    """Encoded JPEG/PNG bytes (scalar tf.string) -> the model's input pixels, uint8 [S, S, 3].

    THE preparation of a picture for the network, in TensorFlow ops: ``decode_tensor`` with JPEGs scaled
    by ``jpeg_scale``, then ``resize_image``. The training input pipeline, evaluation and the SavedModel's
    serving signature run it in their graphs, and ``model_input_array`` (``predict``, batch prediction,
    the host-side decode before a TFLite interpreter, a model server) runs it on one file's bytes, so the
    pixels a model is trained on are the pixels it is served.

    ``orientation``: as ``decode_tensor``'s. ``upright_jpeg``: the caller knows ``data`` is a JPEG in
    which ``exif_orientation`` finds no turn (``decode_upright_jpeg_tensor``). ``scaled=False``: the
    caller knows ``jpeg_scale`` is 1 for it (the training pipeline, from conversion's record of the
    largest JPEG of the split), which spares the header read and the choice; the pixels are the same.
    """
    size = image_size if scaled else None
    decoded = (decode_upright_jpeg_tensor(data, size) if upright_jpeg
               else decode_tensor(data, orientation, image_size=size))
    pixels = resize_image(decoded, image_size, interpolation)
    return tf.ensure_shape(pixels, [image_size, image_size, 3])


def decode_tensor(data: tf.Tensor, orientation: tf.Tensor | None = None, *,
                  image_size: int | None = None) -> tf.Tensor:
    """Encoded JPEG/PNG bytes (scalar tf.string) -> RGB uint8 [H, W, 3], in TensorFlow ops.

    The one TensorFlow decoder used by training, evaluation and serving; pixel for pixel equal to
    ``decode_image`` (Pillow) on every file validation accepts (validation checks each one). It
    checks nothing: files are vetted by ``decode_image`` at validation, and bytes that are neither
    JPEG nor PNG fail in ``tf.io.decode_png``.

    ``orientation``: the EXIF orientation of ``data`` as ``exif_orientation`` finds it, when known
    (conversion stores ``tensorflow_orientation``, the same search in Python, in each record), so the
    input pipeline skips the search; 0 or None means unknown, and the bytes are searched (serving).

    ``image_size``: the model's input size; a JPEG is then decoded scaled down by ``jpeg_scale`` (libjpeg's
    DCT scaling: the pixels Pillow's ``draft`` gives at that scale). None: at full size, as Pillow decodes.
    """
    def jpeg() -> tf.Tensor:
        return _decode_jpeg(data, image_size)

    def png() -> tf.Tensor:
        # A tRNS chunk (a transparent colour or palette entry) comes before the first IDAT chunk;
        # libpng turns it into a real alpha channel when asked for 4 channels.
        header = tf.strings.split(data, sep="IDAT", maxsplit=1)[0]
        # Byte-wise search (a regex would read the binary header as UTF-8).
        has_transparency = tf.size(tf.strings.split(header, sep="tRNS", maxsplit=1)) > 1
        return tf.cond(has_transparency, lambda: composite_on_white(tf.io.decode_png(data, channels=4)),
                       opaque_or_alpha_png)

    def opaque_or_alpha_png() -> tf.Tensor:
        # Without tRNS, decode with the file's own channels: asking for 4 makes libpng add an alpha
        # "filler" that is not 255 for 1-, 2- and 4-bit grayscale and palette files.
        decoded = tf.io.decode_png(data, channels=0, dtype=tf.uint8)
        gray, alpha = decoded[..., :1], decoded[..., -1:]
        return tf.switch_case(tf.shape(decoded)[-1] - 1, [
            lambda: tf.image.grayscale_to_rgb(decoded),
            lambda: composite_on_white(tf.concat([gray, gray, gray, alpha], axis=-1)),
            lambda: decoded,
            lambda: composite_on_white(decoded),
        ])

    image = tf.cond(tf.io.is_jpeg(data), jpeg, lambda: _out_of_line("png", png))
    image.set_shape([None, None, 3])
    if orientation is None:
        orientation = exif_orientation(data)
    else:
        known = tf.cast(orientation, tf.int32)
        orientation = tf.cond(known > 0, lambda: known, lambda: _out_of_line("exif", lambda: exif_orientation(data)))
    # Upright pictures (nearly all) skip the turn's transpose, reverse and their bookkeeping ops.
    return tf.cond(orientation == 1, lambda: image, lambda: apply_orientation(image, orientation))


def decode_upright_jpeg_tensor(data: tf.Tensor, image_size: int | None = None) -> tf.Tensor:
    """``decode_tensor`` of JPEG bytes in which ``exif_orientation`` finds no turn (orientation 1): the
    same pixels, without the control flow of the format dispatch and of the orientation.

    Inside tf.data a ``tf.cond`` turns the map function into a graph of switches run by the general
    executor, and the data-dependent turn of ``apply_orientation`` costs even an upright picture a few
    small ops: together about 0.2-0.3 ms per photo, a fifth of its decode. The training input pipeline
    uses this for a split that conversion recorded as upright JPEGs only. ``image_size``: as ``decode_tensor``'s.
    """
    return _decode_jpeg(data, image_size)


def _out_of_line(name: str, branch):
    """Call ``branch`` (no arguments) as one function-call node that graph optimizers do not inline.

    Inside tf.data, TensorFlow turns a ``tf.cond`` into a switch of every op of both branches, and
    each op of the branch not taken still costs the executor a few microseconds: the PNG branch's
    and the EXIF parse's ops cost every JPEG about 0.5 ms (as much as half its decode). Behind one
    call node, a branch not taken costs one node. The ops and the pixels are the same.
    """
    return tf.function(branch, experimental_attributes={"_noinline": True}, autograph=False)()


# EXIF orientation, as decode_image applies it (Pillow's ImageOps.exif_transpose) and TensorFlow's
# decoders do not: phone cameras store pictures sideways and record the turn in this tag.
_ORIENTATION_TAG = 0x0112
# Where the TIFF block of EXIF data starts: after "Exif\0\0" in a JPEG's APP1 segment (within the
# first 64 KiB, the largest a segment can be), after the chunk type of a PNG "eXIf" chunk.
_JPEG_EXIF_MARKER = b"Exif\x00\x00"
_PNG_EXIF_MARKER = b"eXIf"
_TIFF_LITTLE_ENDIAN = (0x49, 0x49, 0x2A, 0x00)
_TIFF_BIG_ENDIAN = (0x4D, 0x4D, 0x00, 0x2A)
# IFD0 entries examined; tags are sorted and orientation comes early (cameras write about 10-20).
_MAX_IFD_ENTRIES = 128


def exif_orientation(data: tf.Tensor) -> tf.Tensor:
    """The EXIF orientation (int32 1-8) of encoded JPEG/PNG bytes; 1 when absent or unreadable."""
    def tiff_offset(haystack: tf.Tensor, marker: bytes) -> tf.Tensor:
        parts = tf.strings.split(haystack, sep=marker, maxsplit=1)
        found = tf.size(parts) > 1
        offset = tf.cast(tf.strings.length(parts[0]), tf.int64) + len(marker)
        return tf.where(found, offset, tf.constant(-1, tf.int64))

    start = tf.cond(tf.io.is_jpeg(data),
                    lambda: tiff_offset(tf.strings.substr(data, 0, 1 << 16), _JPEG_EXIF_MARKER),
                    lambda: tiff_offset(data, _PNG_EXIF_MARKER))
    # Most files have no EXIF block: the few dozen small ops of the parse then do not run at all (they
    # were about 0.7 ms per image in the training input pipeline, most of what the first epoch cost
    # beyond the JPEG decode). The result is the same either way: 1 when the marker is absent.
    return tf.cond(start >= 0, lambda: _out_of_line("exif", lambda: _orientation_at(data, start)),
                   lambda: tf.constant(1, tf.int32))


def _orientation_at(data: tf.Tensor, start: tf.Tensor) -> tf.Tensor:
    """``exif_orientation`` of ``data`` whose TIFF block begins at ``start`` (>= 0)."""
    tiff = tf.strings.substr(data, start, 1 << 16)
    header = _read_bytes(tiff, 0, 4)
    little = tf.reduce_all(tf.equal(header, _TIFF_LITTLE_ENDIAN))
    big = tf.reduce_all(tf.equal(header, _TIFF_BIG_ENDIAN))

    def number(raw: tf.Tensor) -> tf.Tensor:
        # Unsigned integer from bytes along the last axis, in the TIFF block's byte order.
        weights = tf.cast(256, tf.int64) ** tf.range(tf.shape(raw, out_type=tf.int64)[-1])
        weights = tf.where(little, weights, tf.reverse(weights, [0]))
        return tf.reduce_sum(raw * weights, axis=-1)

    ifd = number(_read_bytes(tiff, 4, 4))
    count = number(_read_bytes(tiff, ifd, 2))
    entries = tf.reshape(_read_bytes(tiff, ifd + 2, 12 * _MAX_IFD_ENTRIES), [_MAX_IFD_ENTRIES, 12])
    is_orientation = tf.logical_and(tf.equal(number(entries[:, 0:2]), _ORIENTATION_TAG),
                                    tf.range(_MAX_IFD_ENTRIES, dtype=tf.int64) < count)
    # An orientation is a SHORT stored in the first two bytes of the entry's value field.
    values = tf.boolean_mask(number(entries[:, 8:10]), is_orientation)
    value = tf.cond(tf.size(values) > 0, lambda: values[0], lambda: tf.constant(1, tf.int64))
    usable = tf.logical_and(tf.logical_or(little, big), tf.logical_and(value >= 1, value <= 8))
    return tf.cast(tf.where(usable, value, 1), tf.int32)


def apply_orientation(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """Turn/mirror [H, W, C] so that it is upright for EXIF ``orientation`` 1-8 (as Pillow does).

    Every orientation is an optional transpose (5-8: the picture is stored on its side) followed by
    optional flips: (orientation - 1) % 4 is 0 (none), 1 (left-right), 2 (both: half a turn) or 3
    (up-down). As two data-dependent ops, a transpose and a reverse, without control flow: an eight-way
    ``switch_case`` here cost about 0.8 ms per image in the training input pipeline, as much as the
    JPEG decode, although nearly every picture takes its "upright" branch. Pixels are the same.
    """
    orientation = tf.cast(orientation, tf.int32)
    perm = tf.where(orientation >= 5, tf.constant([1, 0, 2]), tf.constant([0, 1, 2]))
    turned = tf.transpose(image, perm)  # the identity permutation returns its input as it is
    flips = (orientation - 1) % 4
    axes = tf.boolean_mask(tf.constant([0, 1]), tf.stack([flips >= 2, tf.logical_or(flips == 1, flips == 2)]))
    oriented = tf.reverse(turned, axes)
    oriented.set_shape([None, None, image.shape[-1]])
    return oriented


def _read_bytes(blob: tf.Tensor, position: tf.Tensor, length: int) -> tf.Tensor:
    """``length`` bytes of ``blob`` from ``position`` as int64 [length]; zeros past its end."""
    size = tf.cast(tf.strings.length(blob), tf.int64)
    position = tf.clip_by_value(tf.cast(position, tf.int64), 0, size)
    padded = tf.strings.join([tf.strings.substr(blob, position, length), b"\x00" * length])
    return tf.cast(tf.io.decode_raw(tf.strings.substr(padded, 0, length), tf.uint8), tf.int64)


def composite_on_white(rgba: tf.Tensor) -> tf.Tensor:
    """RGBA uint8 [H, W, 4] -> RGB uint8 [H, W, 3] over an opaque white background.

    The integer arithmetic of Pillow's ``Image.alpha_composite`` (7 fractional bits and its
    shift-based division by 255), so the result equals ``decode_image``'s pixels exactly; opaque
    pixels come out unchanged.
    """
    rgba = tf.cast(rgba, tf.int32)
    color, alpha = rgba[..., :3], rgba[..., 3:]
    # With an opaque background Pillow's blend weights are alpha * 128 and (255 - alpha) * 128.
    total = (color * alpha + 255 * (255 - alpha)) * 128 + (0x80 << 7)
    divided = tf.bitwise.right_shift(tf.bitwise.right_shift(total, 8) + total, 8)
    return tf.cast(tf.bitwise.right_shift(divided, 7), tf.uint8)


# ---------------------------------------------------------------------------------------------
# Validation's cross-check of the two decoders
# ---------------------------------------------------------------------------------------------

_decoder_lock = threading.Lock()
_decoder = None


def tensorflow_decoder():
    """``decode_tensor`` traced once into a graph function of one scalar string, safe to call from threads.

    A graph call costs far less than running the ops eagerly (dozens of small ops for the EXIF
    parse), and one trace serves every file.
    """
    global _decoder
    with _decoder_lock:
        if _decoder is None:
            _quiet_tensorflow_import()
            _decoder = tf.function(decode_tensor).get_concrete_function(tf.TensorSpec([], tf.string))
        return _decoder


_model_inputs: dict[tuple[int, str], object] = {}


def model_input_array(data: bytes, name: str, image_size: int, interpolation: str,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """One file's bytes -> the model's input pixels, uint8 numpy [S, S, 3]: what ``predict``, batch
    prediction, the host side of a TFLite app and a model server do with a picture.

    First ``check_header`` (the checks of ``decode_image`` that need no pixels, as the model server checks
    a request's images); then ``model_input``, the very graph the SavedModel's serving signature
    runs (traced once per size and interpolation), so ``predict`` and the served model see the same
    pixels, also for files Pillow and TensorFlow decode differently (validation keeps those out of
    training; e.g. a 16-bit PNG with a transparent colour, which Pillow reads without its transparency).
    A file TensorFlow cannot decode (truncated, CMYK) raises ``ImageRejected`` naming it.
    """
    check_header(data, name, max_pixels)
    key = (image_size, interpolation)
    with _decoder_lock:
        if key not in _model_inputs:
            _quiet_tensorflow_import()
            _model_inputs[key] = tf.function(
                lambda encoded: model_input(encoded, image_size, interpolation)).get_concrete_function(
                    tf.TensorSpec([], tf.string))
        prepare = _model_inputs[key]
    try:
        return prepare(tf.constant(data)).numpy()
    except tf.errors.OpError as e:
        raise tensorflow_unreadable(e, name) from e


def check_header(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """The checks of ``decode_image`` that need no pixels, before a file is given to the model's decoder:
    the extension against the content, empty and animated files, the pixel limit (from the header: a
    decompression bomb costs nothing), PNG chunk checksums. ``ImageRejected`` naming the file, worded as
    validation words it. ``predict``, batch prediction and the model server check every image so.
    """
    expected = expected_format(name)
    if not data:
        raise ImageRejected("empty file (0 bytes): re-copy it from its source or remove it", "empty", name)
    try:
        _open(data, expected, name, max_pixels)
    except (ImageRejected, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - any failure inside Pillow means the file is unusable.
        raise _decode_failure(e, expected, name) from e


def tensorflow_unreadable(error: tf.errors.OpError, name: str) -> ImageRejected:
    """The rejection of a file the model's TensorFlow decoder refused with ``error``."""
    return ImageRejected(
        f"TensorFlow cannot decode it ({_op_error_text(error)}), and the served model decodes with TensorFlow;"
        " re-save it as a baseline JPEG or PNG", "tensorflow_unreadable", name)


def _quiet_tensorflow_import() -> None:
    """Keep TensorFlow's C++ log lines out of validation's output, when validation is what imports it.

    Importing TensorFlow and running the decoder print its runtime's internals on stderr (oneDNN and CPU
    feature notices, "Skipping loop optimization for Merge node ..." from the graph optimizer, libjpeg's
    "Premature end of JPEG data" for a file it refuses): noise next to validation's own progress lines.
    Every failure that matters reaches Python as an exception, which validation reports by file name,
    so a process that had not imported TensorFlow before gets TF_CPP_MIN_LOG_LEVEL=3 (unless it is set:
    the user's choice wins). A process that imported TensorFlow already keeps its settings.
    """
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def check_tensorflow_decode(data: bytes, name: str, expected: np.ndarray) -> None:
    """Raise ImageRejected unless ``decode_tensor`` decodes ``data`` to exactly ``expected``.

    ``expected`` is ``decode_image``'s array for the same bytes. Training and serving decode with
    ``decode_tensor``, so a file TensorFlow cannot decode would fail a training run midway, and one it
    decodes differently would be trained on as other pixels than validation checked.
    """
    try:
        pixels = tensorflow_decoder()(tf.constant(data)).numpy()
    except tf.errors.OpError as e:
        raise ImageRejected(
            f"Pillow reads it but TensorFlow cannot decode it ({_op_error_text(e)}), and training and serving"
            " decode with TensorFlow; re-save it as a baseline JPEG or PNG", "tensorflow_unreadable", name) from e
    if pixels.shape != expected.shape:
        (height, width), (tf_height, tf_width) = expected.shape[:2], pixels.shape[:2]
        raise ImageRejected(
            f"TensorFlow decodes it as {tf_width}x{tf_height} pixels but Pillow as {width}x{height} (EXIF"
            " orientation stored where only Pillow finds it?); re-save it upright without EXIF orientation",
            "decoder_mismatch", name)
    if not np.array_equal(pixels, expected):
        differ = int(np.count_nonzero((pixels != expected).any(axis=-1)))
        worst = int(np.abs(pixels.astype(np.int16) - expected).max())
        raise ImageRejected(
            f"TensorFlow and Pillow decode it to different pixels ({differ:,} of {pixels.shape[0] * pixels.shape[1]:,}"
            f" differ, by up to {worst} levels), so training would not see the picture validation checked;"
            " re-save it as a baseline JPEG or an 8-bit PNG", "decoder_mismatch", name)


def _op_error_text(error: tf.errors.OpError) -> str:
    """The reason in a TensorFlow op error, without graph-node names, op tags and tracebacks."""
    # Graph-mode errors wrap the reason in "Graph execution error", "Detected at node ..." and a Python
    # traceback before it, and node and op tags after it.
    reasons = []
    for line in (error.message or "").splitlines():
        line = re.sub(r"\[\[.*?\]\]|\{\{.*?\}\}|\[Op:[^\]]*\].*$", "", line).strip()
        if line and not line.startswith(("Graph execution error", "Detected at node", "File ")):
            reasons.append(line)
    return reasons[-1].rstrip(".:; ") if reasons else type(error).__name__
