# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: venv system-deps k8s demo test test-fast dev-cluster crds clean

venv: $(VENV)/.installed

# torch/torchvision: the CUDA build from PyPI (about 3 GB, kept in pip's cache for later installs);
# kubernetes<37 keeps pip from backtracking through boto3 releases.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[trainer,operator,demo,bench,test]'
	touch $@

# Prometheus (promtool too) for the observability tests; openssl for the test cluster's PKI;
# podman, runc and debootstrap to build and run the images (scripts/images/build.sh); the fonts
# the domainbed_mini v2 benchmark renders its auxiliaries from, for its mechanics test.
system-deps:
	@for tool in prometheus openssl podman runc debootstrap; do command -v $$tool >/dev/null || missing=1; done; \
	  [ -z "$$missing" ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    prometheus openssl podman runc debootstrap >/dev/null; }
	@dpkg -s fonts-noto-core fonts-bwht >/dev/null 2>&1 || sh benchmarks/domainbed_mini/setup-v2.sh >/dev/null

# The upstream control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
# kubectl), Helm and Kueue, built from their Go modules (scripts/k8s/versions.env) once per
# machine into ~/.cache/ratatouille/k8s; a cached build costs nothing.
k8s:
	bash scripts/k8s/build.sh

demo: venv
	bash scripts/demo.sh

test: venv system-deps k8s
	$(VENV)/bin/pytest -q -ra

# Without the end-to-end runs and the performance checks (timing bounds flake on a loaded machine);
# `make test` (CI) runs those too.
test-fast: venv k8s
	$(VENV)/bin/pytest -q -m "not slow and not perf"

# The control plane, node agent, S3 and Prometheus on loopback with the chart installed; prints
# the exports for kubectl; Ctrl-C stops it. Uploads the demo data when `make demo` made it.
dev-cluster: venv system-deps k8s
	$(PY) -m tests.cluster.devcluster $(if $(wildcard .demo/data),--demo-data .demo/data)

# The CRD has one source, crds/ratatouilleruns.ratatouille.dev.yaml; the Python package and the
# chart carry copies (tests/test_crd_copies.py fails when they differ).
CRD := crds/ratatouilleruns.ratatouille.dev.yaml
crds:
	cp $(CRD) operator/ratatouille_operator/crd.yaml
	cp $(CRD) charts/ratatouille/files/ratatouilleruns.ratatouille.dev.yaml

clean:
	rm -rf .demo .pytest_cache build *.egg-info
