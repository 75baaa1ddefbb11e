"""The Dockerfile, read as text: pinned bases, non-root targets, nothing built shipped. It is also
really built and run with podman (tests/chart/test_images.py)."""
from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) from Dockerfile text: continuation lines joined, comments
    and parser directives dropped."""
    logical, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # comment inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1].rstrip() + " "
            continue
        logical.append(buf + line)
        buf = ""
    if buf:
        logical.append(buf)
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        op, _, arg = line.partition(" ")
        op, arg = op.upper(), arg.strip()
        if op == "FROM":
            m = re.match(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?$", arg, re.I)
            assert m, line
            stages.append(Stage(m.group(1), m.group(2)))
        elif not stages:
            assert op == "ARG", f"only ARG may precede FROM: {line}"
            name, _, default = arg.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append((op, arg))
    return global_args, stages


def expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


@pytest.fixture(scope="module")
def dockerfile():
    assert DOCKERFILE.exists()
    return parse(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_multi_stage_with_pinned_bases(dockerfile):
    args, stages = dockerfile
    assert len(stages) >= 2
    names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.base in names:
            continue  # FROM an earlier stage
        image = expand(stage.base, args)
        assert "$" not in image, f"unresolved base image {stage.base}"
        repo, _, tag = image.partition("@")[0].rpartition(":")
        assert repo and tag and "/" not in tag, f"{image}: no tag"
        assert tag != "latest"
        # an exact version: major.minor.patch, not a floating 3.11 or 3
        assert re.match(r"^\d+\.\d+\.\d+", tag), f"{image}: tag {tag} is not an exact version"


def _targets(stages: list[Stage]) -> dict[str, Stage]:
    return {s.name: s for s in stages if s.name in ("operator", "trainer")}


def _runtime(stages: list[Stage]) -> Stage:
    return next(s for s in stages if s.name == "runtime")


def test_both_targets_run_as_non_root(dockerfile):
    _, stages = dockerfile
    targets = _targets(stages)
    assert set(targets) == {"operator", "trainer"}
    for name, stage in targets.items():
        users = stage.all("USER")
        assert users, f"no USER in the {name} target"
        user = users[-1].split(":")[0]
        # numeric, so Kubernetes' runAsNonRoot can verify it without runAsUser
        assert user.isdigit() and int(user) >= 10000, name


def test_shipped_stages_have_no_build_tools_and_only_environments_cross_over(dockerfile):
    _, stages = dockerfile
    shipped = [_runtime(stages), *_targets(stages).values()]
    runs = " ".join(r for s in shipped for r in s.all("RUN"))
    for tool in ("build-essential", "gcc", "g++", "make ", "clang", "cmake", "-dev ", "pip install"):
        assert tool not in runs, f"{tool} in a shipped stage"
    for stage in _targets(stages).values():
        copies = [c for c in stage.all("COPY") if c.startswith("--from=")]
        assert copies and all(" /opt/ratatouille" in c for c in copies), copies
    # the operator target never takes the torch environment
    operator = " ".join(_targets(stages)["operator"].all("COPY"))
    assert "deps-trainer" not in operator and "venv-trainer" not in operator


def test_installs_cuda_torch_and_the_project_extras(dockerfile):
    _, stages = dockerfile
    runs = " ".join(r for s in stages for r in s.all("RUN"))
    assert "torch==2.14.1" in runs and "torchvision==0.29.1" in runs
    assert "--index-url" not in runs and "cpu" not in re.findall(r"download\.pytorch\.org/whl/(\w+)", runs)
    assert re.search(r"""pip install ["']?\.\[trainer,operator\]""", runs)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = pyproject["project"]["optional-dependencies"]["trainer"]
    assert "torch==2.14.1" in pins and "torchvision==0.29.1" in pins  # the image agrees with pyproject


def test_environment_and_labels(dockerfile):
    _, stages = dockerfile
    final = _runtime(stages)  # both targets start from it
    env = " ".join(final.all("ENV"))
    assert re.search(r"\bHF_HUB_OFFLINE=1\b", env)
    labels = " ".join(final.all("LABEL"))
    for key in ("org.opencontainers.image.version", "org.opencontainers.image.source",
                "org.opencontainers.image.title", "org.opencontainers.image.licenses"):
        assert key in labels
    assert 'licenses="Apache-2.0"' in labels


def test_entrypoints_exist_in_pyproject_scripts(dockerfile, scripts):
    _, stages = dockerfile
    for final in _targets(stages).values():
        assert not final.all("ENTRYPOINT"), "ENTRYPOINT would force a command on child Jobs"
        [cmd] = final.all("CMD")
        argv = json.loads(cmd)  # exec form
        assert argv == ["ratatouille", "operator"]
    referenced = set()
    for stage in stages:
        for op, arg in stage.instructions:
            if op in ("RUN", "CMD", "ENTRYPOINT"):
                words = json.loads(arg) if arg.startswith("[") else shlex.split(arg)
                referenced |= {w for w in words if re.fullmatch(r"ratatouille[-\w]*", w)}
    assert "ratatouille" in referenced
    assert referenced <= set(scripts), referenced - set(scripts)


def test_dockerignore_keeps_the_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "tests", "charts"):
        assert entry in ignored
    for needed in ("pyproject.toml", "operator", "trainer"):
        assert needed not in ignored


def test_parser_catches_problems():
    """The checks above would fail on a bad file."""
    _, stages = parse("FROM python:latest\nRUN apt-get install -y build-essential\nUSER root\n")
    assert stages[0].base == "python:latest" and stages[-1].all("USER") == ["root"]
    args, stages = parse("ARG B=python:3.11.9-slim\nFROM ${B} AS x\nRUN a \\\n  # note\n  b\n")
    assert expand(stages[0].base, args) == "python:3.11.9-slim" and stages[0].all("RUN") == ["a b"]
