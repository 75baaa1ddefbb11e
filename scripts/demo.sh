#!/usr/bin/env bash
# The quick start: build the demo datasets, then run crds/examples/quickstart.yaml on this
# machine. Re-running resumes (finished members are kept under .demo/runs).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
start=$(date +%s)
if [ ! -f .demo/data/demo-data.json ]; then
  echo "== building the demo datasets under .demo/data (digits target; rot4, shapes, glyphs auxiliaries)"
  .venv/bin/python -m ratatouille_trainer.demo_data --out .demo/data --data-only > .demo-data.log
  mv .demo-data.log .demo/data/build.log
fi
echo "== ratatouille run crds/examples/quickstart.yaml"
status=0
.venv/bin/ratatouille run crds/examples/quickstart.yaml "$@" || status=$?
echo "== demo finished in $(( $(date +%s) - start )) s (exit $status)"
exit $status
