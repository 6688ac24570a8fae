"""Driving ``wrk``: one run against one URL, its numbers read back as JSON.

Every run loads a small Lua script whose ``done()`` prints one ``BENCHJSON {...}``
line (requests, bytes, duration, latency percentiles in µs, errors), so nothing
depends on wrk's human-readable output. With ``keys_file`` the script also rotates
the ``x-api-key`` header over the keys in that file (requests pre-formatted once per
thread, so the rotation costs wrk next to nothing).
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["WrkError", "WrkResult", "run_wrk", "write_script"]

_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"bytes":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.bytes, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""

_ROTATE = r"""
local keys_file = %s
local path = %s
local reqs = {}
local i = 0
local counter = 0

setup = function(thread)
  thread:set("tid", counter)
  counter = counter + 1
end

init = function(args)
  local host = wrk.headers["Host"]
  for line in io.lines(keys_file) do
    if #line > 0 then
      reqs[#reqs + 1] = wrk.format("GET", path, {["Host"] = host, ["x-api-key"] = line})
    end
  end
  -- threads start at different places in the key list
  i = ((tid or 0) * 397) %% #reqs
end

request = function()
  i = i %% #reqs + 1
  return reqs[i]
end
"""


class WrkError(RuntimeError):
    """wrk failed or printed no result line."""


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    bytes: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    errors: Mapping[str, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def mb_s(self) -> float:
        """Body and header bytes received per second, in MB (10^6 bytes)."""
        return self.bytes / self.duration_s / 1e6 if self.duration_s else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def _lua_str(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid Lua string literal for plain text


def write_script(path: Path, *, keys_file: Path | None = None, url_path: str = "/") -> Path:
    body = _DONE
    if keys_file is not None:
        body = (_ROTATE % (_lua_str(str(keys_file)), _lua_str(url_path))) + body
    path.write_text(body)
    return path


def run_wrk(
    url: str,
    script: Path,
    *,
    connections: int,
    threads: int,
    duration: float,
    headers: Mapping[str, str] | None = None,
    timeout_s: int = 10,
) -> WrkResult:
    """One wrk run of ``duration`` seconds; a fraction of a second too (the tests' tiny runs)."""
    threads = max(1, min(threads, connections))
    whole = duration == int(duration)
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{int(duration) if whole else math.ceil(duration)}s",  # wrk takes whole seconds only
        f"--timeout={timeout_s}s",
        "-s",
        str(script),
    ]
    for k, v in (headers or {}).items():
        argv += ["-H", f"{k}: {v}"]
    argv.append(url)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    limit = duration + timeout_s + 30
    try:
        if whole:
            out, err = proc.communicate(timeout=limit)
        else:
            try:
                out, err = proc.communicate(timeout=duration)
            except subprocess.TimeoutExpired:
                # A fraction of a second: wrk's SIGINT handler ends the run early, with its summary
                # and the time it really ran (so req/s stays right).
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise WrkError(f"wrk did not finish: {' '.join(argv)}") from None
    for line in out.splitlines():
        if line.startswith("BENCHJSON "):
            d = json.loads(line[len("BENCHJSON ") :])
            return WrkResult(
                requests=d["requests"],
                bytes=d["bytes"],
                duration_s=d["duration_us"] / 1e6,
                p50_ms=d["p50_us"] / 1000,
                p99_ms=d["p99_us"] / 1000,
                mean_ms=d["mean_us"] / 1000,
                errors={k: d[k] for k in ("connect", "read", "write", "status", "timeout") if d[k]},
            )
    raise WrkError(f"wrk exited {proc.returncode} without a result: {(err or out).strip()[-500:]}")
