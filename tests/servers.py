"""Real servers for the tests: a local image server with hostile routes, and `wanrt serve` as a process."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class ImageServer:
    """Threaded http.server on 127.0.0.1 with well-behaved and hostile routes."""

    def __init__(self):
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
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                import urllib.parse

                path, _, query = self.path.partition("?")
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

            def _send(self, code, ctype, body):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

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
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = self.data_dir / f"server-{self.port}.log"

    def start(self, timeout: float = 60.0) -> "WanrtServer":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "wanrt.cli", "serve"], env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
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
