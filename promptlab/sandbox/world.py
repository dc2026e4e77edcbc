"""The sandbox world: one object per image, rendered with PIL from a seed, and captions about it.

A scene is a handful of named attributes (shape, colour, size, pattern, position, background);
``render`` draws it and ``caption`` describes it in one of many wordings. Both are pure functions of
their arguments and a ``random.Random``, so a seed string fixes every pixel and every word on any
machine. A :class:`Style` changes *how* a scene is drawn without changing *what* it shows (noise,
clutter, a colour cast, outlines, blur): pretraining uses the clean style, the sandbox datasets a
shifted one, which is the distribution shift that gives prompt learning something to learn.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "orange": (240, 130, 30),
    "yellow": (235, 210, 40),
    "green": (40, 160, 60),
    "cyan": (40, 200, 210),
    "blue": (40, 70, 215),
    "purple": (130, 50, 180),
    "pink": (240, 120, 190),
    "brown": (125, 80, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "heart")
SIZES = {"small": (0.14, 0.2), "medium": (0.22, 0.28), "large": (0.3, 0.38)}  # radius / image side
PATTERNS = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (235, 235, 235),
    "grey": (128, 128, 128),
    "black": (25, 25, 25),
    "beige": (225, 205, 165),
    "dark blue": (20, 30, 70),
}
POSITIONS = ("center", "left", "right", "top", "bottom")


@dataclass(frozen=True)
class Scene:
    """What an image shows; every field is a word or phrase that captions may use."""

    shape: str
    colour: str
    size: str = "medium"
    pattern: str = "plain"
    position: str = "center"
    background: str = "grey"


@dataclass(frozen=True)
class Style:
    """How a scene is drawn. The default is the clean pretraining style.

    Attributes:
        noise: standard deviation of Gaussian pixel noise, in 0-255 units.
        clutter: maximum number of small distractor shapes (other colours) drawn behind the object.
        cast: strength (0-1) of a random global colour cast, as under coloured light.
        outline: probability that the object is drawn as a thick outline instead of filled.
        blur: maximum Gaussian blur radius, in pixels of the final image.
        jitter: per-channel jitter of the object's colour, in 0-255 units.
        texture: strength (0-1) of a random low-frequency texture on the background.
        tint: fixed per-channel multipliers (R, G, B) applied to every image of the style, as under a
            lamp of one colour: a *systematic* shift, the same for every image, that a learned prompt can
            adapt to, unlike ``cast``, which is drawn per image. ``None``: no tint.
    """

    noise: float = 0.0
    clutter: int = 0
    cast: float = 0.0
    outline: float = 0.0
    blur: float = 0.0
    jitter: int = 20
    texture: float = 0.0
    tint: tuple[float, float, float] | None = None


CLEAN = Style()


def recorded_style(style: Style) -> dict:
    """The style's fields as a generated dataset records them (a change regenerates the dataset).

    ``tint`` is left out while unset, so that datasets written before the field existed stay up to date.
    """
    fields = dict(vars(style))
    if fields["tint"] is None:
        del fields["tint"]
    return fields


def sample_scene(
    rng: random.Random,
    *,
    shapes: tuple[str, ...] = SHAPES,
    colours: tuple[str, ...] = tuple(COLOURS),
) -> Scene:
    """A random scene; the background is never the object's own colour (it would vanish)."""
    colour = rng.choice(colours)
    backgrounds = [b for b in BACKGROUNDS if b != colour]
    return Scene(
        shape=rng.choice(shapes),
        colour=colour,
        size=rng.choice(tuple(SIZES)),
        pattern=rng.choice(PATTERNS) if rng.random() < 0.5 else "plain",
        position=rng.choice(POSITIONS),
        background=rng.choice(backgrounds),
    )


def checkerboard(n_rows: int, n_cols: int) -> list[tuple[int, int]]:
    """The cells of an ``n_rows`` x ``n_cols`` grid, those with even ``i + j`` first, then the rest.

    Classes listed in this order split into a base half (the first ``ceil(n/2)``) and a new half that
    each hold every row word and every column word (both sizes >= 2): "new" classes are new
    combinations of known words, the compositional generalisation base-to-new evaluation measures.
    """
    cells = [(i, j) for i in range(n_rows) for j in range(n_cols)]
    return sorted(cells, key=lambda c: ((c[0] + c[1]) % 2, c))


def class_scene(classname: str, rng: random.Random) -> Scene:
    """A scene of the class ``"<colour> <shape>"``: random size, pattern, position, and a background
    of another colour. What the sandbox and synthetic datasets draw for each image."""
    colour, shape = classname.split(" ", 1)
    return Scene(
        shape=shape,
        colour=colour,
        size=rng.choice(tuple(SIZES)),
        pattern=rng.choice(PATTERNS) if rng.random() < 0.5 else "plain",
        position=rng.choice(POSITIONS),
        background=rng.choice([b for b in BACKGROUNDS if b != colour]),
    )


def _clip(v: float) -> int:
    return int(min(255, max(0, round(v))))


def _jitter(rgb: tuple[int, int, int], amount: int, rng: random.Random) -> tuple[int, int, int]:
    return tuple(_clip(c + rng.uniform(-amount, amount)) for c in rgb)  # type: ignore[return-value]


def _outline_points(
    shape: str, cx: float, cy: float, r: float, rot: float
) -> list[tuple[float, float]] | None:
    """Polygon vertices of a shape, or None for the shapes drawn with other primitives."""

    def ring(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
        return [
            (
                cx + radius * math.cos(phase + 2 * math.pi * k / n),
                cy + radius * math.sin(phase + 2 * math.pi * k / n),
            )
            for k in range(n)
        ]

    if shape == "square":
        return ring(4, r * 1.15, math.pi / 4 + rot)
    if shape == "triangle":
        return ring(3, r * 1.1, -math.pi / 2 + rot)
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.65 * r, cy), (cx, cy + r), (cx - 0.65 * r, cy)]
    if shape == "hexagon":
        return ring(6, r, rot)
    if shape == "star":
        outer, inner = (
            ring(5, r * 1.1, -math.pi / 2 + rot),
            ring(5, r * 0.45, -math.pi / 2 + math.pi / 5 + rot),
        )
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":
        a, b = r, r * 0.36
        return [
            (cx - b, cy - a),
            (cx + b, cy - a),
            (cx + b, cy - b),
            (cx + a, cy - b),
            (cx + a, cy + b),
            (cx + b, cy + b),
            (cx + b, cy + a),
            (cx - b, cy + a),
            (cx - b, cy + b),
            (cx - a, cy + b),
            (cx - a, cy - b),
            (cx - b, cy - b),
        ]
    return None


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    r: float,
    fill,
    *,
    width: int = 0,
    rot: float = 0.0,
) -> None:
    """Draw a filled shape (``width == 0``) or its outline of the given width, on a mask or an image."""
    pts = _outline_points(shape, cx, cy, r, rot)
    if shape == "circle":
        box = [cx - r, cy - r, cx + r, cy + r]
        draw.ellipse(box, fill=None if width else fill, outline=fill if width else None, width=width)
    elif shape == "heart":
        lobe = r * 0.52
        if width:
            draw.ellipse(
                [cx - 2 * lobe, cy - r * 0.75, cx, cy - r * 0.75 + 2 * lobe], outline=fill, width=width
            )
            draw.ellipse(
                [cx, cy - r * 0.75, cx + 2 * lobe, cy - r * 0.75 + 2 * lobe], outline=fill, width=width
            )
            draw.line(
                [
                    (cx - 2 * lobe + width / 2, cy - 0.1 * r),
                    (cx, cy + r),
                    (cx + 2 * lobe - width / 2, cy - 0.1 * r),
                ],
                fill=fill,
                width=width,
            )
        else:
            draw.ellipse([cx - 2 * lobe, cy - r * 0.75, cx, cy - r * 0.75 + 2 * lobe], fill=fill)
            draw.ellipse([cx, cy - r * 0.75, cx + 2 * lobe, cy - r * 0.75 + 2 * lobe], fill=fill)
            draw.polygon(
                [(cx - 2 * lobe + 1, cy - 0.1 * r), (cx + 2 * lobe - 1, cy - 0.1 * r), (cx, cy + r)],
                fill=fill,
            )
    elif pts is not None:
        if width:
            draw.line(pts + [pts[0]], fill=fill, width=width, joint="curve")
        else:
            draw.polygon(pts, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _pattern_mask(pattern: str, s: int, rng: random.Random) -> Image.Image | None:
    """A 0/255 mask where the pattern's second colour shows, or None for a plain object."""
    if pattern == "plain":
        return None
    m = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(m)
    period = s // rng.randint(6, 9)
    off = rng.randrange(period)
    if pattern == "striped":
        for x in range(-s, 2 * s, period):
            d.polygon(
                [
                    (x + off, 0),
                    (x + off + period // 2, 0),
                    (x + off + period // 2 - s // 2, s),
                    (x + off - s // 2, s),
                ],
                fill=255,
            )
    elif pattern == "dotted":
        rad = period * 0.28
        for y in range(off, s, period):
            for x in range(off, s, period):
                d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=255)
    elif pattern == "checkered":
        for i, y in enumerate(range(0, s, period)):
            for j, x in enumerate(range(0, s, period)):
                if (i + j) % 2 == 0:
                    d.rectangle([x, y, x + period - 1, y + period - 1], fill=255)
    else:
        raise ValueError(f"unknown pattern {pattern!r}; known: {PATTERNS}")
    return m


def _centre(position: str, r: float, s: int, rng: random.Random) -> tuple[float, float]:
    lo, hi, mid = r + 1, s - r - 1, s / 2
    span = max(0.0, (hi - lo) * 0.12)
    near = {"left": lo + rng.uniform(0, span), "right": hi - rng.uniform(0, span)}
    far = {"top": lo + rng.uniform(0, span), "bottom": hi - rng.uniform(0, span)}
    wobble = max(1.0, (hi - lo) * 0.1)
    cx = near.get(position, mid + rng.uniform(-wobble, wobble))
    cy = far.get(position, mid + rng.uniform(-wobble, wobble))
    return cx, cy


def backdrop(
    background: str,
    colour: str,
    s: int,
    style: Style,
    rng: random.Random,
    *,
    clutter_size: tuple[float, float] = (0.05, 0.1),
) -> Image.Image:
    """The ``s`` x ``s`` background behind an object of ``colour``: jittered, optionally textured,
    with up to ``style.clutter`` small distractor shapes of other colours (radius ``clutter_size`` x ``s``)."""
    img = Image.new("RGB", (s, s), _jitter(BACKGROUNDS[background], 12, rng))
    if style.texture > 0:
        coarse = (
            np.random.default_rng(rng.getrandbits(63)).normal(128, 64, (8, 8)).clip(0, 255).astype(np.uint8)
        )
        tex = (
            np.asarray(Image.fromarray(coarse).resize((s, s), Image.Resampling.BICUBIC), dtype=np.float32)
            - 128
        )
        arr = np.asarray(img, dtype=np.float32) + style.texture * rng.uniform(0.3, 1.0) * tex[..., None]
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(0, style.clutter)):
        other = rng.choice([c for c in COLOURS if c not in (colour, background)])
        rr = rng.uniform(*clutter_size) * s
        _draw_shape(
            draw,
            rng.choice(SHAPES),
            rng.uniform(rr, s - rr),
            rng.uniform(rr, s - rr),
            rr,
            _jitter(COLOURS[other], 20, rng),
            rot=rng.uniform(0, 0.5),
        )
    return img


def fill_object(
    img: Image.Image,
    shape: str,
    colour: str,
    pattern: str,
    fg: tuple[int, int, int],
    pose: tuple[float, float, float, float],
    rng: random.Random,
) -> Image.Image:
    """Paint a filled ``shape`` of colour ``fg`` at ``pose = (cx, cy, radius, rotation)`` onto ``img``,
    with its ``pattern`` in a contrasting second colour; returns the object's "L" mask."""
    cx, cy, r, rot = pose
    s = img.size[0]
    mask = Image.new("L", (s, s), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, cx, cy, r, 255, rot=rot)
    img.paste(fg, mask=mask)
    pat = _pattern_mask(pattern, s, rng)
    if pat is not None:
        second = (255, 255, 255) if sum(COLOURS[colour]) < 450 else (30, 30, 30)
        both = Image.fromarray((np.asarray(mask) // 255 * np.asarray(pat)).astype(np.uint8))
        img.paste(_jitter(second, 10, rng), mask=both)
    return mask


def render(scene: Scene, rng: random.Random, *, size: int = 64, style: Style = CLEAN) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image.

    Drawn at 4x and downsampled so edges are anti-aliased like a photograph's. The randomness
    (exact radius, position, rotation, colour jitter, style effects) all comes from ``rng``.
    """
    scale = 4
    s = size * scale
    img = backdrop(scene.background, scene.colour, s, style, rng)
    draw = ImageDraw.Draw(img)

    lo, hi = SIZES[scene.size]
    r = rng.uniform(lo, hi) * s
    cx, cy = _centre(scene.position, r, s, rng)
    rot = rng.uniform(-0.25, 0.25)
    fg = _jitter(COLOURS[scene.colour], style.jitter, rng)
    if rng.random() < style.outline:
        _draw_shape(draw, scene.shape, cx, cy, r, fg, width=max(2, int(s * 0.04)), rot=rot)
    else:
        fill_object(img, scene.shape, scene.colour, scene.pattern, fg, (cx, cy, r, rot), rng)

    img = img.resize((size, size), Image.Resampling.LANCZOS)
    if style.blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0, style.blur)))
    if style.cast > 0 or style.noise > 0 or style.tint:
        arr = np.asarray(img, dtype=np.float32)
        if style.tint:
            arr = arr * np.asarray(style.tint, dtype=np.float32)
        if style.cast > 0:
            tint = np.array([rng.uniform(1 - style.cast, 1 + style.cast) for _ in range(3)], dtype=np.float32)
            arr = arr * tint
        if style.noise > 0:
            nrng = np.random.default_rng(rng.getrandbits(63))
            arr = arr + nrng.normal(0, style.noise, arr.shape)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


# ---------------------------------------------------------------------------------------- captions
_TEMPLATES = (
    "a photo of a {obj}.",
    "a photo of a {obj}.",
    "a {obj}.",
    "{obj}",
    "a picture of a {obj}.",
    "an image of a {obj}.",
    "a rendering of a {obj}.",
    "a drawing of a {obj}.",
    "there is a {obj} in the picture.",
    "a {obj} in the image.",
    "this is a {obj}.",
    "a close-up photo of a {obj}.",
    "a low resolution photo of a {obj}.",
    "a simple computer graphic showing a {obj}.",
)


def caption(scene: Scene, rng: random.Random) -> str:
    """Describe ``scene`` in one of many wordings.

    The colour and the shape are always named (they are what the sandbox datasets classify);
    size, pattern, position and background are each mentioned with some probability and in some
    order, so the text tower learns words, not sentence positions.
    """
    adjectives = [scene.colour]
    if rng.random() < 0.35:
        adjectives.insert(0, scene.size)
    if scene.pattern != "plain" and rng.random() < 0.6:
        adjectives.append(scene.pattern)
    obj = " ".join(adjectives + [scene.shape])
    extras = []
    if rng.random() < 0.3:
        extras.append(
            rng.choice((f"on the {scene.position}", f"at the {scene.position}"))
            if scene.position != "center"
            else "in the center"
        )
    if rng.random() < 0.3:
        extras.append(
            rng.choice((f"on a {scene.background} background", f"against a {scene.background} background"))
        )
    if rng.random() < 0.1:
        extras.append(
            "with a plain pattern" if scene.pattern == "plain" else f"with a {scene.pattern} pattern"
        )
    rng.shuffle(extras)
    template = rng.choice(_TEMPLATES)
    text = template.format(obj=obj)
    if extras:
        tail = " " + " ".join(extras)
        text = text[:-1] + tail + "." if text.endswith(".") else text + tail
    return _fix_articles(text)


def _fix_articles(text: str) -> str:
    """'a orange' -> 'an orange': the captions read as English, as real alt-text does."""
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] in ("a", "an"):
            words[i] = "an" if words[i + 1][:1] in "aeiou" else "a"
    return " ".join(words)


def with_style(style: Style, **changes: float) -> Style:
    """A copy of ``style`` with some fields changed (for tuning the shift from a recipe or a test)."""
    return replace(style, **changes)
