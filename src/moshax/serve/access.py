"""Who may connect: an optional shared token, the websocket ``Origin`` (so another site open in
the user's browser cannot drive the server), and the loud warning for a non-loopback bind."""

from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import urlsplit


def token_ok(request, token: str | None) -> bool:
    """The token from ``Authorization: Bearer T`` or ``?token=T`` (browsers cannot set headers
    on a websocket) equals the server's; always True without a server token."""
    if not token:
        return True
    given = request.query.get("token", "")
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        given = auth[len("Bearer "):]
    return hmac.compare_digest(given.encode(), token.encode())


def origin_ok(request, allowed: frozenset[str]) -> bool:
    """No ``Origin`` (not a browser) or the page's own origin (same scheme, host and port as the
    request) or one of ``allowed`` (``--allow-origin``, e.g. ``https://example.org``)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    origin = origin.rstrip("/").lower()
    if origin in allowed or "*" in allowed:
        return True
    own = f"{request.scheme}://{request.host}".lower()
    return origin == own


def normalize_origins(origins) -> frozenset[str]:
    out = set()
    for o in origins or ():
        if o == "*":
            out.add("*")
            continue
        parts = urlsplit(o)
        if not parts.scheme or not parts.netloc:
            raise ValueError(f"--allow-origin {o!r}: expected SCHEME://HOST[:PORT], e.g. https://example.org")
        out.add(f"{parts.scheme}://{parts.netloc}".lower())
    return frozenset(out)


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, token: str | None) -> str | None:
    """The one-line warning for listening beyond loopback without a token (None when fine)."""
    if is_loopback(host) or token:
        return None
    return (f"WARNING: moshax serve listens on {host} without --auth-token: anyone who can reach this "
            f"port can talk to the model and read /metrics")
