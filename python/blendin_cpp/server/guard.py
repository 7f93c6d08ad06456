"""What a browser page elsewhere must not do to a server on this machine, and the count of every
answer for /metrics.

A page on any site can send a "simple" cross-origin request (a POST with `Content-Type:
text/plain`, no preflight) to a server on localhost, and a DNS-rebinding page can even read the
answers under its own host name. So, before a request reaches the endpoints:
- a POST to a JSON endpoint must declare a JSON body (`Content-Type: application/json`), else 415:
  a page cannot send that cross-origin without a preflight, which this server never grants;
- the `Host` must be an IP address, `localhost`, or a name given with --allowed-hosts (a rebinding
  page's requests carry its own name), else 403;
- an `Origin`, when a browser sends one, must be the server's own (the page it serves itself,
  which posts to relative URLs) or one given with --allowed-origins, else 403.
Clients that are not browsers send no Origin and are not affected.
"""
from __future__ import annotations

import ipaddress
import json
from urllib.parse import urlsplit

from .schemas import ApiError

# the endpoints that take a JSON body, and those /metrics counts by name (anything else is counted
# as "other": no unbounded labels)
JSON_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize")
ENDPOINTS = (*JSON_ENDPOINTS, "/v1/models", "/health", "/metrics", "/tokenizer_info", "/")


def host_name(host: str) -> str:
    """The name part of a Host header or an origin's netloc: no port, no IPv6 brackets, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class Guard:
    """ASGI middleware: the checks above (`hosts` None: no Host check, for an app mounted in
    process), then the request; every answer's status is counted in `metrics`."""

    def __init__(self, app, metrics, hosts: set[str] | None, origins: set[str]):
        self.app, self.metrics = app, metrics
        self.hosts = None if hosts is None else {h.lower() for h in hosts}
        self.origins = {o.lower().rstrip("/") for o in origins}

    def refusal(self, scope) -> ApiError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        name = host_name(host)
        if self.hosts is not None and not (is_ip(name) or name == "localhost" or name in self.hosts
                                           or "*" in self.hosts):
            return ApiError(403, f"the Host {host!r} is not one this server answers to (start it with "
                            "--allowed-hosts NAME to allow a name)", code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None:
            o = origin.lower().rstrip("/")
            same = urlsplit(o).netloc == host.lower()
            if not (same or o in self.origins or "*" in self.origins):
                return ApiError(403, f"requests from pages of {origin!r} are not allowed (start the server with "
                                "--allowed-origins ORIGIN to allow them)", code="origin_not_allowed")
        if scope["method"] == "POST" and scope["path"] in JSON_ENDPOINTS:
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                return ApiError(415, f"the body must be JSON, sent with 'Content-Type: application/json' (got "
                                f"{media or 'none'!r})", code="unsupported_media_type")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        status = 500

        async def counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            error = self.refusal(scope)
            if error is not None:
                await _answer(send, error)
                status = error.status
            else:
                await self.app(scope, receive, counted)
        finally:
            method = scope.get("state", {}).get("method", "")  # set by the endpoints that generate
            self.metrics.requests.labels(endpoint, method, str(status)).inc()


async def _answer(send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
