"""Every aiohttp private name tierproxy relies on is listed, and is on the running aiohttp.

``tierproxy.aiohttp_internals.PRIVATE_NAMES`` is the list; this checks each entry exists with
the kind the list says (an instance attribute, a method to override or call, a module name to
import) on the aiohttp installed. CI runs it on every aiohttp version it tests (the newest the
pin admits, and the pin's lower bound). It also checks that no other tierproxy module imports
an aiohttp private name or aiohttp's protocol/connector modules, so the list stays complete.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import importlib
from pathlib import Path

import aiohttp
import pytest
from aiohttp.client_proto import ResponseHandler

from tierproxy import aiohttp_internals
from tierproxy.aiohttp_internals import (
    OVERRIDDEN_PUBLIC,
    OWNERS,
    PRIVATE_NAMES,
    Private,
    ProxyRequestHandler,
    connector_internals_available,
    missing_internals,
)

PACKAGE = Path(aiohttp_internals.__file__).resolve().parent

# aiohttp modules whose classes only the internals module may subclass or reach into.
_INTERNAL_MODULES = ("aiohttp.web_protocol", "aiohttp.client_proto", "aiohttp.connector")


def _ids(items: tuple[Private, ...]) -> list[str]:
    return [f"{p.owner}.{p.name}" for p in items]


def test_the_running_aiohttp_has_everything_listed() -> None:
    assert missing_internals() == []
    assert connector_internals_available()


def test_every_entry_says_why_and_is_private() -> None:
    assert len({(p.owner, p.name) for p in PRIVATE_NAMES}) == len(PRIVATE_NAMES)
    for private in PRIVATE_NAMES:
        assert private.name.startswith("_"), private
        assert private.kind in ("read", "write", "override", "call", "import"), private
        assert len(private.why) > 40, private  # an explanation, not a placeholder
        assert private.owner in OWNERS or private.kind == "import", private


@pytest.mark.parametrize(
    "private",
    [p for p in PRIVATE_NAMES if p.kind in ("override", "call")],
    ids=_ids(tuple(p for p in PRIVATE_NAMES if p.kind in ("override", "call"))),
)
def test_methods_exist_and_are_callable(private: Private) -> None:
    assert not private.attribute
    method = getattr(OWNERS[private.owner], private.name, None)
    assert callable(method), f"aiohttp {aiohttp.__version__} has no {private.label}"


@pytest.mark.parametrize(
    "private",
    [p for p in PRIVATE_NAMES if p.kind == "import"],
    ids=_ids(tuple(p for p in PRIVATE_NAMES if p.kind == "import")),
)
def test_imported_names_exist(private: Private) -> None:
    module = importlib.import_module(f"aiohttp.{private.owner}")
    assert hasattr(module, private.name)


async def _instances() -> dict[str, object]:
    """One live instance per owner whose instance attributes are listed."""
    loop = asyncio.get_running_loop()
    server = aiohttp.web.Server(lambda request: None, loop=loop)  # type: ignore[arg-type,return-value]
    connector = aiohttp.TCPConnector()
    return {
        "RequestHandler": aiohttp.web_protocol.RequestHandler(server, loop=loop),
        "TCPConnector": connector,
        "ResponseHandler": ResponseHandler(loop),
        "ClientSession": aiohttp.ClientSession(),
    }


async def test_instance_attributes_exist_on_live_instances() -> None:
    instances = await _instances()
    try:
        for private in PRIVATE_NAMES:
            if not private.attribute:
                continue
            instance = instances[private.owner]
            assert hasattr(instance, private.name), (
                f"aiohttp {aiohttp.__version__}: {private.owner} instance has no {private.name}"
            )
            assert not callable(getattr(instance, private.name)) or private.name == "_factory", (
                private
            )
        connector = instances["TCPConnector"]
        assert isinstance(connector._factory, functools.partial)  # type: ignore[attr-defined]
    finally:
        await instances["TCPConnector"].close()  # type: ignore[attr-defined]
        await instances["ClientSession"].close()  # type: ignore[attr-defined]


def test_slotted_request_handler_attributes_are_slots() -> None:
    # RequestHandler is slotted all the way down: a listed attribute must be one of its slots
    # (this is also what missing_internals() checks at start-up).
    slots = aiohttp_internals._slots(aiohttp.web_protocol.RequestHandler)
    for private in PRIVATE_NAMES:
        if private.owner == "RequestHandler" and private.attribute:
            assert private.name in slots, private


def test_own_slots_do_not_shadow_aiohttps() -> None:
    # ProxyRequestHandler adds its own underscore attributes: a later aiohttp must not have
    # taken any of those names for its own.
    own = set(ProxyRequestHandler.__slots__)
    assert not own & aiohttp_internals._slots(aiohttp.web_protocol.RequestHandler)


@pytest.mark.parametrize("owner, name", OVERRIDDEN_PUBLIC)
def test_overridden_public_methods_exist(owner: str, name: str) -> None:
    assert callable(getattr(OWNERS[owner], name, None))


def test_no_other_module_reaches_into_aiohttp() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "aiohttp_internals.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").split(".")[0] == "aiohttp"
            ):
                if node.module in _INTERNAL_MODULES or any(
                    alias.name.startswith("_") for alias in node.names
                ):
                    offenders.append(f"{path.name}: from {node.module} import ...")
            elif isinstance(node, ast.Import):
                offenders += [
                    f"{path.name}: import {a.name}"
                    for a in node.names
                    if a.name in _INTERNAL_MODULES
                ]
    assert offenders == []
