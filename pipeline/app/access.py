"""Who may do what in the app: the token a browser holds, the operator's credential, the origins
and hosts a state-changing request may come from, and per-address rate limits.

The app is not a login system. It knows two kinds of caller:
- a **person**: whoever holds the owner token the app issued to their browser (an unguessable
  random value in an HttpOnly, SameSite=Strict cookie). Feedback they send is stored with the
  token's sha256 (the token itself is never stored), and only a request carrying the same token may
  list or take it back. A name typed in the form is an attribution shown beside the feedback,
  never an identity.
- an **operator**: a request with ``Authorization: Bearer <CAPTIONER_ADMIN_TOKEN>`` (compared in
  constant time). Only an operator lists everyone's feedback or takes back someone else's. With no
  admin token configured, nobody can.

Requests that change something (POST, DELETE) from a page of another origin are refused (the
browser says where a request comes from in ``Origin`` / ``Sec-Fetch-Site``; a non-browser client
sends neither and is judged by its token). A ``Host`` header the operator did not allow is refused
(DNS rebinding against an app on 127.0.0.1). Client addresses come from the connection; proxy
headers (``X-Forwarded-For``) count only from proxies the operator names (``--trusted-proxies``).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import re
import secrets
import threading
import time

OWNER_COOKIE = "captioner_owner"
ADMIN_TOKEN_ENV = "CAPTIONER_ADMIN_TOKEN"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{43}$")  # secrets.token_urlsafe(32)
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
MIN_ADMIN_TOKEN_CHARS = 16


def new_owner_token() -> str:
    return secrets.token_urlsafe(32)


def owner_key(token: str) -> str:
    """What the store keeps of a token: its sha256 (a leaked database hands out no tokens)."""
    return hashlib.sha256(token.encode()).hexdigest()


def valid_token(token: str | None) -> str | None:
    """The cookie's token if it has the form the app issues, else None (a new one is issued)."""
    return token if token and _TOKEN.match(token) else None


def cookie_header(token: str, secure: bool) -> str:
    """Set-Cookie for the owner token: not readable by scripts, not sent by other sites, a year."""
    return (f"{OWNER_COOKIE}={token}; Path=/; Max-Age=31536000; HttpOnly; SameSite=Strict"
            + ("; Secure" if secure else ""))


class OperatorCredential:
    """``CAPTIONER_ADMIN_TOKEN``, checked in constant time; absent = no operator."""

    def __init__(self, token: str | None):
        if token is not None and len(token) < MIN_ADMIN_TOKEN_CHARS:
            raise ValueError(f"{ADMIN_TOKEN_ENV} is shorter than {MIN_ADMIN_TOKEN_CHARS} characters: use a long "
                             "random value (python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        self._token = token.encode() if token else None

    @classmethod
    def from_env(cls) -> "OperatorCredential":
        return cls(os.environ.get(ADMIN_TOKEN_ENV) or None)

    @property
    def configured(self) -> bool:
        return self._token is not None

    def holds(self, authorization: str | None) -> bool:
        """Does an ``Authorization`` header carry the operator's token?"""
        if self._token is None or not authorization:
            return False
        scheme, _, value = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self._token)


def cross_origin(method: str, headers: dict[str, str], scheme: str) -> str | None:
    """Why a state-changing request from a browser page of another origin is refused, or None.
    ``headers``: lower-case names. A request with neither header (curl, scripts) passes."""
    if method not in STATE_CHANGING:
        return None
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"a {method} from a page of another site (Sec-Fetch-Site: {site}) is refused"
    origin = headers.get("origin")
    if origin is not None and origin != f"{scheme}://{headers.get('host', '')}":
        return f"a {method} from the origin {origin[:100]} is refused: only this app's own pages may send one"
    return None


def host_name(host_header: str) -> str:
    """The name in a ``Host`` header, without its port: ``[::1]:8000`` -> ``::1``."""
    value = host_header.strip().lower()
    if value.startswith("["):  # an IPv6 literal, with or without a port
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def host_allowed(host_header: str, allowed: list[str]) -> bool:
    """Does the app answer this ``Host``? ``*`` in ``allowed`` answers any; ``*.example.org`` any
    subdomain of it."""
    name = host_name(host_header)
    for pattern in allowed:
        pattern = host_name(pattern)
        if pattern == "*" or name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


def allowed_hosts(bind_host: str, extra: list[str]) -> list[str]:
    """Host headers the app answers: on a loopback address only the loopback names (and
    ``extra``); on another address whatever the operator lists, or any when none is listed."""
    if bind_host in LOOPBACK_HOSTS or bind_host.startswith("127."):
        return [*LOOPBACK_HOSTS, bind_host, *extra]
    return [*extra] if extra else ["*"]


class RateLimit:
    """At most ``per_minute`` requests per key (the client's address) in any 60 seconds."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self._seen: dict[str, collections.deque] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if len(self._seen) > 10_000:  # forget idle clients (bounded memory under a flood of addresses)
                self._seen = {k: q for k, q in self._seen.items() if q and now - q[-1] < 60}
            times = self._seen.setdefault(key, collections.deque())
            while times and now - times[0] >= 60:
                times.popleft()
            if len(times) >= self.per_minute:
                return False
            times.append(now)
            return True
