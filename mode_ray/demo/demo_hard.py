"""The harder demo's domains (`data.demo.difficulty: hard`): many fine-grained, compositional classes in clutter.

The standard demo is easy where MoDE's effect is small (one tiny model reaches ~98% on colour). These four
domains stretch a small model as web data stretches a real one: each task has 26-42 classes that differ in
one attribute of two (a red hexagon against a red cross and an orange hexagon; forty-seven against
forty-one), every image carries distractors (strokes and small shapes in other colours, an occluding
patch), and ~50 training pairs a class in the demo's 8,000. Drawn like the standard domains: deterministic for a
generator, the eval split's handwriting from scans training never sees.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

DOMAINS = ("objects", "numbers", "fabrics", "glyphs")

PALETTE = {  # six hues a 32-pixel model can tell apart, each a pair of neighbours (red/orange, blue/purple…)
    "red": (215, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (230, 200, 30),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 180),
}
OBJECT_SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
FABRIC_PATTERNS = ("stripes", "checks", "dots", "waves", "zigzag", "grid", "rings")
NUMBERS = tuple(range(10, 50))  # two handwritten digits: tens 1-4, units 0-9
NUMBER_WORDS = ("", "", "twenty", "thirty", "forty")
UNIT_WORDS = ("", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEENS = ("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
GLYPHS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def number_word(n: int) -> str:
    if n < 20:
        return TEENS[n - 10]
    tens, units = divmod(n, 10)
    return NUMBER_WORDS[tens] + (f"-{UNIT_WORDS[units]}" if units else "")


CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "object": tuple(f"{c} {s}" for c in PALETTE for s in OBJECT_SHAPES),
    "number": tuple(number_word(n) for n in NUMBERS),
    "fabric": tuple(f"{c} {p}" for c in PALETTE for p in FABRIC_PATTERNS),
    "glyph": tuple(GLYPHS),
}
TASK_TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": ("a {} among clutter.", "a photo of a {}."),
    "number": ("the handwritten number {}.", "a number {} written by hand."),
    "fabric": ("a fabric with a {} pattern.", "{} textile."),
    "glyph": ("the letter {} in a messy scene.", "a capital letter {}."),
}
CAPTIONS: dict[str, tuple[str, ...]] = {
    "objects": (
        "a {object} among clutter",
        "a {color} {shape} with scribbles around it",
        "photo of a {object} on a messy desk",
        "a {shape} painted {color}, other marks nearby",
    ),
    "numbers": (
        "the handwritten number {value}",
        "the number {word} written by hand",
        "a house number {value} scrawled on a wall",
        "handwriting: {word}",
    ),
    "fabrics": (
        "a fabric with a {fabric} pattern",
        "{color} {pattern} textile, partly covered",
        "a swatch of {fabric} cloth",
        "close-up of a {pattern} print in {color}",
    ),
    "glyphs": (
        "the letter {glyph} in a messy scene",
        "a capital {glyph} among scribbles",
        "a tilted letter {glyph}",
        "signage with the character {glyph}",
    ),
}

SIZE = 64


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int = 25) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _background(rng: np.random.Generator) -> Image.Image:
    """A light, uneven background: a gradient between two random pale tones."""
    a, b = rng.integers(175, 250, size=3), rng.integers(175, 250, size=3)
    t = np.linspace(0.0, 1.0, SIZE, dtype=np.float32)
    angle = float(rng.uniform(0, 2 * np.pi))
    ramp = np.clip(0.5 + (np.cos(angle) * (t[None, :] - 0.5) + np.sin(angle) * (t[:, None] - 0.5)), 0, 1)
    arr = a[None, None, :] * (1 - ramp[..., None]) + b[None, None, :] * ramp[..., None]
    return Image.fromarray(arr.astype(np.uint8))


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    """The outline of `shape` (None: a circle, drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "star":
        radii = [r if i % 2 == 0 else r * 0.45 for i in range(10)]
        thetas = [angle + i * np.pi / 5 for i in range(10)]
    elif shape == "cross":
        arm = r * 0.35
        base = [(arm, r), (arm, arm), (r, arm), (r, -arm), (arm, -arm), (arm, -r)]
        base += [(-x, -y) for x, y in base]
        c, s = np.cos(angle), np.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in base]
    else:
        sides = {"square": 4, "triangle": 3, "hexagon": 6}[shape]
        radii = [r] * sides
        thetas = [angle + k * 2 * np.pi / sides for k in range(sides)]
    return [(cx + rr * np.cos(t), cy + rr * np.sin(t)) for rr, t in zip(radii, thetas, strict=True)]


def _shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, fill: Any) -> None:
    points = _polygon(shape, cx, cy, r, angle)
    if points is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(points, fill=fill)


def _random_color(rng: np.random.Generator, other_than: str | None = None) -> tuple[int, ...]:
    names = [c for c in PALETTE if c != other_than]
    return _jitter(PALETTE[names[int(rng.integers(len(names)))]], rng)


def _clutter(img: Image.Image, rng: np.random.Generator, avoid_color: str | None, strokes: int = 3) -> None:
    """Distractors: thin strokes and one or two small shapes, in colours other than the subject's."""
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, strokes + 1))):
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, SIZE, size=4))
        draw.line([(x0, y0), (x1, y1)], fill=_random_color(rng, avoid_color), width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(1, 3))):
        shape = OBJECT_SHAPES[int(rng.integers(len(OBJECT_SHAPES)))]
        cx, cy = (float(v) for v in rng.uniform(4, SIZE - 4, size=2))
        _shape(
            draw,
            shape,
            cx,
            cy,
            float(rng.uniform(3, 6)),
            float(rng.uniform(0, 2 * np.pi)),
            _random_color(rng, avoid_color),
        )


def _noisy(img: Image.Image, rng: np.random.Generator, sigma: float = 8.0) -> Image.Image:
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, sigma, size=(SIZE, SIZE, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def draw_object(rng: np.random.Generator, split: str) -> tuple[Image.Image, dict[str, Any]]:
    color = tuple(PALETTE)[int(rng.integers(len(PALETTE)))]
    shape = OBJECT_SHAPES[int(rng.integers(len(OBJECT_SHAPES)))]
    img = _background(rng)
    _clutter(img, rng, color)
    r = float(rng.uniform(13, 21))
    cx, cy = (float(rng.uniform(r + 1, SIZE - r - 1)) for _ in range(2))
    _shape(ImageDraw.Draw(img), shape, cx, cy, r, float(rng.uniform(0, 2 * np.pi)), _jitter(PALETTE[color], rng))
    return _noisy(img, rng), {"object": f"{color} {shape}", "color": color, "shape": shape}


def draw_number(rng: np.random.Generator, split: str, scans: tuple[np.ndarray, np.ndarray]) -> tuple[Image.Image, dict]:
    """Two real handwritten digits side by side (sklearn's scans; every fifth scan is eval-only)."""
    images, targets = scans
    n = NUMBERS[int(rng.integers(len(NUMBERS)))]
    pool = np.arange(len(images))
    pool = pool[(pool % 5 == 0) if split == "eval" else (pool % 5 != 0)]
    img = _background(rng)
    _clutter(img, rng, None, strokes=2)
    height = int(rng.integers(30, 42))
    width = int(height * rng.uniform(0.6, 0.8))
    x = int(rng.integers(0, SIZE - 2 * width + 1))
    y = int(rng.integers(0, SIZE - height + 1))
    ink = np.array(_jitter((40, 40, 60), rng, 30), dtype=np.float32)
    canvas = np.asarray(img, dtype=np.float32).copy()
    for digit in divmod(n, 10):
        idx = int(rng.choice(pool[targets[pool] == digit]))
        glyph = Image.fromarray((images[idx] * 255).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
        alpha = np.asarray(glyph, dtype=np.float32)[..., None] / 255.0
        dy = int(rng.integers(-2, 3))
        top = min(max(y + dy, 0), SIZE - height)
        region = canvas[top : top + height, x : x + width]
        canvas[top : top + height, x : x + width] = region * (1 - alpha) + ink * alpha
        x += width - int(rng.integers(0, 4))
    out = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    return _noisy(out, rng), {"number": number_word(n), "value": n, "word": number_word(n)}


def draw_fabric(rng: np.random.Generator, split: str) -> tuple[Image.Image, dict[str, Any]]:
    color = tuple(PALETTE)[int(rng.integers(len(PALETTE)))]
    pattern = FABRIC_PATTERNS[int(rng.integers(len(FABRIC_PATTERNS)))]
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    period = float(rng.uniform(12, 22))
    angle = float(rng.uniform(0, np.pi))
    u = xx * np.cos(angle) + yy * np.sin(angle) + float(rng.uniform(0, period))
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    if pattern == "stripes":
        mask = (u % period) < period / 2
    elif pattern == "checks":
        mask = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    elif pattern == "dots":
        mask = ((u % period) - period / 2) ** 2 + ((v % period) - period / 2) ** 2 < (period * 0.3) ** 2
    elif pattern == "waves":
        mask = np.sin(2 * np.pi * (u + 3 * np.sin(2 * np.pi * v / (2 * period))) / period) > 0
    elif pattern == "zigzag":
        mask = ((u + np.abs(((v / period) % 2) - 1) * period) % period) < period / 2
    elif pattern == "grid":
        mask = ((u % period) < period * 0.25) | ((v % period) < period * 0.25)
    else:  # rings around a random centre
        cx, cy = rng.uniform(0, SIZE, size=2)
        mask = (np.hypot(xx - cx, yy - cy) % period) < period / 2
    ink = np.array(_jitter(PALETTE[color], rng), dtype=np.float32)
    ground = np.array(rng.integers(200, 250, size=3), dtype=np.float32)
    img = Image.fromarray(np.where(mask[..., None], ink, ground).astype(np.uint8))
    draw = ImageDraw.Draw(img)  # an occluding patch (a label, a fold): 10-25% of the swatch
    w, h = (int(rng.uniform(18, 32)) for _ in range(2))
    x, y = int(rng.integers(0, SIZE - w)), int(rng.integers(0, SIZE - h))
    draw.rectangle([x, y, x + w, y + h], fill=_random_color(rng, color))
    return _noisy(img, rng, 6.0), {"fabric": f"{color} {pattern}", "color": color, "pattern": pattern}


def draw_glyph(rng: np.random.Generator, split: str, font_of: Any) -> tuple[Image.Image, dict[str, Any]]:
    """A capital of 26, tilted, in a size of 30-48 px, over clutter. `font_of(size)`: the font."""
    glyph = GLYPHS[int(rng.integers(len(GLYPHS)))]
    font = font_of(int(rng.integers(30, 49)))
    layer = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(layer)
    left, top, right, bottom = draw.textbbox((0, 0), glyph, font=font)
    ox = (SIZE - (right - left)) // 2 - left + int(rng.integers(-6, 7))
    oy = (SIZE - (bottom - top)) // 2 - top + int(rng.integers(-6, 7))
    draw.text((ox, oy), glyph, font=font, fill=255)
    layer = layer.rotate(float(rng.uniform(-25, 25)), resample=Image.Resampling.BILINEAR)
    img = _background(rng)
    _clutter(img, rng, None)
    ink = Image.new("RGB", (SIZE, SIZE), _jitter((50, 40, 40), rng, 40))
    img.paste(ink, (0, 0), layer)
    return _noisy(img, rng), {"glyph": glyph}
