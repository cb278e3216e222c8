"""Schemathesis hooks for the fuzz test: every error answer has the {"detail": ...} shape."""

import schemathesis


@schemathesis.check
def error_has_detail(ctx, response, case):
    if case.method.upper() == "HEAD":  # a HEAD answer has no body by definition (RFC 9110 §9.3.2)
        return
    if response.status_code >= 400:
        try:
            body = response.json()
        except Exception:
            raise AssertionError(f"{response.status_code} body is not JSON: {response.text[:200]!r}") from None
        if not (isinstance(body, dict) and isinstance(body.get("detail"), str) and body["detail"]):
            raise AssertionError(f"{response.status_code} body lacks a 'detail' message: {body!r}")
