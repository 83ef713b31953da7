"""Generated image-folder data sets for tests: learnable class folders and one file per bad-input case.

Everything is drawn with Pillow and numpy at test time (nothing binary is committed). Sizes follow
Pillow's convention, (width, height); arrays are numpy's [height, width, channels].
"""

from __future__ import annotations

import colorsys
import dataclasses
import io
import os
import struct
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

# --- Encoded images ------------------------------------------------------------------------------------


def encode(image: Image.Image | np.ndarray, fmt: str, **options) -> bytes:
    """Encode a Pillow image or an array in a Pillow format ("JPEG", "PNG", "GIF", "BMP", "WEBP")."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def noise(height: int = 30, width: int = 40, seed: int = 0) -> np.ndarray:
    """A random RGB uint8 array, for tests that need every pixel to differ."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def halves(height: int = 20, width: int = 40) -> np.ndarray:
    """Left half red, right half blue: a picture whose orientation can be read back after any rotation."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 2] = (255, 0, 0)
    array[:, width // 2:] = (0, 0, 255)
    return array


def exif_bytes(image: np.ndarray, orientation: int, fmt: str = "JPEG") -> bytes:
    """The image encoded with an EXIF orientation tag (PNG keeps it in an eXIf chunk)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, fmt, exif=exif)


def png16_gray(values: np.ndarray) -> bytes:
    """A 16-bit grayscale PNG holding ``values`` (uint16 [H, W])."""
    return encode(Image.fromarray(np.asarray(values, dtype=np.uint16)), "PNG")


def png16_gray_transparent_key() -> bytes:
    """A 16-bit grayscale PNG whose value 1000 is marked transparent (tRNS): Pillow reads it without its
    transparency, TensorFlow with it (the pixel turns white), so the two decoders disagree."""
    values = np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000
    return encode(Image.fromarray(values), "PNG", transparency=1000)


def too_wide_png() -> bytes:
    """A 1,000,001 x 1 PNG (a few KB): Pillow reads it, but the libpng in TensorFlow refuses images wider
    than its default limit of 1,000,000 pixels, so ``tf.io.decode_png`` fails on it."""
    return encode(Image.new("L", (1_000_001, 1), 7), "PNG")


def cmyk_jpeg(image: np.ndarray) -> bytes:
    return encode(Image.fromarray(image).convert("CMYK"), "JPEG", quality=95)


def animated_png(frames: int = 3) -> bytes:
    images = [Image.fromarray(noise(seed=i)) for i in range(frames)]
    return encode(images[0], "PNG", save_all=True, append_images=images[1:])


def animated_gif(frames: int = 3) -> bytes:
    images = [Image.fromarray(noise(seed=i)).convert("P") for i in range(frames)]
    return encode(images[0], "GIF", save_all=True, append_images=images[1:])


def palette_with_transparency() -> bytes:
    """A palette PNG: index 0 (left column) transparent, index 1 green."""
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    for y in range(4):
        image.putpixel((0, y), 0)
    return encode(image, "PNG", transparency=0)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height 8-bit gray pixels but carries almost no data.

    Enough for a size check (which must happen before decoding) and far too little to decode: the
    shape of a decompression bomb without its cost.
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def pillow_model_input(data: bytes, image_size: int, interpolation: str = "bilinear") -> np.ndarray:
    """The model's input pixels [S, S, 3] of an opaque JPEG/PNG, computed without trainer.images' decoders.

    The rule as the README states it, written out again here: a JPEG is decoded scaled down by the largest
    of 2, 4 and 8 that leaves both its sides at least ``image_size`` (Pillow's ``draft``: libjpeg's DCT
    scaling), then turned by its EXIF orientation (Pillow), then resized by the shared ``resize_image``.
    """
    from PIL import ImageOps

    from trainer.images import resize_image

    image = Image.open(io.BytesIO(data))
    if image.format == "JPEG":
        width, height = image.size
        scale = max(s for s in (1, 2, 4, 8) if s == 1 or min(width, height) >= s * image_size)
        if scale > 1:
            image.draft("RGB", (width // scale, height // scale))
            assert image.size == (-(-width // scale), -(-height // scale)), (image.size, scale)
    image = ImageOps.exif_transpose(image).convert("RGB")
    return resize_image(np.asarray(image), image_size, interpolation).numpy()


def truncate(data: bytes) -> bytes:
    """The first half of a file: what an interrupted copy leaves."""
    return data[: len(data) // 2]


# --- Learnable image folders ----------------------------------------------------------------------------

_SHAPES = ("rectangle", "ellipse", "triangle", "cross", "bars")


def class_image(index: int, num_classes: int, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One picture of class ``index``: a class-specific background hue and shape, jittered per image."""
    width, height = size
    hue = index / max(num_classes, 1)
    background = tuple(int(c * 255) for c in colorsys.hsv_to_rgb(hue, 0.55, 0.9))
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    # The shape is the complementary colour, placed and sized at random so images differ.
    fill = tuple(255 - c for c in background)
    w, h = rng.integers(width // 3, width // 2 + 1), rng.integers(height // 3, height // 2 + 1)
    x, y = rng.integers(0, width - w + 1), rng.integers(0, height - h + 1)
    box = (int(x), int(y), int(x + w), int(y + h))
    shape = _SHAPES[index % len(_SHAPES)]
    if shape == "rectangle":
        draw.rectangle(box, fill=fill)
    elif shape == "ellipse":
        draw.ellipse(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=fill)
    elif shape == "cross":
        draw.line((box[0], box[1], box[2], box[3]), fill=fill, width=3)
        draw.line((box[0], box[3], box[2], box[1]), fill=fill, width=3)
    else:
        for bar in range(box[0], box[2], 4):
            draw.line((bar, box[1], bar, box[3]), fill=fill, width=2)
    # Mild noise so no two images (and no two files) are identical.
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_image_folder(root: str | os.PathLike, classes: dict[str, int] | None = None,
                      size: tuple[int, int] = (40, 30), fmt: str = "jpg", seed: int = 0) -> dict[str, list[str]]:
    """Write ``{class: count}`` images as ``root/<class>/<class>_NNN.<fmt>``; return {class: relative paths}.

    ``size`` is (width, height); ``fmt`` is the extension: "jpg", "jpeg" or "png".
    """
    classes = {"cats": 6, "dogs": 6} if classes is None else classes
    pillow_format = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG"}[fmt]
    rng = np.random.default_rng(seed)
    written: dict[str, list[str]] = {}
    for index, name in enumerate(sorted(classes)):
        folder = Path(root, name)
        folder.mkdir(parents=True, exist_ok=True)
        written[name] = []
        for i in range(classes[name]):
            relative = f"{name}/{name}_{i:03d}.{fmt}"
            options = {"quality": 95} if pillow_format == "JPEG" else {}
            Path(root, relative).write_bytes(
                encode(class_image(index, len(classes), size, rng), pillow_format, **options))
            written[name].append(relative)
    return written


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    """Three learnable classes of 10 small JPEGs each, in ``tmp_path/data``."""
    root = tmp_path / "data"
    make_image_folder(root, {"cats": 10, "dogs": 10, "fish": 10}, size=(40, 30), fmt="jpg")
    return root


# --- The bad-input corpus ---------------------------------------------------------------------------------

NFC_NAME = unicodedata.normalize("NFC", "café")
NFD_NAME = unicodedata.normalize("NFD", "café")
ODD_NAME = "odd #*?[] name"


@dataclasses.dataclass
class Corpus:
    """A data set with one file per bad-input case and what validation must make of each."""

    root: Path
    # relative path -> ("accepted", None) | ("rejected", code) | ("skipped", None)
    expected: dict[str, tuple[str, str | None]]
    # substrings that must each appear in some fatal problem
    fatal: list[str]
    # the pixel limit the corpus is meant to be validated with
    max_pixels: int = 1_000_000


def bad_inputs_corpus(root: str | os.PathLike) -> Corpus:
    """Write one file per case of items 1-9 of bad-inputs.md, and one Pillow alone decodes right, below ``root``.

    Validated with ``max_pixels=Corpus.max_pixels`` it must end with every file in its expected list,
    and fatal problems for the empty class, the NFC/NFD and case-only name pairs and the rejected share.
    """
    root = Path(root)
    expected: dict[str, tuple[str, str | None]] = {}

    def put(relative: str, data: bytes, outcome: str, code: str | None = None) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[relative] = (outcome, code)

    good = "good"
    picture = noise(seed=1)
    jpeg = encode(picture, "JPEG")
    png = encode(picture, "PNG")
    for i in range(3):
        put(f"{good}/plain_{i}.jpg", encode(noise(seed=10 + i), "JPEG"), "accepted")
    put(f"{good}/upper_case.JPG", encode(noise(seed=20), "JPEG"), "accepted")
    put(f"{good}/long_ext.jpeg", encode(noise(seed=21), "JPEG"), "accepted")
    # 1. truncated and empty files
    put(f"{good}/truncated.jpg", truncate(jpeg), "rejected", "truncated")
    put(f"{good}/truncated.png", truncate(png), "rejected", "truncated")
    put(f"{good}/zero_bytes.jpg", b"", "rejected", "empty")
    # 2. content that does not match the extension; unsupported extensions
    put(f"{good}/png_named.jpg", png, "rejected", "format_mismatch")
    put(f"{good}/gif_named.jpg", encode(Image.fromarray(picture).convert("P"), "GIF"), "rejected",
        "format_mismatch")
    put(f"{good}/bmp_named.jpg", encode(picture, "BMP"), "rejected", "format_mismatch")
    put(f"{good}/webp_named.jpg", encode(picture, "WEBP"), "rejected", "format_mismatch")
    put(f"{good}/jpeg_named.png", encode(noise(seed=22), "JPEG"), "rejected", "format_mismatch")
    put(f"{good}/animated.gif", animated_gif(), "rejected", "unsupported_extension")
    put(f"{good}/notes.txt", b"not an image\n", "rejected", "unsupported_extension")
    # 3. animated PNG; colour modes that must become RGB
    put(f"{good}/animated.png", animated_png(), "rejected", "animated")
    put(f"{good}/cmyk.jpg", cmyk_jpeg(noise(seed=23)), "accepted")
    put(f"{good}/gray16.png", png16_gray(np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50), "accepted")
    put(f"{good}/gray.png", encode(noise(seed=24)[:, :, 0], "PNG"), "accepted")
    put(f"{good}/palette.png", palette_with_transparency(), "accepted")
    put(f"{good}/rgba.png", encode(np.dstack([noise(seed=25), np.full((30, 40), 128, np.uint8)]), "PNG"),
        "accepted")
    # 4. EXIF orientation
    put(f"{good}/exif_6.jpg", exif_bytes(halves(), 6), "accepted")
    # 5. over the pixel limit: a real image over the corpus limit, and a bomb's header over Pillow's own
    put(f"{good}/over_limit.png", encode(Image.new("L", (1100, 1000)), "PNG"), "rejected", "too_large")
    put(f"{good}/bomb.png", png_header_only(30_000, 30_000), "rejected", "too_large")
    # 7. hidden and system entries, folder markers, nested folders, files outside class folders
    put(".DS_Store", b"\0\0\0\1Bud1", "skipped")
    put(f"{good}/.DS_Store", b"\0\0\0\1Bud1", "skipped")
    put(f".ipynb_checkpoints/{good}-checkpoint.jpg", jpeg, "skipped")
    put(f"{good}/.ipynb_checkpoints/x-checkpoint.jpg", jpeg, "skipped")
    put(f"{good}_$folder$", b"", "skipped")
    put(f"{good}/nested/deeper.jpg", encode(noise(seed=26), "JPEG"), "rejected", "nested")
    put("top_level.jpg", encode(noise(seed=27), "JPEG"), "rejected", "outside_class")
    # 6. an empty class folder (only an S3 marker) and a truly empty local folder
    put("ghost_$folder$", b"", "skipped")
    (root / "vacant").mkdir()
    # 8. class names: NFC vs NFD, case only, spaces and glob characters
    put(f"{NFC_NAME}/a.jpg", encode(noise(seed=30), "JPEG"), "accepted")
    put(f"{NFD_NAME}/b.jpg", encode(noise(seed=31), "JPEG"), "accepted")
    put("Dogs/a.jpg", encode(noise(seed=32), "JPEG"), "accepted")
    put("dogs/b.jpg", encode(noise(seed=33), "JPEG"), "accepted")
    put(f"{ODD_NAME}/x [1].jpg", encode(noise(seed=34), "JPEG"), "accepted")
    # 9. the same picture in two classes (both copies rejected) and twice in one class (both kept)
    shared = encode(noise(seed=40), "JPEG")
    put(f"{good}/shared.jpg", shared, "rejected", "class_conflict")
    put(f"{ODD_NAME}/shared copy.jpg", shared, "rejected", "class_conflict")
    twin = encode(noise(seed=41), "PNG")
    put(f"{good}/twin_1.png", twin, "accepted")
    put(f"{good}/twin_2.png", twin, "accepted")
    # 10. a file TensorFlow (training and serving) decodes to other pixels than Pillow. (too_wide_png(), which
    # TensorFlow cannot decode at all, is above the corpus's pixel limit: tested on its own.)
    put(f"{good}/gray16_key.png", png16_gray_transparent_key(), "rejected", "decoder_mismatch")
    fatal = ["'ghost'", "'vacant'", "Unicode normalisation", "letter case", "max_rejected_fraction"]
    return Corpus(root, expected, fatal)


@pytest.fixture
def bad_corpus(tmp_path) -> Corpus:
    return bad_inputs_corpus(tmp_path / "corpus")


def validation_with_lists(output_dir: str | os.PathLike) -> dict:
    """A written validation result, its summary with the per-file lists read back through the one reader
    (``trainer.data.validation.read_results``), as one dict: {..., "accepted": [...], "rejected": [...], ...}."""
    from trainer import layout
    from trainer.data import validation

    validation_json = os.path.join(str(output_dir), layout.VALIDATION_FILE) if "://" not in str(output_dir) \
        else f"{output_dir}/{layout.VALIDATION_FILE}"
    result = validation.load_validation(validation_json)
    lists = {kind: list(validation.read_results(validation_json, kind)) for kind in layout.VALIDATION_LISTS}
    return {**result, **lists}
