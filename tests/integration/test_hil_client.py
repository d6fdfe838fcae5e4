"""Contract tests: BMI's production HIL client, isolator and authenticator over real HTTP
against the HIL stand-in. Each test names the HIL behaviour it pins."""

from __future__ import annotations

import base64
import logging

import pytest
import requests
from fakes import SecondsClock
from hil_standin import HilStandin

from bmi_server.adapters.hil import HilAuthenticator, HilClient, HilIsolator
from bmi_server.core import errors
from bmi_server.core.models import SYSTEM, Credentials, Principal

NETWORK = "bmi-provision"
PASSWORDS = {"bmi": "bmi-secret-pw", "alice": "alice-secret-pw", "bob": "bob-secret-pw"}


@pytest.fixture
def hil():
    standin = HilStandin(action_seconds=0.2)
    standin.add_project("alice")
    standin.add_project("bob")
    standin.add_user("bmi", PASSWORDS["bmi"], admin=True)
    standin.add_user("alice", PASSWORDS["alice"], projects=("alice",))
    standin.add_user("bob", PASSWORDS["bob"], projects=("bob",))
    standin.add_network(NETWORK)
    standin.add_network("bob-only", access={"bob"})
    standin.add_node("n1", [("eth0", "52:54:00:00:01:01"), ("eth1", "52:54:00:00:01:02")],
                     "alice", obm_enabled=True)
    standin.add_node("n2", [("eth0", "52:54:00:00:02:01")], "bob")
    standin.add_node("n3", [("eth0", "52:54:00:00:03:01")], "alice")  # OBM disabled
    standin.add_node("free1", [("eth0", "52:54:00:00:09:01")])
    with standin:
        yield standin


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def client(hil, sleeps) -> HilClient:
    return HilClient(hil.url, Credentials("bmi", PASSWORDS["bmi"]), timeout=1.0,
                     sleep=sleeps.append)


@pytest.fixture
def isolator(client) -> HilIsolator:
    return HilIsolator(client, NETWORK, action_timeout=5.0, poll_interval=0.05)


def tenant(name: str) -> Principal:
    return Principal(name, project=name, credentials=Credentials(name, PASSWORDS[name]))


def attach(isolator: HilIsolator, caller: Principal, name: str) -> None:
    """What provisioning does: read the node (ownership, boot NIC), then attach."""
    isolator.attach_provisioning_network(caller, isolator.node(caller, name))


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


ALICE, BOB = tenant("alice"), tenant("bob")


# -- transport ---------------------------------------------------------------------------


def test_basic_credentials_are_sent_up_front_since_hil_never_challenges(hil, client):
    raw = requests.get(hil.url + "/v0/projects")
    assert raw.status_code == 401 and "WWW-Authenticate" not in raw.headers
    hil.requests.clear()
    assert client.get("/v0/projects") == ["alice", "bob"]
    assert [(r.path, r.user) for r in hil.requests] == [("/v0/projects", "bmi")]  # one try


def test_json_labelled_text_html_is_read_as_json(hil, client):
    raw = requests.get(hil.url + "/v0/node/free1", auth=("bmi", PASSWORDS["bmi"]))
    assert raw.headers["Content-Type"].startswith("text/html")
    assert client.get("/v0/node/free1")["nics"][0]["macaddr"] == "52:54:00:00:09:01"


def test_bodies_go_as_raw_json_because_hil_drops_form_bodies_with_400(hil, client):
    form = requests.post(hil.url + "/v0/project/alice/connect_node", data={"node": "free1"},
                         auth=("alice", PASSWORDS["alice"]))
    assert form.status_code == 400 and form.json()["type"] == "ValidationError"
    client.post("/v0/project/alice/connect_node", {"node": "free1"}, as_=ALICE.credentials)
    sent = hil.requests[-1]
    assert sent.content_type == "application/json" and sent.body == b'{"node": "free1"}'
    assert hil.nodes["free1"].project == "alice"


def test_successful_writes_answer_200_with_an_empty_body(hil, client):
    raw = requests.post(hil.url + "/v0/project/alice/connect_node", data='{"node": "free1"}',
                        auth=("alice", PASSWORDS["alice"]))
    assert (raw.status_code, raw.text) == (200, "")
    assert client.post("/v0/project/alice/detach_node", {"node": "free1"}) is None


def test_arguments_hil_does_not_accept_are_400_invalid_argument(client):
    with pytest.raises(errors.InvalidArgument, match="HIL: Request arguments are not valid"):
        client.post("/v0/project/alice/connect_node", {"nodes": "free1"})


def test_unknown_routes_answer_an_html_404_page(hil, client):
    raw = requests.get(hil.url + "/v0/no/such/route", auth=("bmi", PASSWORDS["bmi"]))
    assert raw.status_code == 404 and raw.text.startswith("<!DOCTYPE")
    with pytest.raises(errors.NotFound, match="HIL answered 404 to GET /v0/no/such/route"):
        client.get("/v0/no/such/route")


def test_hil_errors_keep_hils_message_and_map_to_clear_codes(client, isolator):
    # 404 NotFoundError for an unknown node, NIC, network and project.
    with pytest.raises(errors.NotFound, match="HIL: Node ghost does not exist"):
        isolator.node(ALICE, "ghost")
    with pytest.raises(errors.NotFound, match="HIL: Nic eth9 on Node n1 does not exist"):
        client.post("/v0/node/n1/nic/eth9/connect_network", {"network": NETWORK})
    with pytest.raises(errors.NotFound, match="HIL: Network nonet does not exist"):
        client.post("/v0/node/n1/nic/eth0/connect_network", {"network": "nonet"})
    with pytest.raises(errors.NotFound, match="HIL: Project nope does not exist"):
        client.get("/v0/project/nope/nodes")
    # 409 BlockedError: the node is owned already; 409 ProjectMismatchError: no access.
    with pytest.raises(errors.FailedPrecondition, match="Node is already owned"):
        client.post("/v0/project/alice/connect_node", {"node": "n2"})
    with pytest.raises(errors.FailedPrecondition, match="does not have access to given network"):
        client.post("/v0/node/n1/nic/eth0/connect_network", {"network": "bob-only"})
    # 400 BadArgumentError.
    with pytest.raises(errors.InvalidArgument, match="is not legal for this network"):
        client.post("/v0/node/n1/nic/eth0/connect_network",
                    {"network": NETWORK, "channel": "bogus"})


# -- ownership and nodes -----------------------------------------------------------------


def test_a_foreign_node_is_401_authorization_error_which_means_permission_denied(isolator):
    with pytest.raises(errors.PermissionDenied, match="HIL: You do not have access"):
        isolator.node(ALICE, "n2")
    with pytest.raises(errors.PermissionDenied, match="HIL: You do not have access"):
        isolator.attach_provisioning_network(ALICE, isolator.node(SYSTEM, "n2"))


def test_show_node_gives_owner_and_nics_and_the_boot_nic_is_the_first_or_the_configured(
    hil, client, isolator
):
    view = isolator.node(ALICE, "n1")
    assert (view.project, view.boot_nic, view.boot_mac) == ("alice", "eth0", "52:54:00:00:01:01")
    assert isolator.node(ALICE, "free1").project is None  # free nodes: anyone may look
    # Admins also see port and switch; tenants do not.
    assert set(client.get("/v0/node/n1")["nics"][0]) == {
        "label", "macaddr", "networks", "port", "switch"}
    assert set(client.get("/v0/node/n1", as_=ALICE.credentials)["nics"][0]) == {
        "label", "macaddr", "networks"}
    on_eth1 = HilIsolator(client, NETWORK, boot_nic="eth1", poll_interval=0.05)
    assert on_eth1.node(ALICE, "n1").boot_mac == "52:54:00:00:01:02"
    with pytest.raises(errors.FailedPrecondition, match="no NIC 'eth1'"):
        attach(on_eth1, ALICE, "n3")


def test_free_nodes_connect_node_and_detach_node(hil, isolator):
    assert isolator.free_nodes(ALICE) == ["free1"]
    isolator.connect_node(ALICE, "alice", "free1")
    assert isolator.free_nodes(ALICE) == [] and hil.nodes["free1"].project == "alice"
    with pytest.raises(errors.FailedPrecondition, match="already owned"):
        isolator.connect_node(BOB, "bob", "free1")
    with pytest.raises(errors.NotFound, match="Node not in project"):
        isolator.detach_node(ALICE, "alice", "n2")
    isolator.detach_node(ALICE, "alice", "free1")
    assert hil.nodes["free1"].project is None


def test_detach_node_is_409_while_attached_to_a_network_or_obm_enabled(hil, isolator):
    attach(isolator, ALICE, "n3")
    with pytest.raises(errors.FailedPrecondition, match="Node attached to a network"):
        isolator.detach_node(ALICE, "alice", "n3")
    isolator.detach_provisioning_network(ALICE, "n3")
    with pytest.raises(errors.FailedPrecondition, match="OBM enabled"):
        isolator.detach_node(ALICE, "alice", "n1")
    isolator.detach_node(ALICE, "alice", "n3")


# -- asynchronous network actions ----------------------------------------------------------


def test_connect_network_answers_202_with_a_status_id_polled_until_done(hil, isolator):
    attach(isolator, ALICE, "n1")
    assert hil.networks_of("n1", "eth0") == {"vlan/native": NETWORK}
    paths = hil.paths()
    connect = paths.index("POST /v0/node/n1/nic/eth0/connect_network")
    polls = [p for p in paths[connect + 1:] if p.startswith("GET /v0/networking_action/")]
    assert len(polls) >= 2  # PENDING at least once, then DONE
    assert {r.user for r in hil.requests} == {"alice"}  # the caller's own credentials
    hil.requests.clear()
    attach(isolator, ALICE, "n1")  # already there: nothing queued
    assert hil.paths() == ["GET /v0/node/n1"]
    isolator.detach_provisioning_network(ALICE, "n1")
    assert hil.networks_of("n1", "eth0") == {}
    isolator.detach_provisioning_network(ALICE, "n1")  # "not attached" (400): nothing to do


def test_one_pending_action_per_nic_is_409_blocked(hil, isolator, client):
    hil.action_outcome = "NEVER"
    client.post("/v0/node/n1/nic/eth0/connect_network", {"network": NETWORK})
    with pytest.raises(errors.FailedPrecondition, match="already active on the nic"):
        client.post("/v0/node/n1/nic/eth0/detach_network", {"network": NETWORK})
    with pytest.raises(errors.FailedPrecondition, match="pending network actions"):
        isolator.detach_node(ALICE, "alice", "n1")


def test_an_action_ending_in_error_is_reported(hil, isolator):
    hil.action_outcome = "ERROR"
    with pytest.raises(errors.FailedPrecondition, match="ended in ERROR"):
        attach(isolator, ALICE, "n1")
    assert hil.networks_of("n1", "eth0") == {}


def test_an_action_that_never_finishes_hits_the_deadline_as_unavailable(hil, client):
    hil.action_outcome = "NEVER"
    isolator = HilIsolator(client, NETWORK, action_timeout=0.4, poll_interval=0.05)
    with pytest.raises(errors.Unavailable, match=r"within 0.4s .*still PENDING"):
        attach(isolator, ALICE, "n1")
    # While it is pending HIL refuses the undo with 409, not "not attached".
    with pytest.raises(errors.FailedPrecondition, match="already active"):
        isolator.detach_provisioning_network(ALICE, "n1")
    hil.finish_pending()
    hil.action_outcome = "DONE"
    isolator.detach_provisioning_network(ALICE, "n1")
    assert hil.networks_of("n1", "eth0") == {}


@pytest.mark.parametrize("outcome", ["DONE", "ERROR"])
def test_the_action_record_vanishes_404_once_a_newer_action_is_queued(hil, isolator, outcome):
    """HIL keeps a NIC's latest action only; the NIC then tells how ours ended."""
    first_poll = []

    def meddle(record):
        if record.path.startswith("/v0/networking_action/") and not first_poll:
            first_poll.append(record.path)
            hil.finish_pending(outcome)
            hil.queue_action("n1", "eth0", None if outcome == "DONE" else "other")

    hil.add_network("other")
    hil.on_request = meddle
    if outcome == "DONE":
        attach(isolator, ALICE, "n1")
    else:
        with pytest.raises(errors.FailedPrecondition, match="is gone"):
            attach(isolator, ALICE, "n1")
    raw = requests.get(hil.url + first_poll[0], auth=("alice", PASSWORDS["alice"]))
    assert raw.status_code == 404 and raw.json()["type"] == "NotFoundError"


# -- power -------------------------------------------------------------------------------


def test_power_cycle_follows_the_307_with_same_method_and_body_but_not_hils_password(
    hil, isolator
):
    raw = requests.post(hil.url + "/v0/node/n1/power_cycle", data='{"force": false}',
                        auth=("alice", PASSWORDS["alice"]), allow_redirects=False)
    assert raw.status_code == 307 and "/obmd/node/n1/power_cycle?token=" in raw.headers[
        "Location"]
    isolator.power_cycle(ALICE, "n1")
    assert hil.obm_calls == [("POST", "power_cycle", {"force": False}, False)]


def test_power_with_the_obm_disabled_is_409_obm_is_not_enabled(isolator):
    with pytest.raises(errors.FailedPrecondition, match="HIL: OBM is not enabled"):
        isolator.power_cycle(ALICE, "n3")


# -- failures and retries ------------------------------------------------------------------


def test_5xx_is_unavailable_and_safe_gets_are_retried_with_backoff(hil, client, sleeps):
    hil.fail_next = [503, 500]
    assert client.get("/v0/projects") == ["alice", "bob"]
    assert len(hil.requests) == 3 and len(sleeps) == 2 and sleeps[1] <= 0.4
    hil.fail_next = [503] * 3
    with pytest.raises(errors.Unavailable, match=r"HIL failed GET /v0/projects \(503\)"):
        client.get("/v0/projects")


def test_writes_are_never_retried(hil, client, sleeps):
    hil.fail_next = [503]
    hil.requests.clear()
    with pytest.raises(errors.Unavailable):
        client.post("/v0/project/alice/connect_node", {"node": "free1"})
    assert len(hil.requests) == 1 and sleeps == []
    assert hil.nodes["free1"].project is None


def test_an_unreachable_or_slow_hil_is_unavailable(hil, client, sleeps):
    hil.delay_seconds = 1.5  # beyond the client's 1 s timeout
    hil.requests.clear()
    with pytest.raises(errors.Unavailable, match="did not answer GET /v0/projects within 1s"):
        client.get("/v0/projects")
    # A timeout is not retried: one timeout bounds the call, within callers' deadlines.
    assert len(hil.requests) == 1 and sleeps == []
    hil.delay_seconds = 0
    hil.down()
    try:
        with pytest.raises(errors.Unavailable, match="cannot reach HIL"):
            client.get("/v0/projects")
    finally:
        hil.up()
    assert client.get("/v0/projects") == ["alice", "bob"]


# -- the authenticator ---------------------------------------------------------------------


@pytest.fixture
def clock() -> SecondsClock:
    return SecondsClock()


@pytest.fixture
def authn(client, clock) -> HilAuthenticator:
    return HilAuthenticator(client, cache_seconds=30, clock=clock)


def test_tenants_are_checked_by_reading_their_project(hil, authn):
    who = authn.authenticate(basic("alice", PASSWORDS["alice"]), "alice")
    assert (who.name, who.project, who.is_admin) == ("alice", "alice", False)
    assert who.credentials == Credentials("alice", PASSWORDS["alice"])
    assert hil.paths() == ["GET /v0/project/alice/nodes"]


def test_adminship_is_checked_with_the_admin_only_list_of_projects(hil, authn):
    assert authn.authenticate(basic("bmi", PASSWORDS["bmi"])).is_admin
    assert hil.paths() == ["GET /v0/projects"]
    with pytest.raises(errors.PermissionDenied, match="not a HIL admin"):
        authn.authenticate(basic("alice", PASSWORDS["alice"]))
    raw = requests.get(hil.url + "/v0/projects", auth=("alice", PASSWORDS["alice"]))
    assert raw.status_code == 401 and raw.json()["msg"] == "This operation is administrator-only."


def test_bad_password_401_and_unknown_user_404_are_unauthenticated(hil, authn):
    raw = requests.get(hil.url + "/v0/project/alice/nodes", auth=("eve", "x"))
    assert (raw.status_code, raw.json()["type"]) == (404, "NotFoundError")
    with pytest.raises(errors.Unauthenticated, match="User eve does not exist"):
        authn.authenticate(basic("eve", "x"), "alice")
    with pytest.raises(errors.Unauthenticated, match="Authentication failed"):
        authn.authenticate(basic("alice", "wrong"), "alice")
    with pytest.raises(errors.Unauthenticated, match="Basic"):
        authn.authenticate("Bearer some-token", "alice")


def test_a_foreign_project_is_401_like_a_bad_password_but_permission_denied(hil, authn):
    raw = requests.get(hil.url + "/v0/project/bob/nodes", auth=("alice", PASSWORDS["alice"]))
    assert (raw.status_code, raw.json()["type"]) == (401, "AuthorizationError")
    with pytest.raises(errors.PermissionDenied, match="may not act in project 'bob'"):
        authn.authenticate(basic("alice", PASSWORDS["alice"]), "bob")
    with pytest.raises(errors.PermissionDenied):
        authn.authenticate(basic("alice", PASSWORDS["alice"]), "nope")  # no such project


def test_success_is_cached_for_its_ttl_and_failures_never(hil, authn, clock):
    good = basic("alice", PASSWORDS["alice"])
    for _ in range(3):
        authn.authenticate(good, "alice")
    assert len(hil.requests) == 1
    clock.now += 31
    authn.authenticate(good, "alice")
    assert len(hil.requests) == 2
    hil.requests.clear()
    for _ in range(2):
        with pytest.raises(errors.Unauthenticated):
            authn.authenticate(basic("alice", "wrong"), "alice")
    assert len(hil.requests) == 4  # each try asked HIL again (the check and the probe)
    hil.requests.clear()
    with pytest.raises(errors.PermissionDenied):
        authn.authenticate(good, "bob")  # cached for alice, not for another project
    assert hil.requests


def test_an_unavailable_hil_makes_authentication_unavailable(hil, authn):
    hil.down()
    try:
        with pytest.raises(errors.Unavailable):
            authn.authenticate(basic("alice", PASSWORDS["alice"]), "alice")
    finally:
        hil.up()


def test_passwords_never_reach_logs_or_errors(hil, authn, isolator, caplog):
    caplog.set_level(logging.DEBUG)
    seen = []
    for attempt in (lambda: authn.authenticate(basic("alice", PASSWORDS["alice"]), "alice"),
                    lambda: authn.authenticate(basic("alice", PASSWORDS["bob"]), "alice"),
                    lambda: authn.authenticate(basic("alice", PASSWORDS["alice"]), "bob"),
                    lambda: attach(isolator, ALICE, "n1"),
                    lambda: isolator.node(ALICE, "n2"),
                    lambda: isolator.detach_provisioning_network(SYSTEM, "n1")):
        try:
            seen.append(repr(attempt()))
        except errors.BmiError as exc:
            seen.append(exc.message)
    text = caplog.text + "\n".join(seen)
    assert "alice" in text
    for password in PASSWORDS.values():
        assert password not in text
        assert base64.b64encode(f"alice:{password}".encode()).decode() not in text
    # BMI's own work (SYSTEM, no caller) went with BMI's account.
    assert hil.requests[-1].user == "bmi"
