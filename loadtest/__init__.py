"""Load tests and benchmarks for tierproxy.

Everything here talks to loopback only (127.0.0.1): each command starts its own origin,
Redis, proxy and load generator, runs for a bounded time and stops them all.

    python -m loadtest.origin --port 9000            # the simulated origin on its own
    python -m loadtest.run steady --duration 60      # one named scenario, report folder
    python -m loadtest.bench                         # wrk throughput table

See loadtest/README.md.
"""
