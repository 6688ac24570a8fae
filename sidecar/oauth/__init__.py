"""Sidecar as the OAuth 2.1 authorization server of its MCP upstreams (docs/oauth.md).

``server`` (routing, the resource-server hot path), ``metadata`` (RFC 8414 / 9728),
``clients`` (pre-registered, RFC 7591, Client ID Metadata Documents; ``fetch`` is the SSRF
guard), ``authorize`` + ``consent`` (the request and the page), ``tokens`` (token and
revocation endpoints), ``tokenformat`` (checksummed random tokens, stored as SHA-256),
``grants`` (a grant is a child key), ``adminroutes`` and ``cli`` (operators).
Built by ``Sidecar.start`` only when ``oauth.enabled``.
"""
