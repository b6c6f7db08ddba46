"""Test support for tierproxy's integration suite.

Real components only: a real ``redis-server`` (:mod:`support.redis_server`), a scriptable
aiohttp origin (:mod:`support.origin`), a raw TCP fault proxy (:mod:`support.faultproxy`),
the proxy itself in-process or as a subprocess (:mod:`support.proxy`), bounded polling
(:mod:`support.wait`) and readers for the L2/L3 storage layout (:mod:`support.storage`).

Nothing here imports ``tierproxy`` at import time, so the fixtures load even while the
package is being written; the proxy helpers import it when first used.
"""
