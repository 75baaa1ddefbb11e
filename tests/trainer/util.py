"""Tiny real image datasets and job descriptions for the trainer tests."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

MODEL = "test_resnet"
INPUT = 32

_DOMAIN_BG = [(230, 230, 230), (30, 30, 60), (120, 160, 90), (200, 120, 60)]
_CLASSES = ["circle", "square", "triangle"]


def _draw(cls: str, rng: random.Random, bg, size: int):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    color = tuple(rng.randrange(256) for _ in range(3))
    r = rng.randint(size // 4, size // 2 - 2)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    if cls == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif cls == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    # a little noise so images differ
    for _ in range(size):
        d.point((rng.randrange(size), rng.randrange(size)), fill=tuple(rng.randrange(256) for _ in range(3)))
    return im


def write_dataset(root, domains=("d0", "d1", "d2"), classes=_CLASSES, per_class=12, seed=0,
                  size=40, formats=("png",)) -> Path:
    """<root>/<domain>/<class>/<i>.<ext>: coloured shapes, one background per domain; the
    images cycle through `formats` (png, jpg, L (grayscale png), P (palette png), RGBA)."""
    root = Path(root)
    rng = random.Random(seed)
    for di, dom in enumerate(domains):
        for cls in classes:
            folder = root / dom / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                im = _draw(cls, rng, _DOMAIN_BG[di % len(_DOMAIN_BG)], size + rng.randint(-4, 8))
                fmt = formats[(i + di) % len(formats)]
                if fmt == "jpg":
                    im.save(folder / f"{i}.jpg", quality=90)
                elif fmt == "L":
                    im.convert("L").save(folder / f"{i}.png")
                elif fmt == "P":
                    im.convert("P").save(folder / f"{i}.png")
                elif fmt == "RGBA":
                    im.convert("RGBA").save(folder / f"{i}.png")
                else:
                    im.save(folder / f"{i}.png")
    return root


def job(stage, output, dataset, *, member=None, test_domains=("d2",), steps=6, batch=4,
        eval_every=2, lr="1e-3", weight_decay="0", dropout="0", head_warmup=0, lp_steps=0,
        lp_lr="1e-2", init=None, hyper=None, members=(), selection="uniform", seed=0,
        weights=None, model=MODEL, input_size=INPUT) -> dict:
    d = {
        "version": 1, "stage": stage,
        "run": {"namespace": "default", "name": "t", "uid": "uid-1"},
        "member": member or stage, "output": str(output), "storage": {"endpoint": None},
        "seed": seed,
        "foundation": {"model": model, "weights": weights, "inputSize": input_size},
        "data": {"dataset": str(dataset), "testDomains": list(test_domains),
                 "holdoutFraction": 0.2, "splitSeed": 0},
    }
    if stage != "average":
        d["training"] = {"steps": steps, "batchSize": batch, "lr": lr, "weightDecay": weight_decay,
                         "dropout": dropout, "headWarmupSteps": head_warmup, "evalEvery": eval_every,
                         "lpSteps": lp_steps, "lpLr": lp_lr}
    if init is not None:
        d["init"] = init
    if hyper is not None:
        d["hyperparameters"] = hyper
    if stage == "average":
        d["members"] = list(members)
        d["selection"] = selection
    return d


def desc(d: dict):
    from ratatouille_contract.jobdesc import JobDescription
    return JobDescription.from_dict(d)


def write_foundation(path, model=MODEL, seed=123, prefix="", with_head=True):
    """A 'foundation' safetensors file: a seeded random timm model (with its fc head)."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    m = timm.create_model(model, pretrained=False)
    sd = {prefix + k: v.contiguous() for k, v in m.state_dict().items()
          if with_head or not k.startswith("fc.")}
    # make BN running stats non-trivial so "buffers stay the foundation's" is observable
    for k in list(sd):
        if k.endswith("running_mean"):
            sd[k] = torch.randn_like(sd[k]) * 0.1
        elif k.endswith("running_var"):
            sd[k] = torch.rand_like(sd[k]) + 0.5
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return Path(path)


def env():
    e = dict(os.environ)
    e["HF_HUB_OFFLINE"] = "1"
    e["OMP_NUM_THREADS"] = "1"
    e["RATATOUILLE_DEVICE"] = "cpu"
    e.pop("RATATOUILLE_ABORT_AT_STEP", None)
    return e


def dumps(d: dict) -> str:
    return json.dumps(d)
