"""Safe image fetch: http(s) and data: URLs, SSRF-guarded, size- and time-capped, format-sniffed.

- Every hostname is resolved and every address checked (loopback, private, link-local, cloud metadata,
  reserved ... are refused) before connecting; the connection goes to the checked address (no DNS
  rebinding), and each redirect is checked again. `allow_hosts` (hosts or CIDRs) lifts the rule.
- The body is streamed with a byte cap (a lying Content-Length changes nothing), connect/read timeouts
  and an overall deadline (slow drip).
- The format is sniffed from the bytes (JPEG, PNG, WebP, GIF first frame), the pixel count is checked from
  the header before decoding (decompression bombs), EXIF orientation is applied.
No torch here: the API process imports this on the request path.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

MAX_REDIRECTS = 5
FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}


class FetchError(Exception):
    """The image could not be had; the message is the API's 400 detail."""


@dataclass
class FetchedImage:
    image: "Image.Image"  # RGB, orientation applied, first frame
    data: bytes  # the bytes as received
    format: str  # JPEG | PNG | WEBP | GIF
    source: str

    @property
    def extension(self) -> str:
        return FORMATS[self.format]


@dataclass(frozen=True)
class FetchPolicy:
    allow_hosts: tuple[str, ...] = ()
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    deadline_s: float = 30.0
    allow_files: bool = False  # local paths: the CLI only, never the API
    only_allowed: bool = False  # allow-list mode: nothing outside allow_hosts, public or not

    @classmethod
    def from_settings(cls, settings, allow_files: bool = False) -> "FetchPolicy":
        return cls(allow_hosts=tuple(settings.allow_hosts), max_bytes=settings.max_image_bytes,
                   max_pixels=settings.max_image_pixels, read_timeout_s=min(10.0, settings.fetch_timeout_s),
                   deadline_s=settings.fetch_timeout_s, allow_files=allow_files,
                   only_allowed=settings.fetch_only_allowed)


# ------------------------------------------------------------------------------------------- address rules
def _allowed_by_config(host: str, ip: ipaddress._BaseAddress | None, policy: FetchPolicy) -> bool:
    for entry in policy.allow_hosts:
        if entry.lower() == host.lower():
            return True
        if ip is not None:
            try:
                if ip in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
    return False


def _literal_ip(host: str):
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def check_address(host: str, ip_text: str, policy: FetchPolicy) -> None:
    ip = ipaddress.ip_address(ip_text.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if _allowed_by_config(host, ip, policy):
        return
    if not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_unspecified:
        raise FetchError(f"Failed to download image: address {ip} of host {host!r} is not allowed "
                         "(loopback, private, link-local or reserved)")


def resolve(host: str, port: int, policy: FetchPolicy) -> str:
    """Resolve and check every address; return the first, which is what we connect to."""
    if policy.only_allowed and not _allowed_by_config(host, _literal_ip(host), policy):
        raise FetchError(f"Failed to download image: host {host!r} is not in the allowed hosts")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise FetchError(f"Failed to download image: cannot resolve host {host!r} ({e.strerror})")
    addresses = [info[4][0] for info in infos]
    if not addresses:
        raise FetchError(f"Failed to download image: host {host!r} has no address")
    for address in addresses:
        check_address(host, address, policy)
    return addresses[0]


# ------------------------------------------------------------------------------------------- fetching
def fetch_bytes(url: str, policy: FetchPolicy) -> bytes:
    if not isinstance(url, str) or not url.strip():
        raise FetchError("Failed to download image: image_url is empty")
    url = url.strip()
    if url.startswith("data:"):
        return _decode_data_url(url, policy)
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme in ("http", "https"):
        return _fetch_http(url, policy)
    if policy.allow_files and (parsed.scheme in ("", "file")):
        path = Path(urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else url).expanduser()
        if not path.is_file():
            raise FetchError(f"Failed to read image: no such file {path}")
        if path.stat().st_size > policy.max_bytes:
            raise FetchError(f"Failed to read image: file is larger than {policy.max_bytes} bytes")
        return path.read_bytes()
    raise FetchError(f"Failed to download image: unsupported URL scheme {parsed.scheme or '(none)'!r} "
                     "(use http, https or data)")


def _decode_data_url(url: str, policy: FetchPolicy) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise FetchError("Failed to download image: malformed data: URL (no comma)")
    if len(payload) > policy.max_bytes * 4 // 3 + 4:
        raise FetchError(f"Failed to download image: image is larger than {policy.max_bytes} bytes")
    try:
        if header.endswith(";base64"):
            data = base64.b64decode(payload, validate=True)
        else:
            data = urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise FetchError("Failed to download image: data: URL is not valid base64")
    if len(data) > policy.max_bytes:
        raise FetchError(f"Failed to download image: image is larger than {policy.max_bytes} bytes")
    return data


def _fetch_http(url: str, policy: FetchPolicy) -> bytes:
    import httpx

    deadline = time.monotonic() + policy.deadline_s
    timeout = httpx.Timeout(policy.read_timeout_s, connect=policy.connect_timeout_s)
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            parsed = urllib.parse.urlsplit(url)
            if parsed.scheme not in ("http", "https"):
                raise FetchError(f"Failed to download image: redirect to unsupported scheme {parsed.scheme!r}")
            host = parsed.hostname
            if not host:
                raise FetchError("Failed to download image: URL has no host")
            try:
                port = parsed.port or (443 if parsed.scheme == "https" else 80)
            except ValueError:
                raise FetchError("Failed to download image: URL has an invalid port")
            ip = resolve(host, port, policy)
            # Connect to the address we checked; Host header and TLS SNI keep the name.
            ip_host = f"[{ip}]" if ":" in ip else ip
            pinned = urllib.parse.urlunsplit((parsed.scheme, f"{ip_host}:{port}", parsed.path or "/", parsed.query, ""))
            headers = {"Host": parsed.netloc.rsplit("@", 1)[-1], "User-Agent": "wanrt-image-fetch/1",
                       "Accept": "image/*"}
            try:
                with client.stream("GET", pinned, headers=headers, extensions={"sni_hostname": host}) as resp:
                    if resp.is_redirect:
                        location = resp.headers.get("location")
                        if not location:
                            raise FetchError("Failed to download image: redirect without Location")
                        url = urllib.parse.urljoin(url, location)
                        continue
                    if resp.status_code >= 400:
                        raise FetchError(f"Failed to download image: HTTP {resp.status_code} {resp.reason_phrase}")
                    declared = resp.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                        raise FetchError(f"Failed to download image: image is larger than {policy.max_bytes} bytes")
                    chunks, total = [], 0
                    for chunk in resp.iter_raw():  # as it arrives (a chunk size would buffer a slow drip)
                        total += len(chunk)
                        if total > policy.max_bytes:
                            raise FetchError(f"Failed to download image: image is larger than {policy.max_bytes} bytes")
                        if time.monotonic() > deadline:
                            raise FetchError(f"Failed to download image: took longer than {policy.deadline_s:.0f} s")
                        chunks.append(chunk)
                    return b"".join(chunks)
            except httpx.TimeoutException:
                raise FetchError("Failed to download image: timed out")
            except httpx.HTTPError as e:
                raise FetchError(f"Failed to download image: {type(e).__name__}: {e}")
        raise FetchError(f"Failed to download image: more than {MAX_REDIRECTS} redirects")


# ------------------------------------------------------------------------------------------- decoding
def sniff_format(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_image(data: bytes, policy: FetchPolicy, source: str = "") -> FetchedImage:
    fmt = sniff_format(data)
    if fmt is None:
        raise FetchError("Failed to process image: Invalid image format (expected JPEG, PNG, WebP or GIF)")
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:
            w, h = img.size
            if w < 1 or h < 1 or w * h > policy.max_pixels:
                raise FetchError(f"Failed to process image: {w}x{h} pixels exceeds the limit of {policy.max_pixels}")
            img.seek(0)  # GIF / animated WebP: the first frame
            img.load()
            image = ImageOps.exif_transpose(img)
            image = image.convert("RGB")
    except FetchError:
        raise
    except Image.DecompressionBombError:
        raise FetchError(f"Failed to process image: pixel count exceeds the limit of {policy.max_pixels}")
    except Exception as e:
        raise FetchError(f"Failed to process image: Invalid image format ({type(e).__name__}: {str(e)[:120]})")
    return FetchedImage(image=image, data=data, format=fmt, source=source)


def fetch_image(url: str, policy: FetchPolicy) -> FetchedImage:
    return decode_image(fetch_bytes(url, policy), policy, source=url if not url.startswith("data:") else "data:")


def load_image_source(source: str, settings) -> "Image.Image":
    """For the CLI: a local path or any URL the API would accept."""
    return fetch_image(source, FetchPolicy.from_settings(settings, allow_files=True)).image
