"""The built-in multi-domain demo dataset, written as webdataset shards in the MoDE layout.

Four visual domains whose captions also differ (handwritten digits, coloured shapes,
textures, printed letters) plus a few uninformative web-style captions, so caption
clustering has real structure to find and a data expert has something to specialise on.
`difficulty="hard"`: four other domains of many fine-grained, compositional classes in
clutter (mode_ray.demo.demo_hard), where a small model's capacity is stretched.
Deterministic for a seed; `faults=True` adds damage at known places, recorded in
`dataset.json`, so the data pipeline's reject accounting can be checked.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mode_ray.config import EvalTaskConfig, S3Config
from mode_ray.demo import demo_hard
from mode_ray.run_root.ownership import claim, remove_owned_tree, stamp_of
from mode_ray.run_root.storage import MARKER, get_fs, join, read_json
from mode_ray.samples.rejects import Reason

GENERATOR_VERSION = 2
STAMP_WHAT = "demo data"  # what the generator's folders say made them (mode_ray.run_root.ownership)
IMAGE_SIZE = 64
DOMAINS = ("digits", "shapes", "textures", "letters")
WEB_SHARE = 0.05

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 60, 180),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
TEXTURES = ("stripes", "checkerboard", "dots", "waves", "zigzag")
LETTERS = "ACEGKMPRTX"

CAPTIONS: dict[str, tuple[str, ...]] = {
    "digits": (
        "a handwritten digit {digit}",
        "the number {word} written by hand",
        "scanned handwriting of the numeral {digit}",
        "a pen-written {word} on a form",
        "handwritten {digit} from a postal code",
    ),
    "shapes": (
        "a {color} {shape} on a plain background",
        "simple geometric {shape} drawn in {color}",
        "a flat {color} {shape} icon",
        "clip art of a {color} {shape}",
    ),
    "textures": (
        "a seamless {texture} pattern",
        "close-up of fabric with a {texture} pattern",
        "{texture} texture background",
        "wallpaper with a repeating {texture} motif",
    ),
    "letters": (
        "the letter {letter} in bold type",
        "a printed capital {letter}",
        "typography sample showing the character {letter}",
        "the alphabet letter {lower} set in a font",
    ),
}
WEB_CAPTIONS = (
    "IMG_{n}.jpg",
    "click here to see more",
    "untitled",
    "photo {n} of {m}",
    "best price, free shipping",
    "DSC{n}",
    "view full size",
    "image",
)

# Eval tasks built from the class attributes stored in each sample's json.
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "digit": DIGIT_WORDS,
    "shape": SHAPES,
    "color": tuple(COLORS),
    "texture": TEXTURES,
    "letter": tuple(LETTERS),
}
# Prompt templates per task, written for each domain as CLIP benchmark templates are written per dataset
# (e.g. MNIST's 'a photo of the number: "{}".'); they share words with, but are not, the training captions.
TASK_TEMPLATES: dict[str, tuple[str, ...]] = {
    "digit": ("a handwritten digit {}.", "the number {} written by hand."),
    "shape": ("a {} shape.", "a flat {} icon."),
    "color": ("a {} shape.", "something {} on a plain background."),
    "texture": ("a seamless {} pattern.", "{} texture background."),
    "letter": ("the letter {} in bold type.", "a printed capital {}."),
}

FAULT_KINDS: dict[str, Reason] = {
    "missing_image": Reason.MISSING_IMAGE,
    "not_an_image": Reason.NOT_AN_IMAGE,
    "caption_not_utf8": Reason.CAPTION_NOT_UTF8,
    "empty_caption": Reason.EMPTY_CAPTION,
    "bad_json": Reason.BAD_JSON,
    "image_too_large": Reason.IMAGE_TOO_LARGE,
}
TRUNCATED_SHARD_SAMPLES = 6


@dataclass
class Sample:
    key: str
    members: list[tuple[str, bytes]]  # (suffix, payload) in tar order: json first, as in the reference
    domain: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- images


@cache
def _digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 real scans), as 0..1 floats."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


@cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _light_background(rng: np.random.Generator) -> tuple[int, int, int]:
    base = int(rng.integers(215, 250))
    return tuple(int(np.clip(base + rng.integers(-12, 12), 0, 255)) for _ in range(3))  # type: ignore[return-value]


def _add_noise(img: Image.Image, rng: np.random.Generator, sigma: float = 6.0) -> Image.Image:
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, sigma, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _draw_digit(rng: np.random.Generator, split: str) -> tuple[Image.Image, dict[str, Any]]:
    images, targets = _digit_images()
    # Held-out scans for the eval split: every fifth image is eval-only.
    pool = np.arange(len(images))
    pool = pool[(pool % 5 == 0) if split == "eval" else (pool % 5 != 0)]
    idx = int(rng.choice(pool))
    ink = 1.0 - images[idx]
    side = int(rng.integers(40, 56))
    glyph = Image.fromarray((ink * 255).astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC)
    paper = _light_background(rng)
    canvas = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), paper)
    tint = np.array(paper, dtype=np.float32) / 255.0
    glyph_rgb = (np.asarray(glyph, dtype=np.float32)[..., None] / 255.0) * tint[None, None, :] * 255.0
    ox, oy = (int(rng.integers(0, IMAGE_SIZE - side + 1)) for _ in range(2))
    canvas.paste(Image.fromarray(glyph_rgb.astype(np.uint8)), (ox, oy))
    digit = int(targets[idx])
    return _add_noise(canvas, rng), {"digit": DIGIT_WORDS[digit], "digit_value": digit}


def _star(cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = r if i % 2 == 0 else r * 0.45
        theta = angle + i * np.pi / 5
        points.append((cx + radius * np.sin(theta), cy - radius * np.cos(theta)))
    return points


def _draw_shape(rng: np.random.Generator, split: str) -> tuple[Image.Image, dict[str, Any]]:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    color_name = tuple(COLORS)[int(rng.integers(len(COLORS)))]
    fill = tuple(int(np.clip(c + rng.integers(-20, 20), 0, 255)) for c in COLORS[color_name])
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), _light_background(rng))
    draw = ImageDraw.Draw(img)
    r = float(rng.uniform(15, 26))  # 8-13 px at the 32 px models see: the outline stays legible
    cx, cy = (float(rng.uniform(r + 2, IMAGE_SIZE - r - 2)) for _ in range(2))
    angle = float(rng.uniform(0, 2 * np.pi))
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        pts = [(cx + r * np.cos(angle + k * np.pi / 2), cy + r * np.sin(angle + k * np.pi / 2)) for k in range(4)]
        draw.polygon(pts, fill=fill)
    elif shape == "triangle":
        pts = [
            (cx + r * np.cos(angle + k * 2 * np.pi / 3), cy + r * np.sin(angle + k * 2 * np.pi / 3)) for k in range(3)
        ]
        draw.polygon(pts, fill=fill)
    else:
        draw.polygon(_star(cx, cy, r, angle), fill=fill)
    return _add_noise(img, rng, 4.0), {"shape": shape, "color": color_name}


def _draw_texture(rng: np.random.Generator, split: str) -> tuple[Image.Image, dict[str, Any]]:
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    period = float(rng.uniform(12, 24))  # at least 6 px at the 32 px models see: the pattern stays visible
    angle = float(rng.uniform(0, np.pi))
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    phase = float(rng.uniform(0, period))
    if texture == "stripes":
        mask = ((u + phase) % period) < period / 2
    elif texture == "checkerboard":
        mask = (np.floor((u + phase) / period) + np.floor(v / period)) % 2 == 0
    elif texture == "dots":
        du = ((u + phase) % period) - period / 2
        dv = (v % period) - period / 2
        mask = du**2 + dv**2 < (period * 0.3) ** 2
    elif texture == "waves":
        mask = np.sin(2 * np.pi * (u + 3 * np.sin(2 * np.pi * v / (2 * period))) / period) > 0
    else:  # zigzag
        tri = np.abs(((v / period) % 2) - 1) * period
        mask = ((u + tri + phase) % period) < period / 2
    c1 = rng.integers(0, 256, size=3).astype(np.float32)
    c2 = 255.0 - c1 * rng.uniform(0.2, 0.8)
    arr = np.where(mask[..., None], c1, c2)
    return _add_noise(Image.fromarray(arr.astype(np.uint8)), rng, 5.0), {"texture": texture}


def _draw_letter(rng: np.random.Generator, split: str) -> tuple[Image.Image, dict[str, Any]]:
    letter = LETTERS[int(rng.integers(len(LETTERS)))]
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), _light_background(rng))
    draw = ImageDraw.Draw(img)
    font = _font(int(rng.integers(40, 56)))
    left, top, right, bottom = draw.textbbox((0, 0), letter, font=font)
    w, h = right - left, bottom - top
    ox = int(rng.integers(0, max(1, IMAGE_SIZE - w))) - left
    oy = int(rng.integers(0, max(1, IMAGE_SIZE - h))) - top
    ink = tuple(int(c) for c in rng.integers(0, 90, size=3))
    draw.text((ox, oy), letter, font=font, fill=ink)
    return _add_noise(img, rng, 4.0), {"letter": letter}


DRAW = {
    "digits": _draw_digit,
    "shapes": _draw_shape,
    "textures": _draw_texture,
    "letters": _draw_letter,
    "objects": demo_hard.draw_object,
    "numbers": lambda rng, split: demo_hard.draw_number(rng, split, _digit_images()),
    "fabrics": demo_hard.draw_fabric,
    "glyphs": lambda rng, split: demo_hard.draw_glyph(rng, split, _font),
}
CAPTIONS.update(demo_hard.CAPTIONS)
# Each difficulty: its domains, and its zero-shot tasks (class names and templates) over the eval split.
DIFFICULTIES: dict[str, tuple[tuple[str, ...], dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]] = {
    "standard": (DOMAINS, CLASS_NAMES, TASK_TEMPLATES),
    "hard": (demo_hard.DOMAINS, demo_hard.CLASS_NAMES, demo_hard.TASK_TEMPLATES),
}


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# --------------------------------------------------------------------------- captions


def _captions(domain: str, attrs: dict[str, Any], rng: np.random.Generator) -> list[str]:
    """Two distinct phrasings: `caption` is the first, `texts` holds both (the reference's format)."""
    if domain not in DOMAINS:  # the hard domains' attributes are their captions' fields
        fields = attrs
    else:
        fields = {
            "digit": attrs.get("digit_value"),
            "word": attrs.get("digit"),
            "color": attrs.get("color"),
            "shape": attrs.get("shape"),
            "texture": attrs.get("texture"),
            "letter": attrs.get("letter"),
            "lower": str(attrs.get("letter", "")).lower(),
        }
    order = rng.permutation(len(CAPTIONS[domain]))[:2]
    return [CAPTIONS[domain][i].format(**fields) for i in order]


def _web_caption(rng: np.random.Generator) -> str:
    template = WEB_CAPTIONS[int(rng.integers(len(WEB_CAPTIONS)))]
    return template.format(n=int(rng.integers(1000, 9999)), m=int(rng.integers(10, 99)))


def make_sample(key: str, rng: np.random.Generator, split: str, domains: Sequence[str] = DOMAINS) -> Sample:
    """One clean sample: a domain image and its caption (or, rarely, an uninformative web caption)."""
    domain = domains[int(rng.integers(len(domains)))]
    img, attrs = DRAW[domain](rng, split)
    if rng.random() < WEB_SHARE:
        texts = [_web_caption(rng), _web_caption(rng)]
        meta = {"domain": "web", "image_domain": domain, "attributes": attrs}
    else:
        texts = _captions(domain, attrs, rng)
        meta = {"domain": domain, "image_domain": domain, "attributes": attrs}
    record = {"caption": texts[0], "texts": texts, **meta}
    payload = json.dumps(record, sort_keys=True).encode()
    return Sample(key, [("json", payload), ("jpg", _jpeg(img))], meta["domain"], attrs)


def make_fault(kind: str, key: str, rng: np.random.Generator, split: str, max_pixels: int) -> Sample:
    """A damaged sample of a known kind; its expected reject reason is FAULT_KINDS[kind]."""
    clean = make_sample(key, rng, split)
    meta, image = clean.members[0][1], clean.members[1][1]
    if kind == "missing_image":
        members = [("json", meta)]
    elif kind == "not_an_image":
        members = [("json", meta), ("jpg", b"<html><body>404 Not Found</body></html>")]
    elif kind == "caption_not_utf8":
        members = [("json", '{"caption": "caf\u00e9 cr\u00e8me"}'.encode("latin-1")), ("jpg", image)]
    elif kind == "empty_caption":
        members = [("json", json.dumps({"caption": "  ", "texts": [""]}).encode()), ("jpg", image)]
    elif kind == "bad_json":
        members = [("json", b'{"caption": "a red circle", '), ("jpg", image)]
    elif kind == "image_too_large":
        side = int(np.ceil(np.sqrt(max_pixels))) + 16
        members = [("json", meta), ("jpg", _jpeg(Image.new("RGB", (side, side), (128, 128, 128))))]
    else:
        raise ValueError(f"unknown fault kind {kind!r}")
    return Sample(key, members)


# --------------------------------------------------------------------------- shards


def _tar_bytes(samples: list[Sample]) -> bytes:
    """A tar with fixed metadata (mtime, owner) so the same seed gives identical bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for suffix, payload in sample.members:
                info = tarfile.TarInfo(f"{sample.key}.{suffix}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def shard_path(index: int) -> str:
    """The MoDE reference layout: shard i at {i % 100}/{i}.tar."""
    return f"{index % 100}/{index}.tar"


def generate(
    out: str,
    samples: int = 2000,
    shards: int = 8,
    seed: int = 0,
    split: str = "train",
    faults: bool = False,
    max_image_pixels: int = 4_000_000,
    s3: S3Config | None = None,
    domains: Sequence[str] | None = None,
    difficulty: str = "standard",
) -> dict[str, Any]:
    """Write the demo shards under `out` (any fsspec URL) and return the `dataset.json` record. `domains`:
    only these of the difficulty's domains (a system built without one, to grow it later with
    `mode-ray add-data`)."""
    _check_arguments(samples, shards, split, difficulty, domains)
    all_domains, class_names, _ = DIFFICULTIES[difficulty]
    domains = tuple(domains or all_domains)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    prefix = "t" if split == "train" else "e"
    fs, root = get_fs(out, s3)
    empty_for_generation(out, s3)
    per_shard = _clean_shards(samples, shards, prefix, rng, split, domains)
    fault_records = _insert_faults(per_shard, prefix, rng, split, max_image_pixels) if faults else []
    record: dict[str, Any] = {
        "generator_version": GENERATOR_VERSION,
        "split": split,
        "seed": seed,
        "image_size": IMAGE_SIZE,
        "max_image_pixels": max_image_pixels,
        "difficulty": difficulty,
        "class_names": {k: list(v) for k, v in class_names.items()},
        "shards": [],
        "faults": fault_records,
    }
    domain_counts: dict[str, int] = {}
    for s, shard_samples in enumerate(per_shard):
        _write(fs, f"{root}/{shard_path(s)}", _tar_bytes(shard_samples))
        record["shards"].append({"path": shard_path(s), "samples": len(shard_samples)})
        for sample in shard_samples:
            if sample.domain is not None:
                domain_counts[sample.domain] = domain_counts.get(sample.domain, 0) + 1
    intact = _write_truncated_shard(fs, root, shards, prefix, rng, split, domains, record) if faults else []
    record["samples"] = sum(sh["samples"] for sh in record["shards"])
    record["clean_samples"] = sum(domain_counts.values())
    record["fault_samples"] = len(FAULT_KINDS) if faults else 0
    record["lost_samples"] = (TRUNCATED_SHARD_SAMPLES - len(intact)) if faults else 0
    record["domains"] = dict(sorted(domain_counts.items()))
    _write(fs, f"{root}/dataset.json", json.dumps(record, indent=2, sort_keys=True).encode())
    return record


def _check_arguments(samples: int, shards: int, split: str, difficulty: str, domains: Sequence[str] | None) -> None:
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown demo difficulty {difficulty!r}; choose one of {list(DIFFICULTIES)}")
    known = DIFFICULTIES[difficulty][0]
    unknown = sorted(set(domains or ()) - set(known))
    if unknown:
        raise ValueError(f"unknown demo domains {unknown}; the {difficulty} demo has {list(known)}")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if shards > samples:
        raise ValueError(f"{shards} shards for {samples} samples would leave empty shards")


def _clean_shards(
    samples: int, shards: int, prefix: str, rng: np.random.Generator, split: str, domains: tuple[str, ...]
) -> list[list[Sample]]:
    """`samples` clean samples spread evenly over `shards` shards, keys in order."""
    per_shard: list[list[Sample]] = []
    bounds = np.linspace(0, samples, shards + 1).astype(int)
    for s in range(shards):
        keys = range(bounds[s], bounds[s + 1])
        per_shard.append([make_sample(f"{prefix}{i:08d}", rng, split, domains) for i in keys])
    return per_shard


def _insert_faults(
    per_shard: list[list[Sample]], prefix: str, rng: np.random.Generator, split: str, max_image_pixels: int
) -> list[dict[str, Any]]:
    """One damaged sample of each FAULT_KINDS, in the middle of a shard (round robin); their records."""
    fault_records: list[dict[str, Any]] = []
    for j, kind in enumerate(FAULT_KINDS):
        s = j % len(per_shard)
        key = f"{prefix}f{j:07d}"
        position = len(per_shard[s]) // 2
        per_shard[s].insert(position, make_fault(kind, key, rng, split, max_image_pixels))
        fault_records.append({"kind": kind, "key": key, "shard": shard_path(s), "reason": str(FAULT_KINDS[kind])})
    return fault_records


def _write_truncated_shard(
    fs: Any,
    root: str,
    s: int,
    prefix: str,
    rng: np.random.Generator,
    split: str,
    domains: tuple[str, ...],
    record: dict[str, Any],
) -> list[str]:
    """One more shard (index `s`), cut off in the middle of a sample's image: a download that died. Added to
    the record's shards and faults; returns the keys before the cut."""
    truncated = [make_sample(f"{prefix}t{i:07d}", rng, split, domains) for i in range(TRUNCATED_SHARD_SAMPLES)]
    blob = _tar_bytes(truncated)
    cut = _offset_inside_last_image(blob)
    _write(fs, f"{root}/{shard_path(s)}", blob[:cut])
    record["shards"].append({"path": shard_path(s), "samples": len(truncated)})
    intact = [smp.key for smp in truncated[:-1]]
    record["faults"].append(
        {
            "kind": "truncated_tar",
            "shard": shard_path(s),
            "keys": [smp.key for smp in truncated],
            "intact_keys": intact,
            "reason": str(Reason.UNREADABLE_SHARD),
        }
    )
    return intact


def made_by_generator(url: str, s3: S3Config | None = None) -> bool:
    """Whether a folder is the generator's own: its stamp, or (from before stamps) the demo stage's marker,
    whose settings start with the generator version and the split."""
    stamp = stamp_of(url, s3)
    if stamp is not None:
        return stamp.get("what") == STAMP_WHAT
    try:
        settings = str(read_json(join(url, MARKER), s3).get("config_hash", ""))
    except (OSError, ValueError, AttributeError):
        return False
    return re.match(r"^\d+/(train|eval)/", settings) is not None


def empty_for_generation(out: str, s3: S3Config | None = None) -> None:
    """Generate only where nothing else lives: a new or empty folder, or one the generator made (emptied
    first, so fewer shards never leave stale ones behind). Anyone else's data is refused, untouched."""
    remove_owned_tree(out, s3, owned=made_by_generator, what=STAMP_WHAT)
    claim(out, STAMP_WHAT, s3)


def _offset_inside_last_image(blob: bytes) -> int:
    """Byte offset halfway through the last member's data."""
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + last.size // 2


def _write(fs: Any, path: str, payload: bytes) -> None:
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(payload)


def eval_tasks(shards: str | list[str], difficulty: str = "standard") -> list[EvalTaskConfig]:
    """The demo's zero-shot tasks over its eval split: the label is an attribute in each sample's json."""
    _, class_names, templates = DIFFICULTIES[difficulty]
    return [
        EvalTaskConfig(
            name=task,
            source="webdataset",
            location=shards,
            label_field=f"attributes.{task}",
            class_names=list(names),
            templates=list(templates[task]),
        )
        for task, names in class_names.items()
    ]
