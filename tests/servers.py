"""Real servers for the tests: a local image server with hostile routes, and `wanrt serve` as a process."""

from __future__ import annotations

import functools
import gzip
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(directory: Path) -> tuple[subprocess.Popen, str]:
    """A throwaway redis-server on a free loopback port (no persistence), answering PING; (process, URL)."""
    import shutil

    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed (make test installs Debian's redis-server)")
    for _ in range(3):  # the free port may be taken before redis binds it: it exits, and we pick another
        port = free_port()
        proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                 "--dir", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                client.ping()
                return proc, f"redis://127.0.0.1:{port}/0"
            except redis.ConnectionError:
                time.sleep(0.05)
        proc.kill()
        proc.wait()
    raise RuntimeError("redis-server did not start (three free ports tried)")


def image_bytes(fmt: str, size=(320, 240), seed=0, exif_rotate=False) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size[1] // 16 + 1, size[0] // 16 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    if fmt == "GIF":
        frames = [img, Image.fromarray(255 - np.asarray(img))]
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    elif exif_rotate:
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 CW on display
        img.save(buf, format=fmt, exif=exif)
    else:
        img.save(buf, format=fmt)
    return buf.getvalue()


def bomb_png(side=20000) -> bytes:
    """A tiny file that claims side x side pixels (a decompression bomb)."""
    img = Image.new("1", (side, side))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def shaped_png(width: int, height: int) -> bytes:
    """A tiny PNG of any shape (1x100000 is 472 bytes and passes every byte and pixel cap)."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 150)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@functools.lru_cache(maxsize=None)
def rgba_png(side: int = 6000) -> bytes:
    """~140 KB that decodes to side x side RGBA (6000: 144 MB of pixels, ~380 MB to decode and convert)."""
    buf = io.BytesIO()
    Image.new("RGBA", (side, side), (10, 20, 30, 255)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@functools.lru_cache(maxsize=None)
def big_jpeg(width: int = 8000, height: int = 6000) -> bytes:
    """A large, smooth JPEG (~1 MB): a diagonal gradient, so a wrong crop or rotation would show."""
    x = np.linspace(0, 255, width // 8, dtype=np.float32)
    y = np.linspace(0, 255, height // 8, dtype=np.float32)
    small = np.stack([x[None, :].repeat(len(y), 0), y[:, None].repeat(len(x), 1),
                      np.full((len(y), len(x)), 128, np.float32)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def gray16_gradient(width: int = 512, height: int = 64) -> np.ndarray:
    """A horizontal 16-bit ramp 0..65535."""
    row = np.linspace(0, 65535, width).round().astype(np.uint16)
    return np.repeat(row[None, :], height, 0)


@functools.lru_cache(maxsize=None)
def gray16_png(width: int = 512, height: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray16_gradient(width, height)).save(buf, format="PNG")  # mode I;16
    return buf.getvalue()


def self_signed_cert(directory: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate for `name` (and no other name or IP): (cert.pem, key.pem)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = Path(directory) / "cert.pem", Path(directory) / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class ImageServer:
    """Threaded http.server on 127.0.0.1 with well-behaved and hostile routes (over TLS with `tls=(cert, key)`)."""

    def __init__(self, tls: tuple[Path, Path] | None = None):
        self.routes: dict[str, tuple] = {
            "/img.jpg": (200, "image/jpeg", image_bytes("JPEG")),
            "/img.png": (200, "image/png", image_bytes("PNG")),
            "/img.webp": (200, "image/webp", image_bytes("WEBP")),
            "/anim.gif": (200, "image/gif", image_bytes("GIF")),
            "/rotated.jpg": (200, "image/jpeg", image_bytes("JPEG", size=(320, 160), exif_rotate=True)),
            "/notimage.png": (200, "image/png", b"<html>definitely not a png</html>"),
            "/truncated.png": (200, "image/png", image_bytes("PNG")[:400]),
            "/bomb.png": (200, "image/png", bomb_png()),
            "/huge.bin": (200, "image/png", b"\x89PNG\r\n\x1a\n" + b"\0" * (11 * 1024 * 1024)),
        }
        # Built on first request (some take a second to make); path -> () -> (content type, body, extra headers)
        self.lazy: dict[str, object] = {
            "/rgba-6000.png": lambda: ("image/png", rgba_png(6000), {}),
            "/big.jpg": lambda: ("image/jpeg", big_jpeg(8000, 6000), {}),  # 48 MP
            "/big-7500.jpg": lambda: ("image/jpeg", big_jpeg(7500, 5000), {}),  # 37.5 MP: under the 40 MP header cap
            "/gray16.png": lambda: ("image/png", gray16_png(), {}),
            "/garbage.webp": lambda: ("image/webp", b"RIFF\0\0\0\0WEBPgarbage", {}),  # sniffs as WebP, is not
            "/gzip.png": lambda: ("image/png", gzip.compress(image_bytes("PNG")), {"Content-Encoding": "gzip"}),
            # 11 KB on the wire, 11 MB once decoded
            "/gzip-bomb.png": lambda: ("image/png", gzip.compress(b"\x89PNG\r\n\x1a\n" + b"\0" * (11 * 1024 * 1024)),
                                       {"Content-Encoding": "gzip"}),
            "/brotli.png": lambda: ("image/png", b"\x1b\x03\x00\xf8not really brotli", {"Content-Encoding": "br"}),
        }
        self.seen: list[tuple[str, dict]] = []  # (path, request headers) of every request, in order
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                path, _, query = self.path.partition("?")
                server.seen.append((self.path, dict(self.headers)))
                args = {k: v[0] for k, v in urllib.parse.parse_qs(query).items()}
                if path == "/shaped.png":  # any shape: /shaped.png?w=1&h=100000
                    return self._send(200, "image/png", shaped_png(int(args["w"]), int(args["h"])))
                if path == "/slow-headers":  # the status line, then one header byte a second (n bytes, then an image)
                    return self._slow_headers(int(args.get("n", 60)))
                if path == "/slow-redirect":  # each hop waits `delay` s, then redirects; n hops, then an image
                    n, delay = int(args.get("n", 5)), float(args.get("delay", 0.7))
                    time.sleep(delay)
                    if n <= 0:
                        return self._send(200, "image/png", server.routes["/img.png"][2])
                    return self._redirect(f"/slow-redirect?n={n - 1}&delay={delay}")
                if path == "/stall":  # accept, read the request, say nothing for a long time
                    time.sleep(float(args.get("s", 30)))
                    return self._send(200, "image/png", server.routes["/img.png"][2])
                if path in server.lazy:
                    ctype, body, headers = server.lazy[path]()
                    return self._send(200, ctype, body, headers)
                if path == "/missing":
                    return self._send(404, "text/plain", b"nope")
                if path == "/redirect":
                    return self._redirect(urllib.parse.parse_qs(query)["to"][0])
                if path == "/redirect-loop":
                    return self._redirect("/redirect-loop")
                if path == "/lying-length":  # says 1 KB, sends 12 MB
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", "1024")
                    self.end_headers()
                    try:
                        for _ in range(12 * 16):
                            self.wfile.write(b"\0" * 65536)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return
                if path == "/chunked-huge":  # no length at all
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    try:
                        for _ in range(12 * 16):
                            chunk = b"\0" * 65536
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.write(b"0\r\n\r\n")
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return
                if path == "/slow-drip":  # one byte a second, forever (until the client gives up)
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    try:
                        for _ in range(60):
                            self.wfile.write(b"\0")
                            self.wfile.flush()
                            time.sleep(1)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return
                if path in server.routes:
                    code, ctype, body = server.routes[path]
                    return self._send(code, ctype, body)
                return self._send(404, "text/plain", b"not found")

            def _redirect(self, location):
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _send(self, code, ctype, body, headers=None):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _slow_headers(self, n):
                body = server.routes["/img.png"][2]
                try:
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Slow: ")
                    self.wfile.flush()
                    for _ in range(n):
                        time.sleep(1)
                        self.wfile.write(b"a")
                        self.wfile.flush()
                    self.wfile.write(b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            # handshake in the request thread (a plain-HTTP client must not stall the accept loop)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True, do_handshake_on_connect=False)
            self.scheme = "https"
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class WanrtServer:
    """`python -m wanrt.cli serve` on a free port with its own data dir; stopped with SIGTERM."""

    def __init__(self, data_dir: Path, workers: int = 1, **env):
        self.data_dir = Path(data_dir)
        self.port = free_port()
        self.env = {
            **os.environ,
            "WANRT_DATA_DIR": str(self.data_dir),
            "WANRT_PORT": str(self.port),
            "WANRT_HOST": "127.0.0.1",
            "WANRT_WORKERS": str(workers),
            "WANRT_ALLOW_HOSTS": "127.0.0.1",
            "WANRT_LEASE_S": "4",
            "WANRT_HEARTBEAT_S": "0.5",
            "WANRT_MODEL": "tiny",
            **{k: str(v) for k, v in env.items()},
        }
        self.proc: subprocess.Popen | None = None
        self._use_port(self.port)

    def _use_port(self, port: int) -> None:
        self.port, self.env["WANRT_PORT"] = port, str(port)
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = self.data_dir / f"server-{port}.log"

    def start(self, timeout: float = 60.0, retries: int = 2) -> "WanrtServer":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "wanrt.cli", "serve"], env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self._log.close()
                log = self.log_path.read_text()
                if retries and "address already in use" in log.lower():  # the free port was taken meanwhile
                    self._use_port(free_port())
                    return self.start(timeout, retries - 1)
                raise RuntimeError(f"server exited with {self.proc.returncode}: {log[-3000:]}")
            try:
                if httpx.get(self.base + "/", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not start")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._log.close()
        return rc

    def worker_pids(self) -> list[int]:
        import psutil

        return [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)
                if "worker" in " ".join(c.cmdline())]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=30)

    def wait_status(self, job_id: str, states=("completed", "error", "cancelled"), timeout: float = 180.0) -> dict:
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            r = httpx.get(f"{self.base}/status/{job_id}", timeout=10)
            last = r.json()
            if last.get("status") in states:
                return last
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} still {last}")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
