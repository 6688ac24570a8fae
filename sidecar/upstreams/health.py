"""Is an upstream reachable, and if not, why: the readiness probe and the words for a failed connect.

``/readyz`` asks ``check`` for every upstream on each call. A load balancer polls it every
few seconds, so a fresh probe per call is cheap and never stale: readiness follows an
upstream down and back up at the next poll, with no cached state to expire. The probe is
what a request's connect does: resolve the name, open TCP, and for ``https`` complete a TLS
handshake with the upstream's own trust settings, since a TCP connect alone says "ok" to
an upstream whose certificate every request then refuses. It does not send HTTP: an
upstream that accepts and never answers is the request timeouts' business (504).

``connect_problem`` words a failed connect the same way for the forwarder and the MCP
gateway: the client's 502 says whether the name did not resolve, the connection was
refused, or the certificate was wrong (the operator's first question), never the address.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl

import aiohttp
from yarl import URL

from ..config import UpstreamConfig

__all__ = ["PROBE_TIMEOUT", "check", "connect_problem"]

PROBE_TIMEOUT = 1.0


@functools.lru_cache(maxsize=64)
def _client_context(verify: bool, ca_file: str | None) -> ssl.SSLContext:
    """The trust the upstream's session uses (``http.outbound.make_session``), built once per setting."""
    if not verify:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=ca_file)


async def check(upstream: UpstreamConfig, within: float = PROBE_TIMEOUT) -> str:
    """``"ok"``, or why a request could not connect now (``unreachable: …`` / ``tls: …``)."""
    url = URL(upstream.url)
    host = url.host or ""
    tls = url.scheme == "https"
    ctx = _client_context(upstream.tls_verify, str(upstream.tls_ca_file) if upstream.tls_ca_file else None)
    try:
        async with asyncio.timeout(within):
            _, writer = await asyncio.open_connection(
                host, url.port, ssl=ctx if tls else None, server_hostname=host if tls else None
            )
    except TimeoutError:
        return f"unreachable: no connection within {within:g}s"
    except ssl.SSLCertVerificationError as e:
        return f"tls: certificate verification failed ({e.verify_message})"
    except ssl.SSLError as e:
        return f"tls: handshake failed ({e.reason or type(e).__name__})"
    except socket.gaierror:
        return "unreachable: the host name does not resolve"
    except ConnectionRefusedError:
        return "unreachable: connection refused"
    except OSError as e:
        return f"unreachable: {e.strerror or type(e).__name__}"
    writer.close()
    with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
        async with asyncio.timeout(within):  # a TLS peer may never answer our close_notify
            await writer.wait_closed()
    return "ok"


def connect_problem(upstream: UpstreamConfig, e: aiohttp.ClientConnectorError) -> str:
    """The 502 message for a connect that failed (DNS, refused, TLS), naming the upstream by id only."""
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        return (
            f"upstream {upstream.id}: TLS certificate verification failed "
            "(set upstreams[].tls.ca_file to the CA that signed it)"
        )
    if isinstance(e, aiohttp.ClientSSLError):
        return f"upstream {upstream.id}: TLS handshake failed"
    if isinstance(e, aiohttp.ClientConnectorDNSError):
        return f"upstream {upstream.id}: its host name does not resolve"
    return f"upstream {upstream.id} refused the connection"
