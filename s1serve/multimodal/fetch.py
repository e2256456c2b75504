"""Loading media from `data:`, `http(s)://` and `file://` URLs, safe by default.

http(s): the host's addresses are resolved and each must be public (no loopback, private, link-local (cloud
metadata at 169.254.169.254 included), multicast, reserved or unspecified ranges, IPv4-mapped/6to4/Teredo forms
of them included); the connection goes to the checked address (no second lookup that DNS rebinding could
answer differently); redirects are followed by hand and every hop is checked again. `--allowed-media-domains`
limits fetching to the listed hosts, whose addresses are then trusted (an internal media server can be listed);
`allow_private_addresses` lifts the address check for all hosts. Bodies are streamed and cut at the byte cap;
the whole fetch (lookups, redirects, body) runs under one time limit. `file://` reads only below
`--allowed-local-media-path`, after symlinks are resolved. Nothing is written to disk.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes, urljoin, urlsplit

import httpx

from s1serve.multimodal.errors import MediaError
from s1serve.multimodal.processor import MediaItem, MediaKind

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int
    timeout_s: float


@dataclass(frozen=True)
class FetchPolicy:
    """What may be fetched. Time limits follow vLLM's defaults (5 s images, 30 s video); byte caps keep a 50 MB
    image answer out while leaving room for a 4K PNG (20 MiB) and minutes of HD video (256 MiB)."""

    allowed_domains: frozenset[str] = frozenset()  # empty: any public host
    allow_private_addresses: bool = False
    allowed_local_media_path: Path | None = None  # None: file:// refused
    max_redirects: int = 5
    limits: dict[str, FetchLimits] = field(
        default_factory=lambda: {
            "image": FetchLimits(max_bytes=20 * 2**20, timeout_s=5.0),
            "video": FetchLimits(max_bytes=256 * 2**20, timeout_s=30.0),
        }
    )

    def __post_init__(self) -> None:
        domains = frozenset(_normal_host(d) for d in self.allowed_domains)
        object.__setattr__(self, "allowed_domains", domains)


def _normal_host(host: str) -> str:
    return host.strip().rstrip(".").lower()


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def is_public_address(ip: _IPAddress) -> bool:
    """True for an address on the public internet; False for every special-purpose range."""
    if isinstance(ip, ipaddress.IPv6Address) and (inner := _embedded_ipv4(ip)) is not None:
        if not is_public_address(inner):
            return False
    refused = ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved
    return ip.is_global and not refused and not ip.is_unspecified


class MediaFetcher:
    """Fetches one media item's bytes under a FetchPolicy; every refusal is a MediaError naming the item."""

    def __init__(self, policy: FetchPolicy | None = None) -> None:
        self.policy = policy or FetchPolicy()
        root = self.policy.allowed_local_media_path
        self._local_root = Path(os.path.realpath(root)) if root is not None else None

    async def fetch(self, url: str, kind: MediaKind, label: str) -> MediaItem:
        limits = self.policy.limits[kind]
        scheme = urlsplit(url).scheme.lower()
        if scheme == "data":
            return MediaItem.from_bytes(kind, _decode_data_url(url, label, limits.max_bytes))
        if scheme == "file":
            data = await asyncio.to_thread(self._read_local, url, label, limits.max_bytes)
            return MediaItem.from_bytes(kind, data)
        if scheme not in ("http", "https"):
            raise MediaError(f"{label}: URL scheme {scheme!r} is not allowed; use http(s)://, data: or file://")
        try:
            async with asyncio.timeout(limits.timeout_s):
                data = await self._fetch_http(url, label, limits.max_bytes)
        except TimeoutError as e:
            raise MediaError(f"{label}: fetching {_short(url)} took longer than the limit of {limits.timeout_s:g} s") from e
        return MediaItem.from_bytes(kind, data)

    # ---- http(s) -------------------------------------------------------------------------------------------

    async def _fetch_http(self, url: str, label: str, max_bytes: int) -> bytes:
        async with httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=None) as client:
            for _ in range(self.policy.max_redirects + 1):
                response = await self._send_pinned(client, url, label)
                try:
                    if response.is_redirect:
                        location = response.headers.get("location")
                        if not location:
                            raise MediaError(f"{label}: {_short(url)} redirected without a Location header")
                        url = urljoin(url, location)
                        if urlsplit(url).scheme.lower() not in ("http", "https"):
                            raise MediaError(f"{label}: redirected to a non-http(s) URL {_short(url)}")
                        continue
                    if response.status_code != 200:
                        raise MediaError(f"{label}: {_short(url)} answered HTTP {response.status_code}; 200 is needed")
                    return await _read_capped(response, label, url, max_bytes)
                finally:
                    await response.aclose()
        raise MediaError(f"{label}: more than {self.policy.max_redirects} redirects from {_short(url)}")

    async def _send_pinned(self, client: httpx.AsyncClient, url: str, label: str) -> httpx.Response:
        """GET the URL from a checked address of its host (the next one if a connection is refused), sending the
        host's name as Host and as the TLS server name."""
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as e:
            raise MediaError(f"{label}: invalid URL {_short(url)} ({e})") from e
        host = _normal_host(parsed.host)
        if not host:
            raise MediaError(f"{label}: URL {_short(url)} has no host")
        listed = host in self.policy.allowed_domains
        if self.policy.allowed_domains and not listed:
            raise MediaError(f"{label}: host {host!r} is not in --allowed-media-domains")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        check = not (listed or self.policy.allow_private_addresses)
        addresses = await self._checked_addresses(host, port, label, check)
        headers = {"Host": parsed.netloc.decode("ascii"), "Accept-Encoding": "identity"}
        extensions = {"sni_hostname": parsed.host} if parsed.scheme == "https" else {}
        error: Exception | None = None
        for address in addresses:
            request = client.build_request("GET", parsed.copy_with(host=address), headers=headers, extensions=extensions)
            try:
                return await client.send(request, stream=True)
            except httpx.ConnectError as e:
                error = e
            except httpx.HTTPError as e:
                raise MediaError(f"{label}: could not fetch {_short(url)} ({type(e).__name__}: {e})") from e
        raise MediaError(f"{label}: could not connect to {host!r} ({error})")

    async def _checked_addresses(self, host: str, port: int, label: str, check: bool) -> list[str]:
        try:
            literal = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [literal]
        else:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError) as e:
                raise MediaError(f"{label}: cannot resolve host {host!r} ({e})") from e
            addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
            if not addresses:
                raise MediaError(f"{label}: host {host!r} has no address")
        if check:
            refused = [str(a) for a in addresses if not is_public_address(a)]
            if refused:
                raise MediaError(
                    f"{label}: host {host!r} resolves to non-public address {refused[0]}; refused (loopback, private, "
                    "link-local and metadata addresses need --allowed-media-domains or the allow-private flag)"
                )
        return [str(a) for a in addresses]

    # ---- file:// -------------------------------------------------------------------------------------------

    def _read_local(self, url: str, label: str, max_bytes: int) -> bytes:
        if self._local_root is None:
            raise MediaError(f"{label}: file:// URLs are refused; the server has no --allowed-local-media-path")
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise MediaError(f"{label}: file:// URL with host {parts.netloc!r}; only local paths are allowed")
        path = Path(os.path.realpath(unquote(parts.path)))
        if not path.is_relative_to(self._local_root):
            raise MediaError(f"{label}: {unquote(parts.path)} is outside the allowed local media path {self._local_root}")
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > max_bytes:
                    raise MediaError(f"{label}: {size} bytes is over the limit of {max_bytes} bytes", 413)
                data = f.read(max_bytes + 1)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise MediaError(f"{label}: no such file under the allowed local media path: {unquote(parts.path)}") from e
        except OSError as e:
            raise MediaError(f"{label}: cannot read {unquote(parts.path)} ({e.strerror})") from e
        if len(data) > max_bytes:
            raise MediaError(f"{label}: over the limit of {max_bytes} bytes", 413)
        return data


def _decode_data_url(url: str, label: str, max_bytes: int) -> bytes:
    """`data:[<mediatype>][;base64],<data>` -> bytes; the size is checked before decoding."""
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise MediaError(f"{label}: malformed data: URL (no comma)")
    is_base64 = header.lower().endswith(";base64")
    estimate = len(payload) * 3 // 4 if is_base64 else len(payload)
    if estimate > max_bytes + 3:
        raise MediaError(f"{label}: the data: URL holds about {estimate} bytes; the limit is {max_bytes} bytes", 413)
    if not is_base64:
        data = unquote_to_bytes(payload)
    else:
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise MediaError(f"{label}: the data: URL is not valid base64 ({e})") from e
    if len(data) > max_bytes:
        raise MediaError(f"{label}: the data: URL holds {len(data)} bytes; the limit is {max_bytes} bytes", 413)
    if not data:
        raise MediaError(f"{label}: the data: URL is empty")
    return data


async def _read_capped(response: httpx.Response, label: str, url: str, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise MediaError(f"{label}: {_short(url)} is {declared} bytes; the limit is {max_bytes} bytes", 413)
    chunks, size = [], 0
    try:
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > max_bytes:
                raise MediaError(f"{label}: {_short(url)} is over the limit of {max_bytes} bytes", 413)
            chunks.append(chunk)
    except httpx.HTTPError as e:
        raise MediaError(f"{label}: reading {_short(url)} failed ({type(e).__name__}: {e})") from e
    if size == 0:
        raise MediaError(f"{label}: {_short(url)} answered with an empty body")
    return b"".join(chunks)


def _short(url: str, limit: int = 120) -> str:
    """A URL fit for an error message (data: URLs and long query strings cut)."""
    return url if len(url) <= limit else url[: limit - 3] + "..."
