"""A loopback HTTPS target (HTTP/1.1 and HTTP/2 via ALPN) with a throwaway trustme CA."""

from __future__ import annotations

from typing import Any

import trustme
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.web.server import Site

from .servers import Root


class TLSSite:
    """HTTPS on 127.0.0.1 serving the same endpoints as ``LoopbackSite``.

    ``ca_path`` is a CA bundle that verifies it; ``client_cert_path``/``client_key_path``
    are a client certificate from the same CA, for mutual-TLS tests (with
    ``require_client_cert=True`` the server refuses clients without one).
    """

    def __init__(
        self,
        reactor: Any,
        tmp_dir: str,
        *,
        http2: bool = True,
        require_client_cert: bool = False,
    ) -> None:
        self.ca = trustme.CA()
        server_cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.root = Root(reactor)
        self.site = Site(self.root)
        if not http2:
            # Site's own acceptableProtocols() (IProtocolNegotiationFactory) overrides the
            # context's ALPN list, so h2 must be switched off here as well.
            self.site.acceptableProtocols = lambda: [b"http/1.1"]  # type: ignore[method-assign]
        key = ssl.KeyPair.load(server_cert.private_key_pem.bytes(), crypto.FILETYPE_PEM)
        chain = server_cert.cert_chain_pems
        certificate = ssl.Certificate.loadPEM(chain[0].bytes())
        options: dict[str, Any] = {
            "privateKey": key.original,
            "certificate": certificate.original,
            "extraCertChain": [ssl.Certificate.loadPEM(c.bytes()).original for c in chain[1:]],
            "acceptableProtocols": [b"h2", b"http/1.1"] if http2 else [b"http/1.1"],
        }
        if require_client_cert:
            ca_cert = ssl.Certificate.loadPEM(self.ca.cert_pem.bytes())
            options["verify"] = True
            options["caCerts"] = [ca_cert.original]
            options["requireCertificate"] = True
        context = ssl.CertificateOptions(**options)
        self.port = reactor.listenSSL(0, self.site, context, interface="127.0.0.1")
        self.port_number: int = self.port.getHost().port
        self.base = f"https://127.0.0.1:{self.port_number}"
        self.ca_path = f"{tmp_dir}/ca.pem"
        self.ca.cert_pem.write_to_path(self.ca_path)
        client = self.ca.issue_cert("client@curlfetch.test")
        self.client_cert_path = f"{tmp_dir}/client.pem"
        self.client_key_path = f"{tmp_dir}/client.key"
        client.cert_chain_pems[0].write_to_path(self.client_cert_path)
        client.private_key_pem.write_to_path(self.client_key_path)

    def url(self, path: str = "/") -> str:
        return self.base + path

    def stop(self) -> Any:
        return self.port.stopListening()
