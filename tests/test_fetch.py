"""Safe image fetch against a real local HTTP server: each hostile input gets a clear FetchError."""

import base64
import io
import re
import time
import urllib.parse

import numpy as np
import pytest
from PIL import Image

from wanrt.api import fetch as fetch_module
from wanrt.api.fetch import (
    MAX_ASPECT,
    MIN_IMAGE_SIDE,
    FetchError,
    FetchPolicy,
    check_address,
    decode_image,
    fetch_bytes,
    fetch_image,
)

from servers import ImageServer, big_jpeg, gray16_gradient, gray16_png, image_bytes, rgba_png, shaped_png

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
    import io

    import numpy as np
    from PIL import Image

    first = np.asarray(Image.open(io.BytesIO(image_bytes("GIF"))).convert("RGB"))
    got = np.asarray(fetch_image(images.url("/anim.gif"), LOCAL).image)
    assert np.array_equal(first, got)


def test_exif_orientation_applied(images):
    from PIL import ImageOps

    image = fetch_image(images.url("/rotated.jpg"), LOCAL).image
    assert image.size == (160, 320) and ImageOps.exif_transpose(image).size == (160, 320)  # applied once only


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
    with pytest.raises(FetchError, match=r"redirect to a non-http\(s\) URL is not allowed"):
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
    with pytest.raises(FetchError, match="took longer"):
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


def test_fetch_bytes_and_decode_image_are_two_steps(images):
    data, source = fetch_bytes(images.url("/img.png"), LOCAL)
    assert source == images.url("/img.png") and data == image_bytes("PNG")
    assert decode_image(data, LOCAL, source).image.size == (320, 240)
    assert fetch_bytes("data:image/png;base64," + base64.b64encode(data).decode(), STRICT) == (data, "data:")


def peak_rss_growth_mb(fn):
    """(fn(), peak resident memory added while it ran, MB): Linux resets the peak (VmHWM) through clear_refs.
    tracemalloc would not do: Pillow allocates image memory outside Python's allocator."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("cannot reset the peak RSS on this system")

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

    base = status("VmRSS")
    result = fn()
    return result, (status("VmHWM") - base) / 1024


# ---------------------------------------------------------------------------------- issue 12.1: degenerate shapes
@pytest.mark.parametrize("w,h", [(1, 100000), (100000, 1), (40, 40000), (15, 200), (300, 4801)])
def test_degenerate_shapes_are_refused_before_decoding(w, h):
    assert MIN_IMAGE_SIDE == 16 and MAX_ASPECT == 16
    with pytest.raises(FetchError, match=rf"Image is {w}x{h}: the short side must be at least 16 px and the "
                                         r"aspect ratio at most 16:1"):
        decode_image(shaped_png(w, h), STRICT)


@pytest.mark.parametrize("w,h", [(16, 256), (256, 16), (64, 1024), (16, 16)])
def test_shapes_at_the_limits_are_accepted(w, h):
    assert decode_image(shaped_png(w, h), STRICT).image.size == (w, h)


@pytest.mark.parametrize("src,out", [((1, 100000), (256, 256)), ((100000, 1), (256, 1024)),
                                     ((40, 40000), (1024, 1024)), ((16, 256), (1024, 1024))])
def test_fit_image_memory_is_bounded_by_the_output(src, out):
    # The old scale-then-crop made 1x100000 -> 256x25,600,000 RGB (~20 GB) to cover 256x256.
    from wanrt.runtime.image import fit_image

    image = Image.new("RGB", src, (200, 100, 50))
    t0 = time.perf_counter()
    got, grew_mb = peak_rss_growth_mb(lambda: fit_image(image, *out))
    assert got.size == out and got.getpixel((out[0] // 2, out[1] // 2)) == (200, 100, 50)
    assert time.perf_counter() - t0 < 2 and grew_mb < 64, grew_mb


@pytest.mark.parametrize("size,out", [((300, 100), (64, 64)), ((100, 300), (96, 64)), ((300, 100), (256, 128))])
def test_fit_image_covers_and_crops_the_centre(size, out):
    from wanrt.runtime.image import fit_image

    # thirds along the long side: red | green | blue; a centre crop with the output's aspect sees green only
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    long_axis = 1 if size[0] > size[1] else 0
    third = max(size) // 3
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        index = [slice(None), slice(None)]
        index[long_axis] = slice(i * third, (i + 1) * third)
        arr[tuple(index)] = colour
    got = np.asarray(fit_image(Image.fromarray(arr), *out)).astype(int)
    assert got.shape == (out[1], out[0], 3)
    centre = got[out[1] * 3 // 8: out[1] * 5 // 8, out[0] * 3 // 8: out[0] * 5 // 8]  # clear of ringing
    assert np.abs(centre - [0, 255, 0]).max() <= 2
    if out == (256, 128):  # 2:1 from 3:1: the crop is 200 px of the 300, reaching into red and blue
        assert got[64, 0, 0] > 200 and got[64, -1, 2] > 200


# ---------------------------------------------------------------------------------- issue 12.2: one deadline
FAST = FetchPolicy(allow_hosts=("127.0.0.1",), deadline_s=2.0, read_timeout_s=2.0)


def test_slow_headers_hit_the_deadline(images):
    # one header byte a second never trips a per-recv timeout; the deadline cuts it at 2 s
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="took longer than 2 s"):
        fetch_image(images.url("/slow-headers"), FAST)
    assert time.monotonic() - t0 < 6  # the server would drip for 60 s (slack for a busy CI)


def test_slow_redirect_chain_hits_the_deadline(images):
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="took longer than 2 s"):  # 5 hops x 0.7 s, each well under the timeouts
        fetch_image(images.url("/slow-redirect?n=5&delay=0.7"), FAST)
    assert time.monotonic() - t0 < 3.3  # the whole chain takes 4.2 s
    assert fetch_image(images.url("/slow-redirect?n=2&delay=0.1"), FAST).format == "PNG"


def test_deadline_beats_the_per_read_timeout(images):
    policy = FetchPolicy(allow_hosts=("127.0.0.1",), deadline_s=1.0, read_timeout_s=10.0)
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="took longer than 1 s"):
        fetch_image(images.url("/stall?s=20"), policy)
    assert time.monotonic() - t0 < 5  # the read timeout alone would wait 10 s


def test_slow_dns_hits_the_deadline(monkeypatch):
    def slow_getaddrinfo(*args, **kwargs):
        time.sleep(5)
        raise OSError("too late")

    monkeypatch.setattr(fetch_module.socket, "getaddrinfo", slow_getaddrinfo)
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="took longer than 1 s"):
        fetch_image("http://slow-dns.example/x.png", FetchPolicy(deadline_s=1.0))
    assert time.monotonic() - t0 < 3.5  # the lookup takes 5 s


def test_blackholed_connect_stays_within_the_deadline():
    # 10.255.255.1 (allowed here) either never answers or is unreachable: both end inside the deadline
    policy = FetchPolicy(allow_hosts=("10.0.0.0/8",), deadline_s=1.0, connect_timeout_s=5.0)
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="Failed to download image"):
        fetch_image("http://10.255.255.1/x.png", policy)
    assert time.monotonic() - t0 < 3.5  # the connect timeout is 5 s


# ---------------------------------------------------------------------------------- issue 12.3: decode memory
def test_large_png_is_refused_before_decoding():
    data = rgba_png(6000)  # ~140 KB, 144 MB of RGBA pixels
    assert len(data) < 200_000
    error, grew_mb = peak_rss_growth_mb(lambda: _raised(lambda: decode_image(data, STRICT)))
    assert str(error) == ("Failed to process image: 6000x6000 pixels exceeds the decode limit of 16000000 pixels "
                          "for PNG (JPEGs are decoded at reduced size)")
    assert grew_mb < 20, grew_mb


def _raised(fn) -> FetchError:
    with pytest.raises(FetchError) as e:
        fn()
    return e.value


def test_png_over_the_output_size_is_stored_downscaled():
    fetched = decode_image(rgba_png(3000), STRICT)  # 9 MP: decoded, then brought to 1024 on the short side
    assert fetched.image.size == (1024, 1024) and fetched.format == "PNG"
    with Image.open(io.BytesIO(fetched.data)) as stored:
        assert stored.size == (1024, 1024) and stored.mode == "RGB"


# 8000x6000 is 48 MP: over the default header cap (40 MP), so these raise it; 7500x5000 passes the defaults
BIG_PHOTOS = FetchPolicy(max_pixels=64_000_000)


def test_big_jpeg_is_decoded_at_reduced_size():
    data = big_jpeg(8000, 6000)  # 144 MB as RGB at full size
    fetched, grew_mb = peak_rss_growth_mb(lambda: decode_image(data, BIG_PHOTOS))
    assert fetched.image.size == (1365, 1024) and fetched.format == "JPEG"
    assert grew_mb < 60, grew_mb  # DCT-scaled to 2000x1500 (9 MB), then resized
    with Image.open(io.BytesIO(fetched.data)) as stored:  # what the worker gets: the small copy
        assert stored.size == (1365, 1024)
    img = np.asarray(fetched.image).astype(int)  # the gradient survived, unrotated: red grows right, green down
    assert img[5, 5, 0] < 20 and img[5, -5, 0] > 235 and img[-5, 5, 1] > 235 and abs(img[512, 682, 2] - 128) < 8
    assert decode_image(big_jpeg(7500, 5000), STRICT).image.size == (1536, 1024)  # default caps


def test_jpeg_over_the_decode_cap_after_reduction_is_refused():
    policy = FetchPolicy(max_pixels=64_000_000, max_decode_pixels=1_000_000)
    with pytest.raises(FetchError, match="8000x6000 pixels exceeds the decode limit of 1000000 pixels for JPEG$"):
        decode_image(big_jpeg(8000, 6000), policy)  # 2000x1500 after DCT scaling is still 3 MP


# ---------------------------------------------------------------------------------- issue 12.4: odd inputs
def test_redirect_to_data_url_is_refused(images):
    target = "data:image/gif;base64," + base64.b64encode(image_bytes("GIF", size=(16, 16))).decode()
    with pytest.raises(FetchError, match=r"redirect to a non-http\(s\) URL is not allowed \('data'\)"):
        fetch_image(images.url("/redirect?to=" + urllib.parse.quote(target, safe="")), LOCAL)


@pytest.mark.parametrize("url,fragment", [
    ("http://[::1/", "malformed URL"),
    ("http://[::1/x.png", "malformed URL"),
    ("http://[not-an-ip]/x.png", "malformed URL"),
    ("http://127.0.0.1:99999/x.png", "malformed URL"),
    ("http://" + "a" * 64 + ".example.com/x.png", "Invalid host name"),
    ("http://" + "a" * 300 + "/x.png", "Invalid host name"),
    ("http://a..b/x.png", "Invalid host name"),
    ("http://exa mple.com/x.png", "Invalid host name"),
])
def test_malformed_urls_are_fetch_errors(url, fragment):
    with pytest.raises(FetchError, match=re.escape(fragment)):
        fetch_image(url, STRICT)


NO_REPR = re.compile(r"object at 0x|<[_a-zA-Z.]+ |Traceback")


@pytest.mark.parametrize("path,expected", [
    ("/garbage.webp", "Invalid image format: not a JPEG, PNG, WebP or GIF image"),
    ("/notimage.png", "Invalid image format: not a JPEG, PNG, WebP or GIF image"),
    ("/truncated.png", "Invalid image format: the image is truncated or corrupt"),
])
def test_decode_errors_are_fixed_texts(images, path, expected):
    with pytest.raises(FetchError) as e:
        fetch_image(images.url(path), LOCAL)
    assert str(e.value) == "Failed to process image: " + expected and not NO_REPR.search(str(e.value))


@pytest.mark.parametrize("data", [b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, b"GIF89a" + b"\0" * 40, b"\xff\xd8\xff" + b"x" * 40,
                                  image_bytes("JPEG")[:600], image_bytes("WEBP")[:60]])
def test_pillow_messages_never_leak(data):
    with pytest.raises(FetchError, match="^Failed to process image: Invalid image format: ") as e:
        decode_image(data, STRICT)
    assert not NO_REPR.search(str(e.value)), str(e.value)


def test_tls_to_a_plain_server_is_a_clean_error(images):
    with pytest.raises(FetchError, match="TLS handshake|invalid or incomplete HTTP"):
        fetch_image(images.url("/img.png").replace("http://", "https://"), LOCAL)


# ---------------------------------------------------------------------------------- issue 12.5: HTTP and 16-bit
def test_identity_is_asked_for_and_gzip_is_decoded_anyway(images):
    assert fetch_image(images.url("/gzip.png"), LOCAL).image.size == (320, 240)
    assert [h.get("Accept-Encoding") for p, h in images.seen if p == "/gzip.png"][-1] == "identity"


def test_gzip_bomb_is_capped_on_the_decoded_bytes(images):
    with pytest.raises(FetchError, match="larger than"):
        fetch_image(images.url("/gzip-bomb.png"), LOCAL)


def test_other_content_encodings_are_refused(images):
    with pytest.raises(FetchError, match="unsupported Content-Encoding 'br'"):
        fetch_image(images.url("/brotli.png"), LOCAL)


def test_16_bit_grayscale_converts_to_rgb():
    ramp = gray16_gradient() / 257.0  # the 8-bit value each 16-bit level stands for
    fetched = decode_image(gray16_png(), STRICT)
    got = np.asarray(fetched.image).astype(float)
    assert got.shape == (*ramp.shape, 3) and np.abs(got - ramp[..., None]).mean() < 2
    # the worker gets an 8-bit copy (its own convert("RGB") would clip 16-bit gray to white)
    assert fetched.format == "PNG"
    with Image.open(io.BytesIO(fetched.data)) as stored:
        assert stored.mode == "RGB" and np.array_equal(np.asarray(stored), np.asarray(fetched.image))


# ---------------------------------------------------------------------------------- issue 12.6: address rules
@pytest.mark.parametrize("url,embedded", [
    ("http://[2002:7f00:1::]/x.png", "127.0.0.1"),  # 6to4
    ("http://[2002:0a00:0001::]/", "10.0.0.1"),
    ("http://[2002:a9fe:a9fe::1]/latest/meta-data/", "169.254.169.254"),
    ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", "127.0.0.1"),  # Teredo: client = ~0x80fffffe
    ("http://[64:ff9b::7f00:1]/", "127.0.0.1"),  # NAT64
    ("http://[64:ff9b::a9fe:a9fe]/", "169.254.169.254"),
    ("http://[::7f00:1]/", "127.0.0.1"),  # IPv4-compatible
    ("http://[::10.0.0.1]/", "10.0.0.1"),
    ("http://[::ffff:a9fe:a9fe]/", "169.254.169.254"),  # IPv4-mapped
])
def test_ipv6_embedding_a_private_ipv4_is_refused(url, embedded):
    with pytest.raises(FetchError, match=rf"not allowed \(it embeds {re.escape(embedded)}:"):
        fetch_image(url, STRICT)


@pytest.mark.parametrize("url", ["http://192.0.0.8/", "http://192.0.0.171/x.png", "http://[64:ff9b:1::a00:1]/",
                                 "http://198.18.0.1/"])
def test_special_purpose_ranges_are_refused(url):
    with pytest.raises(FetchError, match="not allowed"):
        fetch_image(url, STRICT)


def test_embedded_public_ipv4_passes_and_allow_hosts_lifts_the_rule():
    check_address("x", "64:ff9b::5db8:d822", STRICT)  # NAT64 of 93.184.216.34: what DNS64 networks use
    check_address("x", "2002:5db8:d822::1", STRICT)
    check_address("x", "2002:a00:1::", FetchPolicy(allow_hosts=("10.0.0.0/8",)))  # judged as 10.0.0.1
    check_address("x", "2002:a00:1::", FetchPolicy(allow_hosts=("2002::/16",)))
    check_address("x", "192.0.0.8", FetchPolicy(allow_hosts=("192.0.0.0/24",)))
    with pytest.raises(FetchError, match="it embeds 10.0.0.1"):
        check_address("x", "2002:a00:1::", FetchPolicy(allow_hosts=("192.168.0.0/16",)))
    with pytest.raises(FetchError):  # an IPv4 CIDR never matches an unrelated IPv6 address by its low bits
        check_address("x", "fd00::a00:1", FetchPolicy(allow_hosts=("10.0.0.0/8",)))


def test_https_checks_the_certificate_against_the_name(tmp_path, monkeypatch):
    pytest.importorskip("cryptography", reason="makes the test certificate (not a declared dev dependency)")
    from servers import self_signed_cert

    cert, key = self_signed_cert(tmp_path, "localhost")
    policy = FetchPolicy(allow_hosts=("127.0.0.1", "::1"), deadline_s=4.0)
    with ImageServer(tls=(cert, key)) as srv:
        # not trusted: refused with a fixed text
        with pytest.raises(FetchError, match="^Failed to download image: TLS certificate of 'localhost' could not"):
            fetch_image(srv.url("/img.png", host="localhost"), policy)
        import ssl

        trusted = ssl.create_default_context(cafile=str(cert))
        monkeypatch.setattr(fetch_module, "client_context", lambda: trusted)
        # trusted: connects to the checked address, SNI and Host carry the name
        assert fetch_image(srv.url("/img.png", host="localhost"), policy).format == "PNG"
        assert srv.seen[-1][1]["Host"] == f"localhost:{srv.port}"
        with pytest.raises(FetchError, match="TLS certificate of '127.0.0.1' could not be verified"):
            fetch_image(srv.url("/img.png"), policy)  # the certificate names localhost only
