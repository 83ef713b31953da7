"""decode_image turns every accepted kind of file into the same RGB pixels and refuses the rest by name."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.support import datasets as ds
from trainer import images
from trainer.errors import DataError
from trainer.images import ImageRejected, decode_image, decode_image_with_info


def rejected(data: bytes, name: str, **kwargs) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        decode_image(data, name, **kwargs)
    return info.value


def test_rgb_png_round_trips_exactly_and_jpeg_closely():
    picture = ds.noise(30, 40)
    decoded = decode_image(ds.encode(picture, "PNG"), "a.png")
    assert decoded.dtype == np.uint8 and decoded.shape == (30, 40, 3) and decoded.flags.c_contiguous
    np.testing.assert_array_equal(decoded, picture)
    flat = np.full((16, 16, 3), (200, 40, 90), np.uint8)
    assert np.abs(decode_image(ds.encode(flat, "JPEG", quality=95), "b.JPEG").astype(int) - flat).max() <= 3


def test_rejection_is_a_data_error_naming_the_file():
    error = rejected(b"", "roses/x.jpg")
    assert isinstance(error, DataError)
    assert error.code == "empty" and "0 bytes" in error.reason and str(error).startswith("roses/x.jpg: ")


@pytest.mark.parametrize("fmt,name", [("JPEG", "a.jpg"), ("PNG", "a.png")])
def test_truncated_files_are_rejected(fmt, name):
    error = rejected(ds.truncate(ds.encode(ds.noise(), fmt)), name)
    assert error.code == "truncated" and "truncated" in error.reason and "re-copy" in error.reason


@pytest.mark.parametrize("cut", [12, 16, 20])
def test_png_missing_its_last_chunks_is_rejected(cut):
    # The pixels decode completely, so a plain load() would succeed; the chunk walk notices.
    data = ds.encode(ds.noise(), "PNG")
    assert rejected(data[:-cut], "a.png").code == "truncated"


def test_corrupt_png_checksum_is_rejected():
    data = bytearray(ds.encode(ds.noise(), "PNG"))
    data[200] ^= 0xFF
    error = rejected(bytes(data), "a.png")
    assert error.code == "corrupt" and "PNG" in error.reason


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP", "WEBP"])
def test_other_formats_named_jpg_are_rejected(fmt):
    image = Image.fromarray(ds.noise())
    error = rejected(ds.encode(image.convert("P") if fmt == "GIF" else image, fmt), "x.jpg")
    assert error.code == "format_mismatch"
    assert f"content is {fmt}" in error.reason and "extension says JPEG" in error.reason


def test_jpeg_named_png_is_rejected():
    assert "content is JPEG" in rejected(ds.encode(ds.noise(), "JPEG"), "x.png").reason


@pytest.mark.parametrize("name", ["x.gif", "x.txt", "x.webp", "noextension"])
def test_unsupported_extensions_are_rejected_by_name(name):
    error = rejected(ds.animated_gif(), name)
    assert error.code == "unsupported_extension" and ".jpg, .jpeg and .png" in error.reason


def test_garbage_is_rejected_as_unreadable():
    error = rejected(b"\x00garbage" * 10, "x.jpg")
    assert error.code == "unreadable" and "JPEG" in error.reason


def test_animated_png_is_rejected():
    error = rejected(ds.animated_png(frames=3), "a.png")
    assert error.code == "animated" and "3 frames" in error.reason


def test_multi_picture_jpeg_is_a_jpeg():
    first, second = Image.fromarray(ds.noise(seed=1)), Image.fromarray(ds.noise(seed=2))
    mpo = ds.encode(first, "MPO", save_all=True, append_images=[second], quality=95)
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    decoded = decode_image(mpo, "phone.jpg")
    np.testing.assert_allclose(decoded, decode_image(ds.encode(first, "JPEG", quality=95), "f.jpg"), atol=2)


def test_cmyk_jpeg_becomes_rgb():
    blocks = np.zeros((16, 32, 3), np.uint8)
    blocks[:, :16] = (250, 20, 20)
    blocks[:, 16:] = (20, 20, 250)
    decoded, info = decode_image_with_info(ds.cmyk_jpeg(blocks), "c.jpg")
    assert info.mode == "CMYK" and decoded.shape == (16, 32, 3)
    assert np.abs(decoded.astype(int) - blocks)[:, [2, 29]].max() <= 12


def test_16_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 255, 256, 1000, 32896, 65535]], np.uint16)
    data = ds.png16_gray(values)
    decoded, info = decode_image_with_info(data, "g.png")
    assert info.mode.startswith("I")
    expected = np.array([0, 0, 1, 3, 128, 255], np.uint8)  # the high byte: v >> 8
    for channel in range(3):
        np.testing.assert_array_equal(decoded[0, :, channel], expected)
    # Serving decodes with TensorFlow: the same pixels.
    np.testing.assert_array_equal(decoded, tf.io.decode_png(data, channels=3).numpy())


def test_grayscale_becomes_three_equal_channels():
    gray = ds.noise()[:, :, 0]
    decoded = decode_image(ds.encode(gray, "PNG"), "g.png")
    for channel in range(3):
        np.testing.assert_array_equal(decoded[:, :, channel], gray)


def test_palette_transparency_is_composited_on_white():
    decoded = decode_image(ds.palette_with_transparency(), "p.png")
    assert (decoded[:, 0] == 255).all()  # the transparent column
    assert (decoded[:, 1:] == (0, 255, 0)).all()


def test_rgba_and_la_are_composited_on_white():
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = (200, 0, 0)
    rgba[..., 3] = [[0, 255, 128], [0, 255, 128]]
    decoded = decode_image(ds.encode(rgba, "PNG"), "a.png").astype(int)
    np.testing.assert_array_equal(decoded[0, 0], (255, 255, 255))
    np.testing.assert_array_equal(decoded[0, 1], (200, 0, 0))
    assert np.abs(decoded[0, 2] - (228, 127, 127)).max() <= 1  # 50% over white
    la = np.zeros((1, 2, 2), np.uint8)
    la[..., 0], la[..., 1] = 10, [0, 255]
    decoded = decode_image(ds.encode(Image.fromarray(la, "LA"), "PNG"), "la.png")
    np.testing.assert_array_equal(decoded[0], [(255, 255, 255), (10, 10, 10)])


# What each EXIF orientation means, written as the transform that undoes it (EXIF 2.3, tag 0x0112).
ORIENTATION_FIXES = {
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # stored rotated 90 degrees counter-clockwise: turn it clockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATION_FIXES))
def test_exif_orientation_is_applied(orientation):
    stored = ds.noise(20, 30)
    decoded, info = decode_image_with_info(ds.exif_bytes(stored, orientation, "PNG"), "o.png")
    np.testing.assert_array_equal(decoded, ORIENTATION_FIXES[orientation](stored))
    assert info.exif_orientation == orientation and (info.height, info.width) == decoded.shape[:2]


def test_exif_orientation_6_jpeg_ends_up_upright():
    decoded = decode_image(ds.exif_bytes(ds.halves(20, 40), 6), "photo.jpg")
    assert decoded.shape == (40, 20, 3)
    # The stored left half (red) is the top of the picture as a person sees it.
    assert decoded[:15, :, 0].mean() > 200 and decoded[:15, :, 2].mean() < 60
    assert decoded[25:, :, 2].mean() > 200 and decoded[25:, :, 0].mean() < 60


# 100 M pixels is above Pillow's own warning threshold: the warning is expected here.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_is_checked_before_decoding():
    error = rejected(ds.encode(ds.noise(20, 20), "PNG"), "a.png", max_pixels=399)
    assert error.code == "too_large" and "400" in error.reason and "max_pixels" in error.reason
    # A header declaring 40,000 x 40,000 pixels and holding almost no data: refused without decoding.
    bomb = ds.png_header_only(40_000, 40_000)
    assert rejected(bomb, "bomb.png").code == "too_large"
    assert rejected(ds.png_header_only(10_000, 10_000), "big.png", max_pixels=10**7).code == "too_large"


def test_supported_extensions_are_what_serving_lists():
    assert set(images.SUPPORTED_EXTENSIONS) == {".jpg", ".jpeg", ".png"}
    assert images.expected_format("A/B.JpEg") == "JPEG"


# --- the TensorFlow decoder against Pillow's ------------------------------------------------------------

def test_check_tensorflow_decode_passes_when_both_decoders_agree():
    for name, blob in [("a.jpg", ds.exif_bytes(ds.halves(), 6)), ("b.png", ds.palette_with_transparency()),
                       ("c.jpg", ds.cmyk_jpeg(ds.noise(seed=2))), ("d.png", ds.png16_gray(np.full((3, 5), 700)))]:
        images.check_tensorflow_decode(blob, name, decode_image(blob, name))


def test_check_tensorflow_decode_names_every_disagreement():
    blob = ds.encode(ds.noise(10, 20), "PNG")
    pixels = decode_image(blob, "a.png")
    other = pixels.copy()
    other[0, 0] = pixels[0, 0] ^ 0x10
    with pytest.raises(ImageRejected) as info:
        images.check_tensorflow_decode(blob, "a.png", other)
    assert info.value.code == "decoder_mismatch" and info.value.name == "a.png"
    assert "different pixels (1 of 200 differ, by up to 16 levels)" in info.value.reason
    with pytest.raises(ImageRejected, match=r"TensorFlow decodes it as 20x10 pixels but Pillow as 10x20"):
        images.check_tensorflow_decode(blob, "a.png", pixels.transpose(1, 0, 2))


def test_file_only_pillow_can_decode_is_refused_with_tensorflows_reason():
    blob = ds.too_wide_png()
    pixels = decode_image(blob, "wide.png")  # Pillow: fine
    assert pixels.shape == (1, 1_000_001, 3)
    with pytest.raises(ImageRejected) as info:
        images.check_tensorflow_decode(blob, "wide.png", pixels)
    assert info.value.code == "tensorflow_unreadable"
    assert info.value.reason.startswith("Pillow reads it but TensorFlow cannot decode it (Invalid PNG.")
    assert "re-save it as a baseline JPEG or PNG" in info.value.reason


def test_decode_tensor_runs_inside_tf_data():
    blobs = [ds.encode(ds.noise(6, 9, seed=i), fmt) for i, fmt in enumerate(["JPEG", "PNG"])]
    decoded = list(tf.data.Dataset.from_tensor_slices(blobs).map(images.decode_tensor).as_numpy_iterator())
    for blob, name, pixels in zip(blobs, ["a.jpg", "b.png"], decoded, strict=True):
        np.testing.assert_array_equal(pixels, decode_image(blob, name))


# --- which files validation also decodes with TensorFlow ------------------------------------------------

def second_reason(blob: bytes, name: str) -> str | None:
    info, reason = images.check_image(blob, name)
    return reason


@pytest.mark.parametrize("name,blob", [
    ("baseline.jpg", ds.encode(ds.noise(17, 9), "JPEG", quality=90)),
    ("progressive.jpg", ds.encode(ds.noise(33, 20), "JPEG", quality=75, progressive=True)),
    ("444.jpg", ds.encode(ds.noise(16, 16), "JPEG", subsampling=0)),
    ("422.jpg", ds.encode(ds.noise(16, 16), "JPEG", subsampling=1)),
    ("gray.jpg", ds.encode(Image.fromarray(ds.noise()).convert("L"), "JPEG")),
    ("rotated.jpg", ds.exif_bytes(ds.halves(), 6)),
    ("rgb.png", ds.encode(ds.noise(), "PNG")),
    ("gray.png", ds.encode(Image.fromarray(ds.noise()).convert("L"), "PNG")),
])
def test_plain_files_are_decoded_once_and_agree_with_tensorflow(name, blob):
    # The evidence behind decoding these once: TensorFlow's decoder gives Pillow's very pixels.
    assert second_reason(blob, name) is None
    images.check_tensorflow_decode(blob, name, decode_image(blob, name))


@pytest.mark.parametrize("name,blob,reason", [
    ("cmyk.jpg", ds.cmyk_jpeg(ds.noise(seed=2)), "CMYK JPEG"),
    ("palette.png", ds.palette_with_transparency(), "palette PNG"),
    ("rgba.png", ds.encode(Image.fromarray(ds.noise()).convert("RGBA"), "PNG"), "RGBA PNG"),
    ("gray16.png", ds.png16_gray(np.full((3, 5), 700)), "16-bit PNG"),
    ("key.png", ds.encode(ds.noise(), "PNG", transparency=(1, 2, 3)), "PNG with a transparent colour"),
    ("rotated.png", ds.exif_bytes(ds.halves(), 3, "PNG"), None),
])
def test_files_where_the_decoders_can_differ_are_also_decoded_with_tensorflow(name, blob, reason):
    assert second_reason(blob, name) == reason


def test_orientation_tensorflow_would_read_differently_sends_the_file_to_both_decoders():
    # A second "Exif" block in a comment, before the real one: TensorFlow's parser (the first marker in
    # the file) finds orientation 3 there, Pillow reads the APP1 segment's 6.
    real = ds.exif_bytes(ds.halves(), 6)
    decoy = b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x03\x00\x00"
    segment = b"\xff\xfe" + (len(decoy) + 2).to_bytes(2, "big") + decoy
    blob = real[:2] + segment + real[2:]
    assert images.tensorflow_orientation(blob) == 3
    with pytest.raises(ImageRejected) as info:
        images.check_image(blob, "decoy.jpg")
    assert info.value.code == "decoder_mismatch"


def test_check_image_refuses_as_decode_image_does():
    for name, blob in [("t.jpg", ds.truncate(ds.encode(ds.noise(), "JPEG"))), ("e.png", b""),
                       ("g.jpg", ds.encode(ds.noise(), "PNG")), ("a.png", ds.animated_png())]:
        with pytest.raises(ImageRejected) as fast:
            images.check_image(blob, name)
        assert (fast.value.code, fast.value.reason) == (rejected(blob, name).code, rejected(blob, name).reason)


def test_check_image_reports_size_after_orientation():
    info, _ = images.check_image(ds.exif_bytes(ds.halves(20, 40), 8), "r.jpg")
    assert (info.width, info.height, info.exif_orientation) == (20, 40, 8)


def _tiff(order: str, entries: list[tuple[int, int]], count: int | None = None, ifd: int = 8) -> bytes:
    big = order == "big"
    head = (b"MM\x00\x2a" if big else b"II\x2a\x00") + ifd.to_bytes(4, order)
    body = (len(entries) if count is None else count).to_bytes(2, order)
    for tag, value in entries:
        body += (tag.to_bytes(2, order) + (3).to_bytes(2, order) + (1).to_bytes(4, order)
                 + value.to_bytes(2, order) + b"\0\0")
    return head + b"\0" * (ifd - 8) + body


@pytest.mark.parametrize("blob", [
    b"\xff\xd8\xff" + b"Exif\x00\x00" + _tiff("big", [(0x0100, 5), (0x0112, 6)]),
    b"\xff\xd8\xff" + b"Exif\x00\x00" + _tiff("little", [(0x0112, 8)]),
    b"\xff\xd8\xff" + b"Exif\x00\x00" + _tiff("little", [(0x0112, 9)]),  # out of range
    b"\xff\xd8\xff" + b"Exif\x00\x00" + _tiff("little", [(0x0112, 0)]),
    b"\xff\xd8\xff" + b"Exif\x00\x00" + _tiff("little", [(0x0101, 1), (0x0112, 3)], count=1),  # beyond count
    b"\xff\xd8\xff" + b"Exif\x00\x00" + _tiff("big", [(0x0112, 2)], ifd=70000),  # IFD past the block
    b"\xff\xd8\xff" + b"Exif\x00\x00" + _tiff("little", [(0x0112, 7)])[:12],  # cut short
    b"\xff\xd8\xff" + b"Exif\x00\x00" + b"XX\x2a\x00" + b"\0" * 20,  # no TIFF header
    b"\xff\xd8\xff" + b"\0" * 70000 + b"Exif\x00\x00" + _tiff("little", [(0x0112, 6)]),  # past 64 KiB
    b"\x89PNG" + b"\0" * 100 + b"eXIf" + _tiff("big", [(0x0112, 5)]),
    b"\x89PNG" + b"\0" * 100 + b"Exif\x00\x00" + _tiff("big", [(0x0112, 5)]),  # JPEG's marker in a PNG
    b"", b"\xff\xd8\xff",
])
def test_python_mirror_of_tensorflows_orientation_parse_agrees(blob):
    assert images.tensorflow_orientation(blob) == int(images.exif_orientation(tf.constant(blob)))


def test_orientation_ops_match_pillow_for_every_orientation():
    for orientation in range(1, 9):
        blob = ds.exif_bytes(ds.noise(6, 10, seed=orientation), orientation, "PNG")
        np.testing.assert_array_equal(images.decode_tensor(tf.constant(blob)).numpy(), decode_image(blob, "o.png"))


@pytest.mark.parametrize("method", images.RESIZE_METHODS)
def test_resize_image_of_uint8_pixels_equals_resizing_a_float_copy(method):
    """resize_image hands the uint8 pixels to the resize kernel as they are (no float copy of the whole
    picture first); the result is that of resizing the float copy, rounded and clipped, for every method
    (those that never leave 0-255 skip the clipping: a black and white checkerboard, all extremes, checks
    that)."""
    checkerboard = (np.indices((37, 53)).sum(axis=0) % 2 * 255).astype(np.uint8)
    for picture in (tf.constant(ds.noise(37, 53, seed=11)), tf.constant(np.stack([checkerboard] * 3, axis=-1))):
        for size in (16, 24, 64):
            expected = tf.image.resize(tf.cast(picture, tf.float32), (size, size), method=method)
            expected = tf.cast(tf.clip_by_value(tf.round(expected), 0.0, 255.0), tf.uint8)
            np.testing.assert_array_equal(images.resize_image(picture, size, method).numpy(), expected.numpy())
