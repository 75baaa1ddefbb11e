#!/usr/bin/env bash
# Build the upstream control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl), Helm and Kueue from their Go modules, once per machine.
#
#   scripts/k8s/build.sh            # prints the bin directory; builds what is missing
#
# The cache lives in $RATATOUILLE_K8S_CACHE (default ~/.cache/ratatouille/k8s), one directory
# per pinned version set (scripts/k8s/versions.env), so CI and later sessions reuse it. Each
# binary is built in a throwaway wrapper module and moved into place only when complete.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck disable=SC1091
source <(sed 's/#.*//' "$here/versions.env")
cache="${RATATOUILLE_K8S_CACHE:-$HOME/.cache/ratatouille/k8s}"
# Bump RECIPE when a change to this script must rebuild what is cached.
RECIPE=2
key="$( (cat "$here/versions.env"; echo "recipe=$RECIPE") | sha256sum | cut -c1-12)"
bin="$cache/$key/bin"
src="$cache/$key/src"
mkdir -p "$bin" "$src"
export GOFLAGS="-buildvcs=false -mod=mod" CGO_ENABLED=0
ldflags="-s -w"

log() { echo "[build-k8s] $*" >&2; }

# wrapper DIR MODULE@VERSION [replace lines...]: a module that requires MODULE
wrapper() {
  local dir="$1" req="$2"; shift 2
  rm -rf "$dir"; mkdir -p "$dir"
  { echo "module ratatouille.dev/build/$(basename "$dir")"; echo; echo "go 1.26.0"; echo
    echo "require ${req%@*} ${req#*@}"
    for r in "$@"; do echo "replace $r"; done; } > "$dir/go.mod"
}

build() {  # build NAME DIR PACKAGE...: go build into a temp dir, then move into $bin
  local name="$1" dir="$2"; shift 2
  local t0=$SECONDS
  log "building $name (${*})"
  (cd "$dir" && go build -trimpath -ldflags "$ldflags ${extra_ldflags:-}" -o "$dir/out/" "$@")
  for f in "$dir"/out/*; do mv -f "$f" "$bin/"; done
  log "built $name in $((SECONDS - t0)) s"
}

need() { for b in "$@"; do [[ -x "$bin/$b" ]] || return 0; done; return 1; }

if need kube-apiserver kube-controller-manager kube-scheduler kubectl; then
  d="$src/kubernetes"
  gomod="$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')"
  mapfile -t staging < <(sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#\1#p' "$gomod")
  reps=()
  for m in "${staging[@]}"; do reps+=("$m => $m $KUBERNETES_STAGING"); done
  wrapper "$d" "k8s.io/kubernetes@$KUBERNETES_VERSION" "${reps[@]}"
  (cd "$d" && go get "k8s.io/kubernetes@$KUBERNETES_VERSION" >/dev/null)
  # The version the binaries report (kubectl version, /version): clients such as Kueue parse it.
  minor="${KUBERNETES_VERSION#v1.}"; minor="${minor%%.*}"
  extra_ldflags=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    extra_ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    extra_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  extra_ldflags="$extra_ldflags" build kubernetes "$d" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
fi

if need etcd; then
  d="$src/etcd"
  wrapper "$d" "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  (cd "$d" && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null)
  build etcd "$d" go.etcd.io/etcd/server/v3
  mv -f "$bin/server" "$bin/etcd"  # go names the binary after the package directory
fi

if need helm; then
  d="$src/helm"
  wrapper "$d" "helm.sh/helm/v4@$HELM_VERSION"
  (cd "$d" && go get "helm.sh/helm/v4@$HELM_VERSION" >/dev/null)
  build helm "$d" helm.sh/helm/v4/cmd/helm
fi

if [[ "${RATATOUILLE_SKIP_KUEUE:-}" != 1 ]] && need kueue; then
  d="$src/kueue"
  wrapper "$d" "sigs.k8s.io/kueue@$KUEUE_VERSION"
  if (cd "$d" && go get "sigs.k8s.io/kueue@$KUEUE_VERSION" >/dev/null && \
      go build -trimpath -ldflags "$ldflags" -o "$d/out/kueue" sigs.k8s.io/kueue/cmd/kueue 2> "$d/build.log"); then
    mv -f "$d/out/kueue" "$bin/kueue"; log "built kueue"
  else
    log "kueue did not build (see $d/build.log); tests that need it are skipped"
    touch "$bin/.kueue-failed"
  fi
fi

# The Prometheus Operator's CRDs, generated from its API module's Go types with controller-gen
# (the way that project makes them), so ServiceMonitor/PodMonitor/PrometheusRule objects are
# validated by the API server. Its root module, which ships the YAML, is not served here.
crds="$cache/$key/crds"
if [[ ! -f "$crds/monitoring.coreos.com_prometheusrules.yaml" ]]; then
  d="$src/monitoring-crds"
  wrapper "$d" "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring@$PROMETHEUS_OPERATOR_VERSION"
  printf 'package tools\n\nimport _ "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"\n' > "$d/tools.go"
  (cd "$d" && go get "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring@$PROMETHEUS_OPERATOR_VERSION" \
      "sigs.k8s.io/controller-tools/cmd/controller-gen@$CONTROLLER_TOOLS_VERSION" >/dev/null 2>&1)
  build controller-gen "$d" sigs.k8s.io/controller-tools/cmd/controller-gen
  rm -rf "$d/gen" && mkdir -p "$d/gen" "$crds"
  (cd "$d" && "$bin/controller-gen" crd:crdVersions=v1,maxDescLen=0 \
      paths=github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1 output:crd:dir="$d/gen")
  for kind in servicemonitors podmonitors prometheusrules; do
    cp "$d/gen/monitoring.coreos.com_$kind.yaml" "$crds/"
  done
  log "generated the Prometheus Operator CRDs"
fi

echo "$bin"
