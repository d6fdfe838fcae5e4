"""A stand-in for HIL's v0 REST API, so tests run BMI's production HIL client over real
HTTP. It reproduces the behaviour observed on a running HIL (and read in HIL's source,
CCI-MOC/hil), not HIL's code:

- every path under ``/v0``; every answer labelled ``text/html``, JSON or not; unknown
  routes answer an HTML 404 page, known routes with another method an HTML 405;
- the body is validated before the caller is authenticated (as HIL's ``rest_call``
  does): a GET with a body, a body that is not JSON, a form-encoded body (dropped, so
  the arguments are missing) or arguments that do not fit -> 400 ``ValidationError``;
- HTTP Basic credentials, never challenged (no ``WWW-Authenticate``): none or a wrong
  password -> 401 ``AuthorizationError``; an unknown user name -> 404 ``NotFoundError``;
- errors are ``{"msg", "type"}``: 401 for a foreign project and admin-only calls alike
  (never 403), 404 for unknown node/project/network/NIC, 409 ``BlockedError`` /
  ``ProjectMismatchError`` for conflicts, 400 ``BadArgumentError``;
- successful writes answer 200 with an empty body;
- ``connect_network``/``detach_network`` answer 202 ``{"status_id"}``; the action is
  done by HIL's network daemon (``serve-networks``), which looks for pending actions
  every ``poll_seconds`` (2 s) and then takes ``switch_seconds`` (0.5 s) on the switch:
  an action ends DONE (or ERROR, as set) 0.5-2.5 s after it was queued, as measured on
  a real HIL (1-2.5 s). With the daemon down (``daemon_down()``) actions stay PENDING;
  when it is back (``daemon_up()``) it does them at once. An action's record
  (``GET /v0/networking_action/<id>``, for members of the node's project: others get
  401; an unknown id is 404 ``status_id not found``) vanishes once a newer action is
  queued on that NIC; one pending action per NIC;
- a node's NICs are listed in no fixed order (``nic_order``: shuffled by default);
- ``PUT /v0/node/<n>/obm`` (a member of the node's project; a free node: admins) enables
  or disables its OBM: HIL asks the out-of-band management service (obmd) for a new node
  token (``POST <obm uri>/token``, HIL's admin credentials) or invalidates it
  (``DELETE``); with obmd down that is 500;
- power calls answer 307 to obmd, which the stand-in also serves under ``/obmd`` (it
  authorises by the token in the URL); with OBM disabled, 409 ``BlockedError`` "OBM is
  not enabled";
- ``detach_node`` refuses a node whose OBM is enabled first (409 "Node's obm is
  enabled."), then one attached to a network, then one with a pending action.

Faults for tests: ``delay_seconds`` (slow answers), ``fail_next`` (statuses to answer
next, e.g. 503), ``down()``/``up()`` (connection refused), ``action_outcome``,
``daemon_down()``/``daemon_up()``, ``obmd_down``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import random
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_CHANNEL = "vlan/native"
_CHANNEL = re.compile(r"vlan/(native|\d{1,4})")
AUTH_FAILED = "Authentication failed. Authentication is required to use this service."
NO_ACCESS = "You do not have access to the required project."
ADMIN_ONLY = "This operation is administrator-only."
INVALID_ARGS = "Request arguments are not valid for this request"
HTML_404 = (
    '<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 3.2 Final//EN">\n<title>404 Not Found</title>\n'
    "<h1>Not Found</h1>\n<p>The requested URL was not found on the server.</p>\n"
)
HTML_405 = (
    '<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 3.2 Final//EN">\n'
    "<title>405 Method Not Allowed</title>\n<h1>Method Not Allowed</h1>\n"
)
HTML_500 = "<title>500 Internal Server Error</title>\n<h1>Internal Server Error</h1>\n"


class ApiError(Exception):
    def __init__(self, status: int, kind: str, msg: str) -> None:
        super().__init__(msg)
        self.status, self.kind, self.msg = status, kind, msg


def _not_found(msg: str) -> ApiError:
    return ApiError(404, "NotFoundError", msg)


def _blocked(msg: str) -> ApiError:
    return ApiError(409, "BlockedError", msg)


def _mismatch(msg: str) -> ApiError:
    return ApiError(409, "ProjectMismatchError", msg)


def _unauthorized(msg: str) -> ApiError:
    return ApiError(401, "AuthorizationError", msg)


def _invalid(msg: str = INVALID_ARGS) -> ApiError:
    return ApiError(400, "ValidationError", msg)


@dataclass
class User:
    password: str
    is_admin: bool = False
    projects: set[str] = field(default_factory=set)


@dataclass
class Nic:
    label: str
    mac: str
    port: str | None = None  # switch port; HIL refuses network changes without one
    networks: dict[str, str] = field(default_factory=dict)  # channel -> network
    action: str | None = None  # id of the pending networking action


@dataclass
class Node:
    name: str
    project: str | None
    nics: list[Nic]
    obm_token: str | None = None  # the node's obmd token: None while OBM is disabled
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def obm_enabled(self) -> bool:
        return self.obm_token is not None

    def nic(self, label: str) -> Nic:
        for nic in self.nics:
            if nic.label == label:
                return nic
        raise _not_found(f"Nic {label} on Node {self.name} does not exist.")


@dataclass
class Network:
    name: str
    access: set[str] | None = None  # None: public


@dataclass
class Action:
    id: str
    node: str
    nic: str
    new_network: str | None  # None: detach
    channel: str
    outcome: str  # DONE or ERROR
    queued: float
    due: float  # when the daemon will have done it (inf: not while it is down)
    status: str = "PENDING"


@dataclass(frozen=True)
class Recorded:
    """One request as the stand-in received it."""

    method: str
    path: str
    user: str  # from the Basic header; "" if none
    content_type: str
    body: bytes
    time: float


@dataclass
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Callable[..., Any]
    schema: dict[str, tuple[type, bool]] | None  # body field -> (type, required)


class HilStandin:
    def __init__(self, *, poll_seconds: float = 2.0, switch_seconds: float = 0.5) -> None:
        """``poll_seconds``: how often the network daemon looks for pending actions;
        ``switch_seconds``: how long it then takes on the switch (tests shorten both)."""
        self.lock = threading.RLock()
        self.users: dict[str, User] = {}
        self.projects: set[str] = set()
        self.nodes: dict[str, Node] = {}
        self.networks: dict[str, Network] = {}
        self.actions: dict[str, Action] = {}
        self.poll_seconds = poll_seconds
        self.switch_seconds = switch_seconds
        self._daemon_since: float | None = time.monotonic()  # None: the daemon is down
        self.action_outcome = "DONE"  # how the next actions end: DONE or ERROR
        self.delay_seconds = 0.0  # every answer this late (a slow HIL)
        self.fail_next: list[int] = []  # statuses to answer the next requests with
        self.obmd_down = False  # HIL cannot reach obmd: enabling/disabling OBM fails
        self.nic_order: Callable[[list[Nic]], list[Nic]] = _shuffled
        self.requests: list[Recorded] = []
        # What obmd saw: (method, op, body, had an Authorization header). Power calls
        # come from the client (no HIL credentials); token calls from HIL (its admin token).
        self.obm_calls: list[tuple[str, str, Any, bool]] = []
        self.on_request: Callable[[Recorded], None] | None = None
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self._routes = self._route_table()

    # -- running -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HilStandin:
        standin = self

        class Handler(_Handler):
            owner = standin

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, args=(0.05,), name="hil-standin",
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def down(self) -> None:
        """Stop listening: connections are refused until ``up()``."""
        self.stop()

    def up(self) -> None:
        self.start()  # same port

    def __enter__(self) -> HilStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the data centre -----------------------------------------------------------------

    def add_user(self, name: str, password: str, *, admin: bool = False,
                 projects: tuple[str, ...] = ()) -> None:
        with self.lock:
            self.users[name] = User(password, admin, set(projects))

    def add_project(self, name: str) -> None:
        with self.lock:
            self.projects.add(name)

    def add_network(self, name: str, access: set[str] | None = None) -> None:
        with self.lock:
            self.networks[name] = Network(name, access)

    def add_node(self, name: str, nics: list[tuple[str, str]], project: str | None = None,
                 *, obm_enabled: bool = False) -> Node:
        with self.lock:
            node = Node(name, project,
                        [Nic(label, mac, port=f"gi1/0/{i}") for i, (label, mac) in
                         enumerate(nics, 1)],
                        obm_token=secrets.token_hex(8) if obm_enabled else None)
            self.nodes[name] = node
            return node

    def daemon_down(self) -> None:
        """Stop HIL's network daemon: queued actions stay PENDING."""
        with self.lock:
            self._settle()
            self._daemon_since = None
            for action in self.actions.values():
                if action.status == "PENDING":
                    action.due = math.inf

    def daemon_up(self) -> None:
        """Start the daemon again: it does the pending actions at once, in order."""
        with self.lock:
            now = time.monotonic()
            self._daemon_since = now
            pending = sorted((a for a in self.actions.values() if a.status == "PENDING"),
                             key=lambda a: a.queued)
            for i, action in enumerate(pending, 1):
                action.due = now + i * self.switch_seconds

    def _due(self, queued: float) -> float:
        """When the daemon will have done an action queued at ``queued``: at its first
        poll from then on, plus the switch's time."""
        since = self._daemon_since
        if since is None:
            return math.inf
        polls = max(0, math.ceil((queued - since) / self.poll_seconds))
        return since + polls * self.poll_seconds + self.switch_seconds

    def networks_of(self, node: str, nic: str) -> dict[str, str]:
        with self.lock:
            self._settle()
            return dict(self.nodes[node].nic(nic).networks)

    def pending(self) -> list[Action]:
        with self.lock:
            self._settle()
            return [a for a in self.actions.values() if a.status == "PENDING"]

    def finish_pending(self, outcome: str = "DONE") -> None:
        """End every pending action now (even with the daemon down)."""
        with self.lock:
            for action in self.actions.values():
                if action.status == "PENDING":
                    action.outcome, action.due = outcome, 0.0
            self._settle()

    def queue_action(self, node: str, nic: str, network: str | None,
                     channel: str = DEFAULT_CHANNEL) -> None:
        """Queue an action on a NIC as another HIL user would (None: a detach); like
        HIL, this drops the NIC's older action records."""
        with self.lock:
            self._settle()
            found = self.nodes[node]
            self._queue(found, found.nic(nic), network, channel)

    def paths(self, *, method: str = "") -> list[str]:
        return [f"{r.method} {r.path}" for r in self.requests if not method or r.method == method]

    # -- behaviour -----------------------------------------------------------------------

    def _route_table(self) -> list[Route]:
        s = str
        table = [
            ("GET", "/v0/projects", self._list_projects, {}),
            ("GET", "/v0/project/<project>/nodes", self._project_nodes, {}),
            ("GET", "/v0/nodes/<is_free>", self._list_nodes, {}),
            ("GET", "/v0/node/<node>", self._show_node, {}),
            ("POST", "/v0/project/<project>/connect_node", self._connect_node,
             {"node": (s, True)}),
            ("POST", "/v0/project/<project>/detach_node", self._detach_node,
             {"node": (s, True)}),
            ("POST", "/v0/node/<node>/nic/<nic>/connect_network", self._connect_network,
             {"network": (s, True), "channel": (s, False)}),
            ("POST", "/v0/node/<node>/nic/<nic>/detach_network", self._detach_network,
             {"network": (s, True)}),
            ("GET", "/v0/networking_action/<status_id>", self._show_action, {}),
            ("POST", "/v0/node/<node>/power_cycle", self._power("power_cycle"),
             {"force": (bool, False)}),
            ("POST", "/v0/node/<node>/power_on", self._power("power_on"), {}),
            ("POST", "/v0/node/<node>/power_off", self._power("power_off"), {}),
            ("GET", "/v0/node/<node>/power_status", self._power("power_status"), {}),
            ("PUT", "/v0/node/<node>/boot_device", self._power("boot_device"),
             {"bootdev": (s, True)}),
            ("PUT", "/v0/node/<node>/obm", self._set_obm, {"enabled": (bool, True)}),
            # The out-of-band management service HIL hands power calls to.
            ("POST", "/obmd/node/<node>/<op>", self._obmd, None),
            ("GET", "/obmd/node/<node>/<op>", self._obmd, None),
            ("PUT", "/obmd/node/<node>/<op>", self._obmd, None),
        ]
        routes = []
        for method, path, handler, schema in table:
            regex = re.sub(r"<(\w+)>", r"(?P<\1>[^/]+)", path)
            routes.append(Route(method, re.compile(regex + "$"), handler, schema))
        return routes

    def handle(
        self, method: str, raw_path: str, headers: Any, body: bytes
    ) -> tuple[int, str, dict]:
        """(status, body, extra headers) for one request."""
        split = urlsplit(raw_path)
        user = _basic_user(headers.get("Authorization"))
        record = Recorded(method, split.path, user, headers.get("Content-Type", ""), body,
                          time.monotonic())
        with self.lock:
            self.requests.append(record)
            failure = self.fail_next.pop(0) if self.fail_next else None
        if self.on_request is not None:
            self.on_request(record)
        if self.delay_seconds:
            time.sleep(self.delay_seconds)
        if failure is not None:
            return failure, HTML_500, {}
        matches = [(r, r.pattern.match(split.path)) for r in self._routes]
        matches = [(r, m) for r, m in matches if m]
        if not matches:
            return 404, HTML_404, {}
        found = [(r, m) for r, m in matches if r.method == method]
        if not found:
            return 405, HTML_405, {}
        route, match = found[0]
        args = {k: unquote(v) for k, v in match.groupdict().items()}
        try:
            with self.lock:
                self._settle()
                if route.schema is None:  # the OBM service: its own rules
                    return route.handler(method, args, parse_qs(split.query), headers, body)
                kwargs = self._validate(method, route.schema, args, headers, body)
                self._auth = self._authenticate(headers.get("Authorization"))
                return route.handler(**kwargs)
        except ApiError as exc:
            return exc.status, json.dumps({"msg": exc.msg, "type": exc.kind}), {}

    def _validate(self, method: str, schema: dict, args: dict, headers: Any,
                  body: bytes) -> dict:
        data: dict[str, Any] = {}
        content_type = headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            body = b""  # the web framework takes a form body for itself: HIL sees nothing
        if method == "GET":
            if body:
                raise _invalid("GET request made with a non-empty request body")
        elif body:
            try:
                data = json.loads(body)
            except ValueError:
                raise _invalid("The request body is not valid JSON") from None
            if not isinstance(data, dict):
                raise _invalid()
        for key in args:
            if key in data:
                raise _invalid()
        for key, value in data.items():
            if key not in schema or not isinstance(value, schema[key][0]):
                raise _invalid()
        for key, (_, required) in schema.items():
            if required and key not in data:
                raise _invalid()
        return {**args, **data}

    def _authenticate(self, header: str | None) -> User:
        if not header or not header.startswith("Basic "):
            raise _unauthorized(AUTH_FAILED)
        try:
            name, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise _unauthorized(AUTH_FAILED) from None
        user = self.users.get(name)
        if user is None:
            raise _not_found(f"User {name} does not exist.")
        if user.password != password:
            raise _unauthorized(AUTH_FAILED)
        return user

    def _require_admin(self) -> None:
        if not self._auth.is_admin:
            raise _unauthorized(ADMIN_ONLY)

    def _require_access(self, project: str | None) -> None:
        if self._auth.is_admin:
            return
        if project is None or project not in self._auth.projects:
            raise _unauthorized(NO_ACCESS)

    def _project(self, name: str) -> str:
        if name not in self.projects:
            raise _not_found(f"Project {name} does not exist.")
        return name

    def _node(self, name: str) -> Node:
        if name not in self.nodes:
            raise _not_found(f"Node {name} does not exist.")
        return self.nodes[name]

    def _network(self, name: str) -> Network:
        if name not in self.networks:
            raise _not_found(f"Network {name} does not exist.")
        return self.networks[name]

    def _settle(self) -> None:
        """Apply the networking actions whose time has come."""
        now = time.monotonic()
        for action in self.actions.values():
            if action.status != "PENDING" or action.due > now:
                continue
            nic = self.nodes[action.node].nic(action.nic)
            if action.outcome == "DONE":
                if action.new_network is None:
                    nic.networks.pop(action.channel, None)
                else:
                    nic.networks[action.channel] = action.new_network
            action.status = action.outcome
            nic.action = None

    def _queue(self, node: Node, nic: Nic, network: str | None, channel: str) -> tuple:
        # The NIC's older records go: HIL keeps only the latest action of a NIC.
        for old in [a for a in self.actions.values() if (a.node, a.nic) == (node.name, nic.label)]:
            del self.actions[old.id]
        now = time.monotonic()
        action = Action(str(uuid.uuid4()), node.name, nic.label, network, channel,
                        self.action_outcome, now, self._due(now))
        self.actions[action.id] = action
        nic.action = action.id
        return 202, json.dumps({"status_id": action.id}), {}

    # -- endpoints ---------------------------------------------------------------------

    def _list_projects(self):
        self._require_admin()
        return 200, json.dumps(sorted(self.projects)), {}

    def _project_nodes(self, project):
        self._project(project)
        self._require_access(project)
        return 200, json.dumps([n.name for n in self.nodes.values() if n.project == project]), {}

    def _list_nodes(self, is_free):
        names = [n.name for n in self.nodes.values() if is_free != "free" or n.project is None]
        return 200, json.dumps(sorted(names)), {}

    def _show_node(self, node):
        found = self._node(node)
        if found.project is not None:
            self._require_access(found.project)
        nics = []
        for nic in self.nic_order(list(found.nics)):
            shown = {"label": nic.label, "macaddr": nic.mac, "networks": dict(nic.networks)}
            if self._auth.is_admin:
                shown.update(port=nic.port, switch="switch0" if nic.port else None)
            nics.append(shown)
        answer = {"name": found.name, "project": found.project, "nics": nics,
                  "metadata": dict(found.metadata)}
        return 200, json.dumps(answer, sort_keys=True), {}

    def _connect_node(self, project, node):
        self._project(project)
        self._require_access(project)
        found = self._node(node)
        if found.project is not None:
            raise _blocked("Node is already owned by a project.")
        found.project = project
        return 200, "", {}

    def _detach_node(self, project, node):
        self._project(project)
        self._require_access(project)
        found = self._node(node)
        if found.project != project:
            raise _not_found("Node not in project")
        if found.obm_enabled:
            raise _blocked("Node's obm is enabled.")
        if any(nic.networks for nic in found.nics):
            raise _blocked("Node attached to a network")
        if any(nic.action for nic in found.nics):
            raise _blocked("Node has pending network actions")
        found.project = None
        return 200, "", {}

    def _connect_network(self, node, nic, network, channel=None):
        found = self._node(node)
        port = found.nic(nic)
        net = self._network(network)
        if found.project is None:
            raise _mismatch("Node not in project")
        self._require_access(found.project)
        if port.port is None:
            raise _not_found("No port is connected to given nic.")
        if port.action:
            raise _blocked("A networking operation is already active on the nic.")
        if net.access is not None and found.project not in net.access:
            raise _mismatch("Project does not have access to given network.")
        if network in port.networks.values():
            raise _blocked("The network is already attached to the nic.")
        channel = channel or DEFAULT_CHANNEL
        if channel in port.networks:
            raise _blocked("The channel is already in use on the nic.")
        if not _CHANNEL.fullmatch(channel):
            raise ApiError(400, "BadArgumentError",
                           f"Channel {channel!r}, is not legal for this network.")
        return self._queue(found, port, network, channel)

    def _detach_network(self, node, nic, network):
        found = self._node(node)
        self._network(network)
        port = found.nic(nic)
        if found.project is None:
            raise _mismatch("Node not in project")
        self._require_access(found.project)
        if port.action:
            raise _blocked("A networking operation is already active on the nic.")
        channel = next((c for c, n in port.networks.items() if n == network), None)
        if channel is None:
            raise ApiError(400, "BadArgumentError", "The network is not attached to the nic.")
        return self._queue(found, port, None, channel)

    def _show_action(self, status_id):
        action = self.actions.get(status_id)
        if action is None:
            raise _not_found("status_id not found")
        self._require_access(self.nodes[action.node].project)
        answer = {"status": action.status, "node": action.node, "nic": action.nic,
                  "type": "modify_port", "channel": action.channel,
                  "new_network": action.new_network}
        return 200, json.dumps(answer), {}

    def _power(self, op: str):
        def handler(node, **_body):
            found = self._node(node)
            if found.project is None:
                self._require_admin()
            else:
                self._require_access(found.project)
            if not found.obm_enabled:
                raise _blocked("OBM is not enabled")
            location = f"{self.url}/obmd/node/{node}/{op}?token={found.obm_token}"
            page = f'<a href="{location}">{location}</a>'
            return 307, page, {"Location": location}

        return handler

    def _set_obm(self, node, enabled):
        found = self._node(node)
        self._require_access(found.project)  # a free node: admins only
        # HIL asks obmd with its admin token for the node: a new token (the old one, if
        # any, stops working) or none.
        method = "POST" if enabled else "DELETE"
        if self.obmd_down:
            return 500, HTML_500, {}
        self.obm_calls.append((method, "token", None, True))
        found.obm_token = secrets.token_hex(8) if enabled else None
        return 200, "", {}

    def _obmd(self, method, args, query, headers, body):
        found = self.nodes.get(args["node"])
        if found is None or query.get("token") != [found.obm_token] or not found.obm_enabled:
            return 401, "invalid token", {}
        try:
            data = json.loads(body) if body else None
        except ValueError:
            return 400, "body is not JSON", {}
        op = args["op"]
        if op == "power_cycle" and not (isinstance(data, dict) and isinstance(
                data.get("force"), bool)):
            return 400, "power_cycle needs {\"force\": <bool>}", {}
        self.obm_calls.append((method, op, data, "Authorization" in headers))
        if op == "power_status":
            return 200, json.dumps({"power_status": "On"}), {}
        return 200, "", {}


def _shuffled(nics: list[Nic]) -> list[Nic]:
    random.shuffle(nics)
    return nics


def _basic_user(header: str | None) -> str:
    if not header or not header.startswith("Basic "):
        return ""
    try:
        return base64.b64decode(header[6:]).decode().partition(":")[0]
    except (binascii.Error, UnicodeDecodeError):
        return ""


class _Handler(BaseHTTPRequestHandler):
    owner: HilStandin

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        status, text, extra = self.owner.handle(self.command, self.path, self.headers, body)
        payload = text.encode()
        try:
            self.send_response(status)
            # HIL labels everything text/html, JSON included.
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(payload)))
            for key, value in extra.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting (a slow-HIL test), as a real server sees it

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests read .requests instead
