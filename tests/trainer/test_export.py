"""The averaged model as timm users load it, and `ratatouille evaluate`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from ratatouille_trainer.cli import main as trainer_main
from ratatouille_trainer.data import eval_transform, load_dataset

from .util import INPUT, MODEL, job, write_dataset, write_foundation


def _run(desc) -> None:
    assert trainer_main([desc["stage"], "--job-json", json.dumps(desc)]) == 0


def test_published_timm_model_reproduces_the_reported_test_accuracy(tmp_path):
    ds = write_dataset(tmp_path / "ds", per_class=8, seed=4)
    w = write_foundation(tmp_path / "f.safetensors", with_head=False)
    out = tmp_path / "out"
    _run(job("linear-probe", out / "lp", ds, weights=str(w), steps=4, eval_every=2, lr="1e-2"))
    head = str(out / "lp" / "model.safetensors")
    members = []
    for i, lr in enumerate(("1e-3", "3e-4")):
        _run(job("target", out / "t" / str(i), ds, member=str(i), weights=str(w), steps=4, eval_every=2, lr=lr,
                 init={"source": "foundation", "featurizer": None, "head": head}, seed=i))
        members.append({"member": str(i), "uri": str(out / "t" / str(i)), "source": "foundation"})
    _run(job("average", out / "avg", ds, weights=str(w), members=members))
    metrics = json.loads((out / "avg" / "metrics.json").read_text())
    timm_dir = out / "avg" / "timm"
    cfg = json.loads((timm_dir / "config.json").read_text())
    assert cfg["architecture"] == MODEL and cfg["num_classes"] == 3
    assert cfg["label_names"] == ["circle", "square", "triangle"]
    assert cfg["pretrained_cfg"]["input_size"] == [3, INPUT, INPUT]
    assert cfg["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406] and cfg["pretrained_cfg"]["classifier"] == "fc"
    readme = (timm_dir / "README.md").read_text()
    assert "timm.create_model" in readme and (out / "avg" / "model-card.md").read_text().strip() in readme
    from safetensors import safe_open

    with safe_open(str(timm_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"fc.weight", "fc.bias", "conv1.0.weight"} <= keys and not any(k.startswith(("featurizer.", "head.")) for k in keys)

    import timm

    data = load_dataset(str(ds), INPUT, test_domains=("d2",))
    d2 = data.domain("d2")
    file = str(timm_dir / "model.safetensors")
    # timm keeps a file's classifier only when the pretrained config says it has num_classes
    # classes (else it drops it as an ImageNet head): give both, or load the folder whole.
    for model in (timm.create_model(MODEL, pretrained=True, num_classes=3,
                                    pretrained_cfg_overlay=dict(file=file, num_classes=3)),
                  timm.create_model(f"local-dir:{timm_dir}", pretrained=True)):
        with torch.no_grad():
            pred = model.eval()(eval_transform(d2.images)).argmax(1)
        acc = (pred == d2.labels).float().mean().item()
        assert abs(acc - metrics["testAccuracy"]["d2"]) < 1e-9

    # `ratatouille evaluate` prints per-domain accuracy for either published form
    bin_dir = Path(sys.executable).parent
    for model_file in (timm_dir / "model.safetensors", out / "avg" / "model.safetensors"):
        proc = subprocess.run([str(bin_dir / "ratatouille"), "evaluate", str(model_file), str(ds), "-o", "json"],
                              capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": str(bin_dir)})
        assert proc.returncode == 0, proc.stderr
        scores = json.loads(proc.stdout)
        assert abs(scores["domains"]["d2"]["accuracy"] - metrics["testAccuracy"]["d2"]) < 1e-9
        assert set(scores["domains"]) == {"d0", "d1", "d2"}
    proc = subprocess.run([str(bin_dir / "ratatouille"), "evaluate", str(timm_dir / "model.safetensors"), str(ds)],
                          capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": str(bin_dir)})
    assert proc.returncode == 0 and proc.stdout.splitlines()[0].split() == ["domain", "accuracy", "images"]
