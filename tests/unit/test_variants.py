"""Vary rules (RFC 9111 §4.1): normalising selecting fields, choosing a stored variant, and
the per-URL bound. Pure functions: tables, and properties over generated header values."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from support import records

from tierproxy import codec, variants
from tierproxy.config import ConfigError, load_settings
from tierproxy.entry import Entry, Headers, Variant


def h(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def stored(request: CIMultiDictProxy[str], vary: str = "Accept-Language", **response: str) -> Entry:
    """The entry a response with ``Vary: vary`` (and ``response`` fields) to ``request`` is."""
    headers = tuple((name.replace("_", "-"), value) for name, value in response.items())
    values = variants.vary_values(h(("Vary", vary)), request)
    return Entry(
        key=variants.record_material("/p", values),
        status=200,
        headers=headers,
        body=b"x",
        stored_at=0.0,
        fresh_until=10.0,
        stale_until=10.0,
        swr_until=10.0,
        expires_at=10.0,
        vary=values,
    )


@pytest.mark.parametrize(
    ("name", "lines", "expected"),
    [
        ("foo", ["1, 2"], "1,2"),
        ("foo", ["1", "2"], "1,2"),  # field lines combined (RFC 9110 §5.3)
        ("foo", [" 1, 2 "], "1,2"),
        ("foo", ["1,,  2"], "1,2"),
        ("foo", ["A  b"], "A b"),  # case kept: an unknown field may be case-sensitive
        ("foo", [], ""),
        ("accept-language", ["en, de"], "en,de"),  # equal weights: the order kept
        ("accept-language", ["eN, De"], "en,de"),
        ("accept-language", [" en ,   de"], "en,de"),
        ("accept-language", ["en;q=0.5, de"], "de,en;q=0.5"),  # ordered by weight
        ("accept-language", ["fr;q=0.5, de;q=1.0"], "de,fr;q=0.5"),
        ("accept-language", ["de;q=1, fr ; q=0.50"], "de,fr;q=0.5"),
        ("accept-language", ["en;q=0"], "en;q=0"),
        ("accept-language", ["en;q=2"], "en;q=2"),  # not a qvalue: compared as written
        ("accept-language", ["en;level=1"], "en;level=1"),
        ("accept-encoding", ["gzip, br"], "br,gzip"),
        ("accept-encoding", ["GZIP;q=0.8, br"], "br,gzip;q=0.8"),
        ("accept-charset", ["UTF-8"], "utf-8"),
        ("accept", ["text/html, */*;q=0.1"], "text/html,*/*;q=0.1"),  # not reordered
    ],
)
def test_normalise(name: str, lines: list[str], expected: str) -> None:
    assert variants.normalise(name, lines) == expected


@pytest.mark.parametrize(
    ("stored_lang", "content_language", "asked", "selected"),
    [
        ("en, de", None, "en, de", True),
        # Order kept among equal weights: common frameworks answer in the first listed.
        ("en, de", None, "de, en", False),
        ("fr, de", None, "de, fr", False),
        ("en, de", None, "eN, De", True),  # vary-normalise-lang-case
        ("en, de", None, " en ,   de", True),  # vary-normalise-lang-space
        ("en, de", "de", "fr;q=0.5, de;q=1.0", True),  # vary-normalise-lang-select
        ("en, de", "de", "de", True),
        ("en, de", "de", "de-CH", False),  # more specific than what is stored
        ("en, de", "de-CH", "de", False),  # no prefix matching: the origin may have de
        ("en-GB", "en-GB", "en", False),
        ("en-GB", "en-GB", "en-gb", True),
        ("en, de", "de", "en", False),
        ("en, de", "de", "en, de", True),  # exactly what it was stored for
        ("en, de", "de", "de, fr", True),  # de is the first preference
        ("en, de", "de", "fr, de", False),  # fr is
        ("en, de", "de", "de, en", True),
        ("en, de", "de", "*", False),
        ("en, de", "de", "de;q=0", False),
        ("en, de", None, "fr", False),
        ("en, de", None, "", False),
        ("", None, "", True),  # both without the field
        ("", "de", "de", True),
    ],
)
def test_accept_language_selection(
    stored_lang: str, content_language: str | None, asked: str, selected: bool
) -> None:
    request = h(("Accept-Language", stored_lang)) if stored_lang else h()
    response = {"Content_Language": content_language} if content_language else {}
    entry = stored(request, **response)
    asking = h(("Accept-Language", asked)) if asked else h()
    assert variants.entry_matches(entry, asking) is selected
    chosen = variants.select((variants.variant_of(entry),), asking)
    assert (chosen is not None) is selected


@pytest.mark.parametrize(
    ("content_encoding", "asked", "selected"),
    [
        (None, "gzip, br", True),  # as stored (sorted)
        (None, "br, gzip", True),
        ("gzip", "gzip;q=1, br;q=0.5", True),
        ("gzip", "br", False),
        (None, "identity", True),  # nothing applied: identity
        (None, "br", False),
    ],
)
def test_accept_encoding_selection(
    content_encoding: str | None, asked: str, selected: bool
) -> None:
    response = {"Content_Encoding": content_encoding} if content_encoding else {}
    entry = stored(h(("Accept-Encoding", "gzip, br")), "Accept-Encoding", **response)
    assert variants.entry_matches(entry, h(("Accept-Encoding", asked))) is selected


def test_several_fields_all_must_match() -> None:
    request = h(("Foo", "1"), ("Bar", "abc"), ("Baz", "789"))
    entry = stored(request, "Foo, Bar, Baz")
    assert variants.entry_matches(entry, h(("Baz", "789"), ("Foo", "1"), ("Bar", "abc")))
    assert not variants.entry_matches(entry, h(("Foo", "1"), ("Baz", "789"), ("Bar", "abcde")))
    assert not variants.entry_matches(entry, h(("Foo", "1"), ("Baz", "789")))
    assert variants.entry_matches(entry, h(("Foo", "1"), ("Bar", "abc"), ("Baz", "789"), ("X", "")))


def test_vary_names_sorted_once_lower_case() -> None:
    assert variants.vary_names(h(("Vary", "Foo, bar"), ("Vary", "FOO"))) == ["bar", "foo"]
    assert variants.vary_names(h()) == []


def test_select_prefers_exact_then_most_recent() -> None:
    de_for_en_de = variants.variant_of(
        stored(h(("Accept-Language", "en, de")), Content_Language="de")
    )
    de_exact = variants.variant_of(stored(h(("Accept-Language", "de")), Content_Language="de"))
    fr = variants.variant_of(stored(h(("Accept-Language", "fr")), Content_Language="fr"))
    asking = h(("Accept-Language", "de"))
    # the exact match wins even when less recently used
    assert variants.select((de_exact, de_for_en_de, fr), asking) == de_exact
    # without one, the most recently used that serves the request
    asking = h(("Accept-Language", "de, fr;q=0.2"))
    assert variants.select((de_exact, de_for_en_de, fr), asking) == de_for_en_de
    assert variants.select((fr,), asking) is None


def _variant(vid: str, expires_at: float = 100.0) -> Variant:
    return Variant(vid, (("foo", vid),), "", "", expires_at)


def test_remember_bounds_least_recently_used_out() -> None:
    listed: tuple[Variant, ...] = ()
    for vid in "abcd":
        listed, dropped = variants.remember(listed, _variant(vid), 3, now=0.0)
    assert [v.vid for v in listed] == ["b", "c", "d"]
    assert [v.vid for v in dropped] == ["a"]
    touched = variants.touch(listed, "b")
    assert touched is not None
    assert [v.vid for v in touched] == ["c", "d", "b"]
    assert variants.touch(touched, "b") is None  # already the most recent
    assert variants.touch(touched, "zz") is None
    listed, dropped = variants.remember(touched, _variant("e"), 3, now=0.0)
    assert [v.vid for v in listed] == ["d", "b", "e"]
    assert [v.vid for v in dropped] == ["c"]


def test_remember_replaces_and_drops_expired() -> None:
    listed = (_variant("a", 5.0), _variant("b"), _variant("c"))
    kept, dropped = variants.remember(listed, _variant("b", 200.0), 32, now=10.0)
    assert [(v.vid, v.expires_at) for v in kept] == [("c", 100.0), ("b", 200.0)]
    assert [v.vid for v in dropped] == ["a"]


def test_variant_ids_are_fixed_length_and_distinct() -> None:
    one = variants.variant_id((("accept-language", "de"),))
    two = variants.variant_id((("accept-language", "en"),))
    assert one != two and len(one) == len(two) == 32
    assert variants.record_material("/p", (("accept-language", "de"),)) == f"/p#{one}"


def test_variant_index_round_trips_through_the_codec() -> None:
    index = Entry(
        key="/p",
        status=200,
        headers=(),
        body=b"",
        stored_at=1.0,
        fresh_until=1.0,
        stale_until=1.0,
        swr_until=1.0,
        expires_at=9.0,
        variants=(_variant("a"), Variant("b", (("accept-language", "de"),), "de", "gzip", 9.0)),
    )
    data = codec.encode(index)
    assert codec.decode(data, "/p") == index
    fields = records.fields(data)
    fields[records.VARIANTS][0][0] = "other"  # a variant id changed after it was written
    with pytest.raises(codec.CorruptEntry, match="checksum"):
        codec.decode(records.damaged(fields), "/p")
    fields[records.VARIANTS] = [["a", ["odd"], "", "", 1.0]]  # forged, with a valid CRC
    with pytest.raises(codec.CorruptEntry, match="variant"):
        codec.decode(records.forged(fields), "/p")


def test_a_record_of_a_previous_format_is_a_miss() -> None:
    """Format 2 (one record per URL, no variant index) and 3 (no stored head): CorruptEntry,
    which a tier counts as a miss and deletes - never an error; with a CRC as format 4 ends
    with, too."""
    old = [2, "/p", 200, [], b"x", 0.0, 1.0, 1.0, 1.0, 1.0, None, None, [], [], 1, 0]
    three = [3, "/p", 200, [], b"x", 0.0, 1.0, 1.0, 1.0, 1.0, None, None, [], [], [], 1, 0]
    for fields in (old, three):
        with pytest.raises(codec.CorruptEntry):
            codec.decode(msgpack.packb(fields, use_bin_type=True), "/p")
        with pytest.raises(codec.CorruptEntry):
            codec.decode(records.forged([*fields, b""]), "/p")


# ---- properties -----------------------------------------------------------------------

_LANG = st.from_regex(r"[A-Za-z]{1,8}(-[A-Za-z0-9]{1,8})?", fullmatch=True)
_Q = st.sampled_from(["", ";q=1", ";q=1.0", ";q=0.5", ";q=0.25", ";q=0", " ; q=0.8"])
_MEMBER = st.builds(lambda tag, q: tag + q, _LANG, _Q)
_SPACE = st.sampled_from(["", " ", "  ", "\t"])
_ANY_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from("\t,;"),
    max_size=40,
)


@given(
    name=st.sampled_from(["foo", "accept-language", "accept-encoding", "accept"]), text=_ANY_TEXT
)
def test_normalise_is_idempotent(name: str, text: str) -> None:
    once = variants.normalise(name, [text])
    assert variants.normalise(name, [once]) == once


@given(members=st.lists(_MEMBER, min_size=1, max_size=6), space=_SPACE)
def test_recased_accept_language_selects_the_same_variant(members: list[str], space: str) -> None:
    """Any case, any whitespace around members: the same variant (the order is kept)."""
    entries = [
        stored(h(("Accept-Language", ", ".join(members)))),
        stored(h(("Accept-Language", "xx-other"))),
    ]
    listed = tuple(variants.variant_of(entry) for entry in entries)
    recased = [m.swapcase() if i % 2 else m.upper() for i, m in enumerate(members)]
    asking = h(("Accept-Language", (space + "," + space).join(recased)))
    assert variants.select(listed, asking) == listed[0]
    assert variants.entry_matches(entries[0], asking)


@given(values=st.lists(st.tuples(st.sampled_from(["foo", "bar"]), _ANY_TEXT), max_size=3))
def test_a_variant_never_serves_other_values(values: list[tuple[str, str]]) -> None:
    """Unknown fields: selected only when the normalised values are equal."""
    request = h(*values)
    entry = stored(request, "Foo, Bar")
    other = h(("Foo", "1"), ("Bar", "2"))
    expected = variants.vary_values(h(("Vary", "Foo, Bar")), other) == entry.vary
    assert variants.entry_matches(entry, other) is expected
    assert variants.entry_matches(entry, request)


def test_headers_type_is_pairs() -> None:
    values: Headers = variants.vary_values(h(("Vary", "Foo")), h(("Foo", " a ")))
    assert values == (("foo", "a"),)


def test_max_variants_setting() -> None:
    origin = {"TIERPROXY_ORIGIN": "http://127.0.0.1:9000"}
    assert load_settings(origin).max_variants == 32
    assert load_settings({**origin, "TIERPROXY_MAX_VARIANTS": " 4 "}).max_variants == 4
    for bad in ("0", "-1", "many", "1.5", "1025"):
        with pytest.raises(ConfigError) as info:
            load_settings({**origin, "TIERPROXY_MAX_VARIANTS": bad})
        message = str(info.value)
        assert "TIERPROXY_MAX_VARIANTS" in message and repr(bad) in message, message
        assert "1-1024" in message and "\n" not in message
