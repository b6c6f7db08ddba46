"""Issue 4, lines 3-4: web cache deception and credentials.

Storability is decided by the response's and request's headers, never by a file extension;
Set-Cookie is never replayed; responses to requests with Authorization follow RFC 9111 §3.5.
One client never gets what was fetched for another - not from a tier, and not from a
concurrent fetch it was coalesced with.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from support.fixture_types import MakeProxy
from support.origin import Origin
from support.proxy import ProxyHandle

ALICE = {"Cookie": "session=alice"}
BOB = {"Cookie": "session=bob"}


@pytest.mark.parametrize(
    ("response_headers", "request_headers"),
    [
        ({"Set-Cookie": "session=alice; HttpOnly"}, {}),
        ({"Cache-Control": "private, max-age=60"}, {}),
        # A qualified private keeps only the named fields out of a stored copy (RFC 9111
        # §5.2.2.7); the Set-Cookie it names keeps the whole response out.
        (
            {"Cache-Control": 'max-age=60, private="Set-Cookie"', "Set-Cookie": "session=alice"},
            {},
        ),
        ({"Cache-Control": "no-store"}, {}),
        ({}, ALICE),  # heuristically cacheable .css, but the request carried a cookie
        ({"Cache-Control": "max-age=60"}, ALICE),
        ({"Cache-Control": "max-age=60"}, {"Authorization": "Bearer alice-token"}),
        ({"Cache-Control": "public, max-age=60", "Set-Cookie": "session=alice"}, ALICE),
    ],
    ids=[
        "set-cookie",
        "private",
        "private-with-field",
        "no-store",
        "cookie-request",
        "cookie-request-max-age",
        "authorization-request",
        "public-but-set-cookie",
    ],
)
async def test_a_personal_static_looking_response_is_never_served_to_another_client(
    response_headers: dict[str, str],
    request_headers: dict[str, str],
    origin: Origin,
    make_proxy: MakeProxy,
    redis_client: Any,
    sqlite_path: Path,
) -> None:
    from support.storage import redis_tier_keys, sqlite_count

    origin.set("/account/me.css", headers=response_headers)
    proxy = await make_proxy()

    first = await proxy.get("/account/me.css", headers=request_headers)
    await proxy.settle()
    stored_in_l3 = sqlite_count(sqlite_path)
    stored_in_l2 = len(redis_tier_keys(redis_client))
    second = await proxy.get("/account/me.css")

    assert first.status == 200 and second.status == 200
    assert first.body.endswith(b"(request 1)") and second.body.endswith(b"(request 2)"), second
    assert second.x_cache != "HIT-L1"
    assert origin.count("/account/me.css") == 2
    assert (stored_in_l2, stored_in_l3) == (0, 0)  # nothing reached a shared tier either


async def test_extension_alone_makes_nothing_cacheable(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    """Path confusion (/account/me/x.css served by /account/me): headers decide, not ".css"."""
    origin.set("/account/me/x.css", headers={"Cache-Control": "no-cache, no-store"})
    proxy = await make_proxy()

    await proxy.get("/account/me/x.css", headers=ALICE)
    other = await proxy.get("/account/me/x.css")

    assert other.x_cache == "BYPASS" and other.body.endswith(b"(request 2)")


async def test_set_cookie_is_never_replayed_from_the_cache(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    # Explicitly shareable, yet it sets a cookie: not stored at all (belt and braces: the
    # header is never part of a stored entry either).
    origin.set(
        "/promo", headers={"Cache-Control": "public, s-maxage=60", "Set-Cookie": "tracking=alice"}
    )
    proxy = await make_proxy()

    responses = [await proxy.get("/promo") for _ in range(3)]

    assert [r.x_cache for r in responses] == ["BYPASS"] * 3
    assert origin.count("/promo") == 3


@pytest.mark.parametrize(
    ("cache_control", "shared"),
    [
        ("max-age=60", False),
        ("public, max-age=60", True),
        ("s-maxage=60", True),
        ("max-age=60, must-revalidate", True),
        ("no-cache", False),
    ],
)
async def test_responses_to_authorized_requests_follow_rfc_9111_section_3_5(
    cache_control: str, shared: bool, origin: Origin, make_proxy: MakeProxy
) -> None:
    origin.set("/api/report", headers={"Cache-Control": cache_control})
    proxy = await make_proxy()

    await proxy.get("/api/report", headers={"Authorization": "Bearer alice-token"})
    await proxy.settle()
    anonymous = await proxy.get("/api/report")

    if shared:
        assert anonymous.x_cache == "HIT-L1", anonymous
        assert origin.count("/api/report") == 1
    else:
        assert anonymous.x_cache != "HIT-L1", anonymous
        assert origin.count("/api/report") == 2
    # The credential itself went to the origin (it is end-to-end), nowhere else.
    assert origin.requests[0].headers.get("Authorization") == "Bearer alice-token"


# -- coalesced fetches -------------------------------------------------------------------------


async def test_a_coalesced_waiter_never_gets_a_variant_chosen_for_another_client(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    """Vary: Cookie - the origin says the answer depends on who asks.

    Two clients miss on one key at once; the second waits for the first's fetch. It must not
    be handed the first client's variant.
    """
    origin.set(
        "/dashboard", headers={"Cache-Control": "public, max-age=60", "Vary": "Cookie"}, latency=0.3
    )
    proxy = await make_proxy()

    alice_task = asyncio.create_task(proxy.get("/dashboard", headers=ALICE))
    await asyncio.sleep(0.1)  # alice's fetch is in flight
    bob = await proxy.get("/dashboard", headers=BOB)
    alice = await alice_task

    assert alice.body.endswith(b"(request 1)")
    assert bob.body.endswith(b"(request 2)"), bob
    cookies = [r.headers.get("Cookie", "") for r in origin.requests]
    assert sorted(cookies) == ["session=alice", "session=bob"]
    # Bob was coalesced with alice's fetch (he waited on it), then fetched his own variant
    # after it: never two fetches of the key at once.
    assert _coalesced_waiters(proxy) == 1
    assert origin.peak_concurrency("/dashboard") == 1


async def test_a_coalesced_waiter_never_gets_another_clients_error_with_its_cookie(
    origin: Origin, make_proxy: MakeProxy
) -> None:
    """An origin 5xx is shared with waiters only when nothing in it is personal."""
    origin.set("/profile", status=500, headers={"Set-Cookie": "session=alice-renewed"}, latency=0.3)
    proxy = await make_proxy()

    alice_task = asyncio.create_task(proxy.get("/profile", headers=ALICE))
    await asyncio.sleep(0.1)
    bob = await proxy.get("/profile")
    alice = await alice_task

    assert alice.status == 500 and alice.headers.get("Set-Cookie") == "session=alice-renewed"
    # Bob got an answer fetched for him, not the one (and the cookie) fetched for alice.
    assert bob.status == 500 and bob.body.endswith(b"(request 2)"), bob
    assert [r.headers.get("Cookie") for r in origin.requests] == ["session=alice", None]
    # Bob waited on alice's fetch (coalesced), then fetched his own after it.
    assert _coalesced_waiters(proxy) == 1
    assert origin.peak_concurrency("/profile") == 1


def _coalesced_waiters(proxy: ProxyHandle) -> float:
    value = proxy.state.metrics.registry.get_sample_value("tierproxy_coalesced_waiters_total")
    return value or 0.0


@pytest.mark.parametrize(
    ("field", "value"),
    [("CDN-Cache-Control", "private"), ("Tierproxy-Cache-Control", "no-store")],
)
async def test_a_5xx_a_targeted_field_marks_private_is_not_shared_with_waiters(
    origin: Origin, make_proxy: MakeProxy, field: str, value: str
) -> None:
    """RFC 9213: this cache obeys its targeted fields (TIERPROXY_TARGETED_FIELDS) over
    Cache-Control. An unstored 5xx the targeted field calls private (or no-store) is the
    requester's own, however public its Cache-Control: a waiter fetches its own."""
    origin.set(
        "/account",
        status=503,
        headers={"Cache-Control": "public, max-age=0", field: value},
        latency=0.3,
    )
    proxy = await make_proxy()

    first = asyncio.create_task(proxy.get("/account"))
    await asyncio.sleep(0.1)
    second = await proxy.get("/account")
    await first

    assert second.status == 503 and second.body.endswith(b"(request 2)"), second
    assert origin.count("/account") == 2
    assert origin.peak_concurrency("/account") == 1
