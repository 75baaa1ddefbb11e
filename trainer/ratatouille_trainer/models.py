"""The network: a timm featurizer (classifier removed), dropout on pooled features, one linear
head. BatchNorm is frozen in eval mode for the whole run (docs/algorithm.md), so every member shares the
foundation's BN statistics and members average cleanly.

State dict keys: ``featurizer.*`` (the timm model with ``num_classes=0``) and ``head.*``.
Weights are safetensors only; nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Mapping

import torch
from torch import nn

from .weights import UnsafeWeightsError, load_safetensors_file, refuse_pickle

FEATURIZER_PREFIX = "featurizer."
HEAD_PREFIX = "head."
_CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.", "last_linear.", "head_dist.")
# The CRD's foundation.model pattern: an architecture, optionally with a pretrained tag.
TIMM_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_-]+)?")


class ModelError(ValueError):
    """Weights that do not fit the network, a missing weights file, an unknown architecture."""


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


class Network(nn.Module):
    def __init__(self, featurizer: nn.Module, num_features: int, num_classes: int, dropout: float):
        super().__init__()
        self.featurizer = featurizer
        self.dropout = nn.Dropout(float(dropout))
        self.head = nn.Linear(num_features, num_classes)
        self.bn_frozen = False

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.featurizer(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def train(self, mode: bool = True) -> "Network":
        super().train(mode)
        if self.bn_frozen:
            for m in self.modules():
                if _is_bn(m):
                    m.eval()
        return self


def build_network(model_name: str, num_classes: int, dropout: float = 0.0,
                  input_size: int | None = None) -> Network:
    """``timm.create_model(model_name, pretrained=False, num_classes=0)`` + dropout + a linear
    head (``input_size`` is accepted for symmetry with the job description; timm CNNs pool
    globally and take any input size)."""
    import timm

    if not isinstance(model_name, str) or not TIMM_NAME.fullmatch(model_name):
        # timm would fetch hf-hub: and local-dir: models' configs (and code paths) from outside
        raise ModelError(f"foundation.model: {model_name!r} is not a timm architecture name "
                         "(hf-hub:, local-dir: and paths are refused; weights come from foundation.weights)")
    try:
        featurizer = timm.create_model(model_name, pretrained=False, num_classes=0)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise ModelError(f"foundation.model: {e}") from None
    num_features = int(getattr(featurizer, "num_features"))
    if num_classes < 2:
        raise ModelError(f"need at least 2 classes, got {num_classes}")
    return Network(featurizer, num_features, num_classes, dropout)


def freeze_bn(net: Network) -> Network:
    """BatchNorm layers stay in eval mode (running statistics never change), even after
    ``net.train()``; their affine weights still train."""
    net.bn_frozen = True
    net.train(net.training)
    return net


def featurizer_digest(net: Network) -> str:
    """sha256 over the featurizer's state (parameters and buffers), to check it is unchanged."""
    h = hashlib.sha256()
    for k, v in net.featurizer.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if v.numel() else b"")
    return h.hexdigest()


def _local_weights(uri: str, storage=None) -> str:
    """A local path for a weights URI (downloaded into the cache for remote URIs)."""
    refuse_pickle(uri)  # by name, before anything is fetched
    if uri.startswith("file://") or "://" not in uri:
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        if not os.path.isfile(path):
            raise ModelError(f"weights not found: {uri}")
        return path
    from . import storage as st

    s = storage or st.open_storage(uri)
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    local = os.path.join(st.local_cache_dir(), "weights", digest, os.path.basename(uri) or "model.safetensors")
    try:
        s.download(uri, local)
    except st.NotFound:
        raise ModelError(f"weights not found: {uri}") from None
    return local


def load_weights(uri: str, storage=None) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, sha256 of the file) of a safetensors file at a path or URI."""
    from .weights import sha256_file

    path = _local_weights(uri, storage)
    refuse_pickle(path)
    try:
        state = load_safetensors_file(path)
    except FileNotFoundError:
        raise ModelError(f"weights not found: {uri}") from None
    except UnsafeWeightsError as e:
        raise UnsafeWeightsError(str(e).replace(path, uri)) from None
    return state, sha256_file(path)


def _featurizer_view(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if any(k.startswith(FEATURIZER_PREFIX) for k in state):
        return {k[len(FEATURIZER_PREFIX):]: v for k, v in state.items() if k.startswith(FEATURIZER_PREFIX)}
    return dict(state)


def _describe(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def load_featurizer_state(net: Network, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Load a foundation featurizer (bare timm keys or ``featurizer.``-prefixed), ignoring a
    classifier head the num_classes=0 model does not have; strict on everything else."""
    feat = _featurizer_view(state)
    expected = net.featurizer.state_dict()
    classifier = str((getattr(net.featurizer, "pretrained_cfg", None) or {}).get("classifier") or "")
    prefixes = _CLASSIFIER_PREFIXES + ((classifier + ".",) if classifier else ())
    unexpected = sorted(k for k in feat if k not in expected and not k.startswith(prefixes))
    _check_fit(expected, feat, unexpected, what, type(net.featurizer).__name__)
    _check_finite({k: feat[k] for k in expected}, what, "featurizer.")
    with torch.no_grad():
        net.featurizer.load_state_dict({k: feat[k] for k in expected}, strict=True)


def load_foundation(net: Network, uri: str, storage=None) -> str:
    """Load the foundation featurizer from a safetensors path/URI; returns its sha256."""
    state, sha = load_weights(uri, storage)
    load_featurizer_state(net, state, f"foundation weights {uri}")
    return sha


def copy_featurizer_parameters(net: Network, source_state: Mapping[str, torch.Tensor],
                               what: str = "source featurizer") -> int:
    """Copy only the featurizer *parameters* from ``source_state`` (keys ``featurizer.*`` or
    bare); buffers (BN running statistics) stay as they are (the foundation's). docs/algorithm.md."""
    feat = _featurizer_view(source_state)
    n = 0
    with torch.no_grad():
        for name, p in net.featurizer.named_parameters():
            if name not in feat:
                raise ModelError(f"{what}: missing parameter featurizer.{name}")
            src = feat[name]
            if tuple(src.shape) != tuple(p.shape):
                raise ModelError(f"{what}: parameter featurizer.{name} has shape {tuple(src.shape)}, "
                                 f"the network expects {tuple(p.shape)}")
            if not torch.isfinite(src).all():
                raise ModelError(f"{what}: parameter featurizer.{name} has NaN/Inf values")
            p.copy_(src)
            n += 1
    return n


def load_head(net: Network, state: Mapping[str, torch.Tensor], what: str = "linear-probe head") -> None:
    """Copy only ``head.*`` tensors (the shared linear-probe head)."""
    with torch.no_grad():
        for name, p in net.head.named_parameters():
            key = HEAD_PREFIX + name
            if key not in state:
                raise ModelError(f"{what}: missing tensor {key}")
            if tuple(state[key].shape) != tuple(p.shape):
                raise ModelError(f"{what}: tensor {key} has shape {tuple(state[key].shape)}, "
                                 f"the network expects {tuple(p.shape)} "
                                 f"({net.head.out_features} classes)")
            _check_finite({key: state[key]}, what)
            p.copy_(state[key])


def _check_finite(state: Mapping[str, torch.Tensor], what: str, prefix: str = "") -> None:
    """Refuse weights with NaN/Inf (a diverged or corrupted file), naming the first tensor."""
    for k, v in state.items():
        if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all()):
            raise ModelError(f"{what}: tensor {prefix}{k} has NaN/Inf values; refusing non-finite weights")


def _check_fit(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor],
               unexpected: list[str], what: str, target: str) -> None:
    """Refuse a state that lacks, adds or reshapes tensors, naming them (one line)."""
    missing = sorted(k for k in expected if k not in given)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {_describe(unexpected)}")
        raise ModelError(f"{what} does not fit {target}: {'; '.join(parts)}")
    for k, v in expected.items():
        if tuple(given[k].shape) != tuple(v.shape):
            raise ModelError(f"{what}: tensor {k} has shape {tuple(given[k].shape)}, "
                             f"the network expects {tuple(v.shape)}")


def load_network_state(net: Network, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Strict load of a full network state (``featurizer.*`` + ``head.*``)."""
    expected = net.state_dict()
    _check_fit(expected, state, sorted(k for k in state if k not in expected), what, "the network")
    with torch.no_grad():
        net.load_state_dict(dict(state), strict=True)


def cpu_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the module's state dict."""
    return {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
