"""LocalTrust: when a replica's local copies may be served fresh (tiers/base.py)."""

from __future__ import annotations

from tierproxy.entry import Entry
from tierproxy.tiers.base import LocalTrust, lease_clock


def _entry(stored_at: float) -> Entry:
    return Entry(
        key="/a",
        status=200,
        headers=(),
        body=b"x",
        stored_at=stored_at,
        fresh_until=stored_at + 60,
        stale_until=stored_at + 120,
        swr_until=stored_at,
        expires_at=stored_at + 200,
    )


def test_nothing_is_trusted_before_the_first_lease_and_after_it_runs_out() -> None:
    trust = LocalTrust()
    assert not trust.held()
    trust.lease_until = lease_clock() + 60
    assert trust.held()
    trust.lease_until = lease_clock() - 0.001
    assert not trust.held()


def test_a_copy_is_after_the_floor_by_its_stored_at_or_by_a_write_seen_here() -> None:
    trust = LocalTrust()
    trust.raise_floor(1000.0)
    assert trust.stored_after_floor("/a", _entry(1000.0))
    assert not trust.stored_after_floor("/a", _entry(999.5))  # e.g. Date rounded down
    trust.writing("/a", _entry(999.5))  # this process is writing that very copy
    assert trust.stored_after_floor("/a", _entry(999.5))
    # Another (older) copy under the key stays untrusted, even if the write never lands.
    assert not trust.stored_after_floor("/a", _entry(999.0))
    trust.writing("/b", _entry(999.5))
    trust.raise_floor(2000.0)  # a new floor forgets the writes seen before it
    assert not trust.stored_after_floor("/a", _entry(1500.0))
    assert not trust.stored_after_floor("/b", _entry(999.5))
    trust.raise_floor(1500.0)  # never lowered
    assert trust.floor == 2000.0


def test_the_writes_remembered_are_bounded() -> None:
    trust = LocalTrust()
    for i in range(LocalTrust.MAX_WRITTEN + 50):
        trust.writing(f"/k{i}", _entry(-1.0))
    assert len(trust._written) == LocalTrust.MAX_WRITTEN
    assert not trust.stored_after_floor("/k0", _entry(-1.0))  # the oldest were forgotten
    assert trust.stored_after_floor(f"/k{LocalTrust.MAX_WRITTEN + 49}", _entry(-1.0))
