"""The query in the key: TIERPROXY_QUERY (keep | sort) and TIERPROXY_QUERY_IGNORE."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tierproxy.config import ConfigError, load_settings
from tierproxy.keys import KeySpace, QueryRules

ORIGIN = "http://origin.test"


def keys(mode: str = "keep", ignore: str = "") -> KeySpace:
    return KeySpace(ORIGIN, query=QueryRules.parse(mode, ignore))


@pytest.mark.parametrize(
    ("mode", "ignore", "raw", "material", "target"),
    [
        # keep, nothing ignored: the target as normalised, key and target alike
        ("keep", "", "/p?b=2&a=1", "/p?b=2&a=1", "/p?b=2&a=1"),
        # ignored names and name_* patterns leave the key and the forwarded target
        ("keep", "utm_*,gclid", "/p?a=1&utm_source=x&gclid=9&b=2", "/p?a=1&b=2", "/p?a=1&b=2"),
        ("keep", "utm_*", "/p?utm_source=x&utm_medium=y", "/p", "/p"),
        ("keep", "gclid", "/p?gclid", "/p", "/p"),  # a name without a value
        ("keep", "gclid", "/p?gclid=1&gclid=2&a", "/p?a", "/p?a"),  # every repetition
        ("keep", "gclid", "/p?gclidx=1", "/p?gclidx=1", "/p?gclidx=1"),  # exact names only
        ("keep", "utm_*", "/p?utm=1", "/p?utm=1", "/p?utm=1"),
        ("keep", "gclid", "/p?GCLID=1", "/p?GCLID=1", "/p?GCLID=1"),  # names are case-sensitive
        ("keep", "gclid", "/p?a=gclid", "/p?a=gclid", "/p?a=gclid"),  # values are not names
        # an escaped unreserved character is that character (RFC 3986 §6.2.2.2)
        ("keep", "utm_*", "/p?utm%5Fsource=x&a=1", "/p?a=1", "/p?a=1"),
        ("keep", "utm_source", "/p?%75tm_source=x", "/p", "/p"),
        # sort: the key only, stable by name; the target keeps the client's order
        ("sort", "", "/p?b=2&a=1", "/p?a=1&b=2", "/p?b=2&a=1"),
        ("sort", "", "/p?b=1&a=2&b=0&a=1", "/p?a=2&a=1&b=1&b=0", "/p?b=1&a=2&b=0&a=1"),
        ("sort", "utm_*", "/p?z=1&utm_x=2&a=3", "/p?a=3&z=1", "/p?z=1&a=3"),
        ("sort", "", "/p", "/p", "/p"),
        ("sort", "", "/p?only", "/p?only", "/p?only"),
    ],
)
def test_query_rules(mode: str, ignore: str, raw: str, material: str, target: str) -> None:
    key = keys(mode, ignore).for_target(raw)
    assert (key.material, key.target) == (material, target)


def test_without_rules_the_key_is_the_normalised_target() -> None:
    key = KeySpace(ORIGIN).for_target("/a/../b?%7e=1&b=2")
    assert (key.material, key.target) == ("/b?~=1&b=2", "/b?~=1&b=2")


def test_the_material_is_keyed_as_it_is() -> None:
    # Material already transformed (a purge heard from a replica) is not transformed again.
    key = keys("sort").key("/p?b=1&a=2")
    assert key.material == key.target == "/p?b=1&a=2"


# -- properties ---------------------------------------------------------------------------

_NAMES = st.text(alphabet="abcxyz_", min_size=1, max_size=5)
_VALUES = st.sampled_from(["", "1", "ab", "%2F", "x%2Fy", "a=b"])
_PARAMS = st.lists(st.tuples(_NAMES, _VALUES), max_size=8)


def _target(params: list[tuple[str, str]]) -> str:
    return "/p" + ("?" + "&".join(f"{n}={v}" for n, v in params) if params else "")


@given(_PARAMS, st.randoms(use_true_random=False))
def test_sorted_keys_do_not_depend_on_the_order_of_distinct_names(
    params: list[tuple[str, str]], rnd: random.Random
) -> None:
    # Reordering that keeps the relative order of each name's repetitions: one key.
    space = keys("sort")
    by_name: dict[str, list[tuple[str, str]]] = {}
    for param in params:
        by_name.setdefault(param[0], []).append(param)
    names = list(by_name)
    rnd.shuffle(names)
    queues = {name: list(by_name[name]) for name in names}
    reordered: list[tuple[str, str]] = []
    while any(queues.values()):
        name = rnd.choice([n for n in names if queues[n]])
        reordered.append(queues[name].pop(0))
    assert (
        space.for_target(_target(params)).material == space.for_target(_target(reordered)).material
    )


@given(_PARAMS, st.lists(st.tuples(st.sampled_from(["gclid", "utm_source", "utm_x"]), _VALUES)))
def test_keys_do_not_depend_on_ignored_parameters(
    params: list[tuple[str, str]], noise: list[tuple[str, str]]
) -> None:
    for mode in ("keep", "sort"):
        space = keys(mode, "utm_*,gclid")
        plain = space.for_target(_target(params))
        # Ignored parameters inserted anywhere (after each kept one, in turn).
        mixed: list[tuple[str, str]] = []
        rest = list(noise)
        for param in params:
            mixed.append(param)
            if rest:
                mixed.append(rest.pop())
        mixed.extend(rest)
        noisy = space.for_target(_target(mixed))
        assert noisy.material == plain.material
        assert noisy.target == plain.target  # nor does the origin see them
        # ...and an ignored name spelled with an escaped "_" is that name.
        escaped = _target(mixed).replace("utm_", "utm%5F")
        assert space.for_target(escaped).material == plain.material


@given(_PARAMS)
def test_keys_are_stable_under_their_own_rules(params: list[tuple[str, str]]) -> None:
    # A key's material keyed again gives itself (a purge by that URL finds the entry).
    for mode in ("keep", "sort"):
        space = keys(mode, "utm_*")
        once = space.for_target(_target(params)).material
        assert space.for_target(once).material == once


# -- configuration ------------------------------------------------------------------------


def test_settings_defaults_and_parsing() -> None:
    assert load_settings({"TIERPROXY_ORIGIN": ORIGIN}).query == QueryRules()
    rules = load_settings(
        {
            "TIERPROXY_ORIGIN": ORIGIN,
            "TIERPROXY_QUERY": "sort",
            "TIERPROXY_QUERY_IGNORE": " utm_* , gclid,fbclid,, ",
        }
    ).query
    assert rules == QueryRules(True, frozenset({"gclid", "fbclid"}), ("utm_",))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TIERPROXY_QUERY", "sorted"),
        ("TIERPROXY_QUERY", "drop"),
        ("TIERPROXY_QUERY_IGNORE", "*"),
        ("TIERPROXY_QUERY_IGNORE", "utm_*x"),
        ("TIERPROXY_QUERY_IGNORE", "a b"),
        ("TIERPROXY_QUERY_IGNORE", "a=b"),
        ("TIERPROXY_QUERY_IGNORE", "utm%5Fsource"),
        ("TIERPROXY_QUERY_IGNORE", "caf\u00e9"),
    ],
)
def test_bad_values_name_the_variable_in_one_line(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"TIERPROXY_ORIGIN": ORIGIN, name: value})
    message = str(info.value)
    assert name in message and value in message
    assert "\n" not in message
