"""Which purges a copy in flight must yield to: the purge generation log and the purges
running now (tierproxy.purge)."""

from __future__ import annotations

from tierproxy.background import BackgroundTasks
from tierproxy.keys import KeySpace
from tierproxy.metrics import Metrics
from tierproxy.purge import PURGE_LOG, Purges


def _log_only() -> Purges:
    return Purges([], BackgroundTasks(1, Metrics()))  # only the purge bookkeeping is exercised


def test_key_purges_touch_only_their_keys_and_tag_purges_touch_all() -> None:
    purges = _log_only()
    a, b = KeySpace("http://o.test").key("/a"), KeySpace("http://o.test").key("/b")
    start = purges.generation
    assert not purges.purged_since(start, a)
    purges.bump(frozenset({"/b"}))
    purges.bump(frozenset({"/b"}))
    assert not purges.purged_since(start, a) and purges.purged_since(start, b)
    after_b = purges.generation
    purges.bump(None)  # by tag
    assert purges.purged_since(after_b, a) and purges.purged_since(after_b, b)
    assert purges.purged_since(start, a)


def test_a_copy_older_than_the_log_is_treated_as_purged() -> None:
    purges = _log_only()
    a = KeySpace("http://o.test").key("/a")
    start = purges.generation
    for i in range(PURGE_LOG + 1):
        purges.bump(frozenset({f"/other/{i}"}))
    assert purges.purged_since(start, a)  # the log no longer reaches back: assume the worst
    recent = purges.generation - 10
    assert not purges.purged_since(recent, a)


def test_distrusting_local_copies_counts_as_a_purge_of_every_key() -> None:
    purges = _log_only()
    a = KeySpace("http://o.test").key("/a")
    start = purges.generation
    purges.distrust_local()
    assert purges.purged_since(start, a)
    assert not purges.purged_since(purges.generation, a)


def test_a_purge_being_held_refuses_copies_of_its_keys_and_tags_whenever_they_were_read() -> None:
    purges = _log_only()
    space = KeySpace("http://o.test")
    a, b, c = space.key("/a"), space.key("/b"), space.key("/c")
    with purges.holding([a], ["news"]):
        now = purges.generation  # a copy read while the purge runs (after its first bump)
        assert purges.refuses(now, a)  # its key
        assert purges.refuses(now, c, ("sports", "news"))  # an entry carrying its tag
        assert not purges.refuses(now, b) and not purges.refuses(now, c, ("sports",))
        with purges.holding([b], ()):  # nested, as Invalidation.purge holds around Purges.purge
            assert purges.refuses(purges.generation, b) and purges.refuses(now, a)
        assert purges.refuses(purges.generation, a)  # the outer one still runs
    # Released: the generation moved, so a copy read while it ran is still not written...
    assert purges.refuses(now, a) and purges.refuses(now, c, ("news",))
    # ...and one read afterwards is.
    assert not purges.refuses(purges.generation, a)
    assert not purges.refuses(purges.generation, c, ("news",))
