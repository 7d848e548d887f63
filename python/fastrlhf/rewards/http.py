"""HTTP reward servers (`--reward_url URL`).

Protocol: one POST per chunk of completions, JSON body
    {"prompts": [...], "completions": [...], "<column>": [...], ...}
answered with {"rewards": [float | null, ...]} (one per completion, in order). A batch is sent in
chunks of `request_size` completions (0 = all in one request), at most `concurrency` requests in
flight. Each request gets `timeout` seconds from connecting to the last byte of the answer (a
deadline per request: a server that trickles its answer a byte at a time is cut off there, its
connection shut down); a refused connection, a timeout, an HTTP 5xx/429 or a reply that is not
that JSON is retried `retries` times with exponential backoff (0.5 s, 1 s, 2 s, ...), then a
RewardError names the URL and the last problem. Other 4xx errors are not retried. Standard
library only (urllib, proxies as urllib finds them), so the client needs nothing installed.
"""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

from ..errors import RewardError, RewardSpecError

BACKOFF_S = 0.5


class _Retryable(Exception):
    pass


def check_url(url: str) -> str:
    if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1]) == 0:
        raise RewardSpecError(f"--reward_url {url!r} is not an http:// or https:// URL; e.g. "
                              "--reward_url http://127.0.0.1:8000/reward")
    return url


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


class _Deadline:
    """Shuts down the connections of one request when its time is up, so that a read blocked on a
    trickling server returns at the deadline (urllib's timeout bounds each socket read, not the whole)."""

    def __init__(self, seconds: float):
        self.connections: list = []
        self.expired = False
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for conn in self.connections:
                sock = getattr(conn, "sock", None)
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def connection_class(self, base):
        deadline = self

        class Connection(base):
            def connect(self):
                super().connect()
                with deadline._lock:
                    deadline.connections.append(self)
                    if deadline.expired:
                        self.sock.shutdown(socket.SHUT_RDWR)
        return Connection

    def opener(self):
        deadline = self

        class HTTP(urllib.request.HTTPHandler):
            def http_open(self, req):
                return self.do_open(deadline.connection_class(http.client.HTTPConnection), req)

        class HTTPS(urllib.request.HTTPSHandler):
            def https_open(self, req):
                return self.do_open(deadline.connection_class(http.client.HTTPSConnection), req,
                                    context=self._context)
        return urllib.request.build_opener(HTTP, HTTPS)

    def __enter__(self) -> "_Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


class HTTPReward:
    """Calls one reward server; `__call__(prompts, completions, **columns) -> list`."""

    def __init__(self, url: str, *, timeout: float = 60.0, retries: int = 3, concurrency: int = 4,
                 request_size: int = 0, backoff: float = BACKOFF_S):
        self.url = check_url(url)
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.concurrency, self.request_size = max(1, int(concurrency)), int(request_size)
        self.name = url

    def _post_once(self, body: bytes, n: int) -> list:
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        deadline = _Deadline(self.timeout)
        try:
            with deadline, deadline.opener().open(req, timeout=self.timeout) as resp:
                raw = resp.read()
                if deadline.expired:  # the read ended because the connection was shut down
                    raise TimeoutError
        except urllib.error.HTTPError as e:
            detail = e.read()[:200].decode("utf-8", "replace")
            if e.code >= 500 or e.code == 429:
                raise _Retryable(f"HTTP {e.code} {e.reason}: {detail}") from None
            raise RewardError(f"reward server {self.url} refused the request: HTTP {e.code} {e.reason}: {detail}; "
                              "it must accept a JSON POST of {\"prompts\", \"completions\", ...columns}") from None
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, OSError) as e:
            # socket.timeout is TimeoutError; resets are OSError; a shut-down connection can be any of them
            if deadline.expired or isinstance(e, TimeoutError) or \
                    isinstance(getattr(e, "reason", None), TimeoutError):
                raise _Retryable(f"no complete answer within {self.timeout:g}s") from None
            if isinstance(e, urllib.error.URLError):
                raise _Retryable(f"cannot connect ({e.reason})") from None
            raise _Retryable(f"{type(e).__name__}: {e}") from None
        try:
            reply = json.loads(raw)
        except ValueError:
            raise _Retryable(f"the reply is not JSON: {raw[:120]!r}") from None
        if not isinstance(reply, dict) or not isinstance(reply.get("rewards"), list):
            raise _Retryable(f'the reply is not {{"rewards": [...]}}: {str(reply)[:120]}')
        if len(reply["rewards"]) != n:
            raise _Retryable(f"the reply has {len(reply['rewards'])} rewards for {n} completions")
        return reply["rewards"]

    def _post(self, payload: Dict[str, list], n: int) -> list:
        body = json.dumps(payload).encode()
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return self._post_once(body, n)
            except _Retryable as e:
                problem = str(e)
        raise RewardError(f"reward server {self.url} failed {self.retries + 1} times (timeout {self.timeout:g}s, "
                          f"retries with backoff): {problem}. Check that the server is up and answers "
                          '{"rewards": [...]} (see README, "Reward functions and servers")')

    def __call__(self, prompts: List[str], completions: List[str], **columns) -> list:
        n = len(completions)
        size = self.request_size if self.request_size > 0 else max(n, 1)
        chunks = [(i, min(i + size, n)) for i in range(0, n, size)]

        def payload(lo: int, hi: int) -> Dict[str, list]:
            out = {k: [_jsonable(x) for x in v[lo:hi]] for k, v in columns.items()
                   if k not in ("prompts", "completions")}
            out.update(prompts=list(prompts[lo:hi]), completions=list(completions[lo:hi]))
            return out
        if len(chunks) <= 1:
            return self._post(payload(0, n), n) if n else []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(chunks))) as pool:
            parts = list(pool.map(lambda c: self._post(payload(*c), c[1] - c[0]), chunks))
        return [r for part in parts for r in part]

    def close(self) -> None:
        pass


def max_wait_s(timeout: float, retries: int, backoff: float = BACKOFF_S) -> float:
    """Worst-case seconds one request can take before the error (for documentation and tests)."""
    return (retries + 1) * timeout + backoff * (2 ** retries - 1)


__all__ = ["HTTPReward", "check_url", "max_wait_s"]
