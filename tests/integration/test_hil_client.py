"""Contract tests: BMI's production HIL client, isolator and authenticator over real HTTP
against the HIL stand-in. Each test names the HIL behaviour it pins."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time

import pytest
import requests
from fakes import SecondsClock
from hil_standin import HilStandin

from bmi_server.adapters.hil import HilAuthenticator, HilClient, HilIsolator
from bmi_server.adapters.hil.membership import ProjectMembers
from bmi_server.core import deadlines, errors
from bmi_server.core.models import SYSTEM, Credentials, Principal

NETWORK = "bmi-provision"
PASSWORDS = {"bmi": "bmi-secret-pw", "alice": "alice-secret-pw", "bob": "bob-secret-pw"}


@pytest.fixture
def hil():
    # The network daemon as HIL's, 20 times faster (real: polls every 2 s, 0.5 s a change).
    standin = HilStandin(poll_seconds=0.1, switch_seconds=0.025)
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
    # Generous: on a loaded machine the stand-in may take a while; the slow-HIL test
    # below makes a client with a short timeout of its own.
    return HilClient(hil.url, Credentials("bmi", PASSWORDS["bmi"]), timeout=10.0,
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


@pytest.mark.parametrize("order", ["as registered", "reversed"])
def test_hil_lists_nics_in_no_fixed_order_so_the_default_boot_nic_is_the_first_label(
    hil, client, isolator, order
):
    hil.nic_order = (lambda nics: nics) if order == "as registered" else (
        lambda nics: nics[::-1])
    assert [n["label"] for n in client.get("/v0/node/n1")["nics"]] == (
        ["eth0", "eth1"] if order == "as registered" else ["eth1", "eth0"])
    view = isolator.node(ALICE, "n1")
    assert (view.boot_nic, view.boot_mac) == ("eth0", "52:54:00:00:01:01")
    assert [n.label for n in view.nics] == ["eth0", "eth1"]
    assert not view.boot_nic_configured  # BMI may prefer the NIC it saw PXE-boot
    on_eth1 = HilIsolator(client, NETWORK, boot_nic="eth1")
    assert on_eth1.node(ALICE, "n1").boot_nic_configured


def test_project_nodes_are_hils_list_reused_for_a_few_seconds(hil, client):
    clock = SecondsClock()
    isolator = HilIsolator(client, NETWORK, members=ProjectMembers(5.0, clock=clock))
    hil.requests.clear()
    assert isolator.project_nodes(ALICE, "alice") == {"n1", "n3"}
    assert isolator.project_nodes(ALICE, "alice") == {"n1", "n3"}
    assert hil.paths() == ["GET /v0/project/alice/nodes"]  # once
    hil.nodes["free1"].project = "alice"  # moved in HIL directly: seen once the entry expires
    assert isolator.project_nodes(ALICE, "alice") == {"n1", "n3"}
    clock.now += 5
    assert isolator.project_nodes(ALICE, "alice") == {"n1", "n3", "free1"}
    isolator.detach_node(ALICE, "alice", "free1")  # BMI's own change: seen at once
    assert isolator.project_nodes(ALICE, "alice") == {"n1", "n3"}
    isolator.connect_node(ALICE, "alice", "free1")
    assert isolator.project_nodes(ALICE, "alice") == {"n1", "n3", "free1"}
    with pytest.raises(errors.PermissionDenied, match="You do not have access"):
        isolator.project_nodes(ALICE, "bob")


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


def test_detach_node_checks_the_obm_first_and_the_isolator_disables_it(hil, client, isolator):
    attach(isolator, ALICE, "n1")  # OBM enabled and attached: HIL names the OBM first
    with pytest.raises(errors.FailedPrecondition, match=r"HIL: Node's obm is enabled\."):
        client.post("/v0/project/alice/detach_node", {"node": "n1"}, as_=ALICE.credentials)
    with pytest.raises(errors.FailedPrecondition, match="Node attached to a network"):
        isolator.detach_node(ALICE, "alice", "n1")  # OBM now off; the network stays
    assert not hil.nodes["n1"].obm_enabled and hil.nodes["n1"].project == "alice"
    assert hil.obm_calls == [("DELETE", "token", None, True)]  # HIL asked obmd
    isolator.detach_provisioning_network(ALICE, "n1")
    hil.nodes["n1"].obm_token = "re-enabled"
    hil.obm_calls.clear()
    hil.requests.clear()
    isolator.detach_node(ALICE, "alice", "n1")
    assert hil.nodes["n1"].project is None and not hil.nodes["n1"].obm_enabled
    assert hil.paths() == ["POST /v0/project/alice/detach_node", "PUT /v0/node/n1/obm",
                           "POST /v0/project/alice/detach_node"]
    assert hil.requests[1].body == b'{"enabled": false}'
    assert {r.user for r in hil.requests} == {"alice"}  # a project member may switch it
    hil.requests.clear()
    isolator.connect_node(ALICE, "alice", "free1")  # OBM off: one request, no OBM call
    hil.requests.clear()
    isolator.detach_node(ALICE, "alice", "free1")
    assert hil.paths() == ["POST /v0/project/alice/detach_node"]


def test_obm_is_switched_by_members_of_the_nodes_project_only(hil, client):
    put = lambda node, who, on: requests.put(  # noqa: E731
        f"{hil.url}/v0/node/{node}/obm", data=json.dumps({"enabled": on}),
        auth=(who, PASSWORDS[who]))
    assert put("n3", "bob", True).status_code == 401  # alice's node
    assert put("free1", "alice", True).status_code == 401  # a free node: admins only
    assert put("n3", "alice", True).status_code == 200
    assert hil.obm_calls == [("POST", "token", None, True)] and hil.nodes["n3"].obm_enabled
    hil.obmd_down = True
    assert put("n3", "alice", False).status_code == 500 and hil.nodes["n3"].obm_enabled


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
    hil.daemon_down()
    client.post("/v0/node/n1/nic/eth0/connect_network", {"network": NETWORK})
    with pytest.raises(errors.FailedPrecondition, match="already active on the nic"):
        client.post("/v0/node/n1/nic/eth0/detach_network", {"network": NETWORK})
    hil.nodes["n1"].obm_token = None
    with pytest.raises(errors.FailedPrecondition, match="pending network actions"):
        isolator.detach_node(ALICE, "alice", "n1")


def test_an_action_ending_in_error_is_reported(hil, isolator):
    hil.action_outcome = "ERROR"
    with pytest.raises(errors.FailedPrecondition, match="ended in ERROR"):
        attach(isolator, ALICE, "n1")
    assert hil.networks_of("n1", "eth0") == {}


def test_actions_take_the_daemons_poll_and_stay_pending_while_it_is_down(hil, client):
    hil.poll_seconds, hil.switch_seconds = 0.4, 0.1
    hil.daemon_up()  # polls from now on
    time.sleep(0.2)  # queued between two polls
    queued = time.monotonic()
    status_id = client.post("/v0/node/n1/nic/eth0/connect_network",
                            {"network": NETWORK})["status_id"]
    path = f"/v0/networking_action/{status_id}"
    while client.get(path)["status"] == "PENDING":
        time.sleep(0.02)
    assert time.monotonic() - queued >= 0.25  # at the next poll (0.2 s on), plus the switch
    hil.daemon_down()
    status_id = client.post("/v0/node/n1/nic/eth0/detach_network",
                            {"network": NETWORK})["status_id"]
    time.sleep(1.0)  # more than two polls
    assert client.get(f"/v0/networking_action/{status_id}")["status"] == "PENDING"
    hil.daemon_up()
    time.sleep(0.2)
    assert client.get(f"/v0/networking_action/{status_id}")["status"] == "DONE"
    assert hil.networks_of("n1", "eth0") == {}


def test_an_action_is_shown_to_its_nodes_project_and_an_unknown_one_is_404(hil, client):
    status_id = client.post("/v0/node/n1/nic/eth0/connect_network", {"network": NETWORK},
                            as_=ALICE.credentials)["status_id"]
    path = f"/v0/networking_action/{status_id}"
    assert client.get(path, as_=ALICE.credentials)["node"] == "n1"
    with pytest.raises(errors.PermissionDenied, match="You do not have access"):
        client.get(path, as_=BOB.credentials)
    raw = requests.get(hil.url + "/v0/networking_action/no-such-id",
                       auth=("alice", PASSWORDS["alice"]))
    assert raw.status_code == 404 and raw.json() == {"msg": "status_id not found",
                                                     "type": "NotFoundError"}


def test_an_action_not_done_in_time_is_deadline_exceeded_and_a_detach_waits_for_it(
    hil, client
):
    hil.daemon_down()
    isolator = HilIsolator(client, NETWORK, action_timeout=0.4, poll_interval=0.05)
    with pytest.raises(errors.DeadlineExceeded,
                       match=r"within 0.4s \(networking action .* is still PENDING; HIL's "
                             r"network daemon may be down"):
        attach(isolator, ALICE, "n1")
    # While it is pending HIL refuses the undo with 409; without waiting, that is said.
    with pytest.raises(errors.DeadlineExceeded, match="still busy with an earlier network "
                                                      "change on n1/eth0"):
        isolator.detach_provisioning_network(ALICE, "n1", wait=False)
    # A detach that waits: HIL's daemon comes back meanwhile, the attach ends, then the
    # detach is queued and done.
    waiting = HilIsolator(client, NETWORK, action_timeout=5.0, poll_interval=0.05)
    threading.Timer(0.5, hil.daemon_up).start()
    started = time.monotonic()
    waiting.detach_provisioning_network(ALICE, "n1")
    assert time.monotonic() - started >= 0.5
    assert hil.networks_of("n1", "eth0") == {}
    # Not longer than the caller's deadline: the answer comes before it, with the reason.
    hil.daemon_down()
    with deadlines.scope(1.6), pytest.raises(errors.DeadlineExceeded,
                                             match="within the call's deadline"):
        attach(waiting, ALICE, "n1")


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
    hil.requests.clear()
    isolator.power_cycle(ALICE, "n1")  # OBM enabled already: not touched (same token)
    assert hil.obm_calls == [("POST", "power_cycle", {"force": False}, False)]
    assert hil.paths() == ["POST /v0/node/n1/power_cycle", "POST /obmd/node/n1/power_cycle"]


def test_power_with_the_obm_disabled_is_409_so_the_isolator_enables_it_first(
    hil, client, isolator
):
    with pytest.raises(errors.FailedPrecondition, match="HIL: OBM is not enabled"):
        client.post("/v0/node/n3/power_cycle", {"force": False}, as_=ALICE.credentials)
    hil.requests.clear()
    isolator.power_cycle(ALICE, "n3")
    assert hil.paths() == ["POST /v0/node/n3/power_cycle", "PUT /v0/node/n3/obm",
                           "POST /v0/node/n3/power_cycle", "POST /obmd/node/n3/power_cycle"]
    assert hil.requests[1].body == b'{"enabled": true}' and hil.requests[1].user == "alice"
    assert hil.obm_calls == [("POST", "token", None, True),  # HIL asked obmd for a token
                             ("POST", "power_cycle", {"force": False}, False)]
    assert hil.nodes["n3"].obm_enabled  # left on: the tenant's; giving back turns it off
    hil.nodes["n3"].obm_token = None
    hil.obmd_down = True
    with pytest.raises(errors.Unavailable, match=r"PUT /v0/node/n3/obm \(500\)"):
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


def test_an_unreachable_or_slow_hil_is_unavailable(hil, sleeps):
    client = HilClient(hil.url, Credentials("bmi", PASSWORDS["bmi"]), timeout=1.0,
                       sleep=sleeps.append)
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


def test_a_tenants_check_fills_the_listing_cache_so_a_listing_asks_hil_once(hil, client,
                                                                          authn, clock):
    isolator = HilIsolator(client, NETWORK, members=ProjectMembers(5.0, clock=clock))
    authn.members = isolator.members
    who = authn.authenticate(basic("alice", PASSWORDS["alice"]), "alice")
    assert isolator.project_nodes(who, "alice") == {"n1", "n3"}
    assert hil.paths() == ["GET /v0/project/alice/nodes"]  # the check's answer, reused


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
