"""Every aiohttp private name tierproxy relies on is listed, and is on the running aiohttp.

``tierproxy.aiohttp_internals.PRIVATE_NAMES`` is the list; this checks each entry exists with
the kind the list says on the aiohttp installed: an instance attribute on a live instance, a
method with the parameters and async-ness ``SIGNATURES`` records (``inspect.signature``,
``inspect.iscoroutinefunction``), a module name that can be imported, the layout of
``LineTooLong`` as aiohttp's parser raises it. CI runs it on every aiohttp version it tests
(the newest the pin admits, and the pin's lower bound). It also checks that no other tierproxy
module reaches into aiohttp (a name a module does not export, a private attribute, a
``getattr`` of a private name), so the list stays complete.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import importlib
import inspect
import types
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.connector
import aiohttp.http_parser
import aiohttp.web_protocol
import pytest
from aiohttp import web
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import LineTooLong

from tierproxy import aiohttp_internals
from tierproxy.aiohttp_internals import (
    OVERRIDDEN_PUBLIC,
    OWNERS,
    PRIVATE_NAMES,
    SIGNATURES,
    Private,
    ProxyRequestHandler,
    connector_internals_available,
    missing_internals,
    missing_serving_internals,
    shape,
)

PACKAGE = Path(aiohttp_internals.__file__).resolve().parent
# The request parser class RequestHandler builds (web_protocol does not re-export it).
SERVER_PARSER: Any = vars(aiohttp.web_protocol)["HttpRequestParser"]


def _ids(items: tuple[Private, ...]) -> list[str]:
    return [f"{p.owner}.{p.name}" for p in items]


# aiohttp modules its reference documentation presents as public, whole, that define no
# __all__: aiohttp.abc ("Abstract Base Classes": AbstractStreamWriter, AbstractAccessLogger...).
_DOCUMENTED_WITHOUT_ALL = frozenset({"aiohttp.abc"})


def _exported(module: types.ModuleType, name: str) -> bool:
    """Whether ``module`` exports ``name``: in its ``__all__``; for a module without one, a
    public top-level export of aiohttp (``aiohttp`` or ``aiohttp.web``) that is the same
    object; a submodule counts as exported."""
    if name.startswith("__") and name.endswith("__"):
        return True  # module dunders (__version__): public by convention (PEP 8)
    value = getattr(module, name, None)
    if isinstance(value, types.ModuleType):
        return value.__name__ == f"{module.__name__}.{name}"
    if hasattr(module, "__all__"):
        return name in module.__all__
    if module.__name__ in _DOCUMENTED_WITHOUT_ALL:
        return not name.startswith("_")
    return any(name in top.__all__ and getattr(top, name, None) is value for top in (aiohttp, web))


def test_the_running_aiohttp_has_everything_listed() -> None:
    assert missing_internals() == []
    assert missing_serving_internals() == []
    assert connector_internals_available()


def test_every_entry_says_why_and_is_private_or_not_exported() -> None:
    assert len({(p.owner, p.name) for p in PRIVATE_NAMES}) == len(PRIVATE_NAMES)
    for private in PRIVATE_NAMES:
        assert private.kind in ("read", "write", "override", "call", "import", "layout"), private
        assert private.side in ("listener", "serving", "origin"), private
        assert len(private.why) > 40, private  # an explanation, not a placeholder
        if private.kind == "import":
            module = importlib.import_module(f"aiohttp.{private.owner}")
            assert not _exported(module, private.name), f"{private.label} is exported"
        elif private.kind == "layout":
            assert private.owner in OWNERS, private
        else:
            # a private name, or a field of a private class (_ErrInfo.exc)
            assert private.name.startswith("_") or private.owner.startswith("_"), private
            assert private.owner in OWNERS, private


_METHODS = tuple(p for p in PRIVATE_NAMES if p.kind in ("override", "call"))


@pytest.mark.parametrize("private", _METHODS, ids=_ids(_METHODS))
def test_listed_methods_have_their_signature_recorded(private: Private) -> None:
    assert not private.attribute
    assert (private.owner, private.name) in SIGNATURES, private


@pytest.mark.parametrize("owner, name", OVERRIDDEN_PUBLIC)
def test_overridden_public_methods_have_their_signature_recorded(owner: str, name: str) -> None:
    assert (owner, name) in SIGNATURES


def _aiohttp_callable(owner: str, name: str) -> Any:
    where: Any = {
        "HttpRequestParser": aiohttp.http_parser.HttpRequestParser,
        "helpers": aiohttp.helpers,
    }.get(owner) or OWNERS[owner]
    return getattr(where, name, None)


@pytest.mark.parametrize("key", sorted(SIGNATURES), ids=[f"{o}.{n}" for o, n in sorted(SIGNATURES)])
def test_recorded_signatures_match_the_running_aiohttp(key: tuple[str, str]) -> None:
    is_async, expected = SIGNATURES[key]
    function = _aiohttp_callable(*key)
    assert callable(function), f"aiohttp {aiohttp.__version__} has no {key}"
    assert not getattr(function, "__isabstractmethod__", False), key
    assert inspect.iscoroutinefunction(function) is is_async, key
    assert shape(function) == expected, (aiohttp.__version__, key, inspect.signature(function))


def test_the_parser_request_handler_uses_is_the_one_checked() -> None:
    assert SERVER_PARSER is aiohttp.http_parser.HttpRequestParser


def test_shape_reads_parameter_kinds() -> None:
    def f(a: int, /, b: int, *, c: int, **d: int) -> None: ...

    def g(a: int, *b: int, c: int) -> None: ...

    assert shape(f) == "a, /, b, *, c, **d"
    assert shape(g) == "a, *b, c"


# Every override in aiohttp_internals, with the aiohttp method it replaces.
_OVERRIDES = [
    (aiohttp_internals.ProxyRequestHandler, "RequestHandler"),
    (aiohttp_internals.CappedServer, "Server"),
    (aiohttp_internals._ProxyServer, "Server"),
    (aiohttp_internals._OriginProtocol, "ResponseHandler"),
    (aiohttp_internals._OriginConnector, "BaseConnector"),
    (aiohttp_internals.ExactHead, "StreamResponse"),
    (aiohttp_internals.CappedRunner, "AppRunner"),
    (aiohttp_internals.ProxyRunner, "AppRunner"),
]


@pytest.mark.parametrize("cls, owner", _OVERRIDES, ids=[c.__name__ for c, _ in _OVERRIDES])
def test_every_override_keeps_the_signature_aiohttp_calls_it_with(cls: type, owner: str) -> None:
    base = OWNERS[owner]
    overridden = [
        name
        for name, value in vars(cls).items()
        if callable(value) and name != "__init__" and hasattr(base, name)
    ]
    assert overridden, cls
    for name in overridden:
        assert (owner, name) in SIGNATURES, f"{cls.__name__}.{name} overrides an unlisted method"
        is_async, expected = SIGNATURES[(owner, name)]
        ours = getattr(cls, name)
        assert inspect.iscoroutinefunction(ours) is is_async, (cls, name)
        assert shape(ours) == expected, (cls, name)


@pytest.mark.parametrize(
    "private",
    [p for p in PRIVATE_NAMES if p.kind == "import"],
    ids=_ids(tuple(p for p in PRIVATE_NAMES if p.kind == "import")),
)
def test_imported_names_exist(private: Private) -> None:
    module = importlib.import_module(f"aiohttp.{private.owner}")
    assert hasattr(module, private.name)


def test_every_name_aiohttp_internals_imports_is_exported_or_listed() -> None:
    listed = {(p.owner, p.name) for p in PRIVATE_NAMES if p.kind == "import"}
    tree = ast.parse((PACKAGE / "aiohttp_internals.py").read_text())
    unlisted = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aiohttp."):
            module = importlib.import_module(node.module or "")
            owner = (node.module or "").removeprefix("aiohttp.")
            unlisted += [
                f"{node.module}.{alias.name}"
                for alias in node.names
                if not _exported(module, alias.name) and (owner, alias.name) not in listed
            ]
    assert unlisted == []


async def _instances() -> dict[str, object]:
    """One live instance per owner whose instance attributes are listed."""
    loop = asyncio.get_running_loop()
    server = aiohttp.web.Server(lambda request: None, loop=loop)  # type: ignore[arg-type,return-value]
    connector = aiohttp.TCPConnector()
    error_info = OWNERS["_ErrInfo"]
    return {
        "RequestHandler": aiohttp.web_protocol.RequestHandler(server, loop=loop),
        "TCPConnector": connector,
        "ResponseHandler": ResponseHandler(loop),
        "_ErrInfo": error_info(status=400, exc=ValueError("x"), message="x"),
        "LineTooLong": LineTooLong(b"x", 1),
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


async def test_a_response_handler_lacking_a_listed_attribute_is_seen_at_start_up() -> None:
    # ResponseHandler is not slotted all the way down, so no slot lists _buffer/_payload: the
    # start-up check makes one on a throwaway loop. A class without them fails that check.
    assert not aiohttp_internals._fully_slotted(ResponseHandler)
    assert connector_internals_available()
    original = ResponseHandler.__init__

    def without_payload(self: ResponseHandler, loop: asyncio.AbstractEventLoop) -> None:
        original(self, loop)
        del self._payload

    ResponseHandler.__init__ = without_payload  # type: ignore[method-assign]
    try:
        assert not connector_internals_available()
    finally:
        ResponseHandler.__init__ = original  # type: ignore[method-assign]
    assert connector_internals_available()


def _parse_error(data: bytes, *, max_line_size: int, max_field_size: int) -> BaseException:
    """What the request parser aiohttp's server uses raises for ``data``."""
    loop = asyncio.get_running_loop()
    server = web.Server(lambda request: None, loop=loop)  # type: ignore[arg-type,return-value]
    handler = aiohttp.web_protocol.RequestHandler(server, loop=loop)
    parser = SERVER_PARSER(
        handler, loop, 2**16, max_line_size=max_line_size, max_field_size=max_field_size
    )
    with pytest.raises(LineTooLong) as caught:
        parser.feed_data(data)
    return caught.value


@pytest.mark.parametrize("limits", [(100, 200), (100, 100)], ids=["distinct", "equal"])
async def test_line_too_long_carries_the_limit_and_tells_a_target_from_a_header(
    limits: tuple[int, int],
) -> None:
    line_limit, field_limit = limits
    target = _parse_error(
        b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        max_line_size=line_limit,
        max_field_size=field_limit,
    )
    header = _parse_error(
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"b" * 300 + b"\r\n\r\n",
        max_line_size=line_limit,
        max_field_size=field_limit,
    )
    assert target.args[1] == line_limit and header.args[1] == field_limit
    assert isinstance(target.args[0], bytes | bytearray)
    if SERVER_PARSER is aiohttp.http_parser.HttpRequestParserPy and line_limit == field_limit:
        pytest.skip("aiohttp's pure-Python parser (no C extension) gives bytes for both")
    if SERVER_PARSER is not aiohttp.http_parser.HttpRequestParserPy:
        # aiohttp's C parser: the request-target as a bytearray, a header value as bytes
        # (how equal limits are told apart: 414 vs 431)
        assert type(target.args[0]) is bytearray and type(header.args[0]) is bytes
    status = aiohttp_internals._client_error_status
    assert status(target, line_limit, field_limit) == 414  # type: ignore[arg-type]
    assert status(header, line_limit, field_limit) == 431  # type: ignore[arg-type]


def test_the_reason_phrases_are_aiohttps() -> None:
    from aiohttp.web_response import REASON_PHRASES

    from tierproxy.entry import REASON_PHRASES as OURS

    assert OURS == REASON_PHRASES


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


# -- nothing else reaches into aiohttp -------------------------------------------------------

_PRIVATE_GETTERS = ("getattr", "hasattr", "setattr", "delattr")


class _Reaches(ast.NodeVisitor):
    """Where one module (not aiohttp_internals) reaches into aiohttp."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.found: list[str] = []
        self.modules: dict[str, types.ModuleType] = {}  # local name -> aiohttp module
        self.imports_aiohttp = False
        self.aiohttp_classes: dict[str, type] = {}  # local name -> aiohttp class

    def flag(self, node: ast.AST, what: str) -> None:
        self.found.append(f"{self.name}:{getattr(node, 'lineno', '?')}: {what}")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] == "aiohttp":
                self.imports_aiohttp = True
                if alias.asname:  # import aiohttp.web as w: w is aiohttp.web
                    self.modules[alias.asname] = importlib.import_module(alias.name)
                else:  # import aiohttp.connector: binds aiohttp
                    self.modules["aiohttp"] = importlib.import_module("aiohttp")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        source = node.module or ""
        if node.level or source.split(".")[0] != "aiohttp":
            return
        self.imports_aiohttp = True
        module = importlib.import_module(source)
        for alias in node.names:
            value = getattr(module, alias.name, None)
            if not _exported(module, alias.name):
                self.flag(node, f"from {source} import {alias.name} (not exported)")
            if isinstance(value, types.ModuleType):
                self.modules[alias.asname or alias.name] = value
            elif isinstance(value, type):
                self.aiohttp_classes[alias.asname or alias.name] = value

    def _module_of(self, node: ast.expr) -> types.ModuleType | None:
        if isinstance(node, ast.Name):
            return self.modules.get(node.id)
        if isinstance(node, ast.Attribute):
            parent = self._module_of(node.value)
            value = getattr(parent, node.attr, None) if parent is not None else None
            return value if isinstance(value, types.ModuleType) else None
        return None

    def visit_Attribute(self, node: ast.Attribute) -> None:
        module = self._module_of(node.value)
        if module is not None:
            if not _exported(module, node.attr):
                self.flag(node, f"{module.__name__}.{node.attr} (not exported)")
        elif (
            self.imports_aiohttp
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            self.flag(node, f"{ast.unparse(node)} (a private attribute)")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if (
            isinstance(node.func, ast.Name)
            and node.func.id in _PRIVATE_GETTERS
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and node.args[1].value.startswith("_")
            and not node.args[1].value.startswith("__")
        ):
            self.flag(node, f"{ast.unparse(node)} (a private name by string)")
        self.generic_visit(node)

    def _aiohttp_base(self, node: ast.expr) -> type | None:
        if isinstance(node, ast.Name):
            return self.aiohttp_classes.get(node.id)
        if isinstance(node, ast.Attribute):
            module = self._module_of(node.value)
            value = getattr(module, node.attr, None) if module is not None else None
            return value if isinstance(value, type) else None
        return None

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        # A subclass of an aiohttp class: its own underscore attributes must not be aiohttp's.
        bases = [b for b in map(self._aiohttp_base, node.bases) if b is not None]
        if bases:
            theirs: set[str] = set()
            for base in bases:
                theirs.update(dir(base))
                try:
                    theirs.update(vars(base()))
                except TypeError:  # needs arguments, or has no __dict__ (slotted: dir has it)
                    pass
                theirs.update(aiohttp_internals._slots(base))
            for child in ast.walk(node):
                if (
                    isinstance(child, ast.Attribute)
                    and isinstance(child.value, ast.Name)
                    and child.value.id == "self"
                    and child.attr.startswith("_")
                    and not child.attr.startswith("__")
                    and child.attr in theirs
                ):
                    self.flag(child, f"self.{child.attr} is {bases[0].__name__}'s")
        self.generic_visit(node)


def _reaches(source: str, name: str = "module.py") -> list[str]:
    visitor = _Reaches(name)
    visitor.visit(ast.parse(source))
    return visitor.found


def test_the_reach_finder_finds_each_kind_of_reach() -> None:
    assert _reaches("from aiohttp.helpers import set_exception") == [
        "module.py:1: from aiohttp.helpers import set_exception (not exported)"
    ]
    assert _reaches("from aiohttp.web_response import REASON_PHRASES") != []
    assert _reaches("import aiohttp.connector\nx = aiohttp.connector.Connection") != []
    assert _reaches("from aiohttp import web\ndef f(r):\n    return r.protocol._waiter") != []
    assert _reaches("from aiohttp import web\ndef f(r):\n    return getattr(r, '_payload')") != []
    assert (
        _reaches(
            "from aiohttp import web\nclass R(web.StreamResponse):\n    def f(self):\n"
            "        return self._body"
        )
        != []
    )
    # legitimate use passes
    assert (
        _reaches(
            "from aiohttp import web\nfrom aiohttp.http import HttpVersion11\n"
            "class R(web.StreamResponse):\n    def f(self):\n        self._mine = 1\n"
            "def g(r):\n    return web.Response(), r.headers"
        )
        == []
    )


def test_no_other_module_reaches_into_aiohttp() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "aiohttp_internals.py":
            continue
        offenders += _reaches(path.read_text(), str(path.relative_to(PACKAGE)))
    assert offenders == []
