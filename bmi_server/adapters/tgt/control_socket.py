"""tgtd's management socket spoken directly: a tgtadm Runner that spawns no process.

tgtadm is a thin client. It packs its options into a fixed request (``struct tgtadm_req``,
120 bytes) followed by a NUL-terminated ``key=value,...`` parameter string, sends both over
the AF_UNIX socket ``/var/run/tgtd/socket.<control>``, and reads back ``struct tgtadm_rsp``
(error code, total length) and then the text a ``show`` prints. Spawning tgtadm costs
~10 ms a call, five calls per target: most of a provision. This runner takes the same
command line TgtTargetDriver builds and does the same exchange in-process, answering as
tgtadm would (exit code 22 and tgtadm's message on a refusal), so the driver's logic is
unchanged and tgtadm remains the fallback (setting ``tgt_admin``).

Layout, enum values and messages are those of tgt 1.0.85 (Debian 12): the request bytes
were checked against the installed tgtadm's own traffic (tests/unit/test_tgt_socket.py holds
them) and the messages are the ones it prints for each error code.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

SOCKET_DIR = Path("/var/run/tgtd")
LLD_LEN = 64
UINT64_MAX = (1 << 64) - 1
NO_TID = -1  # tgtadm's default: "not given" (and GLOBAL_TID for account binds)
REFUSED = 22  # tgtadm's exit code (EINVAL) when tgtd refuses a request

# struct tgtadm_req: mode, op, lld[64], len, tid, sid, lun, cid, host_no, device_type,
# ac_dir, pack, force. struct tgtadm_rsp: err, len.
_REQUEST = struct.Struct("<II64sIiQQIIIIII")
_RESPONSE = struct.Struct("<II")

_OPS = {"new": 0, "delete": 1, "show": 2, "bind": 3, "unbind": 4, "update": 5}
_MODES = {
    "system": 0, "sys": 0, "target": 1, "tgt": 1, "logicalunit": 2, "lu": 2,
    "portal": 3, "pt": 3, "lld": 4, "session": 5, "sess": 5,
    "connection": 6, "conn": 6, "account": 7,
}  # fmt: skip

# Options that go into the parameter string, in the order tgtadm writes them.
_PARAMS = {
    "--backing-store": "path", "-b": "path",
    "--bstype": "bstype", "-E": "bstype",
    "--bsopts": "bsopts", "-S": "bsopts",
    "--bsoflags": "bsoflags", "-f": "bsoflags",
    "--blocksize": "blocksize", "-y": "blocksize",
    "--targetname": "targetname", "-T": "targetname",
    "--initiator-address": "initiator-address", "-I": "initiator-address",
    "--initiator-name": "initiator-name", "-Q": "initiator-name",
    "--user": "user", "-u": "user",
    "--password": "password", "-p": "password",
}  # fmt: skip
_PARAM_ORDER = ("path", "bstype", "bsopts", "bsoflags", "blocksize", "targetname",
                "initiator-address", "initiator-name", "user", "password")  # fmt: skip
# Options that fill the request's fields.
_FIELDS = {"--tid": "tid", "-t": "tid", "--sid": "sid", "-s": "sid", "--cid": "cid",
           "-c": "cid", "--lun": "lun", "-l": "lun", "--control-port": "control",
           "-C": "control", "--lld": "lld", "-L": "lld", "--op": "op", "-o": "op",
           "--mode": "mode", "-m": "mode", "--name": "name", "-n": "name",
           "--value": "value", "-v": "value"}  # fmt: skip

# tgtadm_strerror() of tgt 1.0.85, by error code.
MESSAGES = (
    "success", "unknown error", "out of memory", "can't find the driver",
    "can't find the target", "can't find the logical unit", "can't find the session",
    "can't find the connection", "can't find the binding", "this target already exists",
    "this logical unit number already exists", "this binding already exists",
    "this access control rule already exists", "this access control rule does not exist",
    "this account already exists", "can't find the account", "too many accounts",
    "invalid request", "this target already has an outgoing account",
    "this target is still active", "this logical unit is still active",
    "this driver is busy", "this operation isn't supported", "unknown parameter",
    "this device has Prevent Removal set",
)  # fmt: skip


class BadCommand(ValueError):
    """A command line this runner does not translate (tgtadm would refuse it too)."""


@dataclass
class Request:
    """One management request, as tgtadm would build it from its command line."""

    mode: int
    op: int
    lld: str = ""
    tid: int = NO_TID
    sid: int = 0
    lun: int = UINT64_MAX
    cid: int = 0
    outgoing: bool = False
    force: bool = False
    control: int = 0
    name_value: tuple[str, str] | None = None
    params: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        parts = [f"{self.name_value[0]}={self.name_value[1]}"] if self.name_value else []
        parts += [f"{key}={self.params[key]}" for key in _PARAM_ORDER if key in self.params]
        # tgtadm counts the string's NUL, and sends nothing when there are no parameters.
        text = (",".join(parts).encode() + b"\0") if parts else b""
        header = _REQUEST.pack(
            self.mode, self.op, self.lld.encode()[:LLD_LEN], _REQUEST.size + len(text),
            self.tid, self.sid, self.lun, self.cid, 0, 0, int(self.outgoing), 0,
            int(self.force),
        )  # fmt: skip
        return header + text


def parse(argv: Sequence[str]) -> Request:
    """The request for a tgtadm command line (argv[0] is ``tgtadm``)."""
    values: dict[str, str] = {}
    flags: set[str] = set()
    params: dict[str, str] = {}
    args = list(argv[1:])
    i = 0
    while i < len(args):
        arg = args[i]
        if "=" in arg and arg.startswith("--"):
            arg, value = arg.split("=", 1)
            args[i + 1 : i + 1] = [value]
        if arg in ("--force", "-F", "--outgoing", "-O"):
            flags.add("force" if arg in ("--force", "-F") else "outgoing")
            i += 1
            continue
        if i + 1 >= len(args):
            raise BadCommand(f"option {arg} needs a value")
        value = args[i + 1]
        if arg in _PARAMS:
            params[_PARAMS[arg]] = value
        elif arg in _FIELDS:
            values[_FIELDS[arg]] = value
        else:
            raise BadCommand(f"unsupported option {arg}")
        i += 2
    try:
        request = Request(mode=_MODES[values["mode"]], op=_OPS[values["op"]],
                          lld=values.get("lld", ""), force="force" in flags,
                          outgoing="outgoing" in flags, params=params)
        for key in ("tid", "sid", "lun", "cid", "control"):
            if key in values:
                setattr(request, key, int(values[key]))
    except KeyError as e:
        raise BadCommand(f"missing or unknown operation/mode: {e}") from None
    except ValueError as e:
        raise BadCommand(str(e)) from None
    if "name" in values or "value" in values:
        request.name_value = (values.get("name", ""), values.get("value", ""))
    return request


class TgtdSocketRunner:
    """A Runner (see tgtadm.py): runs tgtadm command lines over tgtd's socket itself."""

    def __init__(self, timeout: float = 30, socket_dir: Path = SOCKET_DIR) -> None:
        self._timeout = timeout
        self._dir = socket_dir

    def __call__(self, argv: Sequence[str]) -> tuple[int, str, str]:
        try:
            request = parse(argv)
        except BadCommand as e:
            return REFUSED, "", f"tgtadm: {e}\n"
        path = self._dir / f"socket.{request.control}"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(self._timeout)
                conn.connect(str(path))
                conn.sendall(request.encode())
                err, length = _RESPONSE.unpack(_receive(conn, _RESPONSE.size))
                text = _receive(conn, length - _RESPONSE.size) if length > _RESPONSE.size else b""
        except TimeoutError:
            return -1, "", f"tgtd at {path} did not answer within {self._timeout:g} s"
        except OSError as e:
            gone = e.errno in (errno.ENOENT, errno.ECONNREFUSED)
            what = "can't connect to the tgt daemon" if gone else "tgt daemon connection failed"
            return -1, "", f"{what} at {path}: {e.strerror or e}"
        if err:
            message = MESSAGES[err] if err < len(MESSAGES) else "(unknown tgtadm_errno)"
            return REFUSED, "", f"tgtadm: {message}\n"
        # tgtd's text ends with a NUL, which tgtadm's fputs() does not print.
        return 0, text.partition(b"\0")[0].decode(errors="replace"), ""


def _receive(conn: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError(errno.ECONNRESET, "tgtd closed the connection mid-answer")
        data += chunk
    return bytes(data)
