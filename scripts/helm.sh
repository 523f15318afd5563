#!/usr/bin/env bash
# Print the path of a helm binary for the chart tests and scripts/render-manifests.sh: the pinned version, built
# once from its Go module into var/tools/ (helm ships no package for this platform's package manager).
set -euo pipefail
cd "$(dirname "$0")/.."
version=${HELM_VERSION:-v3.22.0}
dir="var/tools/helm-$version"
if [ ! -x "$dir/helm" ]; then
  if ! command -v go >/dev/null; then
    echo "error: go not found; install Go 1.24 or newer to build helm $version, or set HELM_VERSION to a built one" >&2
    exit 1
  fi
  echo "building helm $version from its Go module into $dir (once; a few minutes)" >&2
  mkdir -p "$dir"
  GOBIN="$PWD/$dir" CGO_ENABLED=0 go install "helm.sh/helm/v3/cmd/helm@$version" >&2
fi
echo "$PWD/$dir/helm"
