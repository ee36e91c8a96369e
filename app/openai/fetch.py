"""Image URLs for POST /v1/embeddings, fetched under the rules of a public endpoint (server-side request forgery).

Off unless MAE_URL_FETCH_HOSTS lists hosts. Then a URL is fetched only when
- its scheme is http or https, it has no user:password@, and its host name is on the list (exact, or *.suffix);
- every address the name resolves to is globally routable, or inside an address or network the list names:
  loopback, link-local (cloud metadata), private, shared, multicast and reserved ranges are refused otherwise.
  IPv6 forms that carry an IPv4 address (mapped ::ffff:a.b.c.d, NAT64 64:ff9b::/96, 6to4, Teredo) are judged by
  that IPv4 address;
- the connection goes to the address that was checked (TLS still verifies the name), so a second DNS answer
  cannot swap it; each redirect is checked the same way, up to MAE_URL_FETCH_MAX_REDIRECTS;
- the answer is a 200 of at most MAE_URL_FETCH_MAX_BYTES, all within MAE_URL_FETCH_TIMEOUT_S, redirects included.
A refusal raises the serving core's image errors (413 oversize, 400 otherwise: app.http.errors decides).
The fetch runs on the event loop, so a client that leaves cancels it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import h11

from app.serving.errors import ImageTooLarge, UnreadableImage
from app.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_MAX_HEAD = 16 * 1024  # response line + headers


@dataclass(frozen=True)
class Policy:
    """Which hosts may be named and which otherwise-forbidden addresses may be reached; the limits."""

    names: frozenset[str]
    suffixes: tuple[str, ...]  # from *.example.com: ".example.com"
    networks: tuple[Network, ...]
    max_bytes: int
    timeout_s: float
    max_redirects: int

    @classmethod
    def from_settings(cls, s: Settings) -> Policy | None:
        """None when fetching is off (no hosts listed)."""
        names: set[str] = set()
        suffixes: list[str] = []
        networks: list[Network] = []
        for raw in (h.strip().lower().rstrip(".") for h in s.url_fetch_hosts.split(",")):
            if not raw:
                continue
            try:
                net = ipaddress.ip_network(raw.strip("[]"), strict=False)
            except ValueError:
                if raw.startswith("*."):
                    suffixes.append(raw[1:])
                else:
                    names.add(raw)
                continue
            networks.append(net)
            if net.num_addresses == 1:
                names.add(str(net.network_address))
        if not (names or suffixes or networks):
            return None
        return cls(frozenset(names), tuple(suffixes), tuple(networks), s.url_fetch_max_bytes,
                   s.url_fetch_timeout_s, s.url_fetch_max_redirects)  # fmt: skip

    def host_allowed(self, host: str) -> bool:
        """The URL's host (lower case, no brackets) is one the list names."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return host in self.names or any(host.endswith(s) for s in self.suffixes)
        return any(ip in n for n in self.networks if n.version == ip.version) or str(ip) in self.names

    def address_allowed(self, ip: IPAddress) -> bool:
        """A resolved address may be connected to: globally routable, or named by the list."""
        v4 = embedded_ipv4(ip)
        for a in (ip, v4) if v4 is not None else (ip,):
            if any(a in n for n in self.networks if n.version == a.version):
                return True
        return is_public(ip)


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, NAT64, 6to4, Teredo's client), if any."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def is_public(ip: IPAddress) -> bool:
    """Globally routable unicast: not loopback, link-local, private, shared (CGNAT), multicast, reserved or
    unspecified; an IPv6 form of an IPv4 address is judged by that address."""
    v4 = embedded_ipv4(ip)
    if v4 is not None:
        return is_public(v4)
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local)


def _refuse(url: str, why: str) -> UnreadableImage:
    return UnreadableImage("url_not_allowed", f"{_short(url)}: {why}")


def _failed(url: str, why: str) -> UnreadableImage:
    return UnreadableImage("fetch_failed", f"{_short(url)}: {why}")


def _short(url: str) -> str:
    return url if len(url) <= 200 else url[:200] + "..."


async def fetch(url: str, policy: Policy) -> bytes:
    """The body of `url` under `policy`, following redirects; raises UnreadableImage / ImageTooLarge."""
    try:
        async with asyncio.timeout(policy.timeout_s):
            for _ in range(policy.max_redirects + 1):
                status, location, body = await _get_once(url, policy)
                if location is None:
                    if status != 200:
                        raise _failed(url, f"answered HTTP {status}")
                    return body
                url = urljoin(url, location)
            raise _failed(url, f"more than {policy.max_redirects} redirects")
    except TimeoutError:
        raise _failed(url, f"not fetched within {policy.timeout_s:g} s") from None


async def _get_once(url: str, policy: Policy) -> tuple[int, str | None, bytes]:
    """One GET, pinned to a checked address: (status, the redirect's Location or None, body)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _refuse(url, "not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise _refuse(url, "only http and https URLs are fetched")
    if parts.username is not None or parts.password is not None:
        raise _refuse(url, "URLs with credentials are refused")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise _refuse(url, "no host")
    if not policy.host_allowed(host):
        raise _refuse(url, f"host {host!r} is not in MAE_URL_FETCH_HOSTS")
    https = parts.scheme == "https"
    port = port or (443 if https else 80)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (OSError, ValueError) as e:  # UnicodeError (a label over 63), an embedded NUL
        raise _failed(url, f"cannot resolve {host!r}: {e}") from None
    addresses = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos))
    for ip in addresses:  # every address, not only the first: DNS may answer a public and a private one
        if not policy.address_allowed(ip):
            raise _refuse(url, f"{host!r} resolves to {ip}, a loopback, link-local, private or reserved address")
    if not addresses:
        raise _failed(url, f"{host!r} has no address")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    default_port = port == (443 if https else 80)
    host_header = (f"[{host}]" if ":" in host else host) + ("" if default_port else f":{port}")
    last: OSError | None = None
    for ip in addresses:
        try:
            reader, writer = await asyncio.open_connection(
                str(ip), port, ssl=ssl.create_default_context() if https else None,
                server_hostname=host if https else None, limit=_MAX_HEAD,
            )  # fmt: skip
        except OSError as e:
            last = e
            continue
        try:
            return await _exchange(url, reader, writer, target, host_header, policy.max_bytes)
        finally:
            writer.close()
    raise _failed(url, f"cannot connect: {last}")


async def _exchange(
    url: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: str, host: str, max_bytes: int
) -> tuple[int, str | None, bytes]:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD)
    head = [("Host", host), ("User-Agent", "mae-serve"), ("Accept", "image/*"), ("Connection", "close")]
    status, parts, size = 0, [], 0
    try:
        writer.write(conn.send(h11.Request(method="GET", target=target, headers=head)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.lower(): v for k, v in event.headers}
                if 300 <= status < 400 and status != 304:
                    loc = headers.get(b"location")
                    if not loc:
                        raise _failed(url, f"a redirect ({status}) without a Location")
                    return status, loc.decode("latin-1"), b""
                if status != 200:
                    return status, None, b""
                length = headers.get(b"content-length", b"0")
                if length.isdigit() and int(length) > max_bytes:
                    raise ImageTooLarge("fetched_too_large", f"{_short(url)}: {int(length)} bytes, over {max_bytes}")
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > max_bytes:
                    raise ImageTooLarge("fetched_too_large", f"{_short(url)}: over {max_bytes} bytes")
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return status, None, b"".join(parts)
            else:  # ConnectionClosed before the end, InformationalResponse (skipped)
                if isinstance(event, h11.ConnectionClosed):
                    raise _failed(url, "the connection closed before the answer was complete")
    except h11.LocalProtocolError as e:  # a path or host h11 will not send (spaces, control characters)
        raise _refuse(url, f"not a valid request: {e}") from None
    except h11.RemoteProtocolError as e:
        raise _failed(url, f"not a valid HTTP answer: {e}") from None
    except (OSError, ssl.SSLError) as e:
        raise _failed(url, f"{type(e).__name__}: {e}") from None
