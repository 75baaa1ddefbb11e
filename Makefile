# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: venv system-deps demo test test-fast clean

venv: $(VENV)/.installed

# torch/torchvision are pinned to the pair that installs from local disk here (ENVIRONMENT.md);
# kubernetes<37 keeps pip from backtracking through boto3 releases.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[trainer,operator,demo,bench,test]'
	touch $@

# Prometheus (promtool too) for the observability tests; kubectl is used when present.
system-deps:
	@command -v prometheus >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }

demo: venv
	bash scripts/demo.sh

test: venv system-deps
	$(VENV)/bin/pytest -q -ra

test-fast: venv
	$(VENV)/bin/pytest -q -m "not slow"

clean:
	rm -rf .demo .pytest_cache build *.egg-info
