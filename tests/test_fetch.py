"""Safe image fetch against a real local HTTP server: each hostile input gets a clear FetchError."""

import base64
import time
import urllib.parse

import pytest

from servers import ImageServer, image_bytes
from wanrt.api.fetch import FetchError, FetchPolicy, check_address, fetch_image

LOCAL = FetchPolicy(allow_hosts=("127.0.0.1",), deadline_s=4.0, read_timeout_s=2.0)
STRICT = FetchPolicy()


@pytest.fixture(scope="module")
def images():
    with ImageServer() as srv:
        yield srv


@pytest.mark.parametrize("path,fmt", [("/img.jpg", "JPEG"), ("/img.png", "PNG"), ("/img.webp", "WEBP"), ("/anim.gif", "GIF")])
def test_supported_formats(images, path, fmt):
    got = fetch_image(images.url(path), LOCAL)
    assert got.format == fmt and got.image.mode == "RGB" and got.image.size == (320, 240)


def test_gif_first_frame_is_used(images):
    import numpy as np
    from PIL import Image
    import io

    first = np.asarray(Image.open(io.BytesIO(image_bytes("GIF"))).convert("RGB"))
    got = np.asarray(fetch_image(images.url("/anim.gif"), LOCAL).image)
    assert np.array_equal(first, got)


def test_exif_orientation_applied(images):
    assert fetch_image(images.url("/rotated.jpg"), LOCAL).image.size == (160, 320)


def test_data_url():
    url = "data:image/png;base64," + base64.b64encode(image_bytes("PNG")).decode()
    assert fetch_image(url, STRICT).format == "PNG"


@pytest.mark.parametrize("url,fragment", [
    ("http://127.0.0.1:9/x.png", "not allowed"),
    ("http://localhost:9/x.png", "not allowed"),
    ("http://10.1.2.3/x.png", "not allowed"),
    ("http://192.168.0.1/x.png", "not allowed"),
    ("http://172.16.0.1/x.png", "not allowed"),
    ("http://169.254.169.254/latest/meta-data/", "not allowed"),
    ("http://[::1]:9/x.png", "not allowed"),
    ("http://[::ffff:127.0.0.1]:9/x.png", "not allowed"),
    ("http://0.0.0.0:9/x.png", "not allowed"),
    ("http://100.64.0.1/x.png", "not allowed"),
    ("file:///etc/passwd", "unsupported URL scheme 'file'"),
    ("ftp://example.com/x.png", "unsupported URL scheme 'ftp'"),
    ("gopher://example.com/x", "unsupported URL scheme"),
    ("/etc/passwd", "unsupported URL scheme"),
    ("data:image/png;base64,!!!notbase64", "not valid base64"),
    ("http://no-such-host.invalid/x.png", "cannot resolve"),
])
def test_refused_targets(url, fragment):
    t0 = time.time()
    with pytest.raises(FetchError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        fetch_image(url, STRICT)
    assert time.time() - t0 < 10


def test_redirect_to_private_address_is_refused(images):
    # the first hop is allowed (127.0.0.1 is in allow_hosts), the redirect target is a metadata address
    url = images.url("/redirect?to=" + urllib.parse.quote("http://169.254.169.254/latest/meta-data/"))
    with pytest.raises(FetchError, match="169.254.169.254.*not allowed"):
        fetch_image(url, LOCAL)
    url = images.url("/redirect?to=" + urllib.parse.quote("file:///etc/passwd"))
    with pytest.raises(FetchError, match="redirect to unsupported scheme"):
        fetch_image(url, LOCAL)


def test_redirect_within_allowed_host_is_followed(images):
    url = images.url("/redirect?to=" + urllib.parse.quote(images.url("/img.png")))
    assert fetch_image(url, LOCAL).format == "PNG"


def test_redirect_loop_is_bounded(images):
    with pytest.raises(FetchError, match="redirects"):
        fetch_image(images.url("/redirect-loop"), LOCAL)


@pytest.mark.parametrize("path,fragment", [
    ("/missing", "HTTP 404"),
    ("/huge.bin", "larger than"),
    ("/lying-length", "Invalid image format"),  # only the declared 1 KB is read, the 12 MB after it never
    ("/chunked-huge", "larger than"),
    ("/notimage.png", "Invalid image format"),
    ("/truncated.png", "Invalid image format"),
    ("/bomb.png", "exceeds the limit"),
])
def test_hostile_bodies(images, path, fragment):
    with pytest.raises(FetchError, match=fragment):
        fetch_image(images.url(path), LOCAL)


def test_slow_drip_hits_the_deadline(images):
    t0 = time.time()
    with pytest.raises(FetchError, match="took longer|timed out"):
        fetch_image(images.url("/slow-drip"), LOCAL)
    assert time.time() - t0 < LOCAL.deadline_s + LOCAL.read_timeout_s + 2


def test_allow_hosts_accepts_cidrs():
    check_address("internal", "10.0.0.5", FetchPolicy(allow_hosts=("10.0.0.0/8",)))
    with pytest.raises(FetchError):
        check_address("internal", "10.0.0.5", FetchPolicy(allow_hosts=("192.168.0.0/16",)))
    check_address("example.com", "93.184.216.34", STRICT)


def test_allow_list_mode_refuses_before_resolving():
    policy = FetchPolicy(allow_hosts=("127.0.0.1",), only_allowed=True)
    with pytest.raises(FetchError, match="not in the allowed hosts"):
        fetch_image("http://example.com/x.png", policy)
    with pytest.raises(FetchError, match="not in the allowed hosts"):
        fetch_image("http://93.184.216.34/x.png", policy)
