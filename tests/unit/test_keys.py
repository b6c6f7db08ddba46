"""Request target -> key material (which is also exactly what is forwarded)."""

from __future__ import annotations

import pytest

from tierproxy.keys import BadTarget, CacheKey, normalise_target


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
def test_normalise(raw, material):
    assert normalise_target(raw) == material


@pytest.mark.parametrize("raw", ["*", "evil.example:443", "/a%zz", "/a%", "/a#frag", "x" * 9000])
def test_rejected(raw):
    with pytest.raises(BadTarget):
        normalise_target(raw)


def test_normalising_twice_changes_nothing():
    for raw in ["/a/../b/%7e/%2f?q=%2a", "/x/./y//z", "http://h/a/%2E/b"]:
        once = normalise_target(raw)
        assert normalise_target(once) == once


def test_digest_is_fixed_length_sha256():
    assert len(CacheKey("/short").digest) == 64
    assert len(CacheKey("/" + "x" * 5000).digest) == 64
    assert CacheKey("/a").digest != CacheKey("/b").digest
