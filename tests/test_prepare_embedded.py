"""Prepared datasets end to end in embedded mode: a prepare process per dataset, the entry
reused by later runs and seeds (the prepare steps are counted), lineage names the entry."""
from __future__ import annotations

import json
from pathlib import Path

from tests.test_embedded import manifest, ratatouille, write_manifest
from tests.trainer.util import write_dataset, write_foundation


def _prepare_metrics(storage: Path, name: str) -> dict[str, dict]:
    found = {}
    for p in storage.glob(f"default/{name}/*/prepare/*/metrics.json"):
        found[p.parent.name] = json.loads(p.read_text())
    return found


def test_each_dataset_is_prepared_once_across_runs_and_seeds(tmp_path):
    world = tmp_path / "world"
    write_dataset(world / "target", domains=("d0", "d1", "d2"), per_class=6, seed=1)
    write_dataset(world / "aux", domains=("a0", "a1"), classes=("p", "q"), per_class=6, seed=2)
    write_foundation(world / "foundation.safetensors", with_head=False)
    storage = tmp_path / "store"
    small = dict(linearProbe={"steps": 4, "batchSize": 4, "lr": "1e-2"},
                 auxiliaryFinetune={"steps": 4, "batchSize": 4, "lr": "1e-3"},
                 finetune={"runs": 2, "steps": 4, "batchSize": 4, "headWarmupSteps": 1, "evalEvery": 2},
                 averaging={"selection": "uniform"}, failurePolicy={"minSucceeded": 1},
                 dataPreparation={"enabled": True})
    reused = {}
    for name, seed in (("first", 0), ("second", 1)):
        # The auxiliary pool is shared across run seeds; another pool seed makes the second run
        # train its auxiliary again, so that it needs the auxiliary's prepared data too.
        small["auxiliaryFinetune"] = dict(small["auxiliaryFinetune"], seed=seed)
        doc = manifest(world, storage, name=name, seed=seed, **small)
        doc["spec"]["auxiliaries"] = [{"name": "shapes", "dataset": str(world / "aux")}]
        ratatouille("run", write_manifest(tmp_path / f"{name}.yaml", doc), check=True)
        metrics = _prepare_metrics(storage, name)
        assert set(metrics) == {"target", "aux-shapes"}
        reused[name] = {m: v["reused"] for m, v in metrics.items()}
    # decoded once per dataset: the second run (another seed) found both entries DONE
    assert reused == {"first": {"target": False, "aux-shapes": False},
                      "second": {"target": True, "aux-shapes": True}}
    entries = sorted(p.parent.name for p in (storage / "cache" / "data").glob("*/DONE"))
    assert len(entries) == 2
    (lineage_file,) = storage.glob("default/second/*/average/lineage.json")
    lineage = json.loads(lineage_file.read_text())
    text = json.dumps(lineage)
    target_entry = _prepare_metrics(storage, "second")["target"]["prepared"]["entry"]
    assert target_entry in text and Path(target_entry).name in entries
