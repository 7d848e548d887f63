"""HTTP reward servers (`--reward_url URL`).

Protocol: one POST per chunk of completions, JSON body
    {"prompts": [...], "completions": [...], "<column>": [...], ...}
answered with {"rewards": [float | null, ...]} (one per completion, in order). A batch is sent in
chunks of `request_size` completions (0 = all in one request), at most `concurrency` requests in
flight. Each request gets `timeout` seconds; a refused connection, a timeout, an HTTP 5xx/429 or a
reply that is not that JSON is retried `retries` times with exponential backoff (0.5 s, 1 s,
2 s, ...), then a RewardError names the URL and the last problem. Other 4xx errors are not retried.
Standard library only (urllib), so the client needs nothing installed.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

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
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:200].decode("utf-8", "replace")
            if e.code >= 500 or e.code == 429:
                raise _Retryable(f"HTTP {e.code} {e.reason}: {detail}") from None
            raise RewardError(f"reward server {self.url} refused the request: HTTP {e.code} {e.reason}: {detail}; "
                              "it must accept a JSON POST of {\"prompts\", \"completions\", ...columns}") from None
        except urllib.error.URLError as e:
            raise _Retryable(f"cannot connect ({e.reason})") from None
        except (TimeoutError, OSError) as e:    # socket.timeout is TimeoutError; resets are OSError
            what = "no answer within" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}; timeout"
            raise _Retryable(f"{what} {self.timeout:g}s") from None
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
