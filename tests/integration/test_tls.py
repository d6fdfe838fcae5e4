"""TLS on the gRPC API of a real bmi-server: server certificates, and mutual TLS.

Certificates are made at test time by two throwaway CAs: the site's, and a foreign one.
"""

from __future__ import annotations

import grpc
import pytest
from bmi_client.client import BmiClient, channel_credentials
from server_process import ADMIN_TOKEN, ServerProcess
from tls_certs import CertificateAuthority

pytestmark = pytest.mark.ceph


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    site, foreign = CertificateAuthority(folder, "site"), CertificateAuthority(folder, "foreign")
    return {
        "site": site,
        "foreign": foreign,
        "server": site.issue("bmi-server", server=True),
        "client": site.issue("operator", server=False),
        "foreign_client": foreign.issue("intruder", server=False),
    }


def _server(ceph_cluster, tgtd, tmp_path_factory, pki, *, mutual: bool) -> ServerProcess:
    env = {
        "BMI_TLS_CERT_FILE": str(pki["server"].cert),
        "BMI_TLS_KEY_FILE": str(pki["server"].key),
    }
    credentials = channel_credentials(pki["site"].cert)
    if mutual:
        env["BMI_TLS_CLIENT_CA_FILE"] = str(pki["site"].cert)
        credentials = channel_credentials(pki["site"].cert, pki["client"].cert, pki["client"].key)
    return ServerProcess(
        tmp_path_factory.mktemp("bmi-tls"), str(ceph_cluster.conf_path), ceph_cluster.pool,
        tgtd=tgtd, extra_env=env, channel_credentials=credentials,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tls_server(ceph_cluster, tgtd, tmp_path_factory, pki):
    process = _server(ceph_cluster, tgtd, tmp_path_factory, pki, mutual=False)
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def mtls_server(ceph_cluster, tgtd, tmp_path_factory, pki):
    process = _server(ceph_cluster, tgtd, tmp_path_factory, pki, mutual=True)
    process.start()
    yield process
    process.stop()


def _list_images(address: str, **transport) -> list:
    with BmiClient(address, ADMIN_TOKEN, timeout=10, max_attempts=1, **transport) as client:
        return list(client.list_images())


def _refused(address: str, **transport) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        _list_images(address, **transport)
    return caught.value


def test_client_trusting_the_site_ca_is_served(tls_server, pki):
    assert _list_images(tls_server.address, ca_file=pki["site"].cert) == []
    assert "TLS (certificate" in tls_server.log()


def test_plaintext_client_is_refused(tls_server):
    assert _refused(tls_server.address).code() == grpc.StatusCode.UNAVAILABLE


def test_client_trusting_another_ca_is_refused(tls_server, pki):
    error = _refused(tls_server.address, ca_file=pki["foreign"].cert)
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_serves_a_client_certificate_of_the_site(mtls_server, pki):
    client = {"cert_file": pki["client"].cert, "key_file": pki["client"].key}
    assert _list_images(mtls_server.address, ca_file=pki["site"].cert, **client) == []
    assert "mutual TLS" in mtls_server.log()


def test_mutual_tls_refuses_a_client_without_certificate(mtls_server, pki):
    error = _refused(mtls_server.address, ca_file=pki["site"].cert)
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_certificate_from_a_foreign_ca(mtls_server, pki):
    foreign = {"cert_file": pki["foreign_client"].cert, "key_file": pki["foreign_client"].key}
    error = _refused(mtls_server.address, ca_file=pki["site"].cert, **foreign)
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_on_a_public_address_is_refused_at_start(
    ceph_cluster, tgtd, tmp_path_factory
):
    process = ServerProcess(
        tmp_path_factory.mktemp("bmi-plain"), str(ceph_cluster.conf_path), ceph_cluster.pool,
        tgtd=tgtd, extra_env={"BMI_LISTEN": "0.0.0.0:0"},
    )  # fmt: skip
    process.start(wait=False)
    assert process.wait_exit() != 0
    assert "set tls_cert_file and tls_key_file, or allow_plaintext" in process.log()
    assert "Traceback" not in process.log()


def test_node_agent_speaks_tls_with_the_ca_it_was_given(tls_server, pki):
    from bmi_agent.client import BootClient, ServerRefused, TokenRejected
    from bmi_agent.cmdline import AgentConfig

    # A handshake that succeeded reaches the token check, which refuses this made-up token.
    trusted = AgentConfig(tls_server.address, "node-0", "bogus", ca_file=str(pki["site"].cert))
    client = BootClient(trusted)
    with pytest.raises(TokenRejected):
        client.heartbeat(attempts=1)
    client.close()
    plaintext = BootClient(AgentConfig(tls_server.address, "node-0", "bogus"))
    with pytest.raises(ServerRefused) as refused:
        plaintext.heartbeat(attempts=1)
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    plaintext.close()


def test_bmi_cli_with_client_certificate_from_its_config_file(mtls_server, pki, tmp_path):
    from bmi_client.cli import cli
    from click.testing import CliRunner

    config = tmp_path / "client.toml"
    config.write_text(f'server = "{mtls_server.address}"\ntoken = "{ADMIN_TOKEN}"\n'
                      f'ca_file = "{pki["site"].cert}"\n')  # fmt: skip
    env = {"BMI_CONFIG": str(config), "BMI_SERVER": None, "BMI_TOKEN": None}
    runner = CliRunner()
    refused = runner.invoke(cli, ["image", "ls"], env=env)
    assert refused.exit_code == 1 and refused.stderr.startswith("error: UNAVAILABLE")
    with config.open("a") as f:
        f.write(f'cert_file = "{pki["client"].cert}"\nkey_file = "{pki["client"].key}"\n')
    served = runner.invoke(cli, ["--json", "image", "ls"], env=env)
    assert served.exit_code == 0, served.output
    assert served.stdout.strip() == "[]"
