#!/usr/bin/env bash
# wrk throughput benchmark: tierproxy L1/L2/L3 hits vs a bare aiohttp handler vs nginx proxy_cache.
# Loopback only, bounded; all flags go to `python -m loadtest.bench` (see loadtest/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null 2>&1; then
    echo "bench.sh: wrk not found: apt-get install -y wrk (and nginx-light for target e)" >&2
    exit 2
fi
exec "${PYTHON:-python3}" -m loadtest.bench "$@"
