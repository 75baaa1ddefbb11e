"""Data: DomainBed layout, splits, samplers, augmentation, bad input."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from ratatouille_trainer import data as D
from tests.trainer import util

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ds_path(tmp_path_factory):
    return util.write_dataset(tmp_path_factory.mktemp("data") / "ds",
                              formats=("png", "jpg", "L", "P", "RGBA"))


def test_seed_hash_is_domainbeds():
    expect = int(hashlib.md5(str((0, 1)).encode()).hexdigest(), 16) % (2 ** 31)
    assert D.seed_hash(0, 1) == expect
    assert D.seed_hash(0, 1) != D.seed_hash(0, 2)


def test_load_mixed_formats_split_and_order(ds_path):
    ds = D.load_dataset(str(ds_path), 32, test_domains=("d2",), holdout_fraction=0.2, split_seed=0)
    assert ds.domain_names == ["d0", "d1", "d2"]
    assert ds.classes == ["circle", "square", "triangle"]
    assert [d.name for d in ds.train_domains] == ["d0", "d1"]
    for i, d in enumerate(ds.domains):
        assert d.images.dtype == torch.uint8 and tuple(d.images.shape) == (36, 3, 32, 32)
        assert d.skipped == []
        # DomainBed's split_dataset: out = first int(n * 0.2) of a RandomState-shuffled range
        keys = list(range(36))
        np.random.RandomState(D.seed_hash(0, i)).shuffle(keys)
        assert d.out_idx.tolist() == keys[:7]
        assert d.in_idx.tolist() == keys[7:]
        assert sorted(d.out_idx.tolist() + d.in_idx.tolist()) == list(range(36))
    # the labels follow sorted class folders, 12 each
    assert ds.domains[0].labels.bincount().tolist() == [12, 12, 12]
    # splits depend on the split seed
    other = D.load_dataset(str(ds_path), 32, test_domains=("d2",), split_seed=1)
    assert other.domains[0].out_idx.tolist() != ds.domains[0].out_idx.tolist()
    # file:// URIs work too
    via_uri = D.load_dataset("file://" + str(ds_path), 32, test_domains=("d2",))
    assert torch.equal(via_uri.domains[1].images, ds.domains[1].images)


def test_grayscale_and_palette_become_rgb(tmp_path):
    from PIL import Image
    root = tmp_path / "ds"
    for dom in ("a", "b"):
        for cls in ("x", "y"):
            (root / dom / cls).mkdir(parents=True)
            Image.new("L", (50, 30), 128).save(root / dom / cls / "g.png")
            Image.new("P", (20, 20), 3).save(root / dom / cls / "p.gif")
            Image.new("RGBA", (64, 64), (10, 20, 30, 0)).save(root / dom / cls / "r.png")
            Image.new("RGB", (64, 64), (200, 10, 10)).save(root / dom / cls / "c.jpg")
    ds = D.load_dataset(str(root), 16)
    imgs = ds.domains[0].images
    assert tuple(imgs.shape) == (8, 3, 16, 16)
    # grayscale 128 -> (128, 128, 128); RGBA keeps its colour (alpha dropped, as PIL convert('RGB'))
    assert imgs[imgs[:, 0, 0, 0] == 128].shape[0] >= 1
    assert any(torch.equal(im[:, 0, 0], torch.tensor([10, 20, 30], dtype=torch.uint8)) for im in imgs)


def test_missing_dataset_and_unknown_test_domain(tmp_path, ds_path):
    with pytest.raises(D.DataError, match="nope"):
        D.load_dataset(str(tmp_path / "nope"), 32)
    with pytest.raises(D.DataError) as e:
        D.load_dataset(str(ds_path), 32, test_domains=("sketch",))
    assert "'sketch'" in str(e.value) and "d0, d1, d2" in str(e.value)
    with pytest.raises(D.DataError, match="every domain"):
        D.load_dataset(str(ds_path), 32, test_domains=("d0", "d1", "d2"))


def test_class_mismatch_names_the_domain(tmp_path):
    root = util.write_dataset(tmp_path / "ds", per_class=3)
    (root / "d1" / "hexagon").mkdir()
    with pytest.raises(D.DataError) as e:
        D.load_dataset(str(root), 32)
    assert "'d1'" in str(e.value) and "hexagon" in str(e.value)


def test_truncated_image_skipped_with_warning_and_empty_domain(tmp_path, capsys):
    root = util.write_dataset(tmp_path / "ds", per_class=4)
    good = (root / "d0" / "circle" / "0.png").read_bytes()
    (root / "d0" / "circle" / "0.png").write_bytes(good[: len(good) // 2])
    (root / "d0" / "circle" / "junk.png").write_bytes(b"not an image at all")
    ds = D.load_dataset(str(root), 32)
    err = capsys.readouterr().err
    assert "warning" in err and "0.png" in err and "junk.png" in err
    assert len(ds.domain("d0")) == 12 - 1 and len(ds.domain("d1")) == 12
    assert len(ds.domain("d0").skipped) == 2
    # a domain whose images are all unreadable is an error naming it
    for f in (root / "d1").rglob("*.png"):
        f.write_bytes(b"garbage")
    with pytest.raises(D.DataError, match="'d1'.*no readable images"):
        D.load_dataset(str(root), 32)


def test_domain_without_images(tmp_path):
    root = util.write_dataset(tmp_path / "ds", per_class=3)
    for f in (root / "d2").rglob("*.png"):
        f.unlink()
    with pytest.raises(D.DataError, match="'d2' .*has no images"):
        D.load_dataset(str(root), 32)


def test_stream_batches_training_domains_only_and_resumes(ds_path):
    ds = D.load_dataset(str(ds_path), 32, test_domains=("d1",))
    s = D.TrainStream(ds, batch_size=5, seed=3)
    assert [d.name for d in s.domains] == ["d0", "d2"]
    x, y = s.next_raw()
    assert tuple(x.shape) == (10, 3, 32, 32) and tuple(y.shape) == (10,)
    # every image of the first half comes from d0's in-split, the second half from d2's in-split
    for half, dom in ((x[:5], ds.domain("d0")), (x[5:], ds.domain("d2"))):
        pool = dom.images[dom.in_idx].flatten(1)
        for im in half:
            assert (pool == im.flatten()).all(1).any()
        out_pool = dom.images[dom.out_idx].flatten(1)
        # out-split images are never drawn (the shapes are random, so no duplicates)
        assert not any((out_pool == im.flatten()).all(1).any() for im in half)
    state = s.get_state()
    a = [s.next_raw()[1].tolist() for _ in range(3)]
    aug_a = D.train_transform(x, s.aug_gen)
    s.set_state(state)
    b = [s.next_raw()[1].tolist() for _ in range(3)]
    aug_b = D.train_transform(x, s.aug_gen)
    assert a == b
    assert torch.equal(aug_a, aug_b)


def test_augmentation_shapes_ranges_and_per_image_params(ds_path):
    ds = D.load_dataset(str(ds_path), 32, test_domains=("d2",))
    x = ds.domains[0].images[:16]
    g = torch.Generator().manual_seed(0)
    out = D.augment_batch(x, g)
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    # different images get different crops/jitter: the same image repeated gives varied outputs
    same = x[:1].repeat(16, 1, 1, 1)
    outs = D.augment_batch(same, g)
    assert len({round(float(o.sum()), 3) for o in outs}) > 8
    # evaluation is resize only: normalisation of the decoded image
    ev = D.eval_transform(x)
    mean = torch.tensor(D.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(D.IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(ev, (x.float() / 255 - mean) / std)


def test_hue_matches_torchvision():
    from torchvision.transforms.v2 import functional as TF
    x = torch.rand(4, 3, 8, 8)
    hsv = D._rgb_to_hsv(x)
    assert torch.allclose(D._hsv_to_rgb(hsv), x, atol=1e-5)
    h = torch.remainder(hsv[:, 0] + 0.2, 1.0)
    mine = D._hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), 1))
    assert torch.allclose(mine, TF.adjust_hue(x, 0.2), atol=1e-4)
    assert torch.allclose(D._blend(x, D._grayscale(x), torch.tensor(0.5)),
                          TF.adjust_saturation(x, 0.5), atol=1e-5)
    assert torch.allclose(D._blend(x, D._grayscale(x).mean(dim=(1, 2, 3), keepdim=True), torch.tensor(1.3)),
                          TF.adjust_contrast(x, 1.3), atol=1e-5)
