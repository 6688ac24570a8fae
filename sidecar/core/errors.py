"""Errors the sidecar itself produces, and their one JSON shape.

Hierarchy (each carries its HTTP status and contract code)::

    SidecarError
    ├── BadRequest            400 bad_request
    ├── Unauthorized          401 unauthorized        (no credential; adds WWW-Authenticate)
    ├── InvalidKey            401 invalid_key
    ├── InvalidToken          401 invalid_token       (a JWT that does not verify; RFC 6750's challenge)
    ├── ExpiredKey            401 expired_key
    ├── RevokedKey            401 revoked_key
    ├── Forbidden             403 insufficient_permissions
    ├── NoRoute               404 no_route
    ├── NotFound              404 not_found           (admin API)
    ├── RequestTimeout        408 request_timeout     (request head or body stalled)
    ├── Conflict              409 conflict            (admin API)
    ├── PayloadTooLarge       413 payload_too_large
    ├── HeadersTooLarge       431 headers_too_large
    ├── RateLimited           429 rate_limit_exceeded (adds Retry-After)
    ├── QuotaExceeded         429 quota_exceeded      (adds Retry-After)
    ├── TooManyFailures       429 too_many_failed_attempts
    ├── UpstreamUnavailable   502 upstream_unavailable
    ├── ServiceUnavailable    503 service_unavailable
    └── UpstreamTimeout       504 upstream_timeout

Upstream errors are never wrapped: they pass through untouched.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from aiohttp import web

__all__ = [
    "BadRequest",
    "Conflict",
    "ExpiredKey",
    "Forbidden",
    "HeadersTooLarge",
    "InvalidKey",
    "InvalidToken",
    "NoRoute",
    "NotFound",
    "PayloadTooLarge",
    "QuotaExceeded",
    "RateLimited",
    "RequestTimeout",
    "RevokedKey",
    "ServiceUnavailable",
    "SidecarError",
    "TooManyFailures",
    "Unauthorized",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "error_body",
]


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"success": False, "error": {"code": code, "message": message}}).encode()


class SidecarError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        resp = web.Response(
            status=self.status,
            body=error_body(self.code, self.message),
            content_type="application/json",
            headers=self.headers,
        )
        resp.headers["X-Content-Type-Options"] = "nosniff"  # a message may quote the path: never read as markup
        return resp


class BadRequest(SidecarError):
    status, code = 400, "bad_request"


class Unauthorized(SidecarError):
    status, code = 401, "unauthorized"

    def __init__(self, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message, headers or {"WWW-Authenticate": 'ApiKey realm="sidecar", Bearer realm="sidecar"'})


class InvalidKey(SidecarError):
    status, code = 401, "invalid_key"


class InvalidToken(SidecarError):
    """401 ``invalid_token``: a JWT that does not verify (RFC 6750's code, with its challenge).

    ``kind`` is one of ``sidecar.auth.jwt.FAILURE_REASONS`` (the failures metric's label). On an
    MCP route the challenge also names the resource's RFC 9728 metadata (``at_resource``).
    """

    status, code = 401, "invalid_token"

    def __init__(self, reason: str, kind: str = "claims") -> None:
        super().__init__(f"invalid token: {reason}")
        self.kind = kind
        quoted = reason.replace("\\", "").replace('"', "'")  # a quoted-string (RFC 9110), whatever a claim name holds
        self._params = f'error="invalid_token", error_description="{quoted}"'
        self.headers["WWW-Authenticate"] = f'Bearer realm="sidecar", {self._params}'

    def at_resource(self, metadata_url: str) -> InvalidToken:
        """Point the challenge at the protected resource's metadata, so an MCP client can find the IdP."""
        self.headers["WWW-Authenticate"] = f'Bearer realm="sidecar", resource_metadata="{metadata_url}", {self._params}'
        return self


class ExpiredKey(SidecarError):
    status, code = 401, "expired_key"


class RevokedKey(SidecarError):
    status, code = 401, "revoked_key"


class Forbidden(SidecarError):
    status, code = 403, "insufficient_permissions"


class NoRoute(SidecarError):
    status, code = 404, "no_route"


class NotFound(SidecarError):
    status, code = 404, "not_found"


class RequestTimeout(SidecarError):
    status, code = 408, "request_timeout"


class Conflict(SidecarError):
    status, code = 409, "conflict"


class PayloadTooLarge(SidecarError):
    status, code = 413, "payload_too_large"


class HeadersTooLarge(SidecarError):
    status, code = 431, "headers_too_large"


class _Retry(SidecarError):
    status = 429

    def __init__(self, message: str, retry_after: float, headers: Mapping[str, str] | None = None) -> None:
        h = dict(headers or {})
        h["Retry-After"] = str(max(1, math.ceil(retry_after)))
        super().__init__(message, h)
        self.retry_after = retry_after


class RateLimited(_Retry):
    code = "rate_limit_exceeded"


class QuotaExceeded(_Retry):
    code = "quota_exceeded"


class TooManyFailures(_Retry):
    code = "too_many_failed_attempts"


class UpstreamUnavailable(SidecarError):
    status, code = 502, "upstream_unavailable"


class ServiceUnavailable(SidecarError):
    status, code = 503, "service_unavailable"


class UpstreamTimeout(SidecarError):
    status, code = 504, "upstream_timeout"
