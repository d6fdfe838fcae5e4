"""Standalone isolation (no HIL), the isolation settings, and callers' projects."""

from __future__ import annotations

import pytest
from principals import ADMIN, ALICE, BOB
from test_catalogue import upload

from bmi_server.adapters.auth.token_file import TokenFileAuthenticator
from bmi_server.adapters.standalone import StandaloneIsolator
from bmi_server.config import load_settings
from bmi_server.core import errors
from bmi_server.core.models import Credentials, NodeState, Principal, Visibility
from bmi_server.server import Core

MAC = "52:54:00:12:34:56"


@pytest.fixture
def marks(tmp_path):
    return tmp_path / "power.log"


@pytest.fixture
def core(state, store, targets, marks):
    commands = {
        "n1": f"sh -c 'echo cycled \"$0\" >> {marks}' {{node}}",
        "broken": "sh -c 'echo no BMC >&2; exit 3'",
    }
    return Core.build(state, store, targets, isolator=StandaloneIsolator(state, commands))


@pytest.fixture
def node(core):
    return core.registry.enrol(ADMIN, name="n1", project="alice", macs=[MAC])


def test_nodes_come_from_bmis_own_records_and_networks_stay_as_they_are(core, node):
    iso = core.ownership.isolator
    view = iso.node(ALICE, "n1")
    assert (view.project, view.boot_mac) == ("alice", MAC)
    with pytest.raises(errors.NotFound):
        iso.node(BOB, "n1")  # another project's node does not exist for bob
    iso.attach_provisioning_network(ALICE, view)
    iso.detach_provisioning_network(ALICE, "n1")
    assert iso.free_nodes(ALICE) == []
    for refused in (lambda: iso.connect_node(ALICE, "alice", "n1"),
                    lambda: iso.detach_node(ALICE, "alice", "n1")):
        with pytest.raises(errors.FailedPrecondition, match="needs HIL"):
            refused()


def test_power_cycle_runs_the_nodes_command(core, node, store, inspector, tmp_path, marks):
    upload(core, store, inspector, tmp_path, ADMIN, "golden", project="ops",
           visibility=Visibility.PUBLIC)
    done = core.provisioner.provision(ALICE, "n1", image="golden", power_cycle=True)
    assert done.state is NodeState.PROVISIONED
    assert marks.read_text() == "cycled n1\n"  # {node} became the node's name


def test_power_cycle_without_a_command_or_with_a_failing_one_is_refused(core, state):
    with pytest.raises(errors.FailedPrecondition, match=r"exit 3\): no BMC"):
        core.ownership.isolator.power_cycle(ALICE, "broken")
    with pytest.raises(errors.FailedPrecondition, match="no power command"):
        StandaloneIsolator(state, {"n2": "true"}).power_cycle(ALICE, "n1")
    StandaloneIsolator(state, {"*": "true"}).power_cycle(ALICE, "n1")  # the default
    with pytest.raises(errors.FailedPrecondition, match="cannot run"):
        StandaloneIsolator(state, {"*": "/nonexistent/ipmi"}).power_cycle(ALICE, "n1")


def test_token_callers_may_not_name_another_project(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("a-token project:alice\nroot-token admin\n")
    authn = TokenFileAuthenticator(path)
    assert authn.authenticate("Bearer a-token", "alice").project == "alice"
    with pytest.raises(errors.PermissionDenied):
        authn.authenticate("Bearer a-token", "bob")
    assert authn.authenticate("Bearer root-token", "bob").is_admin


def test_hil_settings(tmp_path):
    secret = tmp_path / "hil-password"
    secret.write_text("s3cret\n")
    settings = load_settings(env={
        "BMI_ISOLATOR": "hil", "BMI_HIL_URL": "http://hil:5000", "BMI_HIL_USER": "bmi",
        "BMI_HIL_PASSWORD_FILE": str(secret), "BMI_HIL_PROVISIONING_NETWORK": "prov",
        "BMI_HIL_AUTH_CACHE_SECONDS": "2.5", "BMI_POWER_COMMANDS": '{"*": "true"}',
    })
    assert settings.hil_account() == Credentials("bmi", "s3cret")
    assert settings.hil_auth_cache_seconds == 2.5 and settings.power_commands == {"*": "true"}
    settings.hil_password_file, settings.hil_password = "", "inline"
    assert "inline" not in repr(settings)
    settings.hil_provisioning_network = ""
    with pytest.raises(errors.InvalidArgument, match="hil_provisioning_network"):
        settings.hil_account()
    with pytest.raises(errors.InvalidArgument, match="isolator"):
        load_settings(env={"BMI_ISOLATOR": "maas"})


def test_passwords_never_show_in_a_principal():
    caller = Principal("alice", project="alice", credentials=Credentials("alice", "hunter2"))
    assert "hunter2" not in repr(caller) and "hunter2" not in str(caller)
    assert caller == Principal("alice", project="alice")  # credentials do not change who


def test_giving_back_without_a_free_pool_is_refused_before_anything_changes(core):
    node = core.registry.enrol(ADMIN, name="n1", project="alice", macs=["52:54:00:00:00:01"])
    before = core.registry.history(node)
    for who in (ADMIN, ALICE):
        with pytest.raises(errors.FailedPrecondition, match="needs HIL"):
            core.ownership.give_back(who, "n1")
    assert core.registry.history(node) == before
