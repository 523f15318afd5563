#!/usr/bin/env bash
# Install the real peers the test suite talks to (Debian packages listed in tests/debian-packages.txt),
# only those missing, and only when we may (root with apt-get). Tests that need an absent peer skip
# with a reason that names the package.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
while read -r pkg _; do
  case "$pkg" in ''|'#'*) continue ;; esac
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done < tests/debian-packages.txt
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing test peers: ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "warning: missing ${need[*]} (not root, or no apt-get); the tests that need them will skip" >&2
  fi
fi
