"""Synthetic photo-like JPEGs for the benchmarks: 10 classes of distinct pictures, about 500x375 pixels.

    from synthetic import write_photos      # with benchmarks/ on sys.path
    write_photos(Path("work/photos"), 2000)  # work/photos/class_00/img_000000.jpg ...

Pictures are shaped like those of common photo data sets (Caltech-101, Pascal VOC, TF flowers):
mostly 500 pixels wide, landscape, 30-90 KB at JPEG quality 80-95. Each class has its own colours;
each picture is a random crop of one of a few class scenes, maybe mirrored, with its own brightness,
sensor noise and JPEG quality, so that no two files are alike (validation would keep duplicates in
one split) and JPEG works as hard as on photos. The same (images, seed) always gives the same files.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

NUM_CLASSES = 10
# (width, height) of typical photo data sets; most are 500 wide, landscape.
SIZES = ((500, 375), (500, 375), (500, 375), (500, 333), (375, 500), (500, 400), (480, 360), (500, 281))
SCENE = (640, 560)  # larger than every picture, so that crops from one scene differ
SCENES_PER_CLASS = 4
SEED = 20240601
# Bumped whenever the pictures drawn for a given (images, seed) change, so old folders are redrawn.
GENERATOR_VERSION = 4
# Pictures drawn per task: each task pays for its class's scenes once.
_CHUNK = 250


def write_photos(folder: Path, images: int, seed: int = SEED) -> None:
    """Write ``images`` JPEGs into ``folder/class_NN/img_NNNNNN.jpg`` (10 classes, as even as possible).

    A folder already holding exactly this set (same count, seed and generator, every file present,
    nothing else) is reused as it is; anything else in ``folder`` is replaced. A stamp file next to
    the folder (``<folder>.synthetic.json``) records what it holds, so that the folder itself holds
    only the pictures.
    """
    folder = Path(folder)
    if images < NUM_CLASSES:
        raise ValueError(f"images must be at least {NUM_CLASSES} (one per class), got {images}")
    stamp = folder.with_name(folder.name + ".synthetic.json")
    wanted = {"images": images, "seed": seed, "generator": GENERATOR_VERSION}
    expected = {f"{_class_name(c)}/{_file_name(i)}" for c, count in enumerate(_per_class(images))
                for i in range(count)}
    if stamp.exists() and json.loads(stamp.read_text()) == wanted and _listing(folder) == expected:
        return
    stamp.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    tasks = [(folder, seed, c, start, min(_CHUNK, count - start))
             for c, count in enumerate(_per_class(images)) for start in range(0, count, _CHUNK)]
    # Threads, not processes: Pillow's JPEG encoder and NumPy's large-array work release the GIL,
    # and callers may already run TensorFlow, whose threads make fork() unsafe.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(_write_chunk, tasks))  # list() re-raises the first failure
    stamp.write_text(json.dumps(wanted))


def _class_name(index: int) -> str:
    return f"class_{index:02d}"


def _file_name(index: int) -> str:
    return f"img_{index:06d}.jpg"


def _per_class(total: int) -> list[int]:
    base, extra = divmod(total, NUM_CLASSES)
    return [base + (1 if c < extra else 0) for c in range(NUM_CLASSES)]


def _listing(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}


def _smooth_noise(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Fractal noise [H, W] in about [-1, 1]: octaves whose amplitude halves as the frequency doubles.

    Natural images have such a falling spectrum, so JPEG compresses these scenes about as it does photos
    (unlike white noise, which does not compress, or flat colour, which compresses to nothing).
    """
    field = np.zeros((height, width), np.float32)
    for octave in range(7):
        cells = 2 ** (octave + 1)
        small = rng.normal(0.0, 1.0, (max(2, cells * height // width), cells)).astype(np.float32)
        layer = Image.fromarray(small, mode="F").resize((width, height), Image.Resampling.BICUBIC)
        field += np.asarray(layer) * 0.55 ** octave
    return field / np.abs(field).max()


def _scene(rng: np.random.Generator, class_index: int) -> np.ndarray:
    """One class-coloured scene (uint8 RGB, SCENE sized): shading, fine texture and soft-edged shapes."""
    width, height = SCENE
    hue = np.array([np.cos(class_index * 0.63), np.cos(class_index * 0.63 + 2.1), np.cos(class_index * 0.63 + 4.2)])
    base = 128 + 60 * hue
    colour = np.stack([_smooth_noise(rng, width, height) for _ in range(3)], axis=-1)
    shade = _smooth_noise(rng, width, height)[..., None]
    # Detail a few pixels across (foliage, fabric, gravel), stronger in some parts of the scene than others:
    # it is what makes a photo's JPEG 40-100 KB rather than 10.
    fine = rng.normal(0.0, 1.0, (height // 3, width // 3)).astype(np.float32)
    fine = np.asarray(Image.fromarray(fine, mode="F").resize((width, height), Image.Resampling.BICUBIC))
    strength = 0.5 + 0.5 * _smooth_noise(rng, width, height)
    pixels = base + 45 * colour + 40 * shade + (50 * fine * strength)[..., None]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 14))):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(30, 200)), int(rng.integers(30, 200))
        fill = tuple(int(c) for c in np.clip(base[::-1] + rng.normal(0, 50, 3), 0, 255))
        if rng.random() < 0.5:
            draw.ellipse((x, y, x + w, y + h), fill=fill)
        else:
            draw.polygon([(x, y), (x + w, y + int(rng.integers(0, h))), (x + int(rng.integers(0, w)), y + h)],
                         fill=fill)
    return np.asarray(image.filter(ImageFilter.GaussianBlur(0.5)))


def _write_chunk(task: tuple[Path, int, int, int, int]) -> None:
    """Write pictures ``start`` to ``start + count - 1`` of one class.

    Pictures are cheap to make and all distinct: a random crop of one of a few scenes, maybe mirrored,
    with its own brightness, sensor noise (a random window of one precomputed noise field) and JPEG
    quality. Every random draw comes from generators seeded by (seed, class, start), so a picture does
    not depend on which thread drew it.
    """
    folder, seed, class_index, start, count = task
    rng = np.random.default_rng([seed, class_index, start])
    scenes = [_scene(np.random.default_rng([seed, class_index, s]), class_index) for s in range(SCENES_PER_CLASS)]
    noise = rng.normal(0.0, 4.0, (SCENE[1] + 64, SCENE[0] + 64, 3)).astype(np.int16)
    target = folder / _class_name(class_index)
    target.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        width, height = SIZES[int(rng.integers(len(SIZES)))]
        scene = scenes[int(rng.integers(SCENES_PER_CLASS))]
        x, y = int(rng.integers(0, SCENE[0] - width + 1)), int(rng.integers(0, SCENE[1] - height + 1))
        crop = scene[y:y + height, x:x + width].astype(np.int16)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        nx, ny = int(rng.integers(0, 64)), int(rng.integers(0, 64))
        pixels = crop + noise[ny:ny + height, nx:nx + width] + int(rng.integers(-20, 21))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            target / _file_name(i), "JPEG", quality=int(rng.integers(80, 96)))
