"""The averaged model in the form timm users load directly, and scoring any published model.

``publish_timm`` writes, beside the averaging stage's own ``model.safetensors``
(``featurizer.*``/``head.*`` keys), a folder ``timm/`` with

- ``model.safetensors``: timm's own key names (the featurizer's keys unprefixed, the head under
  the architecture's classifier name, e.g. ``fc.weight`` for ResNets), so
  ``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=".../model.safetensors"),
  num_classes=K)`` builds the averaged network;
- ``config.json``: timm's hub config (``architecture``, ``num_classes``, ``num_features``,
  ``label_names``, ``pretrained_cfg`` with the input size, resize-only preprocessing and the
  ImageNet mean and std the model was trained with);
- ``README.md``: the model card, with how to load it.

``evaluate`` scores a published model (either form) on a DomainBed-layout dataset, per domain.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Mapping, Sequence

import torch

from .data import IMAGENET_MEAN, IMAGENET_STD

TIMM_DIR = "timm"
CONFIG = "config.json"


def classifier_name(arch: str) -> str:
    """The attribute timm puts the classifier under for ``arch`` (``fc``, ``head``, ``head.fc``...)."""
    import timm

    cfg = timm.create_model(arch, pretrained=False, num_classes=2).pretrained_cfg or {}
    name = cfg.get("classifier")
    if not name:
        raise ValueError(f"timm does not name the classifier of {arch!r}")
    return str(name)


def to_timm_state(state: Mapping[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """``featurizer.*``/``head.*`` -> timm's key names for ``arch``."""
    cls = classifier_name(arch)
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith("featurizer."):
            out[k[len("featurizer."):]] = v
        elif k.startswith("head."):
            out[f"{cls}.{k[len('head.'):]}"] = v
        else:
            raise ValueError(f"unexpected tensor {k!r} (expected featurizer.* or head.*)")
    return out


def timm_config(arch: str, num_classes: int, num_features: int, classes: Sequence[str],
                input_size: int) -> dict:
    return {
        "architecture": arch,
        "num_classes": int(num_classes),
        "num_features": int(num_features),
        "label_names": list(classes),
        "pretrained_cfg": {
            "architecture": arch,
            "input_size": [3, int(input_size), int(input_size)],
            "fixed_input_size": False,
            # Evaluation was a plain resize to inputSize x inputSize (no crop), bilinear.
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "crop_mode": "squash",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "num_classes": int(num_classes),
            "classifier": classifier_name(arch),
        },
    }


def _readme(card: str, arch: str, num_classes: int) -> str:
    return (card.rstrip() + "\n\n## Load it with timm\n\n```python\nimport timm\n"
            "model = timm.create_model(\"local-dir:/path/to/this/folder\", pretrained=True)\n"
            "# or, from the weights file alone (num_classes in the overlay too, or timm drops the head):\n"
            f"model = timm.create_model({arch!r}, pretrained=True, num_classes={num_classes},\n"
            f"                          pretrained_cfg_overlay=dict(file=\"model.safetensors\", num_classes={num_classes}))\n"
            "model.eval()  # inputs: RGB resized to the input size in config.json, ImageNet mean/std\n```\n"
            "\nThe class order is `label_names` in `config.json`. `ratatouille evaluate model.safetensors DATASET`"
            " scores it on a DomainBed-layout dataset.\n")


def publish_timm(storage, output: str, state: Mapping[str, torch.Tensor], arch: str, classes: Sequence[str],
                 input_size: int, num_features: int, card: str, tmp: str, metadata: Mapping[str, str]) -> str:
    """Write ``<output>/timm/{model.safetensors, config.json, README.md}``; returns the model URI."""
    from safetensors.torch import save_file

    from ratatouille_contract.layout import join

    local = os.path.join(tmp, "timm-model.safetensors")
    tensors = {k: v.detach().cpu().contiguous() for k, v in to_timm_state(state, arch).items()}
    save_file(tensors, local, metadata={**metadata, "format": "pt"})
    uri = join(output, TIMM_DIR, "model.safetensors")
    storage.upload(local, uri)
    cfg = timm_config(arch, len(classes), num_features, classes, input_size)
    storage.write_text(join(output, TIMM_DIR, CONFIG), json.dumps(cfg, indent=2) + "\n")
    storage.write_text(join(output, TIMM_DIR, "README.md"), _readme(card, arch, len(classes)))
    return uri


# ------------------------------------------------------------------------------------ evaluate


def load_published(path: str, arch: str | None = None):
    """(module, classes or None, input size or None) from a published ``model.safetensors``:
    timm form (``config.json`` beside it) or our own ``featurizer.*``/``head.*`` form."""
    import timm

    from .weights import load_safetensors_file
    from .models import build_network, freeze_bn, load_network_state

    cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG)
    if os.path.exists(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        k = int(cfg["num_classes"])
        model = timm.create_model(arch or cfg["architecture"], pretrained=True, num_classes=k,
                                  pretrained_cfg_overlay=dict(file=os.path.abspath(path), num_classes=k))
        size = (cfg.get("pretrained_cfg") or {}).get("input_size") or [3, None, None]
        return model.eval(), cfg.get("label_names"), size[-1]
    state = load_safetensors_file(path)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    arch = arch or meta.get("foundation")
    if not arch:
        raise ValueError(f"{path}: no config.json beside it and no architecture in its metadata (use --model-name)")
    if "head.weight" not in state:
        raise ValueError(f"{path}: neither timm form (config.json) nor featurizer.*/head.* tensors")
    net = freeze_bn(build_network(arch, int(state["head.weight"].shape[0])))
    load_network_state(net, state, path)
    size = None
    lineage = os.path.join(os.path.dirname(os.path.abspath(path)), "lineage.json")
    if os.path.exists(lineage):  # the run's own output: its lineage knows the input size
        with open(lineage, encoding="utf-8") as f:
            size = (json.load(f).get("foundation") or {}).get("inputSize")
    return net.eval(), None, size


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ratatouille evaluate",
                                description="Score a published model on a DomainBed-layout dataset, per domain.")
    p.add_argument("model", help="model.safetensors (timm form with config.json beside it, or the run's own form)")
    p.add_argument("dataset", help="DomainBed layout <domain>/<class>/<image>: a path, file:// or s3:// URI")
    p.add_argument("--model-name", help="timm architecture (default: from config.json or the file's metadata)")
    p.add_argument("--input-size", type=int, help="square input side (default: from config.json, else 224)")
    p.add_argument("--endpoint", help="S3 endpoint for s3:// datasets")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    args = p.parse_args(argv)
    from .data import DataError, load_dataset
    from .training import correct_count

    try:
        net, labels, size = load_published(args.model, args.model_name)
        size = args.input_size or size or 224
        ds = load_dataset(args.dataset, int(size), endpoint=args.endpoint)
        if labels is not None and list(labels) != ds.classes:
            raise DataError(f"the model's label_names {list(labels)} are not the dataset's classes {ds.classes}")
        k = getattr(net, "num_classes", None) or net.head.out_features
        if int(k) != ds.num_classes:
            raise DataError(f"the model has {int(k)} classes, the dataset {ds.num_classes}")
        rows, correct, total = {}, 0, 0
        with torch.no_grad():
            for d in ds.domains:
                c, t = correct_count(net, d.images, d.labels)
                rows[d.name] = {"accuracy": c / t, "images": t}
                correct, total = correct + c, total + t
    except (OSError, ValueError, RuntimeError) as e:
        print(f"ratatouille evaluate: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if args.output == "json":
        print(json.dumps({"domains": rows, "pooled": correct / total}, indent=2))
        return 0
    width = max(len("domain"), *(len(n) for n in rows))
    print(f"{'domain':<{width}}  accuracy  images")
    for n, r in rows.items():
        print(f"{n:<{width}}  {r['accuracy']:8.4f}  {r['images']:6d}")
    print(f"{'(pooled)':<{width}}  {correct / total:8.4f}  {total:6d}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(evaluate_main())
