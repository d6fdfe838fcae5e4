"""bmi-gateway reaches a server that requires mutual TLS with its CA, certificate and key,
and is refused without them."""

from __future__ import annotations

import grpc
import pytest
from bmi_client.client import channel_credentials
from tls_certs import CertificateAuthority

from bmi_gateway.client import GatewayClient
from bmi_server.core.gateways import GatewayDirectory, GatewayExports
from bmi_server.server import Core, build_grpc_server


class _GatewayTokens:
    def authenticate(self, credentials):
        from bmi_server.core.errors import Unauthenticated

        if credentials == "Bearer gw1-token":
            return "gw1"
        raise Unauthenticated("invalid gateway token")


@pytest.fixture
def mtls_address(state, store, inspector, tmp_path):
    site = CertificateAuthority(tmp_path / "pki", "site")
    server_pair = site.issue("bmi-server", server=True)
    exports = GatewayExports(state)
    core = Core.build(state, store, exports, advertised_portals=[], portal_source=exports,
                      gateways=GatewayDirectory(exports))
    server = build_grpc_server(core, inspector, _GatewayTokens(), tmp_path / "spool",
                               workers=4, gateway_authenticator=_GatewayTokens())
    credentials = grpc.ssl_server_credentials(
        [(server_pair.key.read_bytes(), server_pair.cert.read_bytes())],
        root_certificates=site.cert.read_bytes(), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield f"127.0.0.1:{port}", site
    server.stop(0)


def test_heartbeat_over_mutual_tls(mtls_address):
    address, site = mtls_address
    gateway = site.issue("gw1", server=False)
    client = GatewayClient(address, "gw1-token",
                           channel_credentials(site.cert, gateway.cert, gateway.key))
    try:
        assert client.heartbeat("gw1", ["192.0.2.1:3260"], "run-1", []) == (5, 15)
    finally:
        client.close()
    for credentials in (None, channel_credentials(site.cert)):  # plaintext; no certificate
        refused = GatewayClient(address, "gw1-token", credentials)
        try:
            with pytest.raises(grpc.RpcError) as caught:
                refused.heartbeat("gw1", ["192.0.2.1:3260"], "run-1", [])
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        finally:
            refused.close()
