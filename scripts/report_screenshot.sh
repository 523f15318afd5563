#!/usr/bin/env bash
# Regenerate docs/report.png: a simulated fleet over two months, replayed, reported as HTML, photographed by
# headless Chromium (Debian's chromium). Usage: scripts/report_screenshot.sh [out.png]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/report.png}
g=$(realpath "${GPUSENTRY:-.venv/bin/gpusentry}")
out=$(realpath -m "$out")
browser=$(command -v chromium || command -v chromium-browser || true)
[ -n "$browser" ] || { echo "needs chromium (apt-get install chromium)" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$g" simulate --hosts 2 --start 2026-10-15T08:00:00Z -o "$work/oct.jsonl.gz" 2>/dev/null
"$g" simulate --hosts 2 --start 2026-11-10T08:00:00Z --seed 7 -o "$work/nov.jsonl.gz" 2>/dev/null
"$g" replay "$work/oct.jsonl.gz" "$work/nov.jsonl.gz" -o "$work/alerts.jsonl" 2>/dev/null
(cd "$work" && "$g" report alerts.jsonl --format html -o report.html)
"$browser" --headless=new --no-sandbox --disable-gpu --hide-scrollbars --no-first-run \
  --screenshot="$out" --window-size=1400,1500 "file://$work/report.html" 2>/dev/null
echo "wrote $out"
