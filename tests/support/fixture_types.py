"""The types of the shared factory fixtures (tests/conftest.py), for test signatures.

A test asks for ``make_proxy: MakeProxy`` instead of spelling the callable out each time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from support.faultproxy import FaultProxy
from support.proxy import ProxyHandle, SpawnedProxy

# ``await make_proxy(hit_path=True, **env)`` -> an in-process proxy.
MakeProxy = Callable[..., Awaitable[ProxyHandle]]
# ``await spawn_proxy(wait_healthy=True, healthy_timeout=15.0, **env)`` -> a spawned process.
SpawnProxy = Callable[..., Awaitable[SpawnedProxy]]
# ``await fault_proxy(target_port, host="127.0.0.1", **mode)`` -> a fault-injecting TCP proxy.
MakeFaultProxy = Callable[..., Awaitable[FaultProxy]]
