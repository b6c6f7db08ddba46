"""Request target -> key material (which is also exactly what is forwarded)."""

from __future__ import annotations

import pytest

from tierproxy.keys import BadTarget, KeySpace, normalise_target, origin_identity


@pytest.mark.parametrize(
    ("raw", "material"),
    [
        ("/", "/"),
        ("/a/b.css?x=1&y=2", "/a/b.css?x=1&y=2"),
        ("/a/../b", "/b"),
        ("/a/./b", "/a/b"),
        ("/%2e%2e/etc/passwd", "/etc/passwd"),  # escaped dots are dots
        ("/%2E%2e/x", "/x"),
        ("/a/..", "/"),
        ("/..", "/"),
        ("/a%2fb", "/a%2Fb"),  # an escaped slash is data, never a separator
        ("/%7euser", "/~user"),  # unreserved characters are decoded
        ("/a%3a", "/a%3A"),  # reserved escapes upper-cased
        ("//x", "//x"),
        ("/a?", "/a"),
        ("/a?q=%7e&r=%2f", "/a?q=~&r=%2F"),
        ("/a b", "/a%20b"),
        ("/caf\u00e9", "/caf%C3%A9"),
        ("http://evil.example:81/x?y", "/x?y"),  # absolute-form: authority dropped
        ("http://evil.example", "/"),
        ("HTTPS://evil.example?q", "/?q"),
    ],
)
def test_normalise(raw: str, material: str) -> None:
    assert normalise_target(raw) == material


@pytest.mark.parametrize("raw", ["*", "evil.example:443", "/a%zz", "/a%", "/a#frag", "x" * 9000])
def test_rejected(raw: str) -> None:
    with pytest.raises(BadTarget):
        normalise_target(raw)


def test_normalising_twice_changes_nothing() -> None:
    for raw in ["/a/../b/%7e/%2f?q=%2a", "/x/./y//z", "http://h/a/%2E/b"]:
        once = normalise_target(raw)
        assert normalise_target(once) == once


def test_digest_is_fixed_length_sha256() -> None:
    keys = KeySpace("http://origin.test")
    assert len(keys.key("/short").digest) == 64
    assert len(keys.key("/" + "x" * 5000).digest) == 64
    assert keys.key("/a").digest != keys.key("/b").digest


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("http://example.com", "HTTP://Example.COM:80/"),
        ("https://example.com", "https://example.com:443"),
        ("http://[::1]:8080", "http://[::1]:8080/"),
        ("http://h/base", "http://h:80/base/"),
    ],
)
def test_one_origin_spelled_two_ways_is_one_namespace(one: str, other: str) -> None:
    assert origin_identity(one) == origin_identity(other)
    assert KeySpace(one).key("/a").digest == KeySpace(other).key("/a").digest


@pytest.mark.parametrize(
    "other",
    [
        "https://example.com",
        "http://example.com:8080",
        "http://example.org",
        "http://example.com/v2",
    ],
)
def test_another_origin_is_another_namespace(other: str) -> None:
    base = KeySpace("http://example.com")
    assert base.key("/a").digest != KeySpace(other).key("/a").digest
    assert base.tag_id("t") != KeySpace(other).tag_id("t")


def test_the_format_version_is_part_of_every_key_but_not_of_tag_ids() -> None:
    now, older = KeySpace("http://h", 2), KeySpace("http://h", 1)
    assert now.key("/a").digest != older.key("/a").digest
    assert now.tag_id("t") == older.tag_id("t")  # a tag purge reaches older entries too


def test_for_target_remembers_recent_short_targets_within_its_bound() -> None:
    from tierproxy import keys as keys_module

    space = KeySpace("http://origin.test")
    first = space.for_target("/a/%7euser?x=1")
    assert space.for_target("/a/%7euser?x=1") is first  # normalised once
    assert first.material == space.for_target("/a/~user?x=1").material
    long_target = "/" + "l" * keys_module._KNOWN_TARGET_CHARS
    assert space.for_target(long_target) is not space.for_target(long_target)  # not kept
    for i in range(keys_module._KNOWN_TARGETS + 10):
        space.for_target(f"/many/{i}")
    assert len(space._known) <= keys_module._KNOWN_TARGETS
    with pytest.raises(BadTarget):
        space.for_target("/bad/%zz")
    with pytest.raises(BadTarget):
        space.for_target("/bad/%zz")  # an error is not remembered as a key
