"""augmentation.horizontalFlip in the trainer: off flips no image and leaves every other random
parameter where it was; on (the default) is the augmentation as it always was; the job
description carries it to the training loop and the averaged model's lineage."""
from __future__ import annotations

import json

import pytest
import torch

from ratatouille_trainer import data as D
from ratatouille_trainer import stages, training
from ratatouille_contract.jobdesc import Augmentation, JobDescription, JobDescriptionError
from ratatouille_trainer.progress import Progress

from . import util

S = 32


def left_bright(n: int) -> torch.Tensor:
    """n uint8 images, white on the left half and black on the right: a flip is visible after
    any crop of scale >= 0.7 and any jitter (brightness, contrast, saturation, hue and grayscale
    keep white above black)."""
    x = torch.zeros(n, 3, S, S, dtype=torch.uint8)
    x[..., : S // 2] = 255
    return x


def flipped(out: torch.Tensor) -> torch.Tensor:
    half = out.shape[-1] // 2
    return out[..., :half].mean(dim=(1, 2, 3)) < out[..., half:].mean(dim=(1, 2, 3))


@pytest.mark.parametrize("fn", [D.augment_batch, D.augment_batch_reference])
def test_no_flip_flips_no_image_and_draws_the_same_numbers(fn):
    x = left_bright(64)
    g_on, g_off = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    on = fn(x, g_on)
    off = fn(x, g_off, horizontal_flip=False)
    assert flipped(on).sum() > 10                 # with flips some are mirrored
    assert not flipped(off).any()                 # without, none
    # the switch consumes the same random numbers: the next batches' crops and jitter match
    assert torch.equal(g_on.get_state(), g_off.get_state())
    # the images the flip left alone are the same bits; the others are their mirror image
    # (an unflipped copy of a mirrored crop: equal up to the order of the contrast mean's sum)
    was = flipped(on)
    assert torch.equal(on[~was], off[~was])
    assert torch.allclose(on[was].flip(3), off[was], atol=1e-5)


def test_flip_on_is_the_default_and_what_training_always_did():
    torch.manual_seed(1)
    x = (torch.rand(24, 3, S, S) * 255).to(torch.uint8)
    outs = []
    for kw in ({}, {"horizontal_flip": True}):
        g = torch.Generator().manual_seed(7)
        outs.append(D.train_transform(x, g, **kw))
    assert torch.equal(outs[0], outs[1])
    g = torch.Generator().manual_seed(7)
    assert torch.equal(outs[0], D.normalize(D.augment_batch_reference(x, g)))


def test_job_description_carries_the_switch_and_defaults_older_ones_to_flip():
    d = util.job("linear-probe", "/tmp/out", "/tmp/ds")
    assert "augmentation" not in d
    assert util.desc(d).augmentation == Augmentation(horizontalFlip=True)     # older descriptions
    off = util.desc({**d, "augmentation": {"horizontalFlip": False}})
    assert off.augmentation.horizontalFlip is False
    assert json.loads(off.to_json())["augmentation"] == {"horizontalFlip": False}
    assert JobDescription.from_json(off.to_json()) == off
    assert "augmentation" not in util.desc(d).to_dict()                    # default: unchanged JSON
    with pytest.raises(JobDescriptionError, match="horizontalFlip must be a boolean"):
        util.desc({**d, "augmentation": {"horizontalFlip": "false"}})


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RATATOUILLE_DEVICE", "cpu")
    monkeypatch.delenv("RATATOUILLE_ABORT_AT_STEP", raising=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flip")
    return {"ds": util.write_dataset(tmp / "ds", per_class=4),
            "fw": util.write_foundation(tmp / "foundation.safetensors")}


def _quiet():
    import io
    return Progress("t", "0", 1, stream=io.StringIO())


@pytest.mark.parametrize("flip", [True, False])
def test_a_job_trains_with_its_description_s_switch(world, tmp_path, monkeypatch, flip):
    seen = []
    real = training.train_transform

    def spy(x, g, *, horizontal_flip=True):
        seen.append(horizontal_flip)
        return real(x, g, horizontal_flip=horizontal_flip)

    monkeypatch.setattr(training, "train_transform", spy)
    d = util.job("linear-probe", tmp_path / "lp", world["ds"], weights=str(world["fw"]), steps=3)
    d["augmentation"] = {"horizontalFlip": flip}
    stages.run_stage(util.desc(d), progress=_quiet())
    assert seen and set(seen) == {flip}


def test_the_average_records_the_switch_in_its_lineage(world, tmp_path):
    # one trained member is enough (a linear probe's output has what a member needs)
    d = util.job("linear-probe", tmp_path / "m0", world["ds"], weights=str(world["fw"]), steps=2)
    d["augmentation"] = {"horizontalFlip": False}
    stages.run_stage(util.desc(d), progress=_quiet())
    avg = util.job("average", tmp_path / "avg", world["ds"], member="0", weights=str(world["fw"]),
                   members=[{"member": "0", "uri": str(tmp_path / "m0"), "source": "foundation"}])
    avg["augmentation"] = {"horizontalFlip": False}
    stages.run_stage(util.desc(avg), progress=_quiet())
    lineage = json.loads((tmp_path / "avg" / "lineage.json").read_text())
    assert lineage["data"]["augmentation"] == {"horizontalFlip": False}
