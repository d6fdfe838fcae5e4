"""A node's config: every field checked within its limits (messages never echo user-data),
and the NoCloud seed cloud-init reads, as mtools reads it back from the drive."""

from __future__ import annotations

import base64
import gzip
import json
import os
import struct
import subprocess

import pytest

from bmi_server.core import node_config
from bmi_server.core.errors import InvalidArgument
from bmi_server.core.models import NodeConfig

SECRET = "hunter2-TOP-SECRET-db-password"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Public keys of every type ssh-keygen makes, by type."""
    folder = tmp_path_factory.mktemp("keys")
    out = {}
    for kind, extra in (("ed25519", []), ("rsa", ["-b", "2048"]), ("ecdsa", ["-b", "384"])):
        path = folder / f"id_{kind}"
        subprocess.run(["ssh-keygen", "-q", "-t", kind, *extra, "-N", "", "-C", f"me@{kind}",
                        "-f", str(path)], check=True)  # fmt: skip
        out[kind] = (folder / f"id_{kind}.pub").read_text().strip()
    return out


def check(**fields) -> NodeConfig:
    return node_config.check_config(default_hostname="n1", **fields)


def blob(*parts: bytes) -> str:
    return base64.b64encode(b"".join(struct.pack(">I", len(p)) + p for p in parts)).decode()


# -- host names ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["web1", "web-1.example.org", "A1", "x" * 63,
                                  ".".join(["a" * 63] * 3 + ["b" * 61])])  # fmt: skip
def test_dns_names_are_taken_as_given(name):
    assert check(hostname=name).hostname == name


@pytest.mark.parametrize("name", ["-web", "web-", "we_b", "a..b", "a.", ".a", "x" * 64,
                                  "10.0.0.1", "web 1", "wéb", "a\nb",
                                  ".".join(["a" * 63] * 4)])  # fmt: skip
def test_other_host_names_are_refused(name):
    with pytest.raises(InvalidArgument, match="hostname"):
        check(hostname=name)


@pytest.mark.parametrize("node_name, hostname", [
    ("n1", "n1"), ("Rack7_U12", "rack7-u12"), ("a..b", "a.b"), ("db.1", "db-1"),
    ("_x_", "x"), ("-.-", "node"), ("web.prod", "web.prod"),
])  # fmt: skip
def test_the_default_host_name_is_the_node_name_made_valid(node_name, hostname):
    config = node_config.check_config(default_hostname=node_name)
    assert config.hostname == hostname
    assert node_config.check_hostname(config.hostname) == hostname


# -- SSH keys ------------------------------------------------------------------------------


def test_every_openssh_key_type_parses_and_duplicates_go(keys):
    given = [keys["ed25519"], keys["rsa"], "  " + keys["ecdsa"] + "  ", keys["ed25519"]]
    assert check(ssh_keys=given).ssh_keys == (keys["ed25519"], keys["rsa"], keys["ecdsa"])


def test_security_keys_parse():
    sk = "sk-ssh-ed25519@openssh.com"
    line = f"{sk} {blob(sk.encode(), bytes(32), b'ssh:')} yubi"
    assert check(ssh_keys=[line]).ssh_keys == (line,)


@pytest.mark.parametrize("line, why", [
    ("", "not an OpenSSH public key"),
    ("AAAAC3NzaC1lZDI1NTE5AAAAI", "not an OpenSSH public key"),
    ("ssh-ed25519 !!!notbase64", "not valid base64"),
    ("ssh-ed25519 " + blob(b"ssh-rsa", bytes(32)), "does not match"),
    ("ssh-ed25519 " + blob(b"ssh-ed25519", bytes(31)), "32 bytes"),
    ("ssh-ed25519 " + blob(b"ssh-ed25519", bytes(32), b"extra"), "trailing data"),
    ("ssh-ed25519 " + base64.b64encode(b"\0\0\0\xffssh").decode(), "truncated"),
    ("ssh-rsa " + blob(b"ssh-rsa", b"\x01\x00\x01", b"\x00" + b"\xff" * 64), "1024 bits"),
    ("ssh-dss " + blob(b"ssh-dss", b"p", b"q", b"g", b"y"), "DSA"),
    ('command="rm -rf /" ssh-ed25519 AAAA', "key type"),
    ("ssh-ed25519-cert-v01@openssh.com AAAA", "key type"),
    ("ecdsa-sha2-nistp256 " + blob(b"ecdsa-sha2-nistp256", b"nistp384", b"\x04" + bytes(64)),
     "not a nistp256 key"),
])  # fmt: skip
def test_anything_but_a_public_key_is_refused(line, why):
    with pytest.raises(InvalidArgument, match=why) as refused:
        check(ssh_keys=["ssh-ed25519 " + blob(b"ssh-ed25519", bytes(32)), line])
    assert "ssh_authorized_keys[1]" in refused.value.message


def test_a_key_smuggling_a_second_line_is_refused(keys):
    with pytest.raises(InvalidArgument, match="one line"):
        check(ssh_keys=[keys["ed25519"] + "\nssh-ed25519 AAAA attacker"])


def test_key_count_and_length_are_bounded(keys):
    check(ssh_keys=[keys["ed25519"]] * node_config.MAX_SSH_KEYS)
    with pytest.raises(InvalidArgument, match="at most 32"):
        check(ssh_keys=[keys["ed25519"]] * (node_config.MAX_SSH_KEYS + 1))
    with pytest.raises(InvalidArgument, match="longer than"):
        check(ssh_keys=[keys["ed25519"] + " " + "c" * node_config.MAX_SSH_KEY_LENGTH])


# -- user-data ------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    b"#cloud-config\nruncmd: [touch /x]\n", b"#!/bin/sh\necho hi\n", b"#include\nhttp://x/\n",
    b"#cloud-boothook\n#!/bin/sh\n", b"## template: jinja\n#cloud-config\n",
    b"Content-Type: multipart/mixed; boundary=x\n", b"MIME-Version: 1.0\n",
    gzip.compress(b"#cloud-config\n"), b"",
])  # fmt: skip
def test_user_data_cloud_init_runs_is_taken_as_it_is(data):
    assert check(user_data=data).user_data == data


def test_other_user_data_is_refused_without_echoing_it():
    with pytest.raises(InvalidArgument) as refused:
        check(user_data=f"password: {SECRET}\n".encode())
    assert "#cloud-config" in refused.value.message and SECRET not in refused.value.message
    assert SECRET not in repr(check(user_data=f"#cloud-config\n# {SECRET}\n".encode()))


def test_user_data_is_bounded():
    head = b"#cloud-config\n"
    check(user_data=head + b"#" * (node_config.MAX_USER_DATA - len(head)))
    with pytest.raises(InvalidArgument, match="larger than 65536 bytes"):
        check(user_data=head + b"#" * (node_config.MAX_USER_DATA - len(head) + 1))


# -- network config ------------------------------------------------------------------------

V2 = b"""network:
  version: 2
  ethernets:
    eno1:
      dhcp4: true
"""


@pytest.mark.parametrize("data", [
    V2, b"version: 2\nethernets:\n  id0:\n    match: {macaddress: '52:54:00:12:34:56'}\n",
    b"version: 1\nconfig:\n  - type: physical\n    name: eth0\n",
    b'{"version": 2, "ethernets": {}}', b'{"network": {"version": 1, "config": []}}',
    b'network:\n  version: "2"\n',
])  # fmt: skip
def test_network_configs_of_either_version_in_yaml_or_json_are_taken(data):
    assert check(network_config=data).network_config == data


@pytest.mark.parametrize("data, why", [
    (b"ethernets: {}\n", "no 'version: 1' or 'version: 2'"),
    (b"network:\n  version: 3\n", "no 'version: 1'"),
    (b'{"version": 3}', "no 'version': 1 or 2"),
    (b'{"version": 2', "not JSON"),
    (b'["version", 2]', "no 'version'"),
    (b"network:\n\tversion: 2\n", "tabs"),
    (b"version: 2\n\x00", "control characters"),
    (b"version: 2\n\xff\xfe", "not UTF-8"),
    (b"version: 2\n" + b"#" * node_config.MAX_NETWORK_CONFIG, "larger than"),
])  # fmt: skip
def test_network_configs_that_are_not_are_refused(data, why):
    with pytest.raises(InvalidArgument, match=why):
        check(network_config=data)


# -- metadata -------------------------------------------------------------------------------


def test_metadata_is_sorted_and_bounded():
    assert check(metadata={"role": "db", "rack": "r7", "a.b_c-1": "x y"}).metadata == (
        ("a.b_c-1", "x y"), ("rack", "r7"), ("role", "db"))
    many = {f"k{i}": "v" for i in range(node_config.MAX_METADATA_ENTRIES)}
    check(metadata=many)
    with pytest.raises(InvalidArgument, match="at most 32"):
        check(metadata={**many, "one-more": "v"})
    with pytest.raises(InvalidArgument, match="metadata key"):
        check(metadata={"-bad": "v"})
    with pytest.raises(InvalidArgument, match="printable"):
        check(metadata={"k": "a\nb"})
    with pytest.raises(InvalidArgument, match="printable"):
        check(metadata={"k": "v" * (node_config.MAX_METADATA_VALUE + 1)})
    big = {f"key{i}": "v" * node_config.MAX_METADATA_VALUE for i in range(17)}
    with pytest.raises(InvalidArgument, match="in all"):
        check(metadata=big)


# -- the drive ------------------------------------------------------------------------------


def test_the_drive_holds_the_nocloud_seed(keys, tmp_path):
    config = check(hostname="web1.example.org", ssh_keys=[keys["ed25519"]],
                   user_data=b"#cloud-config\nruncmd: [touch /ran]\n", network_config=V2,
                   metadata={"role": "db", "note": "ünïcödé ok"})  # fmt: skip
    instance = node_config.new_instance_id()
    image = tmp_path / "drive.img"
    image.write_bytes(node_config.drive_image(config, instance))
    assert image.stat().st_size == node_config.DRIVE_BYTES

    def read(name: str) -> bytes:
        return subprocess.run(["mtype", "-i", str(image), f"::{name}"], capture_output=True,
                              check=True, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}).stdout

    meta = json.loads(read("meta-data"))
    assert meta == {"instance-id": instance, "local-hostname": "web1.example.org",
                    "public-keys": [keys["ed25519"]],
                    "meta": {"note": "ünïcödé ok", "role": "db"}}  # fmt: skip
    assert read("user-data") == config.user_data
    assert read("network-config") == V2
    blkid = subprocess.run(["blkid", "-p", "-s", "LABEL", "-o", "value", str(image)],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert blkid.strip() == "cidata"


def test_a_bare_config_gives_meta_data_and_an_empty_user_data_only():
    files = dict(node_config.seed_files(NodeConfig(hostname="n1"), "i-00000000000000aa"))
    assert set(files) == {"meta-data", "user-data"} and files["user-data"] == b""
    assert json.loads(files["meta-data"]) == {"instance-id": "i-00000000000000aa",
                                              "local-hostname": "n1"}  # fmt: skip


def test_the_largest_config_fits_on_the_drive():
    def longest(i: int) -> str:
        key = "ssh-ed25519 " + blob(b"ssh-ed25519", bytes([i]) * 32) + " "
        return key + "c" * (node_config.MAX_SSH_KEY_LENGTH - len(key))

    config = check(
        ssh_keys=[longest(i) for i in range(node_config.MAX_SSH_KEYS)],
        user_data=b"#!" + b"x" * (node_config.MAX_USER_DATA - 2),
        network_config=b"version: 2\n" + b"#" * (node_config.MAX_NETWORK_CONFIG - 11),
        metadata={f"key{i}": "v" * 500 for i in range(32)},
    )
    assert len(config.ssh_keys) == node_config.MAX_SSH_KEYS
    assert len(node_config.drive_image(config, node_config.new_instance_id())) == (
        node_config.DRIVE_BYTES
    )


def test_the_largest_config_of_odd_characters_fits_on_the_drive():
    """Limits are in bytes: comments of 4-byte characters, and quotes and backslashes
    that meta-data's JSON doubles, still leave a config that passes every check on the
    drive (never a late failure of the drive's writer)."""

    def key(i: int, filler: str) -> str:
        head = "ssh-ed25519 " + blob(b"ssh-ed25519", bytes([i]) * 32) + " "
        room = node_config.MAX_SSH_KEY_LENGTH - len(head.encode())
        return head + filler * (room // len(filler.encode()))

    keys = [key(i, "\U0001f600" if i % 2 else '"\\') for i in range(node_config.MAX_SSH_KEYS)]
    config = check(
        ssh_keys=keys,
        user_data=b"#!" + b"x" * (node_config.MAX_USER_DATA - 2),
        network_config=b"version: 2\n" + b"#" * (node_config.MAX_NETWORK_CONFIG - 11),
        metadata={f"key{i}": '"' * 500 for i in range(32)},
    )
    assert config.ssh_keys == tuple(keys)
    instance = node_config.new_instance_id()
    meta = dict(node_config.seed_files(config, instance))["meta-data"]
    assert json.loads(meta)["public-keys"] == keys
    assert len(node_config.drive_image(config, instance)) == node_config.DRIVE_BYTES


def test_the_key_length_bound_counts_bytes_not_characters():
    head = "ssh-ed25519 " + blob(b"ssh-ed25519", bytes(32)) + " "
    wide = head + "\U0001f600" * (node_config.MAX_SSH_KEY_LENGTH - len(head))
    with pytest.raises(InvalidArgument, match="longer than 16384 bytes"):
        check(ssh_keys=[wide])


def test_drive_volumes_are_named_after_their_instance():
    instance = node_config.new_instance_id()
    assert node_config.drive_volume(instance) == "bmi-cfg-" + instance.removeprefix("i-")
    assert instance != node_config.new_instance_id()
    with pytest.raises(ValueError):
        node_config.drive_volume("i-../../etc")
