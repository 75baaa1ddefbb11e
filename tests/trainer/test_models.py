"""Models: featurizer/head split, frozen BN, safetensors-only foundation loading, parameter copy."""
from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from ratatouille_trainer import models as M
from ratatouille_trainer.averaging import UnsafeWeightsError
from tests.trainer import util

torch.set_num_threads(1)


def _net(classes=3, dropout=0.0):
    torch.manual_seed(0)
    return M.build_network(util.MODEL, classes, dropout, 32)


def test_network_keys_and_forward():
    net = _net()
    keys = list(net.state_dict())
    assert all(k.startswith(("featurizer.", "head.")) for k in keys)
    assert net.head.weight.shape == (3, net.featurizer.num_features)
    assert not any(k.startswith("featurizer.fc.") for k in keys)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(M.ModelError, match="no_such_model"):
        M.build_network("no_such_model", 3)


def test_frozen_bn_keeps_running_stats_but_trains_affine():
    net = M.freeze_bn(_net())
    net.train()
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert net.training and net.featurizer.training
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(net(torch.randn(8, 3, 32, 32) * 3 + 1), torch.arange(8) % 3)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = net.state_dict()
    for k in before:
        if "running_" in k or "num_batches_tracked" in k:
            assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["featurizer.bn1.weight"], after["featurizer.bn1.weight"])


def test_load_foundation_bare_prefixed_and_errors(tmp_path):
    bare = util.write_foundation(tmp_path / "bare.safetensors", seed=1)  # includes fc.* (ignored)
    pref = util.write_foundation(tmp_path / "pref.safetensors", seed=1, prefix="featurizer.", with_head=False)
    a, b = _net(), _net()
    sha = M.load_foundation(a, str(bare))
    M.load_foundation(b, "file://" + str(pref))
    assert len(sha) == 64
    from safetensors.torch import load_file
    src = load_file(str(bare))
    for k, v in a.featurizer.state_dict().items():
        assert torch.equal(v, src[k]), k
        assert torch.equal(v, b.featurizer.state_dict()[k])
    # missing and unexpected tensors are named
    sd = dict(src)
    first = next(iter(a.featurizer.state_dict()))
    del sd[first]
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(M.ModelError) as e:
        M.load_foundation(_net(), str(tmp_path / "bad.safetensors"))
    assert first in str(e.value) and "extra.weight" in str(e.value)
    with pytest.raises(M.ModelError, match="not found"):
        M.load_foundation(_net(), str(tmp_path / "absent.safetensors"))


def test_pickle_weights_are_refused_never_loaded(tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(pickle, "load", lambda *a, **k: called.append(1))
    pt = tmp_path / "w.pt"
    pt.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UnsafeWeightsError):
        M.load_foundation(_net(), str(pt))
    disguised = tmp_path / "w.safetensors"
    disguised.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(UnsafeWeightsError, match="pickle"):
        M.load_foundation(_net(), str(disguised))
    assert called == []


def test_copy_featurizer_parameters_only(tmp_path):
    net = _net()
    src = _net()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
        for name, buf in src.named_buffers():
            if buf.is_floating_point():
                buf.add_(5.0)
    before_buffers = {k: v.clone() for k, v in net.featurizer.named_buffers()}
    head_before = net.head.weight.clone()
    n = M.copy_featurizer_parameters(net, src.state_dict())
    assert n == len(list(net.featurizer.parameters()))
    for (k, p), (_, q) in zip(net.featurizer.named_parameters(), src.featurizer.named_parameters()):
        assert torch.equal(p, q), k
    for k, v in net.featurizer.named_buffers():
        assert torch.equal(v, before_buffers[k]), k
    assert torch.equal(net.head.weight, head_before)
    first = "featurizer." + next(iter(dict(net.featurizer.named_parameters())))
    bad = {k: v for k, v in src.state_dict().items() if k != first}
    with pytest.raises(M.ModelError, match=first.replace(".", "\\.")):
        M.copy_featurizer_parameters(net, bad)


def test_load_head_checks_classes():
    net = _net(3)
    other = _net(4)
    with pytest.raises(M.ModelError, match="head.weight"):
        M.load_head(net, other.state_dict())
    src = _net(3)
    with torch.no_grad():
        src.head.weight.fill_(0.5)
    M.load_head(net, src.state_dict())
    assert torch.equal(net.head.weight, src.head.weight)
