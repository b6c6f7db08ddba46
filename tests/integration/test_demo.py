"""``tierproxy demo`` and ``tierproxy demo-origin`` as real processes on loopback.

The demo's own curl lines are run with the real curl: MISS, then HIT, then - after the
printed failure switch and once the copy is past its max-age - STALE. Ctrl-C (SIGINT) and
SIGTERM stop it with exit 0 and no traceback.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.net import free_port
from support.proxy import ENV_PREFIX, REPO_ROOT
from support.storage import redis_key
from support.wait import wait_for_condition

from tierproxy.cli import main

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl on the PATH")


class Demo:
    """``python -m tierproxy <command> <args>`` with no TIERPROXY_* but ``env``."""

    def __init__(self, tmp_path: Path, args: list[str], env: dict[str, str] | None = None):
        self.started = time.monotonic()
        self.stdout_path = tmp_path / "demo.stdout"
        self.stderr_path = tmp_path / "demo.stderr"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        full_env.update(env or {})
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tierproxy", *args],
                env=full_env,
                cwd=str(tmp_path),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def wait_output(self, text: str, timeout: float = 20.0) -> str:
        def printed() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode}; stderr:\n{self.stderr}")
            return text in self.stdout

        await wait_for_condition(printed, timeout, message=lambda: f"{text!r} in {self.stdout!r}")
        return self.stdout

    async def stop(self, sig: signal.Signals, timeout: float = 15.0) -> int:
        self.proc.send_signal(sig)
        await wait_for_condition(
            lambda: self.proc.poll() is not None, timeout, message="exit after " + sig.name
        )
        return int(self.proc.returncode)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


@pytest.fixture
def demos() -> Iterator[list[Demo]]:
    started: list[Demo] = []
    yield started
    for demo in started:
        demo.cleanup()


@dataclass
class Curl:
    status: int
    headers: dict[str, str]
    body: str
    elapsed: float


async def run_curl(line: str) -> Curl:
    """One of the demo's printed curl lines, run as printed (no shell)."""
    argv = shlex.split(line)
    assert argv[0] == "curl", line
    began = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv, "--max-time", "10", stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    elapsed = time.monotonic() - began
    assert proc.returncode == 0, (line, err)
    head, _, body = out.decode().partition("\r\n\r\n")
    status_line, *header_lines = head.split("\r\n")
    headers = {}
    for header in header_lines:
        name, _, value = header.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Curl(int(status_line.split()[1]), headers, body, elapsed)


def curl_lines(stdout: str) -> list[str]:
    return [line.strip() for line in stdout.splitlines() if line.strip().startswith("curl ")]


def demo_args(**extra: str) -> list[str]:
    args = ["demo", "--port", str(free_port()), "--admin-port", str(free_port())]
    for name, value in extra.items():
        args += [f"--{name.replace('_', '-')}", value]
    return args


@pytest.mark.slow
async def test_demo_prints_three_curl_lines_that_show_miss_hit_then_stale(
    tmp_path: Path, demos: list[Demo]
) -> None:
    # Fresh for 4 s: long enough for a loaded machine to start curl twice within it (with 1 s
    # the second curl once came after the copy went stale), short enough to see STALE soon.
    demo = Demo(tmp_path, demo_args(max_age="4"))
    demos.append(demo)
    stdout = await demo.wait_output("Ctrl-C")
    lines = curl_lines(stdout)
    assert len(lines) == 3, stdout
    page, switch, again = lines

    miss = await run_curl(page)
    hit = await run_curl(page)
    served_by = time.monotonic() - demo.started

    assert (miss.status, miss.headers["x-cache"]) == (200, "MISS"), miss
    assert miss.elapsed >= 0.3, miss  # the demo origin is slow on purpose
    assert (hit.status, hit.headers["x-cache"]) == (200, "HIT-L1"), hit
    assert hit.body == miss.body
    assert "max-age=4" in miss.headers["cache-control"], miss
    assert "stale-if-error" in miss.headers["cache-control"], miss
    assert served_by < 15, f"MISS and HIT took {served_by:.1f} s from the start"

    failing = await run_curl(switch)
    assert failing.status == 200, failing
    assert "on" in failing.body, failing

    async def stale() -> Curl | None:
        answer = await run_curl(again)
        return answer if answer.headers["x-cache"].startswith("STALE") else None

    served = await wait_for_condition(stale, 15, interval=0.2, message="a STALE answer")
    assert served is not None
    assert served.status == 200, served
    assert served.body == miss.body  # the last good copy, not the origin's 503

    sqlite_dir = Path(re.findall(r"SQLite in (\S+)", stdout)[0]).parent
    assert sqlite_dir.is_dir()
    assert await demo.stop(signal.SIGINT) == 0, demo.stderr
    assert "Traceback" not in demo.stderr, demo.stderr
    assert not sqlite_dir.exists(), "the demo's temporary SQLite directory was left behind"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_demo_stops_cleanly_on_a_signal(
    sig: signal.Signals, tmp_path: Path, demos: list[Demo]
) -> None:
    demo = Demo(tmp_path, demo_args())
    demos.append(demo)
    stdout = await demo.wait_output("Ctrl-C")
    assert (await run_curl(curl_lines(stdout)[0])).headers["x-cache"] == "MISS"

    assert await demo.stop(sig) == 0, demo.stderr
    assert "Traceback" not in demo.stderr, demo.stderr


@pytest.mark.parametrize("which", ["port", "origin-port"])
async def test_demo_on_a_port_in_use_says_so_in_one_line_and_exits_1(
    which: str, tmp_path: Path, demos: list[Demo]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        args = demo_args()
        if which == "port":
            args[args.index("--port") + 1] = str(port)
        else:
            args += ["--origin-port", str(port)]
        demo = Demo(tmp_path, args)
        demos.append(demo)
        await wait_for_condition(lambda: demo.proc.poll() is not None, 15, message="exit")

    assert demo.proc.returncode == 1, demo.stderr
    lines = [line for line in demo.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, demo.stderr
    assert str(port) in lines[0] and "in use" in lines[0], lines
    assert "Traceback" not in demo.stderr


async def test_demo_uses_redis_when_tierproxy_redis_url_is_set(
    tmp_path: Path, demos: list[Demo], redis_url: str, redis_client: Any
) -> None:
    origin_port = free_port()
    demo = Demo(
        tmp_path,
        [*demo_args(), "--origin-port", str(origin_port)],
        {"TIERPROXY_REDIS_URL": redis_url},
    )
    demos.append(demo)
    stdout = await demo.wait_output("Ctrl-C")
    assert "Redis" in stdout and redis_url not in stdout, stdout  # never print the URL

    miss = await run_curl(curl_lines(stdout)[0])

    assert miss.headers["x-cache"] == "MISS", miss
    entry = redis_key("/hello", f"http://127.0.0.1:{origin_port}")
    await wait_for_condition(lambda: redis_client.exists(entry), message="the page in Redis")
    assert await demo.stop(signal.SIGTERM) == 0, demo.stderr


async def test_demo_origin_runs_alone_and_its_switch_toggles_failures(
    tmp_path: Path, demos: list[Demo]
) -> None:
    port = free_port()
    demo = Demo(tmp_path, ["demo-origin", "--port", str(port), "--delay", "0.05"])
    demos.append(demo)
    await demo.wait_output(f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}"

    async with aiohttp.ClientSession() as session:

        async def status(method: str, path: str) -> tuple[int, str]:
            async with session.request(method, url + path) as response:
                return response.status, response.headers.get("Cache-Control", "")

        page = await status("GET", "/products?page=2")
        toggled_on = await status("POST", "/_demo/fail")
        failing = await status("GET", "/products?page=2")
        toggled_off = await status("POST", "/_demo/fail")
        healed = await status("GET", "/products?page=2")

    assert page == (200, "max-age=5, stale-if-error=600"), page
    assert toggled_on[0] == toggled_off[0] == 200
    assert failing == (503, "no-store"), failing
    assert healed[0] == 200, healed
    assert await demo.stop(signal.SIGTERM) == 0, demo.stderr
    assert "Traceback" not in demo.stderr, demo.stderr


async def test_demo_origin_on_a_port_in_use_exits_1(tmp_path: Path, demos: list[Demo]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        demo = Demo(tmp_path, ["demo-origin", "--port", str(port)])
        demos.append(demo)
        await wait_for_condition(lambda: demo.proc.poll() is not None, 15, message="exit")

    assert demo.proc.returncode == 1, demo.stderr
    assert demo.stderr.count("\n") == 1 and "in use" in demo.stderr, demo.stderr


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["demo", "--origin-port", "70000"], "--origin-port"),
        (["demo", "--delay", "-1"], "--delay"),
        (["demo-origin", "--max-age", "0"], "--max-age"),
        (["demo-origin", "--port", "http"], "--port"),
    ],
)
def test_bad_demo_flags_exit_2_naming_the_flag(
    args: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)

    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err
