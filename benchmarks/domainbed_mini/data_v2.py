"""Data of domainbed_mini's second configuration (`run.py --config v2*`).

* target `digits`: the demo's four domains (`colored`, `mnist`, `optdigits`, `rotated`, made by the
  demo's own image makers), with more images per domain (1,500 in v2): no auxiliary takes MNIST or
  optdigits images any more, so MNIST's 500 images per class are split between the three MNIST
  domains only, optdigits' 174-183 per class go to `optdigits` only.
* related auxiliaries, rendered on this machine from Debian font packages whose font files are not
  among the foundation's pretraining fonts (checked by file name and folder, `font_report`), 10
  classes "0".."9" each:
    - `handwritten`: Latin digits in handwriting-style fonts, domains `comic`, `pen`, `script`;
    - `numerals`: the native digits of other scripts (class = the digit's value), domains `arabic`
      (Arabic-Indic and Persian), `indic` (9 scripts of India), `southeast` (Thai, Lao, Khmer,
      Myanmar);
    - `printed`: Latin digits in Noto's sans and serif faces, domains `sans`, `serif`.
* unrelated control `shapes`: the demo's 6 synthetic shapes (`clean`, `noisy`).

Style mix of the font auxiliaries, fixed before any run (a design choice, README "v2"): every image
is one glyph at a random size (28-44 px on a 64 px canvas), shift (+-5 px), rotation (uniform
+-30 degrees) and weight (stroke 0 or 1), downscaled to 32x32; then one of three looks, each with
probability 1/3: white on black, random colours (the demo's `colored` recipe), or low resolution
(down to 10-15 px and back, like optdigits' 8x8 scans); plus pixel noise (s.d. 0.03).

Needs: numpy, pillow, fontTools (a matplotlib dependency) and the Debian packages in FONT_PACKAGES.
"""
from __future__ import annotations

import glob
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ratatouille_trainer import demo_data as dd

FONT_PACKAGES = ("fonts-noto-core", "fonts-comic-neue", "fonts-humor-sans", "fonts-femkeklaver", "fonts-breip",
                 "fonts-dkg-handwriting", "fonts-bwht", "fonts-dancingscript", "fonts-kaushanscript",
                 "fonts-kristi")
NOTO = "/usr/share/fonts/truetype/noto"
LATIN = 0x30  # "0"
# auxiliary -> domain -> [(glob of font files, first code point of the 10 digits)]
FONT_AUXILIARIES: dict[str, dict[str, list[tuple[str, int]]]] = {
    "handwritten": {
        "comic": [("/usr/share/fonts/opentype/comic-neue/ComicNeue-*.otf", LATIN),
                  ("/usr/share/fonts/truetype/humor-sans/Humor-Sans.ttf", LATIN)],
        "pen": [("/usr/share/fonts/truetype/femkeklaver/*.ttf", LATIN),
                ("/usr/share/fonts/truetype/breip/*.ttf", LATIN),
                ("/usr/share/fonts/truetype/fifthhorseman/dkg*.ttf", LATIN),
                ("/usr/share/fonts/opentype/bwht/BecauseWe*.otf", LATIN)],
        "script": [("/usr/share/fonts/opentype/dancingscript/DancingScript-*.otf", LATIN),
                   ("/usr/share/fonts/opentype/kaushanscript/KaushanScript-*.otf", LATIN),
                   ("/usr/share/fonts/truetype/kristi/Kristi.ttf", LATIN)],
    },
    "numerals": {
        "arabic": [(f"{NOTO}/Noto{f}Arabic-{w}.ttf", cp) for f in ("Naskh", "Sans", "Kufi")
                   for w in ("Regular", "Bold") for cp in (0x660, 0x6F0)],
        "indic": [(f"{NOTO}/Noto{f}{s}-{w}.ttf", cp) for s, cp in
                  (("Devanagari", 0x966), ("Bengali", 0x9E6), ("Gurmukhi", 0xA66), ("Gujarati", 0xAE6),
                   ("Oriya", 0xB66), ("Tamil", 0xBE6), ("Telugu", 0xC66), ("Kannada", 0xCE6), ("Malayalam", 0xD66))
                  for f in ("Sans", "Serif") for w in ("Regular", "Bold")],
        "southeast": [(f"{NOTO}/Noto{f}{s}-{w}.ttf", cp) for s, cp in
                      (("Thai", 0xE50), ("Lao", 0xED0), ("Khmer", 0x17E0), ("Myanmar", 0x1040))
                      for f in ("Sans", "Serif") for w in ("Regular", "Bold")],
    },
    "printed": {
        "sans": [(f"{NOTO}/NotoSans{d}-{w}.ttf", LATIN) for d in ("", "Display")
                 for w in ("Regular", "Bold", "Italic", "BoldItalic")],
        "serif": [(f"{NOTO}/NotoSerif{d}-{w}.ttf", LATIN) for d in ("", "Display")
                  for w in ("Regular", "Bold", "Italic", "BoldItalic")],
    },
}
RELATED = tuple(sorted(FONT_AUXILIARIES))
CONTROL = ("shapes",)


def _has_digits(path: str, first: int) -> bool:
    from fontTools.ttLib import TTFont

    with TTFont(path, lazy=True) as f:
        cmap = f.getBestCmap() or {}
    return all(first + d in cmap for d in range(10))


def resolve_fonts(auxiliaries: tuple[str, ...] = RELATED) -> dict[str, dict[str, list[tuple[str, int]]]]:
    """Every (font file, first digit code point) per auxiliary and domain: files that exist and map
    all ten digits. Missing packages are an error that names them."""
    out: dict[str, dict[str, list[tuple[str, int]]]] = {}
    for aux in auxiliaries:
        domains = FONT_AUXILIARIES[aux]
        out[aux] = {}
        for dom, patterns in domains.items():
            fonts = [(p, cp) for pat, cp in patterns for p in sorted(glob.glob(pat)) if _has_digits(p, cp)]
            if not fonts:
                raise SystemExit(f"no font for auxiliary {aux}/{dom}: install the Debian packages "
                                 + " ".join(FONT_PACKAGES))
            out[aux][dom] = fonts
    return out


def font_report(fonts: dict, foundation_fonts: list[str]) -> dict:
    """Are the auxiliaries' font files disjoint from the foundation's pretraining fonts? Compared by
    file name (the foundation's metadata lists its files by name) and by folder (demo_data's
    FOUNDATION_FONT_DIRS, where it took them from)."""
    names = {os.path.basename(f).lower() for f in foundation_fonts}
    dirs = tuple(os.path.realpath(d) + os.sep for d in dd.FOUNDATION_FONT_DIRS)
    files = sorted({p for doms in fonts.values() for fs in doms.values() for p, _ in fs})
    by_name = [p for p in files if os.path.basename(p).lower() in names]
    by_dir = [p for p in files if os.path.realpath(p).startswith(dirs)]
    return {"fontFiles": len(files), "files": [os.path.basename(p) for p in files],
            "foundationFonts": len(names), "sameFileName": by_name, "underFoundationDirs": by_dir,
            "disjoint": not by_name and not by_dir and len(names) > 0}


def _digit_image(font_path: str, first: int, digit: int, rng: np.random.Generator) -> np.ndarray:
    font = dd._font(font_path, int(rng.integers(28, 45)))
    g = dd._render_glyph(chr(first + digit), font, rng, shift=5, stroke=int(rng.integers(0, 2)),
                         rotate=float(rng.uniform(-30, 30)), shear=0.0, blur=0.0)
    u8 = np.clip(g * 255.0 + 0.5, 0, 255).astype(np.uint8)
    look = int(rng.integers(3))
    if look == 1:
        rgb = dd._colorize(u8, rng)
    else:
        if look == 2:
            low = int(rng.integers(10, 16))
            u8 = np.asarray(Image.fromarray(u8).resize((low, low), Image.BOX).resize((dd.SIZE, dd.SIZE),
                                                                                    Image.BILINEAR))
        rgb = dd._rgb(u8)
    noisy = rgb.astype(np.float32) + rng.normal(0, 0.03 * 255, rgb.shape)
    return np.clip(noisy + 0.5, 0, 255).astype(np.uint8)


def _font_domain(fonts: list[tuple[str, int]], n: int, rng: np.random.Generator, prefix: str):
    for j, cls in enumerate(dd._balanced_labels(dd.DIGIT_CLASSES, n, rng)):
        path, first = fonts[int(rng.integers(len(fonts)))]
        yield cls, f"{prefix}-{j:05d}", _digit_image(path, first, int(cls), rng)


def _target_allocation(per_domain: int, seed: int) -> dict[str, list[int]]:
    """Disjoint class-balanced source indices per target domain (MNIST: mnist, rotated, colored;
    optdigits: optdigits), drawn as the demo draws them."""
    per_class = per_domain // 10
    consumers = {"mnist": ("mnist", "rotated", "colored"), "optdigits": ("optdigits",)}
    out = {}
    for src, doms in consumers.items():
        by_class = dd._unique_indices_by_class(dd.load_sources()[src], dd._rng(seed, "allocate", src))
        have = min(len(v) for v in by_class.values())
        if per_class * len(doms) > have:
            raise ValueError(f"{per_domain} images per domain need {per_class * len(doms)} {src} images per class; "
                             f"{have} exist")
        for j, dom in enumerate(doms):
            out[dom] = [i for c in range(10) for i in by_class[c][j * per_class:(j + 1) * per_class]]
    return out


MAKERS = {"colored": ("mnist", lambda g, rng: dd._colorize(g, rng)), "mnist": ("mnist", lambda g, rng: dd._rgb(g)),
          "optdigits": ("optdigits", lambda g, rng: dd._rgb(g)),
          "rotated": ("mnist", lambda g, rng: dd._rgb(dd._rotate(g, 45.0)))}


def generate(out: Path, per_domain: int, aux_per_domain: int, seed: int = 0,
             related: tuple[str, ...] = RELATED) -> dict:
    """Write the target, the related auxiliaries and the control under `out` (DomainBed layout)."""
    t0 = time.time()
    fonts = resolve_fonts(related)
    alloc = _target_allocation(per_domain, seed)
    counts: dict[str, dict[str, int]] = {"digits": {}}
    for dom in dd.TARGET_DOMAINS:
        src, make = MAKERS[dom]
        s, rng = dd.load_sources()[src], dd._rng(seed, "digits-v2", dom)
        items = ((str(int(s.labels[i])), f"{src}-{i:05d}", make(s.images[i], rng)) for i in alloc[dom])
        counts["digits"][dom] = dd._write_domain(out / "digits" / dom, dd.DIGIT_CLASSES, items)
    for aux, domains in fonts.items():
        counts[aux] = {dom: dd._write_domain(out / aux / dom, dd.DIGIT_CLASSES,
                                             _font_domain(fs, aux_per_domain, dd._rng(seed, aux, dom), dom))
                       for dom, fs in domains.items()}

    def shapes(dom: str):
        rng = dd._rng(seed, "shapes", dom)
        for j, cls in enumerate(dd._balanced_labels(dd.SHAPE_CLASSES, aux_per_domain, rng)):
            yield cls, f"{dom}-{j:05d}", dd._shape(cls, rng, noisy=dom == "noisy")

    counts["shapes"] = {d: dd._write_domain(out / "shapes" / d, dd.SHAPE_CLASSES, shapes(d)) for d in ("clean", "noisy")}
    summary = {"seed": seed, "perDomain": per_domain, "auxPerDomain": aux_per_domain, "counts": counts,
               "fonts": {a: {d: [f"{os.path.basename(p)}:U+{cp:04X}" for p, cp in fs] for d, fs in doms.items()}
                         for a, doms in fonts.items()},
               "seconds": round(time.time() - t0, 1)}
    (out / "demo-data.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary
