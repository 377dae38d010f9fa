"""Who may talk to the prediction server: an API key, a Host allow-list, and the rule for binding beyond loopback.

- API key: `--api-key` or STUDIO_API_KEY; a client sends `Authorization: Bearer KEY` or `X-API-Key: KEY`, compared in
  constant time. /health stays open (a load balancer's probe has no key); everything else answers 401 without it.
- Host allow-list: the Host header must name this server (loopback names by default, `--allowed-host` for more, `*`
  for any). A web page the line PC happens to open can POST to localhost (a multipart form needs no CORS preflight),
  and a DNS-rebinding page can even read the answer: both send a Host of their own, which is refused here.
- Binding to anything but loopback without a key refuses to start unless the user says `--no-auth`.
"""
from __future__ import annotations

import hmac
import ipaddress

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from core.errors import UserError

API_KEY_ENV = "STUDIO_API_KEY"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
OPEN_PATHS = ("/health",)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, no_auth: bool) -> str | None:
    """None when serving on host is fine as asked; otherwise raise UserError saying what to add. Returns a warning
    line to print when the user chose --no-auth on a network address."""
    if is_loopback(host):
        return None
    if api_key:
        return None
    if not no_auth:
        raise UserError(f"--host {host} makes the server reachable from the network, and it has no API key: anyone "
                        f"who can reach it could use it. Give --api-key (or set {API_KEY_ENV}), or say --no-auth if "
                        "the network itself is trusted.")
    return f"warning: serving on {host} without an API key (--no-auth): anyone who can reach this port can use it"


def allowed_hosts(bind_host: str, extra: list[str] | None) -> list[str]:
    """Host names a request may name: loopback, the address bound to (when it is a specific one), and extra."""
    hosts = list(LOOPBACK_NAMES)
    if bind_host not in ("0.0.0.0", "::", "") and bind_host not in hosts:
        hosts.append(bind_host)
    return hosts + [h.lower() for h in (extra or [])]


def _host_name(header: str) -> str:
    """The host part of a Host header, lower case: 'Example.com:8000' -> 'example.com', '[::1]:80' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class AccessGuard:
    """ASGI middleware: the Host allow-list for every request, then the API key for all but OPEN_PATHS."""

    def __init__(self, app: ASGIApp, api_key: str | None, hosts: list[str]):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.any_host = "*" in hosts
        self.hosts = set(hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not self.any_host and _host_name(headers.get("host", "")) not in self.hosts:
            reply = JSONResponse({"detail": "this server does not answer to the host name "
                                            f"{headers.get('host', '')!r} (start it with --allowed-host NAME)"}, 400)
            await reply(scope, receive, send)
            return
        if self.key is not None and scope.get("path") not in OPEN_PATHS and not self._has_key(headers):
            reply = JSONResponse({"detail": "missing or wrong API key: send 'Authorization: Bearer KEY' or "
                                            "'X-API-Key: KEY'"}, 401, headers={"WWW-Authenticate": "Bearer"})
            await reply(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _has_key(self, headers: dict[str, str]) -> bool:
        given = headers.get("x-api-key", "")
        auth = headers.get("authorization", "")
        if not given and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), self.key)
