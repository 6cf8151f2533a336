#!/usr/bin/env bash
# Measures the test build (`cargo test --release --workspace --no-run`) of each given commit one
# after the other in one checkout, so that the numbers are side by side on one machine: the
# dependencies are built once (by the first run, or already), the workspace's own crates are
# rebuilt from scratch for every commit (`cargo clean -p` of the four crates, no incremental
# cache). Prints wall and CPU time per commit and the slowest compilation units from cargo's
# --timings report, which it keeps as target/build-times/<commit>.html.
#
# Usage: scripts/build-times.sh COMMIT... (run it in a clone you do not work in: it checks the
# commits out, and leaves the last one checked out). Takes about 15 minutes per commit on two
# cores once the dependencies are built.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -eq 0 ]; then
    echo "usage: scripts/build-times.sh COMMIT..." >&2
    exit 2
fi
if ! git diff --quiet HEAD; then
    echo "build-times.sh checks commits out: run it in a clean clone" >&2
    exit 2
fi
mkdir -p target/build-times
for commit in "$@"; do
    git checkout -q "$commit"
    cargo clean --release -p rak -p rak-runtime -p rak-codegen -p rak-macros >/dev/null 2>&1
    echo "== $commit ($(git log -1 --format=%s | cut -c1-70))"
    TIMEFORMAT="wall %R s, CPU %U s user + %S s system"
    time CARGO_INCREMENTAL=0 cargo test --release --workspace --no-run --timings -q
    report=$(ls -t target/cargo-timings/cargo-timing-*.html | head -1)
    cp "$report" "target/build-times/$commit.html"
    python3 - "$report" <<'PY'
import json, re, sys
text = open(sys.argv[1]).read()
units = json.loads(re.search(r"const UNIT_DATA = (\[.*?\]);", text, re.S).group(1))
for unit in sorted(units, key=lambda u: -u["duration"])[:8]:
    target = unit.get("target", "").strip() or "lib"
    print(f"  {unit['name']:14} {target:32} {unit['duration']:7.1f} s")
PY
done
