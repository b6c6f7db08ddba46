"""Which purges a copy in flight must yield to: the purge generation log (readthrough)."""

from __future__ import annotations

from tierproxy.keys import KeySpace
from tierproxy.readthrough import _PURGE_LOG, ReadThrough


def _log_only() -> ReadThrough:
    rt = ReadThrough.__new__(ReadThrough)  # only the purge bookkeeping is exercised
    import collections

    rt._purge_generation = 0
    rt._purge_log = collections.deque(maxlen=_PURGE_LOG)
    return rt


def test_key_purges_touch_only_their_keys_and_tag_purges_touch_all() -> None:
    rt = _log_only()
    a, b = KeySpace("http://o.test").key("/a"), KeySpace("http://o.test").key("/b")
    start = rt._purge_generation
    assert not rt._purged_since(start, a)
    rt._bump_purge_generation(frozenset({"/b"}))
    rt._bump_purge_generation(frozenset({"/b"}))
    assert not rt._purged_since(start, a) and rt._purged_since(start, b)
    after_b = rt._purge_generation
    rt._bump_purge_generation(None)  # by tag
    assert rt._purged_since(after_b, a) and rt._purged_since(after_b, b)
    assert rt._purged_since(start, a)


def test_a_copy_older_than_the_log_is_treated_as_purged() -> None:
    rt = _log_only()
    a = KeySpace("http://o.test").key("/a")
    start = rt._purge_generation
    for i in range(_PURGE_LOG + 1):
        rt._bump_purge_generation(frozenset({f"/other/{i}"}))
    assert rt._purged_since(start, a)  # the log no longer reaches back: assume the worst
    recent = rt._purge_generation - 10
    assert not rt._purged_since(recent, a)
