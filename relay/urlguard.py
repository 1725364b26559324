"""URL guard: decide whether a user-supplied URL may be fetched, and to which address exactly.

The relay fetches URLs that strangers type, so every hop is checked twice: the literal URL
(scheme, credentials, odd characters) and every address its host resolves to. The caller then
connects to the address that was checked (see :mod:`relay.fetch`), which closes the DNS-rebinding
gap between "resolve to check" and "resolve to connect".
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import idna

from .errors import DownloadFailed, UrlNotAllowed

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]

MAX_URL_LENGTH = 4096
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_FORBIDDEN_CHARACTERS = re.compile(r"[\x00-\x20\\\x7f]")  # control characters, space, backslash, DEL


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (``address``, ``port``) and what to ask for (``url``)."""

    url: str
    scheme: str
    host: str
    port: int
    address: str


def check_literal(url: str, allowed: Iterable[Network] = ()) -> tuple[str, str, int]:
    """Check what can be checked without DNS; return ``(scheme, ascii_host, port)``.

    Raises :class:`UrlNotAllowed` for non-http(s) schemes, embedded credentials, control
    characters, a missing host, and literal addresses that are not globally routable.
    """
    if not isinstance(url, str) or not url:
        raise UrlNotAllowed("The URL is empty.")
    if len(url) > MAX_URL_LENGTH:
        raise UrlNotAllowed(f"The URL is longer than {MAX_URL_LENGTH} characters.")
    if _FORBIDDEN_CHARACTERS.search(url):
        raise UrlNotAllowed("The URL contains spaces, backslashes or control characters; encode them first.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise UrlNotAllowed(f"The URL cannot be parsed ({err}).") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        given = f"{scheme}:" if scheme else "a URL without a scheme"
        raise UrlNotAllowed(
            f"Only http:// and https:// URLs can be fetched, not {given}. Use the file's public download link."
        )
    if "@" in parts.netloc:
        raise UrlNotAllowed("URLs with a user name or password in them are not fetched; use a share link instead.")
    host = parts.hostname
    if not host:
        raise UrlNotAllowed("The URL has no host name.")
    if port == 0:
        raise UrlNotAllowed("The URL's port 0 is not a valid port.")
    ascii_host = _ascii_host(host)
    literal = _literal_address(ascii_host)
    if literal is not None and not is_allowed(literal, allowed):
        raise UrlNotAllowed(_private_message(ascii_host, literal))
    return scheme, ascii_host, port or _DEFAULT_PORTS[scheme]


def check(url: str, allowed: Iterable[Network] = (), resolve: Resolver | None = None) -> Target:
    """Check ``url`` fully: literal rules, then every address its host resolves to.

    Every resolved address must be allowed (globally routable, or inside ``allowed``); the first
    one is returned to connect to. Raises :class:`UrlNotAllowed` or, when the name does not
    resolve, :class:`DownloadFailed`.
    """
    allowed = tuple(allowed)
    scheme, host, port = check_literal(url, allowed)
    literal = _literal_address(host)
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            addresses = (resolve or resolve_host)(host, port)
        except OSError as err:
            raise DownloadFailed(f"The host {host} could not be found (DNS: {err}). Check the link.") from None
        except (UnicodeError, ValueError) as err:  # a name the resolver's encoder refuses
            raise UrlNotAllowed(f"The host name {host[:80]!r} is not a valid domain name ({err}).") from None
    if not addresses:
        raise DownloadFailed(f"The host {host} has no addresses.")
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])
        if not is_allowed(address, allowed):
            raise UrlNotAllowed(_private_message(host, address))
    return Target(url=url, scheme=scheme, host=host, port=port, address=addresses[0].split("%", 1)[0])


def resolve_host(host: str, port: int) -> list[str]:
    """All addresses ``host`` resolves to (TCP), in the resolver's order, without duplicates."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        if sockaddr[0] not in seen:
            seen.append(sockaddr[0])
    return seen


def is_allowed(address: IPAddress, allowed: Iterable[Network] = ()) -> bool:
    """True when ``address`` is globally routable or inside one of the ``allowed`` networks.

    IPv6 forms that embed an IPv4 address (IPv4-mapped, 6to4, NAT64, IPv4-compatible) are judged
    by the embedded address, so ``::ffff:127.0.0.1`` is as forbidden as ``127.0.0.1``. Teredo
    (``2001::/32``) is never global, so it is refused outright.
    """
    allowed = tuple(allowed)
    embedded = _embedded(address)
    if _in(address, allowed):
        return all(_in(inner, allowed) or _is_public(inner) for inner in embedded)
    # A translation form (IPv4-mapped, 6to4, NAT64) is only as public as the IPv4 address inside.
    return all(_in(inner, allowed) or _is_public(inner) for inner in embedded) if embedded else _is_public(address)


# Path segments that look like a secret: a Telegram bot's token (``/file/bot<id>:<token>/…``, the link
# a bot hands over for a voice note), or a long run of letters and digits (a key, a JWT, a signature).
_SECRET_SEGMENT = re.compile(
    r"bot\d+(?::|%3[Aa])[\w-]+"  # Telegram, the colon as it is or percent-encoded
    r"|[\w-]{10,}\.[\w-]{10,}\.[\w-]{10,}"  # a JWT: three long base64url parts
    r"|(?=[\w-]*\d)(?=[\w-]*[A-Za-z])[\w-]{32,}"  # a key: a long run of letters and digits
)


def secret_segment(segment: str) -> bool:
    """Whether a URL path segment looks like a secret (see ``_SECRET_SEGMENT``)."""
    return _SECRET_SEGMENT.fullmatch(segment) is not None


def redact(url: str) -> str:
    """``url`` without credentials, query string, fragment, or path segments that look like a
    secret (each shown as ``…``): safe for logs, answers and rows kept after the job."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{host}:{parts.port}" if parts.port else host
        path = "/".join("…" if secret_segment(segment) else segment for segment in parts.path.split("/"))
        return urlunsplit((parts.scheme, netloc, path, "", ""))
    except ValueError:
        return "<unparseable URL>"


def _private_message(host: str, address: IPAddress) -> str:
    where = f"{address}" if host == str(address) else f"{host} points to {address}, which"
    return (
        f"{where} is not a public internet address; the relay only connects to public ones, unless its "
        "operator allows a private network with RELAY_ALLOWED_NETWORKS (a self-hosted n8n, a local test)."
    )


def _is_public(address: IPAddress) -> bool:
    return address.is_global and not (
        address.is_multicast
        or address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_reserved
        or address.is_unspecified
        or (isinstance(address, ipaddress.IPv6Address) and address.is_site_local)  # fec0::/10, still routed in places
    )


def _in(address: IPAddress, networks: tuple[Network, ...]) -> bool:
    return any(address.version == net.version and address in net for net in networks)


def _embedded(address: IPAddress) -> list[IPAddress]:
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    found: list[IPAddress] = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address in _NAT64 or address in _NAT64_LOCAL:
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    # IPv4-compatible (deprecated ::a.b.c.d) forms.
    if int(address) >> 32 == 0 and int(address) > 0xFFFF:
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def is_address(host: str) -> bool:
    """True when ``host`` (as :func:`check_literal` returns it) is an IP address, not a name."""
    return _literal_address(host) is not None


def _literal_address(host: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    return address


def _ascii_host(host: str) -> str:
    host = host.rstrip(".") if host.endswith(".") and not host.endswith("..") else host
    if host.isascii():
        host = host.lower()
        # A name the resolver would refuse (an empty label, one over 63 characters) is refused here.
        if _literal_address(host) is None and (
            len(host) > 253 or not all(0 < len(label) <= 63 for label in host.split("."))
        ):
            raise UrlNotAllowed(f"The host name {host[:80]!r} is not a valid domain name. Check the link.")
        return host
    try:
        return idna.encode(host, uts46=True).decode("ascii")
    except idna.IDNAError as err:
        raise UrlNotAllowed(f"The host name {host!r} is not a valid international domain name ({err}).") from None
