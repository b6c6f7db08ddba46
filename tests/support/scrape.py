"""One sample from a spawned proxy's admin ``/metrics`` (the Prometheus text exposition)."""

from __future__ import annotations

import aiohttp


async def metric_value(admin_url: str, name: str) -> float:
    """The value of the unlabelled sample ``name``; an AssertionError when it is absent."""
    async with aiohttp.ClientSession() as session, session.get(admin_url + "/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")
