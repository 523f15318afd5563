#!/usr/bin/env bash
# Render the Helm chart with its default values (and its Namespace) into deploy/kubernetes/gpusentry.yaml: the plain manifests for
# `kubectl apply` (tests/test_helm_chart.py checks the file is current).  --check: exit 1 if it is not.
set -euo pipefail
cd "$(dirname "$0")/.."
helm=${HELM:-$(scripts/helm.sh)}
out=deploy/kubernetes/gpusentry.yaml
render() {
  echo "# Rendered from deploy/helm/gpusentry with its default values by scripts/render-manifests.sh: edit the chart."
  echo "# kubectl apply -f deploy/kubernetes/gpusentry.yaml  (create the Kafka password Secrets first: docs/kubernetes.md)"
  "$helm" template gpusentry deploy/helm/gpusentry --namespace gpusentry --kube-version 1.30.0 --set namespace.create=true
}
if [ "${1:-}" = "--check" ]; then
  diff -u "$out" <(render) >/dev/null || { echo "$out is out of date: run scripts/render-manifests.sh" >&2; exit 1; }
else
  render > "$out"
  echo "wrote $out"
fi
