"""Which webhook URLs the server will POST to: http(s) only, and (unless a setting allows it) never to an
address of its own network, so that a webhook cannot be aimed at a database port, a cloud metadata
service or an admin page behind the firewall (SSRF). The host is resolved and every address it names
must be public; the check is made when the endpoint is saved and again before each delivery, as a name
can point elsewhere later.

A delivery connects to an address its own check resolved (:func:`pinned`), never to the name: were the
name resolved again on connect, a DNS server under an attacker's control could answer a public address
to the check and an internal one to the connection (DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

MAX_URL_LENGTH = 2000


class BadWebhookUrl(ValueError):
    """A URL the server will not deliver to; the message says why, for the person who typed it."""


def check_url(url: str, allow_private: bool) -> str:
    """``url`` cleaned, if webhooks may go there; BadWebhookUrl otherwise."""
    url = url.strip()
    if not url:
        raise BadWebhookUrl("enter the URL of your webhook receiver")
    if len(url) > MAX_URL_LENGTH:
        raise BadWebhookUrl(f"the URL is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        raise BadWebhookUrl("that is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise BadWebhookUrl("the URL must start with https:// or http://")
    if not parts.hostname:
        raise BadWebhookUrl("the URL names no host")
    if parts.username or parts.password:
        raise BadWebhookUrl("the URL must not carry a user name or password; verify the signature instead")
    check_host(parts.hostname, allow_private)
    return url


def check_host(host: str, allow_private: bool) -> list[str]:
    """The addresses ``host`` resolves to, once; BadWebhookUrl unless every one is public (or
    ``allow_private``, which resolves nothing and returns no address)."""
    if allow_private:
        return []
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        raise BadWebhookUrl(f"the host {host} could not be resolved") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise BadWebhookUrl(f"the host {host} could not be resolved")
    for address in addresses:
        if not is_public(address):
            raise BadWebhookUrl(f"the host {host} is a loopback, private or reserved address")
    return addresses


@dataclass(frozen=True)
class Target:
    """Where one delivery goes: ``url`` with the host replaced by an address that was checked, and what
    keeps the name for the receiver (the ``Host`` header) and for TLS (SNI and the certificate's name)."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, str] = field(default_factory=dict)


def pinned(url: str, allow_private: bool) -> Target:
    """Resolve ``url``'s host once, check every address, and aim at the first: BadWebhookUrl if refused.
    With ``allow_private`` (closed networks, tests) nothing is checked, so the URL is left as it is."""
    parsed = httpx.URL(url)
    if allow_private:
        return Target(url)
    name = parsed.raw_host.decode("ascii")  # IDNA-encoded: what DNS and the certificate know
    address = check_host(name, allow_private)[0]
    extensions = {"sni_hostname": name} if parsed.scheme == "https" else {}
    # netloc is the name and any explicit port: the Host header the receiver would get by name.
    return Target(str(parsed.copy_with(host=address)), {"host": parsed.netloc.decode("ascii")}, extensions)


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone ("fe80::1%eth0") is not part of it
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return ip.is_global and not ip.is_multicast
