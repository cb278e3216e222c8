"""The one TLS client context for outbound HTTPS (image fetch in the API, webhooks in jobs): made once, verifying
against certifi's bundle (what httpx used) or the system store."""

from __future__ import annotations

import functools
import ssl


@functools.cache
def client_context() -> ssl.SSLContext:
    try:
        import certifi

        return ssl.create_default_context(cafile=certifi.where())
    except ImportError:
        return ssl.create_default_context()
