"""The demo data generator: DomainBed layout, byte-reproducibility, and that no auxiliary or
foundation image leaks into the target; plus the shipped foundation checkpoint."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ratatouille_trainer import demo_data as dd

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT = ROOT / dd.DEFAULT_FOUNDATION_PATH
PER_DOMAIN = 20


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    a = tmp_path_factory.mktemp("demo-a")
    b = tmp_path_factory.mktemp("demo-b")
    dd.generate(a, seed=0, per_domain=PER_DOMAIN)
    dd.generate(b, seed=0, per_domain=PER_DOMAIN)
    return a, b


def _domains(ds: Path) -> list[str]:
    return sorted(p.name for p in ds.iterdir() if p.is_dir())


def _classes(dom: Path) -> list[str]:
    return sorted(p.name for p in dom.iterdir() if p.is_dir())


def _pixel_hashes(dom: Path) -> dict[str, str]:
    out = {}
    for f in sorted(dom.rglob("*.png")):
        with Image.open(f) as im:
            out[hashlib.sha256(np.asarray(im.convert("RGB")).tobytes()).hexdigest()] = str(f)
    return out


def test_layout(built):
    root, _ = built
    datasets = _domains(root)
    assert "digits" in datasets
    digits = _domains(root / "digits")
    assert len(digits) >= 4 and digits == list(dd.TARGET_DOMAINS)
    for d in digits:
        assert _classes(root / "digits" / d) == list(dd.DIGIT_CLASSES)
        assert len(list((root / "digits" / d).rglob("*.png"))) == PER_DOMAIN
    aux = [d for d in datasets if d != "digits"]
    assert len(aux) >= 2
    for ds in aux:
        doms = _domains(root / ds)
        assert len(doms) >= 2, ds
        first = _classes(root / ds / doms[0])
        assert len(first) >= 2
        for d in doms:
            assert _classes(root / ds / d) == first, (ds, d)
            assert len(list((root / ds / d).rglob("*.png"))) == PER_DOMAIN
    some = next((root / "digits" / "optdigits" / "3").glob("*.png"))
    with Image.open(some) as im:
        assert im.size == (dd.SIZE, dd.SIZE) and im.mode == "RGB"


def test_same_seed_same_bytes(built, tmp_path):
    a, b = built
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 100
    for rel in files_a:
        if rel.name == "demo-data.json":
            continue  # holds the wall time
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    other = tmp_path / "seed1"
    dd.generate(other, seed=1, per_domain=PER_DOMAIN)
    assert _pixel_hashes(other / "shapes" / "clean") != _pixel_hashes(a / "shapes" / "clean")


def test_images_disjoint(built):
    root, _ = built
    target: dict[str, str] = {}
    for d in _domains(root / "digits"):
        hashes = _pixel_hashes(root / "digits" / d)
        assert len(hashes) == PER_DOMAIN, f"duplicate image inside digits/{d}"
        shared = set(hashes) & set(target)
        assert not shared, f"digits/{d} shares images with another domain: {[hashes[h] for h in shared]}"
        target.update(hashes)
    for ds in _domains(root):
        if ds == "digits":
            continue
        for d in _domains(root / ds):
            leaked = set(_pixel_hashes(root / ds / d)) & set(target)
            assert not leaked, f"{ds}/{d} contains target images"
    # Rotations change pixels, so also check provenance: a source image is used at most once.
    used: dict[str, str] = {}
    for f in root.rglob("*.png"):
        m = re.fullmatch(r"(mnist|optdigits)-(\d+)", f.stem)
        if m:
            assert f.stem not in used, f"{f} and {used[f.stem]} come from the same source image"
            used[f.stem] = str(f)


@pytest.mark.parametrize("per_domain", [10, dd.DEFAULT_PER_DOMAIN, 870])
def test_allocation_disjoint_at_every_size(per_domain):
    alloc = dd.allocate(dd.load_sources(), per_domain, seed=0)
    for src, consumers in alloc.items():
        seen: set[int] = set()
        for name, idx in consumers.items():
            assert len(idx) == per_domain // 10 * 10, (src, name)
            assert not seen & set(idx), (src, name)
            seen |= set(idx)


def test_too_many_per_domain_is_refused():
    with pytest.raises(ValueError, match="at most"):
        dd.allocate(dd.load_sources(), 2000, seed=0)


def test_foundation_letters_disjoint_from_glyphs(built):
    fonts = dd.foundation_fonts()
    assert not any("aileron" in os.path.basename(f).lower() for f in fonts)
    if len(fonts) < 4:
        pytest.skip("foundation fonts not installed")
    x, _ = dd.render_letters(208, fonts, dd._rng(0, "foundation", "train"))
    letters = {hashlib.sha256(dd._rgb(im).tobytes()).hexdigest() for im in x}
    root, _ = built
    for d in _domains(root / "glyphs"):
        assert not letters & set(_pixel_hashes(root / "glyphs" / d))


def test_cli_data_only(tmp_path, capsys):
    assert dd.main(["--out", str(tmp_path), "--data-only", "--per-domain", "10"]) == 0
    assert sorted(_domains(tmp_path)) == ["digits", "glyphs", "rot4", "shapes"]
    assert not (tmp_path / "foundation.safetensors").exists()


def test_trainer_reads_generated_data(built):
    from ratatouille_trainer.data import load_dataset

    root, _ = built
    ds = load_dataset(str(root / "digits"), 32, test_domains=["optdigits"])
    assert ds.classes == list(dd.DIGIT_CLASSES)
    assert [d.name for d in ds.domains] == list(dd.TARGET_DOMAINS)


def test_shipped_foundation_checkpoint():
    import timm
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    assert CHECKPOINT.stat().st_size < 5 * 1024 * 1024
    with safe_open(str(CHECKPOINT), framework="pt") as f:
        meta = f.metadata()
    assert {"model", "inputSize", "pretrainedOn", "recipe"} <= set(meta)
    assert meta["model"] == "test_resnet" and meta["inputSize"] == "32"
    assert "demo_data" in meta["recipe"]
    model = timm.create_model(meta["model"], pretrained=False, num_classes=0)
    state = load_file(str(CHECKPOINT))
    assert set(state) == set(model.state_dict())  # buffers included
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, model.num_features) and torch.isfinite(out).all()
