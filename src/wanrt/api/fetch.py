"""Safe image fetch: http(s) and data: URLs, SSRF-guarded, size- and time-capped, format-sniffed.

Two steps, so the API can bound them separately: `fetch_bytes` (network only) and `decode_image` (CPU and
memory); `fetch_image` runs both.
- Every hostname is resolved and every address checked (loopback, private, link-local, cloud metadata,
  reserved ... are refused; an IPv6 address that embeds an IPv4 one, i.e. mapped, compatible, 6to4, Teredo
  or NAT64, is judged as that IPv4 address) before connecting; the connection goes to the checked address
  (no DNS rebinding), and each redirect is checked again. `allow_hosts` (hosts or CIDRs) lifts the rule.
- One wall-clock deadline covers the whole fetch: DNS, connect, TLS, request, status line and headers,
  body, every redirect hop. A watchdog shuts the socket down when it passes, so a server that drips its
  headers one byte a second is cut off like one that drips its body.
- The body is streamed with a byte cap (a lying Content-Length changes nothing). We ask for identity
  encoding; a server that gzips anyway is decoded with the cap on the decoded bytes.
- The format is sniffed from the bytes (JPEG, PNG, WebP, GIF first frame); size, aspect ratio and pixel
  count are checked from the header before decoding (decompression bombs); JPEGs are decoded at reduced
  size; EXIF orientation is applied; 16-bit grayscale is scaled to 8 bits (not clipped).
- Error messages are fixed texts plus our own numbers: never a library's message or an object repr.
No torch here: the API process imports this on the request path.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import math
import socket
import ssl
import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from wanrt.params import FIELDS_BY_NAME
from wanrt.tls import client_context

MAX_REDIRECTS = 5
FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}
# Shapes the worker can cover-crop sensibly; a 1x100000 strip is an attack, not a photo.
MIN_IMAGE_SIDE = 16  # px, the short side
MAX_ASPECT = 16  # long side / short side
# The largest width/height a request can ask for: a stored input never needs a longer short side.
MAX_SHORT_SIDE = max(FIELDS_BY_NAME["width"].hi, FIELDS_BY_NAME["height"].hi)

INVALID_FORMAT = "Failed to process image: Invalid image format: not a JPEG, PNG, WebP or GIF image"
CORRUPT = "Failed to process image: Invalid image format: the image is truncated or corrupt"


class FetchError(Exception):
    """The image could not be had; the message is the API's 400 detail."""


@dataclass
class FetchedImage:
    image: "Image.Image"  # RGB, orientation applied, first frame, short side <= MAX_SHORT_SIDE
    data: bytes  # what is stored for the worker: the bytes as received, or `image` re-encoded (see decode_image)
    format: str  # JPEG | PNG | WEBP | GIF: the format of `data`
    source: str

    @property
    def extension(self) -> str:
        return FORMATS[self.format]


@dataclass(frozen=True)
class FetchPolicy:
    allow_hosts: tuple[str, ...] = ()
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000  # from the header, before anything is decoded
    max_decode_pixels: int = 16_000_000  # what is actually decoded (after JPEG's reduced-size decode)
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0  # per recv; the deadline below bounds the total
    deadline_s: float = 30.0  # the whole fetch, redirects included
    allow_files: bool = False  # local paths: the CLI only, never the API
    only_allowed: bool = False  # allow-list mode: nothing outside allow_hosts, public or not

    @classmethod
    def from_settings(cls, settings, allow_files: bool = False) -> "FetchPolicy":
        deadline = settings.fetch_timeout_s
        return cls(allow_hosts=tuple(settings.allow_hosts), max_bytes=settings.max_image_bytes,
                   max_pixels=settings.max_image_pixels, max_decode_pixels=settings.max_decode_pixels,
                   connect_timeout_s=min(5.0, deadline), read_timeout_s=min(10.0, deadline), deadline_s=deadline,
                   allow_files=allow_files, only_allowed=settings.fetch_only_allowed)


# ------------------------------------------------------------------------------------------- address rules
# Refused although some Python versions call them global: IETF protocol assignments, the 6to4 relay anycast,
# benchmarking, and NAT64 local-use (RFC 8215; its IPv4 position varies with the prefix, so no mapping).
_BLOCKED = tuple(ipaddress.ip_network(n) for n in ("192.0.0.0/24", "192.88.99.0/24", "198.18.0.0/15", "64:ff9b:1::/48"))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _allowed_by_config(host: str, ip: ipaddress._BaseAddress | None, policy: FetchPolicy) -> bool:
    for entry in policy.allow_hosts:
        if entry.lower() == host.lower():
            return True
        if ip is not None:
            try:
                net = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                continue
            if net.version == ip.version and ip in net:
                return True
    return False


def _literal_ip(host: str):
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def embedded_ipv4(ip: ipaddress._BaseAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 address(es) an IPv6 address stands for: mapped ::ffff:a.b.c.d, 6to4 2002::/16 (bits 16-48),
    Teredo 2001::/32 (server, and client = last 32 bits XOR 0xffffffff), NAT64 64:ff9b::/96 and
    IPv4-compatible ::a.b.c.d; [] for anything else."""
    if ip.version == 4:
        return []
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)
    if ip in _NAT64:
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    if int(ip) >> 32 == 0 and int(ip) > 1:  # :: and ::1 keep their own meaning
        return [ipaddress.IPv4Address(int(ip))]
    return []


def _public(ip: ipaddress._BaseAddress) -> bool:
    if any(net.version == ip.version and ip in net for net in _BLOCKED):
        return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def check_address(host: str, ip_text: str, policy: FetchPolicy) -> None:
    ip = ipaddress.ip_address(ip_text.split("%")[0])
    if _allowed_by_config(host, ip, policy):
        return
    embedded = embedded_ipv4(ip)
    # An embedding address is judged as what it embeds (allow list included), whatever its own prefix says.
    refused = [v4 for v4 in embedded if not (_allowed_by_config(host, v4, policy) or _public(v4))]
    if refused:
        raise FetchError(f"Failed to download image: address {ip} of host {host!r} is not allowed (it embeds "
                         f"{refused[0]}: loopback, private, link-local or reserved)")
    if not embedded and not _public(ip):
        raise FetchError(f"Failed to download image: address {ip} of host {host!r} is not allowed "
                         "(loopback, private, link-local or reserved)")


_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def _wire_host(host: str) -> str:
    """The host as resolved and sent (IDNA for non-ASCII names); FetchError for names no resolver should see
    (a 64-character label is a UnicodeError deep in the idna codec otherwise)."""
    if _literal_ip(host) is not None:
        return host
    invalid = FetchError(f"Failed to download image: Invalid host name {host[:100]!r}")
    try:
        wire = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise invalid from None
    labels = wire[:-1].split(".") if wire.endswith(".") else wire.split(".")
    if len(wire) > 253 or any(not 0 < len(label) <= 63 or not set(label) <= _HOST_CHARS for label in labels):
        raise invalid
    return wire


def _deadline_error(policy: FetchPolicy) -> FetchError:
    return FetchError(f"Failed to download image: took longer than {policy.deadline_s:g} s "
                      "(the whole fetch, redirects included)")


def _remaining(deadline: float, policy: FetchPolicy) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _deadline_error(policy)
    return left


def _getaddrinfo(host: str, port: int, timeout_s: float | None):
    """getaddrinfo cannot be interrupted: run it in a daemon thread and stop waiting at the deadline (the
    thread ends when the resolver gives up)."""
    if timeout_s is None or _literal_ip(host) is not None:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    result: dict = {}

    def run():
        try:
            result["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except BaseException as e:  # handed to the caller's thread
            result["error"] = e

    thread = threading.Thread(target=run, name="wanrt-resolve", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError
    if "error" in result:
        raise result["error"]
    return result["infos"]


def resolve_all(host: str, port: int, policy: FetchPolicy, deadline: float | None = None) -> list[str]:
    """Resolve and check every address (one bad address refuses the host); return them in resolver order."""
    if policy.only_allowed and not _allowed_by_config(host, _literal_ip(host), policy):
        raise FetchError(f"Failed to download image: host {host!r} is not in the allowed hosts")
    try:
        infos = _getaddrinfo(host, port, None if deadline is None else _remaining(deadline, policy))
    except TimeoutError:
        raise _deadline_error(policy) from None
    except socket.gaierror as e:
        raise FetchError(f"Failed to download image: cannot resolve host {host!r} ({e.strerror})") from None
    except (UnicodeError, ValueError, OSError):
        raise FetchError(f"Failed to download image: cannot resolve host {host!r}") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise FetchError(f"Failed to download image: host {host!r} has no address")
    for address in addresses:
        check_address(host, address, policy)
    return addresses


def resolve(host: str, port: int, policy: FetchPolicy, deadline: float | None = None) -> str:
    return resolve_all(host, port, policy, deadline)[0]


# ------------------------------------------------------------------------------------------- fetching
def fetch_bytes(url: str, policy: FetchPolicy) -> tuple[bytes, str]:
    """The image's bytes (network only, no decoding) and its source as recorded: the URL, "data:" or the path."""
    if not isinstance(url, str) or not url.strip():
        raise FetchError("Failed to download image: image_url is empty")
    url = url.strip()
    if url[:5].lower() == "data:":
        return _decode_data_url(url, policy), "data:"
    try:
        scheme = urllib.parse.urlsplit(url).scheme.lower()
    except ValueError:
        raise FetchError("Failed to download image: malformed URL") from None
    if scheme in ("http", "https"):
        return _fetch_http(url, policy, time.monotonic() + policy.deadline_s), url
    if policy.allow_files and scheme in ("", "file"):
        parsed = urllib.parse.urlsplit(url)
        path = Path(urllib.parse.unquote(parsed.path) if scheme == "file" else url).expanduser()
        if not path.is_file():
            raise FetchError(f"Failed to read image: no such file {path}")
        if path.stat().st_size > policy.max_bytes:
            raise FetchError(f"Failed to read image: file is larger than {policy.max_bytes} bytes")
        return path.read_bytes(), str(path)
    raise FetchError(f"Failed to download image: unsupported URL scheme {scheme or '(none)'!r} "
                     "(use http, https or data)")


def _decode_data_url(url: str, policy: FetchPolicy) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise FetchError("Failed to download image: malformed data: URL (no comma)")
    if len(payload) > policy.max_bytes * 4 // 3 + 4:
        raise FetchError(f"Failed to download image: image is larger than {policy.max_bytes} bytes")
    try:
        if header.lower().endswith(";base64"):
            data = base64.b64decode(payload, validate=True)
        else:
            data = urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise FetchError("Failed to download image: data: URL is not valid base64") from None
    if len(data) > policy.max_bytes:
        raise FetchError(f"Failed to download image: image is larger than {policy.max_bytes} bytes")
    return data


# Printable ASCII but space: what may stand in a request target unescaped (escapes already there are kept).
_TARGET_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))


def _fetch_http(url: str, policy: FetchPolicy, deadline: float) -> bytes:
    for _ in range(MAX_REDIRECTS + 1):
        try:
            parsed = urllib.parse.urlsplit(url)
            host, port = parsed.hostname, parsed.port
        except ValueError:  # "http://[::1/", a port out of range ...
            raise FetchError("Failed to download image: malformed URL") from None
        if parsed.scheme.lower() not in ("http", "https"):
            raise FetchError(f"Failed to download image: redirect to a non-http(s) URL is not allowed "
                             f"({parsed.scheme.lower()[:20]!r})")
        if not host:
            raise FetchError("Failed to download image: URL has no host")
        https = parsed.scheme.lower() == "https"
        port = port or (443 if https else 80)
        wire = _wire_host(host)
        ips = resolve_all(wire, port, policy, deadline)
        location, body = _get_once(parsed, wire, port, ips, https, policy, deadline)
        if location is None:
            return body
        try:
            url = urllib.parse.urljoin(url, location)
        except ValueError:
            raise FetchError("Failed to download image: malformed redirect Location") from None
    raise FetchError(f"Failed to download image: more than {MAX_REDIRECTS} redirects")


def _get_once(parsed, host: str, port: int, ips: list[str], https: bool, policy: FetchPolicy,
              deadline: float) -> tuple[str | None, bytes]:
    """One GET to the first checked address that connects: (Location, b"") for a redirect, (None, body)
    otherwise."""
    target = urllib.parse.quote(parsed.path or "/", safe=_TARGET_SAFE)
    if parsed.query:
        target += "?" + urllib.parse.quote(parsed.query, safe=_TARGET_SAFE)
    host_header = f"[{host}]" if ":" in host else host
    if port != (443 if https else 80):
        host_header += f":{port}"
    request = (f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: wanrt-image-fetch/1\r\n"
               "Accept: image/*\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n").encode("ascii")

    # The watchdog: at the deadline, shut the socket down; whatever is blocked on it (TLS handshake, header
    # or body reads, each under its per-operation timeout) returns at once and we report the deadline.
    expired = threading.Event()
    current: list[socket.socket] = []

    def expire():
        expired.set()
        for s in current:
            try:
                socket.socket.shutdown(s, socket.SHUT_RDWR)  # the plain call: SSLSocket's drops its state
            except OSError:
                pass

    watchdog = threading.Timer(_remaining(deadline, policy), expire)
    watchdog.daemon = True
    watchdog.start()
    sock = None
    try:
        for i, ip in enumerate(ips):  # e.g. localhost: ::1 refused, then 127.0.0.1
            try:
                sock = socket.create_connection((ip, port), timeout=min(policy.connect_timeout_s,
                                                                          _remaining(deadline, policy)))
                break
            except OSError:
                if i == len(ips) - 1:
                    raise
        current.append(sock)
        sock.settimeout(policy.read_timeout_s)
        if https:  # certificate checked against the name; SNI carries it
            sock = client_context().wrap_socket(sock, server_hostname=host)
            current[:] = [sock]
        sock.sendall(request)
        resp = http.client.HTTPResponse(sock, method="GET")
        resp.begin()  # status line + headers: at most 64 KB a line and 100 headers
        if resp.status in (301, 302, 303, 307, 308):
            location = resp.getheader("location")
            if not location:
                raise FetchError("Failed to download image: redirect without Location")
            return location, b""
        if resp.status >= 400:
            reason = "".join(c for c in (resp.reason or "")[:60] if c.isprintable())
            raise FetchError(f"Failed to download image: HTTP {resp.status} {reason}".rstrip())
        return None, _read_body(resp, policy, expired)
    except FetchError:
        if expired.is_set():
            raise _deadline_error(policy) from None
        raise
    except (OSError, http.client.HTTPException, ValueError) as e:
        if expired.is_set() or time.monotonic() >= deadline:
            raise _deadline_error(policy) from None
        raise FetchError(_network_message(e, host, policy)) from None
    finally:
        watchdog.cancel()
        if sock is not None:
            sock.close()


def _read_body(resp: http.client.HTTPResponse, policy: FetchPolicy, expired: threading.Event) -> bytes:
    too_large = FetchError(f"Failed to download image: image is larger than {policy.max_bytes} bytes")
    declared = resp.getheader("content-length")
    if declared and declared.strip().isdigit() and int(declared) > policy.max_bytes:
        raise too_large
    encoding = (resp.getheader("content-encoding") or "identity").strip().lower()
    if encoding in ("gzip", "x-gzip", "deflate"):  # asked for identity, got compressed anyway: decode, capped
        decoder = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib wrapper
    elif encoding in ("identity", ""):
        decoder = None
    else:
        raise FetchError(f"Failed to download image: unsupported Content-Encoding {encoding[:30]!r} "
                         "(send the image uncompressed or gzipped)")
    chunks, received, total = [], 0, 0
    while True:
        chunk = resp.read1(65536)  # what has arrived, not a full 64 KB
        if not chunk:
            break
        received += len(chunk)
        if received > policy.max_bytes:
            raise too_large
        if decoder is not None:
            try:  # never more than one byte past the cap: a gzip bomb stops here
                chunk = decoder.decompress(chunk, policy.max_bytes + 1 - total)
            except zlib.error:
                raise FetchError(f"Failed to download image: corrupt {encoding} body") from None
        total += len(chunk)
        if total > policy.max_bytes:
            raise too_large
        chunks.append(chunk)
    if expired.is_set():  # the watchdog's shutdown reads as an early end: not a body
        raise _deadline_error(policy)
    return b"".join(chunks)


def _network_message(e: Exception, host: str, policy: FetchPolicy) -> str:
    """A fixed text for each failure class (library messages can carry reprs and addresses)."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"Failed to download image: TLS certificate of {host!r} could not be verified"
    if isinstance(e, ssl.SSLError):
        return f"Failed to download image: TLS handshake with {host!r} failed"
    if isinstance(e, TimeoutError):
        return f"Failed to download image: timed out waiting for {host!r}"
    if isinstance(e, ConnectionRefusedError):
        return f"Failed to download image: connection to {host!r} refused"
    if isinstance(e, http.client.HTTPException):
        return f"Failed to download image: invalid or incomplete HTTP response from {host!r}"
    if isinstance(e, OSError) and e.strerror:
        return f"Failed to download image: cannot reach {host!r} ({e.strerror})"
    return f"Failed to download image: cannot reach {host!r}"


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


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def check_shape(w: int, h: int, policy: FetchPolicy) -> None:
    """Header checks, before a byte is decoded."""
    if w < 1 or h < 1 or w * h > policy.max_pixels:
        raise FetchError(f"Failed to process image: {w}x{h} pixels exceeds the limit of {policy.max_pixels}")
    if min(w, h) < MIN_IMAGE_SIDE or max(w, h) > MAX_ASPECT * min(w, h):
        raise FetchError(f"Failed to process image: Image is {w}x{h}: the short side must be at least "
                         f"{MIN_IMAGE_SIDE} px and the aspect ratio at most {MAX_ASPECT}:1")


def decode_image(data: bytes, policy: FetchPolicy, source: str = "") -> FetchedImage:
    """Decode within bounded memory: header checks first, JPEG at reduced size (DCT scaling to the smallest
    size whose short side is still >= MAX_SHORT_SIDE), other formats refused above max_decode_pixels, then
    RGB with orientation applied and the short side brought down to MAX_SHORT_SIDE.

    What is stored for the worker (`data`): the bytes as received when the image is used as is; the decoded
    image re-encoded (JPEG q95 for JPEG sources, else PNG) when it was downscaled or was 16-bit, so the worker
    never decodes a large image again nor clips 16-bit gray to white."""
    fmt = sniff_format(data)
    if fmt is None:
        raise FetchError(INVALID_FORMAT)
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:
            w, h = img.size
            check_shape(w, h, policy)
            if fmt == "JPEG" and min(w, h) > MAX_SHORT_SIDE:
                k = MAX_SHORT_SIDE / min(w, h)  # draft keeps the decoded size >= the size asked for
                img.draft("RGB", (math.ceil(w * k), math.ceil(h * k)))
            dw, dh = img.size
            if dw * dh > policy.max_decode_pixels:
                reduced = " (JPEGs are decoded at reduced size)" if fmt != "JPEG" else ""
                raise FetchError(f"Failed to process image: {w}x{h} pixels exceeds the decode limit of "
                                 f"{policy.max_decode_pixels} pixels for {fmt}{reduced}")
            img.seek(0)  # GIF / animated WebP: the first frame
            img.load()
            high_depth = img.mode in _HIGH_DEPTH
            try:
                orientation = int(img.getexif().get(0x0112, 1))
            except Exception:  # a broken EXIF block is no reason to refuse the pixels
                orientation = 1
            image = _to_rgb(img)
    except FetchError:
        raise
    except Image.DecompressionBombError:
        raise FetchError(f"Failed to process image: pixel count exceeds the limit of {policy.max_pixels}") from None
    except Image.UnidentifiedImageError:
        raise FetchError(INVALID_FORMAT) from None
    except MemoryError:
        raise
    except Exception:  # Pillow's plugins raise OSError, SyntaxError, ValueError, EOFError, struct.error ...
        raise FetchError(CORRUPT) from None

    reencode = high_depth
    if min(image.size) > MAX_SHORT_SIDE:
        k = MAX_SHORT_SIDE / min(image.size)
        size = (max(MAX_SHORT_SIDE, round(image.width * k)), max(MAX_SHORT_SIDE, round(image.height * k)))
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        reencode = True
    if orientation in _TRANSPOSE:
        image = image.transpose(_TRANSPOSE[orientation])
    image.info = {}  # pixels only: a copied EXIF orientation would be applied again downstream (fit_image)
    if reencode:  # the stored copy is what we decoded, upright, without EXIF
        buf = io.BytesIO()
        if fmt == "JPEG":
            image.save(buf, format="JPEG", quality=95, subsampling=0)
        else:
            fmt = "PNG"
            image.save(buf, format="PNG", compress_level=1)
        data = buf.getvalue()
    return FetchedImage(image=image, data=data, format=fmt, source=source)


def _to_rgb(img: "Image.Image") -> "Image.Image":
    if img.mode in _HIGH_DEPTH:
        # 16-bit gray: Pillow's convert("RGB") clips to 255 (a gradient comes out white); keep the top 8 bits.
        import numpy as np

        arr = np.asarray(img)
        if img.mode == "I":
            arr = np.clip(arr, 0, 65535)
        return Image.fromarray((arr >> 8).astype(np.uint8)).convert("RGB")  # uint8 2-D: mode L
    return img.convert("RGB")


def fetch_image(url: str, policy: FetchPolicy) -> FetchedImage:
    data, source = fetch_bytes(url, policy)
    return decode_image(data, policy, source=source)


def load_image_source(source: str, settings) -> "Image.Image":
    """For the CLI: a local path or any URL the API would accept."""
    return fetch_image(source, FetchPolicy.from_settings(settings, allow_files=True)).image
