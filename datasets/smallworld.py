"""Small world: a procedural world of captioned 32x32 images for pretraining a small CLIP.

One scene is a frozen :class:`Scene` (what is there); :func:`render` turns it into pixels and
:func:`caption` into one of many natural sentences ("two small dark blue stars on a striped
background", "an aerial view of a river"). Everything is drawn with Pillow masks and NumPy
patterns, deterministic for a given ``numpy.random.Generator``, and fast enough to make
every pretraining batch on the fly (no files).

The same scenes, constrained per class, make the downstream tasks (:data:`TASKS`): each task
maps a label to a scene, so ``generate_dataset`` writes it in the standard split-file layout
like any other catalog entry. Tasks are built so that a hand-written template is *not*
enough: fine-grained shades the captions seldom
name, satellite class names the captions seldom use, counting, distractor objects, and
renderings (inverted colours) that pretraining never showed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "ring", "moon", "arrow",
)  # fmt: skip
HUES: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 50),
    "cyan": (30, 210, 220),
    "blue": (35, 70, 225),
    "purple": (140, 45, 190),
    "pink": (245, 120, 190),
    "brown": (130, 80, 35),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
}
CHROMATIC: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
SHADES: tuple[str, ...] = ("light", "", "dark")  # "" = the plain hue
SIZES: tuple[str, ...] = ("small", "medium", "large")
FILLS: tuple[str, ...] = ("solid", "outlined", "striped", "dotted", "checkered")
PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered", "grid", "wavy", "gradient", "noisy")
POSITIONS: tuple[str, ...] = ("center", "left", "right", "top", "bottom")
STYLES: tuple[str, ...] = ("photo", "sketch", "cartoon", "noisy", "inverted")
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four", "five")
LAND: dict[str, tuple[str, ...]] = {  # satellite scene kind -> caption words, task name first
    "annual crop land": ("annual crop land", "crop fields", "farmland", "fields"),
    "permanent crop land": ("permanent crop land", "an orchard", "rows of trees", "a vineyard"),
    "pasture land": ("pasture land", "a pasture", "a meadow", "grassland"),
    "herbaceous vegetation land": ("herbaceous vegetation land", "shrubland", "wild vegetation", "scrub"),
    "forest": ("forest", "a forest", "woodland", "dense trees"),
    "highway or road": ("highway or road", "a highway", "a road", "a motorway"),
    "river": ("river", "a river", "a stream", "a winding river"),
    "sea or lake": ("sea or lake", "a lake", "the sea", "open water"),
    "residential buildings": ("residential buildings", "a town", "houses", "a suburb"),
    "industrial buildings": ("industrial buildings", "a factory", "warehouses", "an industrial area"),
}
SUPERSAMPLE = 2  # draw at 2x and downsample, for smooth edges at 32 px


@dataclass(frozen=True)
class Thing:
    """One kind of object in a scene (``count`` copies of it)."""

    shape: str
    hue: str
    shade: str = ""
    size: str = "medium"
    fill: str = "solid"
    count: int = 1


@dataclass(frozen=True)
class Scene:
    """What an image shows. ``kind`` is "objects", "texture" or "satellite"."""

    kind: str = "objects"
    thing: Thing | None = None
    distractor: Thing | None = None
    background: str = "plain"
    bg_hue: str = "white"
    bg_hue2: str = "gray"
    position: str = "center"
    style: str = "photo"
    land: str = ""
    land2: str = ""  # satellite: a second land use covering part of the tile (tasks only)


# ---------------------------------------------------------------------------- colours
def rgb(hue: str, shade: str = "") -> np.ndarray:
    """RGB (float, 0-255) of a hue word and shade ("light", "", "dark")."""
    c = np.asarray(HUES[hue], dtype=np.float32)
    if shade == "light":
        return 0.45 * c + 0.55 * 255.0
    if shade == "dark":
        return 0.45 * c
    return c


# ---------------------------------------------------------------------------- patterns
def pattern(name: str, c1: np.ndarray, c2: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """An ``(n, n, 3)`` float image of texture ``name`` in colours ``c1`` (ink) on ``c2``."""
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    period = n / 8.0 * rng.uniform(0.8, 1.2)
    phase = rng.uniform(0, period)
    angle = rng.choice([0.0, 45.0, 90.0, 135.0])
    u = x * np.cos(np.radians(angle)) + y * np.sin(np.radians(angle)) + phase
    if name == "plain":
        ink = np.zeros((n, n), bool)
    elif name == "striped":
        ink = (u % period) < period / 2
    elif name == "dotted":
        p = period * 0.9
        ink = ((x + phase) % p - p / 2) ** 2 + ((y + phase) % p - p / 2) ** 2 < (p * 0.22) ** 2
    elif name == "checkered":
        p = period * 0.6
        ink = (((x + phase) // p + (y + phase) // p) % 2) == 0
    elif name == "grid":
        p = period * 0.8
        w = max(1.0, p * 0.18)
        ink = (((x + phase) % p) < w) | (((y + phase) % p) < w)
    elif name == "wavy":
        v = -x * np.sin(np.radians(angle)) + y * np.cos(np.radians(angle))
        ink = ((u + 0.12 * n * np.sin(v * 2 * np.pi / (n / 2.5))) % period) < period / 2
    elif name == "gradient":
        t = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
        return (1 - t)[..., None] * c2 + t[..., None] * c1
    elif name == "noisy":
        blocks = rng.random((n // 4 + 1, n // 4 + 1)) < 0.5
        ink = np.kron(blocks, np.ones((4, 4), bool))[:n, :n]
    else:
        raise ValueError(f"unknown pattern {name!r}; known: {', '.join(PATTERNS)}")
    return np.where(ink[..., None], c1, c2)


# ---------------------------------------------------------------------------- shapes
def _polygon(
    cx: float, cy: float, r: float, k: int, rot: float, inner: float = 1.0
) -> list[tuple[float, float]]:
    pts = []
    for i in range(k * (2 if inner != 1.0 else 1)):
        a = rot + np.pi * 2 * i / (k * (2 if inner != 1.0 else 1)) - np.pi / 2
        rr = r if (i % 2 == 0 or inner == 1.0) else r * inner
        pts.append((cx + rr * np.cos(a), cy + rr * np.sin(a)))
    return pts


def shape_mask(shape: str, cx: float, cy: float, r: float, rot: float, n: int) -> np.ndarray:
    """Boolean ``(n, n)`` mask of ``shape`` centred at (cx, cy) with radius r (pixels)."""
    img = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(img)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=255)
    elif shape == "square":
        d.polygon(_polygon(cx, cy, r * 1.2, 4, rot + np.pi / 4), fill=255)
    elif shape == "triangle":
        d.polygon(_polygon(cx, cy, r * 1.15, 3, rot), fill=255)
    elif shape == "star":
        d.polygon(_polygon(cx, cy, r * 1.15, 5, rot, inner=0.42), fill=255)
    elif shape == "cross":
        t = 0.34 * r
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=255)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=255)
    elif shape == "diamond":
        d.polygon(
            [(cx, cy - 1.15 * r), (cx + 0.7 * r, cy), (cx, cy + 1.15 * r), (cx - 0.7 * r, cy)], fill=255
        )
    elif shape == "hexagon":
        d.polygon(_polygon(cx, cy, r, 6, rot), fill=255)
    elif shape == "ring":
        d.ellipse(box, fill=255)
        h = 0.55 * r
        d.ellipse([cx - h, cy - h, cx + h, cy + h], fill=0)
    elif shape == "moon":
        d.ellipse(box, fill=255)
        o = 0.55 * r
        d.ellipse([cx - r + o, cy - r - 0.2 * o, cx + r + o, cy + r - 0.2 * o], fill=0)
    elif shape == "arrow":
        t = 0.3 * r
        pts = [
            (-r, -t),
            (0.1 * r, -t),
            (0.1 * r, -0.8 * r),
            (r, 0),
            (0.1 * r, 0.8 * r),
            (0.1 * r, t),
            (-r, t),
        ]
        c, s = np.cos(rot), np.sin(rot)
        d.polygon([(cx + c * px - s * py, cy + s * px + c * py) for px, py in pts], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return np.asarray(img) > 127


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    inner = np.asarray(img.filter(ImageFilter.MinFilter(2 * width + 1))) > 127
    return mask & ~inner


_RADIUS = {"small": (0.09, 0.12), "medium": (0.15, 0.19), "large": (0.25, 0.31)}
_REGION = {  # (x range, y range) of centres, as fractions of the image
    "center": ((0.38, 0.62), (0.38, 0.62)),
    "left": ((0.2, 0.3), (0.3, 0.7)),
    "right": ((0.7, 0.8), (0.3, 0.7)),
    "top": ((0.3, 0.7), (0.2, 0.3)),
    "bottom": ((0.3, 0.7), (0.7, 0.8)),
}


def _place(
    k: int, r: float, n: int, rng: np.random.Generator, taken: list[tuple[float, float, float]], region: str
) -> list[tuple[float, float]]:
    """Centres for k objects of radius r that do not overlap each other or ``taken``."""
    out: list[tuple[float, float]] = []
    for _ in range(k):
        for attempt in range(200):
            if k == 1 and attempt < 100:
                (x0, x1), (y0, y1) = _REGION[region]
                cx, cy = rng.uniform(x0, x1) * n, rng.uniform(y0, y1) * n
            else:
                cx, cy = rng.uniform(r, n - r, size=2)
            if all((cx - ox) ** 2 + (cy - oy) ** 2 > (r + orr + 2) ** 2 for ox, oy, orr in taken):
                break
        taken.append((float(cx), float(cy), r))
        out.append((float(cx), float(cy)))
    return out


def _draw_thing(
    canvas: np.ndarray,
    edges: np.ndarray,
    thing: Thing,
    rng: np.random.Generator,
    taken: list[tuple[float, float, float]],
    region: str,
) -> None:
    n = canvas.shape[0]
    lo, hi = _RADIUS[thing.size]
    if thing.count > 1:  # many copies: shrink so they fit
        lo, hi = (0.1, 0.14) if thing.count <= 3 else (0.085, 0.11)
    r = float(rng.uniform(lo, hi)) * n
    colour = np.clip(rgb(thing.hue, thing.shade) + rng.normal(0, 6, 3), 0, 255)
    rot = float(rng.uniform(-0.35, 0.35)) if thing.shape != "arrow" else float(rng.uniform(0, 2 * np.pi))
    for cx, cy in _place(thing.count, r, n, rng, taken, region):
        mask = shape_mask(thing.shape, cx, cy, r, rot, n)
        line = _outline(mask, SUPERSAMPLE)
        if thing.fill == "outlined":
            paint = line
            mask_fill = np.broadcast_to(colour, canvas.shape)
        else:
            paint = mask
            other = 0.35 * colour + 0.65 * (255.0 if colour.mean() < 128 else 0.0)
            if thing.fill == "solid":
                mask_fill = np.broadcast_to(colour, canvas.shape)
            else:
                mask_fill = pattern(thing.fill, colour, other, n, rng)
            mask_fill = np.where(line[..., None], colour, mask_fill)
        canvas[paint] = mask_fill[paint]
        edges |= _outline(mask, SUPERSAMPLE)


# ---------------------------------------------------------------------------- satellite
def _satellite(land: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """A top-down 'satellite' tile of land-use ``land`` (EuroSAT's role in this world)."""
    soil = np.array([150, 120, 80], np.float32) + rng.normal(0, 10, 3)
    grass = np.array([95, 140, 60], np.float32) + rng.normal(0, 10, 3)
    water = np.array([40, 75, 140], np.float32) + rng.normal(0, 8, 3)
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    noise = np.kron(rng.normal(0, 1, (n // 4, n // 4)), np.ones((4, 4)))[..., None]
    img = np.broadcast_to(grass, (n, n, 3)).copy()
    a = rng.uniform(0, np.pi)
    u = x * np.cos(a) + y * np.sin(a)
    v = -x * np.sin(a) + y * np.cos(a)
    if land == "annual crop land":
        cells = np.kron(rng.integers(0, 3, (4, 4)), np.ones((n // 4, n // 4), int))
        tones = np.stack([soil, grass * 1.1, np.array([200, 180, 90], np.float32)])
        img = tones[cells] + 6 * noise
    elif land == "permanent crop land":
        rows = (u % (n / 7)) < n / 16
        img = np.where(rows[..., None], grass * 0.6, soil) + 6 * noise
    elif land == "pasture land":
        img = grass * 1.15 + 5 * noise
    elif land == "herbaceous vegetation land":
        img = grass + 25 * noise * np.array([1.0, 0.8, 0.5])
    elif land == "forest":
        img = grass * 0.55 + 18 * noise
    elif land in ("highway or road", "river"):
        wiggle = 0.0 if land == "highway or road" else 0.1 * n * np.sin(u / n * 2 * np.pi * rng.uniform(1, 2))
        band = np.abs(v - rng.uniform(0.35, 0.65) * n * 1.2 + n * 0.1 + wiggle - (v.mean() - n / 2))
        width = n * (0.06 if land == "highway or road" else 0.09)
        ink = np.array([120, 120, 125], np.float32) if land == "highway or road" else water
        img = np.where((band < width)[..., None], ink, grass + 10 * noise)
    elif land == "sea or lake":
        shore = (v - v.min()) / (v.max() - v.min()) - rng.uniform(0.25, 0.6) + 0.03 * noise[..., 0]
        img = np.where((shore > 0)[..., None], water + 4 * noise, soil + 8 * noise)
    elif land in ("residential buildings", "industrial buildings"):
        cell = n // 6 if land == "residential buildings" else n // 3
        roof = np.array([170, 80, 60] if land == "residential buildings" else [175, 175, 180], np.float32)
        gx, gy = (x // cell).astype(int), (y // cell).astype(int)
        inside = ((x % cell) > cell * 0.2) & ((y % cell) > cell * 0.2)
        built = rng.random((gy.max() + 1, gx.max() + 1)) < 0.75
        img = np.where((inside & built[gy, gx])[..., None], roof, np.array([110, 110, 100.0]) + 8 * noise)
    else:
        raise ValueError(f"unknown land use {land!r}; known: {', '.join(LAND)}")
    return np.clip(img, 0, 255)


# ---------------------------------------------------------------------------- render
def render(scene: Scene, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """Pixels of ``scene`` (RGB, ``size`` x ``size``); the random details come from ``rng``."""
    n = size * SUPERSAMPLE
    edges = np.zeros((n, n), bool)
    if scene.kind == "satellite":
        canvas = _satellite(scene.land, n, rng)
        if scene.land2:
            y, x = np.mgrid[0:n, 0:n] / n - 0.5
            a = rng.uniform(0, 2 * np.pi)
            part = (x * np.cos(a) + y * np.sin(a)) > rng.uniform(0.05, 0.2)
            canvas = np.where(part[..., None], _satellite(scene.land2, n, rng), canvas)
    else:
        canvas = pattern(scene.background, rgb(scene.bg_hue2), rgb(scene.bg_hue), n, rng)
        taken: list[tuple[float, float, float]] = []
        if scene.thing is not None:
            _draw_thing(canvas, edges, scene.thing, rng, taken, scene.position)
        if scene.distractor is not None:
            _draw_thing(canvas, edges, scene.distractor, rng, taken, "center")
    canvas = _stylise(canvas, edges, scene.style, rng)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    return image.resize((size, size), Image.Resampling.BOX)


def _stylise(canvas: np.ndarray, edges: np.ndarray, style: str, rng: np.random.Generator) -> np.ndarray:
    if style == "photo":
        return canvas + rng.normal(0, 4, canvas.shape)
    if style == "sketch":
        paper = np.array([240, 236, 225], np.float32) + rng.normal(0, 5, canvas.shape)
        return np.where(edges[..., None], np.array([40, 40, 40], np.float32), paper)
    if style == "cartoon":
        flat = np.round(canvas / 85.0) * 85.0
        thick = (
            np.asarray(Image.fromarray(edges.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(3))) > 127
        )
        return np.where(thick[..., None], 0.0, flat)
    if style == "noisy":
        return canvas + rng.normal(0, 45, canvas.shape)
    if style == "inverted":
        return 255.0 - canvas
    raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")


# ---------------------------------------------------------------------------- captions
def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x")) else "s")


def noun_phrase(thing: Thing, rng: np.random.Generator) -> str:
    """A phrase such as "two small dark blue striped stars", attributes dropped at random."""
    words = []
    if thing.count > 1:
        words.append(COUNT_WORDS[thing.count - 1])
    if thing.size != "medium" and thing.count == 1 and rng.random() < 0.5:
        words.append(thing.size)
    if rng.random() < 0.85:
        if thing.shade and rng.random() < 0.35:
            words.append(thing.shade)
        words.append(thing.hue)
    if thing.fill != "solid" and rng.random() < 0.4:
        words.append(thing.fill)
    words.append(_plural(thing.shape) if thing.count > 1 else thing.shape)
    if thing.count == 1:
        article = "an" if words[0][0] in "aeiou" else "a"
        words.insert(0, "one" if rng.random() < 0.1 else article)
    return " ".join(words)


_PREFIX = {
    "photo": ("", "", "a photo of ", "a picture of ", "an image of "),
    "sketch": ("a sketch of ", "a drawing of ", "a pencil sketch of "),
    "cartoon": ("a cartoon of ", "a cartoon drawing of "),
    "noisy": ("a noisy photo of ", "a grainy picture of "),
    "inverted": ("an inverted photo of ",),
}
_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
_SAT_PREFIX = (
    "a satellite photo of ",
    "an aerial view of ",
    "a satellite image of ",
    "a view from above of ",
)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One natural caption of ``scene``; which attributes it names is random."""
    if scene.kind == "satellite":
        words = LAND[scene.land]
        word = words[0] if rng.random() < 0.2 else words[int(rng.integers(1, len(words)))]
        return str(rng.choice(_SAT_PREFIX)) + word
    prefix = str(rng.choice(_PREFIX[scene.style]))
    if scene.kind == "texture":
        colour = f"{scene.bg_hue2} and {scene.bg_hue} " if rng.random() < 0.4 else ""
        text = str(rng.choice(["a {}{} pattern", "a {}{} texture", "{}{} texture", "a {}{} surface"]))
        return prefix + text.format(colour, scene.background)
    assert scene.thing is not None
    text = noun_phrase(scene.thing, rng)
    if scene.distractor is not None and rng.random() < 0.5:
        text += str(rng.choice([" and ", " next to ", " with "])) + noun_phrase(scene.distractor, rng)
    if scene.thing.count == 1 and scene.position != "center" and rng.random() < 0.4:
        text += " " + _WHERE[scene.position]
    if scene.style in ("photo", "noisy") and rng.random() < 0.35:
        colour = f"{scene.bg_hue} " if scene.background == "plain" or rng.random() < 0.3 else ""
        bg = "" if scene.background == "plain" else f"{scene.background} "
        text += f" on a {bg}{colour}background"
    return prefix + text


# ---------------------------------------------------------------------------- sampling
def _pick(rng: np.random.Generator, values: tuple[str, ...] | list[str], p: list[float] | None = None) -> str:
    return str(values[int(rng.choice(len(values), p=p))])


def random_thing(rng: np.random.Generator, *, exclude_hue: str = "", count: int | None = None) -> Thing:
    hues = [h for h in HUES if h != exclude_hue]
    hue = _pick(rng, hues)
    shade = _pick(rng, SHADES, [0.2, 0.6, 0.2]) if hue in CHROMATIC else ""
    if count is None:
        count = int(rng.choice([1, 2, 3, 4, 5], p=[0.6, 0.13, 0.11, 0.09, 0.07]))
    return Thing(
        shape=_pick(rng, SHAPES),
        hue=hue,
        shade=shade,
        size=_pick(rng, SIZES),
        fill=_pick(rng, FILLS, [0.6, 0.1, 0.1, 0.1, 0.1]),
        count=count,
    )


def _background(rng: np.random.Generator, avoid: str) -> tuple[str, str, str]:
    pat = _pick(rng, PATTERNS, [0.5, 0.08, 0.08, 0.08, 0.06, 0.06, 0.07, 0.07])
    hues = [h for h in HUES if h != avoid]
    bg = _pick(rng, ["white", "gray", "black"]) if rng.random() < 0.5 else _pick(rng, hues)
    bg2 = _pick(rng, [h for h in hues if h != bg])
    return pat, bg, bg2


def random_scene(rng: np.random.Generator, simple: float = 0.0) -> Scene:
    """A scene from the pretraining distribution (no inverted colours: kept for testing).

    ``simple``: probability of a plain scene instead -- one solid object on a plain neutral
    background, where only shape, colour and size tell captions apart (a curriculum knob).
    """
    if simple > 0 and rng.random() < simple:  # no draw at 0: the default stream stays as it was
        thing = replace(random_thing(rng, count=1), fill="solid", size=_pick(rng, ("medium", "large")))
        return Scene(
            thing=thing, bg_hue=_pick(rng, [h for h in ("white", "gray", "black") if h != thing.hue])
        )
    u = rng.random()
    if u < 0.1:
        return Scene(kind="satellite", land=_pick(rng, tuple(LAND)))
    if u < 0.2:
        pat = _pick(rng, PATTERNS[1:])
        bg, bg2 = rng.choice(list(HUES), size=2, replace=False)
        return Scene(kind="texture", background=pat, bg_hue=str(bg), bg_hue2=str(bg2))
    thing = random_thing(rng)
    distractor = None
    if rng.random() < 0.3:
        distractor = replace(random_thing(rng, exclude_hue=thing.hue, count=1), size="small")
    pat, bg, bg2 = _background(rng, thing.hue)
    style = _pick(rng, STYLES[:4], [0.82, 0.06, 0.06, 0.06])
    return Scene(
        thing=thing,
        distractor=distractor,
        background=pat,
        bg_hue=bg,
        bg_hue2=bg2,
        position=_pick(rng, POSITIONS, [0.6, 0.1, 0.1, 0.1, 0.1]),
        style=style,
    )


def pretraining_batch(
    rng: np.random.Generator, n: int, size: int = 32, simple: float = 0.0
) -> tuple[np.ndarray, list[str]]:
    """``n`` fresh (image, caption) pairs: uint8 array ``(n, size, size, 3)`` and captions."""
    images = np.empty((n, size, size, 3), np.uint8)
    captions = []
    for i in range(n):
        scene = random_scene(rng, simple)
        images[i] = np.asarray(render(scene, rng, size))
        captions.append(caption(scene, rng))
    return images, captions


# ---------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """A downstream classification task: class names and a scene maker per label."""

    classnames: tuple[str, ...]
    make: Callable[[int, np.random.Generator], Scene]


def _object_scene(shape: str, rng: np.random.Generator, style: str) -> Scene:
    thing = replace(random_thing(rng, count=1), shape=shape, size=_pick(rng, ("medium", "large")))
    other = [s for s in SHAPES if s != shape]
    distractor = replace(random_thing(rng, exclude_hue=thing.hue, count=1), shape=_pick(rng, other))
    distractor = replace(distractor, size="small")
    pat, bg, bg2 = _background(rng, thing.hue)
    return Scene(thing=thing, distractor=distractor, background=pat, bg_hue=bg, bg_hue2=bg2, style=style)


def _objects_task(style: str) -> Task:
    return Task(SHAPES, lambda label, rng: _object_scene(SHAPES[label], rng, style))


_SHADE_CLASSES = tuple((h, s) for h in CHROMATIC for s in SHADES)


def _shade_scene(label: int, rng: np.random.Generator) -> Scene:
    hue, shade = _SHADE_CLASSES[label]
    thing = replace(random_thing(rng), hue=hue, shade=shade, fill=_pick(rng, ("solid", "striped", "dotted")))
    distractor = replace(random_thing(rng, exclude_hue=hue, count=1), size="small")
    pat, bg, bg2 = _background(rng, hue)
    return Scene(thing=thing, distractor=distractor, background=pat, bg_hue=bg, bg_hue2=bg2)


def _texture_scene(label: int, rng: np.random.Generator) -> Scene:
    bg, bg2 = rng.choice(list(HUES), size=2, replace=False)
    thing = random_thing(rng, count=1)
    return Scene(thing=thing, background=PATTERNS[label], bg_hue=str(bg), bg_hue2=str(bg2))


def _count_scene(label: int, rng: np.random.Generator) -> Scene:
    thing = random_thing(rng, count=label + 1)
    pat, bg, bg2 = _background(rng, thing.hue)
    return Scene(thing=thing, background=pat, bg_hue=bg, bg_hue2=bg2)


def _satellite_scene(label: int, rng: np.random.Generator) -> Scene:
    """A tile whose majority land use is the label, with another land use at one edge."""
    land = tuple(LAND)[label]
    other = _pick(rng, [name for name in LAND if name != land])
    return Scene(kind="satellite", land=land, land2=other, style=_pick(rng, ("photo", "noisy")))


TASKS: dict[str, Task] = {
    "objects": _objects_task("photo"),
    "objects_sketch": _objects_task("sketch"),
    "objects_cartoon": _objects_task("cartoon"),
    "objects_noisy": _objects_task("noisy"),
    "objects_inverted": _objects_task("inverted"),
    "shades": Task(tuple(f"{s} {h}".strip() for h, s in _SHADE_CLASSES), _shade_scene),
    "textures": Task(PATTERNS, _texture_scene),
    "satellite": Task(tuple(LAND), _satellite_scene),
    "counting": Task(COUNT_WORDS, _count_scene),
}
"""Small-world tasks by name; catalog entries point at them through ``CatalogEntry.world``."""


def render_task_image(task: str, label: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One image of class ``label`` of small-world task ``task``."""
    if task not in TASKS:
        raise ValueError(f"unknown small-world task {task!r}; known: {', '.join(sorted(TASKS))}")
    return render(TASKS[task].make(label, rng), rng, size)
