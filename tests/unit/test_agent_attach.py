"""The agent's attach-and-pivot and its conversation with the server, on a recording
command runner and a scripted BootService: the exact commands, never run."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import grpc
import pytest
from bmi.v1 import boot_pb2

from bmi_agent.attach import Attacher, IscsiLogin, StepFailed
from bmi_agent.client import (
    TOKEN_METADATA,
    BootClient,
    ServerRefused,
    TokenRejected,
    retry_after,
)
from bmi_agent.cmdline import AgentConfig, CmdlineError, parse_cmdline
from bmi_agent.inventory import GenericCollector
from bmi_agent.main import Agent, Outcome
from bmi_agent.network import Network
from bmi_agent.runner import CommandFailed, Result, SubprocessRunner, masked
from bmi_agent.sysroot import SysRoot

FIXTURES = Path(__file__).parent / "agent_fixtures"
IQN = "iqn.2026-11.org.moc.bmi:dsk-3f2a9c0d1e4b5a67"
INITIATOR = "iqn.2026-11.org.moc.bmi.node:node-0123456789abcdef"
SECRET = "s3cr3t-chap-pass"
MAC = "52:54:00:a6:00:01"
P = boot_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


class FakeKernel:
    """Records commands; plays the kernel's part (sessions, disks, mounts) in a tree."""

    def __init__(self, base: Path, *, failing_portals=(), lun: int = 1, mount_ok=True):
        self.base = base
        self.calls: list[list[str]] = []
        self.execs: list[list[str]] = []
        self.failing = set(failing_portals)
        self.lun = lun
        self.mount_ok = mount_ok
        self.sessions = 0

    def run(self, argv, *, timeout=60, check=True, secrets=()):
        argv = list(argv)
        self.calls.append(argv)
        result = Result(0, "")
        if argv[0] == "modprobe":
            (self.base / "sys" / "module" / argv[1]).mkdir(parents=True, exist_ok=True)
        if argv[0] == "iscsistart":
            host, port = argv[argv.index("-a") + 1], argv[argv.index("-p") + 1]
            portal = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            if portal in self.failing:
                result = Result(
                    8, "iscsistart: initiator reported error (8 - connection timed out)"
                )
            else:
                self._login(argv[argv.index("-t") + 1])
        elif argv[:2] == ["mount", "-t"] or argv[:2] == ["mount", "-o"]:
            if not self.mount_ok:
                result = Result(
                    255, "mount: mounting /dev/sda on /newroot failed: Invalid argument"
                )
            else:
                for folder in ("sbin", "dev", "proc", "sys"):
                    (self.base / "newroot" / folder).mkdir(parents=True, exist_ok=True)
                (self.base / "newroot" / "sbin" / "init").write_text("#!/bin/sh\n")
        if check and not result.ok:
            raise CommandFailed(argv, result)
        return result

    def exec(self, argv):
        self.execs.append(list(argv))

    def _login(self, iqn: str) -> None:
        self.sessions += 1
        sessions = self.base / "sys" / "class" / "iscsi_session"
        (sessions / "session1").mkdir(parents=True)
        (sessions / "session1" / "targetname").write_text(iqn + "\n")
        device = self.base / f"sys/devices/platform/host2/session1/target2:0:0/2:0:0:{self.lun}"
        (device / "block" / "sda").mkdir(parents=True)
        (self.base / "sys" / "block").mkdir(parents=True, exist_ok=True)
        os.symlink(device / "block" / "sda", self.base / "sys" / "block" / "sda")
        (self.base / "dev").mkdir(exist_ok=True)
        (self.base / "dev" / "sda").touch()


@pytest.fixture
def machine(tmp_path) -> Path:
    """The QEMU node's /proc and /sys, writable."""
    base = tmp_path / "machine"
    shutil.copytree(FIXTURES / "qemu-pc", base, symlinks=True)
    return base


def login(*portals: str) -> IscsiLogin:
    return IscsiLogin(portals, IQN, 1, INITIATOR, "bmi-dsk-3f2a9c0d1e4b5a67", SECRET)


def iscsistart(portal: str) -> list[str]:
    host, port = portal.rsplit(":", 1)
    return ["iscsistart", "-i", INITIATOR, "-t", IQN, "-g", "1", "-a", host, "-p", port,
            "-u", "bmi-dsk-3f2a9c0d1e4b5a67", "-w", SECRET,
            "-P", "node.session.timeo.replacement_timeout=300"]  # fmt: skip


def test_login_tries_each_portal_with_chap(machine):
    kernel = FakeKernel(machine, failing_portals={"10.0.0.1:3260"})
    clock = Clock()
    attacher = Attacher(kernel, SysRoot(machine), sleep=clock.sleep, clock=clock)
    tried = []
    assert attacher.login(login("10.0.0.1:3260", "10.0.2.2:3261"), tried.append) == (
        "10.0.2.2:3261"
    )
    assert tried == ["10.0.0.1:3260", "10.0.2.2:3261"]
    assert kernel.calls == [iscsistart("10.0.0.1:3260"), iscsistart("10.0.2.2:3261")]
    # The session exists now: a retry logs in no second time.
    assert attacher.login(login("10.0.2.2:3261"), tried.append) == "10.0.2.2:3261"
    assert kernel.sessions == 1
    assert attacher.wait_for_disk(IQN, 1) == "/dev/sda"


def test_login_failure_names_every_portal_but_no_secret(machine):
    kernel = FakeKernel(machine, failing_portals={"10.0.0.1:3260", "[fd00::2]:3260"})
    attacher = Attacher(kernel, SysRoot(machine))
    with pytest.raises(StepFailed) as failed:
        attacher.login(login("10.0.0.1:3260", "[fd00::2]:3260"), lambda p: None)
    assert "10.0.0.1:3260" in str(failed.value) and "[fd00::2]:3260" in str(failed.value)
    assert SECRET not in str(failed.value)
    assert kernel.calls[1][kernel.calls[1].index("-a") + 1] == "fd00::2"  # no brackets
    with pytest.raises(StepFailed, match="no portal"):
        attacher.login(login(), lambda p: None)


def test_waiting_for_a_lun_that_never_appears_times_out(machine):
    kernel = FakeKernel(machine, lun=0)
    clock = Clock()
    attacher = Attacher(kernel, SysRoot(machine), sleep=clock.sleep, clock=clock,
                        device_timeout=5)  # fmt: skip
    attacher.login(login("10.0.2.2:3260"), lambda p: None)
    with pytest.raises(StepFailed, match=r"no block device for LUN 1 .* after 5s \(no LUN 1\)"):
        attacher.wait_for_disk(IQN, 1)
    assert 4.9 < sum(clock.slept) < 5.5
    with pytest.raises(StepFailed, match="no session"):
        attacher.wait_for_disk("iqn.2026-11.org.moc.bmi:other", 1)


def test_root_partitions_and_the_pivot(machine):
    kernel = FakeKernel(machine)
    clock = Clock()
    attacher = Attacher(kernel, SysRoot(machine), sleep=clock.sleep, clock=clock)
    assert attacher.root_device("/dev/sda", 0) == "/dev/sda"
    for disk, part in (("sda", "sda2"), ("nvme0n1", "nvme0n1p2")):
        (machine / "sys" / "block" / disk / part).mkdir(parents=True)
        (machine / "dev" / part).parent.mkdir(exist_ok=True)
        (machine / "dev" / part).touch()
        assert attacher.root_device(f"/dev/{disk}", 2) == f"/dev/{part}"
    with pytest.raises(StepFailed, match="no partition 3"):
        attacher.root_device("/dev/sda", 3)
    attacher.mount_root("/dev/sda", "ext4", "")
    attacher.check_init("/sbin/init")
    with pytest.raises(StepFailed, match="no /sbin/systemd"):
        attacher.check_init("/sbin/systemd")
    kernel.calls.clear()
    attacher.pivot("/sbin/init", ["quiet", "systemd.unit=multi-user.target"])
    # /run is not in the new root: not moved. busybox's switch_root moves nothing itself.
    assert kernel.calls == [
        ["mount", "--move", m, f"/newroot{m}"] for m in ("/dev", "/proc", "/sys")
    ]
    assert kernel.execs == [
        ["switch_root", "/newroot", "/sbin/init", "quiet", "systemd.unit=multi-user.target"]
    ]


# -- the whole agent ----------------------------------------------------------------------


class FakeServer:
    """BootService as the agent sees it through BootClient."""

    def __init__(self, plans, *, beats=(), fail_on=None):
        self.plans = list(plans)
        self.beats = list(beats)
        self.fail_on = fail_on or {}
        self.reports: list[tuple[str, str, int, bool]] = []
        self.registered = None
        self.closed = False

    def register(self, inventory, attempts=0):
        if "register" in self.fail_on:
            raise self.fail_on["register"]
        self.registered = inventory
        return P.RegisterResponse(node_id="node-0123456789abcdef", name="n1", heartbeat_seconds=2)

    def boot_plan(self, attempts=0):
        return self.plans.pop(0)

    def heartbeat(self, attempts=3):
        return self.beats.pop(0)

    def report(self, phase, detail="", *, attempt=0, will_retry=False, attempts=5):
        name = P.AgentPhase.Name(phase).removeprefix("AGENT_PHASE_")
        self.reports.append((name, detail, attempt, will_retry))
        if name in self.fail_on:
            raise self.fail_on[name]

    def close(self):
        self.closed = True


def attach_plan(attempts=2, on_failure=P.FAILURE_POLICY_SHELL) -> P.BootPlan:
    return P.BootPlan(
        action=P.BOOT_PLAN_ACTION_ATTACH,
        target=P.IscsiLogin(portals=["10.0.2.2:3260"], iqn=IQN, lun=1, initiator_iqn=INITIATOR,
                            chap_user="bmi-dsk-3f2a9c0d1e4b5a67", chap_secret=SECRET),
        root=P.RootDeviceHint(partition=0, fs_type="ext4"),
        init="/sbin/init",
        attach_attempts=attempts,
        retry_delay_seconds=7,
        on_failure=on_failure,
    )  # fmt: skip


def make_agent(machine, server, kernel, clock, kexec=None):
    config = AgentConfig("10.0.2.2:50051", "node-0123456789abcdef", "tok", boot_mac=MAC)
    root = SysRoot(machine, machine="x86_64")
    return Agent(
        config,
        kernel,
        server,
        root,
        sleep=clock.sleep,
        collectors=[GenericCollector()],
        network=Network(kernel, root, sleep=clock.sleep, clock=clock),
        attacher=Attacher(kernel, root, sleep=clock.sleep, clock=clock),
        kexec=kexec,
        say=lambda text: None,
    )


def test_agent_boots_the_plan_and_reports_every_phase(machine):
    kernel, clock = FakeKernel(machine), Clock()
    server = FakeServer([attach_plan()])
    assert make_agent(machine, server, kernel, clock).run() is Outcome.PIVOTED
    assert server.registered.macs() == [MAC] and server.registered.cpu.count == 2
    assert kernel.calls == [
        ["modprobe", m]
        for m in ("virtio_pci", "virtio_net", "crc32c_generic", "sd_mod", "iscsi_tcp", "ext4")
    ] + [
        ["ip", "link", "set", "dev", "eth0", "up"],
        ["udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "5", "-T", "2",
         "-s", "/etc/bmi/udhcpc.script"],
        iscsistart("10.0.2.2:3260"),
        ["mkdir", "-p", "/newroot"],
        ["mount", "-t", "ext4", "-o", "rw", "/dev/sda", "/newroot"],
        ["mount", "--move", "/dev", "/newroot/dev"],
        ["mount", "--move", "/proc", "/newroot/proc"],
        ["mount", "--move", "/sys", "/newroot/sys"],
    ]  # fmt: skip
    assert kernel.execs == [["switch_root", "/newroot", "/sbin/init"]]
    assert [(r[0], r[2]) for r in server.reports] == [
        ("ATTACHING", 1), ("ATTACHED", 1), ("MOUNTED", 1), ("PIVOTING", 1)
    ]  # fmt: skip
    assert "/dev/sda" in server.reports[1][1] and server.closed


def test_drivers_of_the_pci_devices_present_are_loaded(machine, tmp_path):
    clock = Clock()
    agent = make_agent(machine, FakeServer([]), FakeKernel(machine), clock)
    assert agent.coldplug_modules() == ["virtio_pci"]  # the IDE and host bridges: no driver
    (machine / "sys" / "module" / "virtio_pci").mkdir(parents=True)
    assert agent.coldplug_modules() == []  # loaded already
    dell = tmp_path / "dell"
    shutil.copytree(FIXTURES / "dell-r640", dell, symlinks=True)
    kernel = FakeKernel(dell)
    make_agent(dell, FakeServer([]), kernel, clock).load_modules()
    # Both Broadcom ports want bnxt_en, once; the RAID controller has no module here.
    assert kernel.calls == [["modprobe", "bnxt_en"]]


def test_failures_are_reported_retried_and_end_at_a_shell(machine):
    kernel, clock = FakeKernel(machine, mount_ok=False), Clock()
    server = FakeServer([attach_plan(attempts=3)])
    assert make_agent(machine, server, kernel, clock).run() is Outcome.SHELL
    failed = [r for r in server.reports if r[0] == "FAILED"]
    assert [(r[2], r[3]) for r in failed] == [(1, True), (2, True), (3, False)]
    assert all("cannot mount /dev/sda" in r[1] for r in failed)
    assert clock.slept.count(7) == 2  # the plan's delay between attempts
    assert kernel.sessions == 1  # later attempts reuse the session
    assert kernel.calls.count(["umount", "/newroot"]) == 3
    assert kernel.execs == []


def test_the_plan_may_say_reboot_after_the_last_failure(machine):
    kernel, clock = FakeKernel(machine, failing_portals={"10.0.2.2:3260"}), Clock()
    server = FakeServer([attach_plan(attempts=1, on_failure=P.FAILURE_POLICY_REBOOT)])
    assert make_agent(machine, server, kernel, clock).run() is Outcome.REBOOT
    assert [r[0] for r in server.reports] == ["ATTACHING", "FAILED"]
    assert "connection timed out" in server.reports[-1][1]


def test_no_pivot_when_the_server_refuses_it(machine):
    refusal = ServerRefused(grpc.StatusCode.FAILED_PRECONDITION, "node is deprovisioning")
    kernel, clock = FakeKernel(machine), Clock()
    server = FakeServer([attach_plan(attempts=1)], fail_on={"PIVOTING": refusal})
    assert make_agent(machine, server, kernel, clock).run() is Outcome.SHELL
    assert kernel.execs == [] and server.reports[-1][0] == "FAILED"
    assert "deprovisioning" in server.reports[-1][1]


def test_waits_with_heartbeats_until_a_plan_is_ready(machine):
    kernel, clock = FakeKernel(machine), Clock()
    wait = P.BootPlan(action=P.BOOT_PLAN_ACTION_WAIT, reason="waiting", retry_after_seconds=60)
    beats = [P.HeartbeatResponse(plan_ready=False, heartbeat_seconds=2)] * 3 + [
        P.HeartbeatResponse(plan_ready=True, heartbeat_seconds=2)
    ]
    server = FakeServer([wait, attach_plan()], beats=beats)
    assert make_agent(machine, server, kernel, clock).run() is Outcome.PIVOTED
    assert server.beats == [] and len(clock.slept) == 4
    assert all(1.6 <= s <= 2.4 for s in clock.slept)  # heartbeat with jitter


def test_reboot_plans_and_rejected_tokens_reboot(machine):
    clock = Clock()
    reboot = P.BootPlan(action=P.BOOT_PLAN_ACTION_REBOOT, reason="sanboot now")
    outcome = make_agent(machine, FakeServer([reboot]), FakeKernel(machine), clock).run()
    assert outcome is Outcome.REBOOT
    server = FakeServer([], fail_on={"register": TokenRejected("expired")})
    assert make_agent(machine, server, FakeKernel(machine), clock).run() is Outcome.REBOOT


def test_no_boot_nic_stops_at_a_shell(machine):
    kernel, clock = FakeKernel(machine), Clock()
    agent = make_agent(machine, FakeServer([]), kernel, clock)
    agent.config = AgentConfig("10.0.2.2:50051", "node-0123456789abcdef", "t", "52:54:00:00:00:09")
    assert agent.run() is Outcome.SHELL
    assert not any(c[0] == "udhcpc" for c in kernel.calls)


# -- command line, runner, client ---------------------------------------------------------


def test_cmdline():
    config = parse_cmdline(
        "BOOT_IMAGE=vmlinuz initrd=initrd console=ttyS0 quiet bmi.server=10.0.2.2:50051 "
        "bmi.node=node-0123456789abcdef bmi.token=Zm9v_YmFy-1 BOOTIF=01-52-54-00-A6-00-01"
    )
    assert config == AgentConfig("10.0.2.2:50051", "node-0123456789abcdef", "Zm9v_YmFy-1",
                                 MAC)  # fmt: skip
    assert "Zm9v" not in repr(config)
    for bad in ("bmi.server=h:1 bmi.node=n", "bmi.server=h bmi.node=n bmi.token=t",
                "bmi.server=h:1 bmi.node=n bmi.token=t BOOTIF=52:54:00:a6:00:01"):  # fmt: skip
        with pytest.raises(CmdlineError):
            parse_cmdline(bad)


def test_cmdline_tls_ca_and_unreadable_ca(tmp_path):
    config = parse_cmdline("bmi.server=h:1 bmi.node=n bmi.token=t bmi.ca=/etc/bmi/ca.pem")
    assert config.ca_file == "/etc/bmi/ca.pem"
    assert parse_cmdline("bmi.server=h:1 bmi.node=n bmi.token=t").ca_file == ""
    missing = AgentConfig("h:1", "n", "t", ca_file=str(tmp_path / "ca.pem"))
    with pytest.raises(CmdlineError, match=r"bmi\.ca .*ca\.pem: No such file"):
        BootClient(missing)


def test_runner_reports_failures_and_masks_secrets(caplog):
    runner = SubprocessRunner()
    assert runner.run(["sh", "-c", "echo hi"]).output == "hi\n"
    with pytest.raises(CommandFailed, match="exited with 3: oops"):
        runner.run(["sh", "-c", "echo oops >&2; exit 3"])
    assert runner.run(["no-such-command-bmi"], check=False).returncode == 127
    assert runner.run(["sleep", "5"], timeout=0.2, check=False).returncode == 124
    with caplog.at_level(logging.DEBUG, logger="bmi_agent.runner"):
        runner.run(["echo", "-w", SECRET], secrets=[SECRET])
    assert SECRET not in caplog.text and "-w ***" in caplog.text
    assert masked(["a", "", "b"], [""]) == "a  b"


class RpcError(grpc.RpcError):
    def __init__(self, code, trailing=()):
        self._code = code
        self._trailing = trailing

    def code(self):
        return self._code

    def trailing_metadata(self):
        return self._trailing

    def details(self):
        return f"{self._code.name} for a test"


def scripted_client(answers: list) -> tuple[BootClient, list[float], list]:
    """A BootClient whose Heartbeat gives ``answers`` in turn (raising the errors among
    them), with the sleeps it took and the (node id, metadata) of each call."""
    config = AgentConfig("127.0.0.1:9", "node-0123456789abcdef", "tok-1")
    slept: list[float] = []
    calls: list = []
    client = BootClient(config, sleep=slept.append)

    def heartbeat(request, metadata, timeout):
        calls.append((request.node_id, metadata))
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    client._stub.Heartbeat = heartbeat
    return client, slept, calls


def test_client_sends_the_token_and_retries_only_transient_errors():
    answers = [RpcError(grpc.StatusCode.UNAVAILABLE), RpcError(grpc.StatusCode.UNAVAILABLE),
               P.HeartbeatResponse(plan_ready=True)]  # fmt: skip
    client, slept, calls = scripted_client(answers)
    assert client.heartbeat(attempts=0).plan_ready
    assert calls == [("node-0123456789abcdef", ((TOKEN_METADATA, "tok-1"),))] * 3
    assert len(slept) == 2
    answers[:] = [RpcError(grpc.StatusCode.UNAUTHENTICATED)]
    with pytest.raises(TokenRejected):
        client.heartbeat()
    answers[:] = [RpcError(grpc.StatusCode.PERMISSION_DENIED)]
    with pytest.raises(ServerRefused, match="PERMISSION_DENIED"):
        client.heartbeat()
    answers[:] = [RpcError(grpc.StatusCode.UNAVAILABLE)] * 3
    with pytest.raises(ServerRefused, match="UNAVAILABLE"):
        client.heartbeat(attempts=3)
    client.close()


def test_client_waits_as_long_as_a_busy_server_asks_with_jitter():
    busy = RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after-ms", "400"),))
    client, slept, _ = scripted_client([busy, busy, P.HeartbeatResponse(plan_ready=True)])
    assert client.heartbeat(attempts=0).plan_ready
    assert len(slept) == 2 and all(0.4 <= s <= 0.6 for s in slept)
    client.close()


@pytest.mark.parametrize(
    ("code", "trailing", "hint"),
    [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after-ms", "250"),), 0.25),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after-ms", "-5"),), 0.0),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after-ms", "9" * 40),), 60.0),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after-ms", "soon"),), None),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after-ms", "1e3"),), None),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, (), None),  # a quota refusal: no hint
        (grpc.StatusCode.UNAVAILABLE, (("retry-after-ms", "250"),), None),  # not busy
    ],
)
def test_retry_after_reads_only_a_busy_servers_hint_and_bounds_it(code, trailing, hint):
    """As bmi_client reads it (the agent imports no client code, so it has its own)."""
    from bmi_client.client import retry_after as clients_retry_after

    assert retry_after(RpcError(code, trailing)) == hint
    assert clients_retry_after(RpcError(code, trailing)) == hint


def test_client_backs_off_as_usual_when_a_busy_servers_hint_is_garbage():
    garbled = RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after-ms", "soon"),))
    client, slept, _ = scripted_client([garbled, P.HeartbeatResponse(plan_ready=True)])
    assert client.heartbeat(attempts=0).plan_ready
    assert len(slept) == 1 and 1.0 <= slept[0] <= 2.0  # the first step of the backoff
    client.close()


# -- a real image: its own kernel (kexec) -----------------------------------------------


class FakeKexec:
    def __init__(self):
        self.loaded = None
        self.executed = False

    def load(self, kernel, initrd, command_line):
        self.loaded = (kernel, initrd.read_bytes(), command_line)

    def execute(self):
        self.executed = True


class RealImageKernel(FakeKernel):
    """Like FakeKernel, with a partitioned disk whose largest partition holds a Debian
    root: kernel and initramfs behind absolute symlinks, fstab by UUID."""

    def _login(self, iqn):
        super()._login(iqn)
        for number, size in ((1, 2048), (2, 65536), (3, 4000000)):
            part = self.base / "sys" / "block" / "sda" / f"sda{number}"
            part.mkdir(parents=True)
            (part / "partition").write_text(f"{number}\n")
            (part / "size").write_text(f"{size}\n")
            (self.base / "dev" / f"sda{number}").touch()

    def run(self, argv, **kwargs):
        result = super().run(argv, **kwargs)
        if argv[:1] == ["mount"] and argv[-1] == "/newroot" and "--move" not in argv:
            root = self.base / "newroot"
            (root / "boot").mkdir(exist_ok=True)
            (root / "boot" / "vmlinuz-6.1.0-28-amd64").write_bytes(b"kernel")
            (root / "boot" / "initrd.img-6.1.0-28-amd64").write_bytes(b"INITRD!")
            for link, target in (("vmlinuz", "/boot/vmlinuz-6.1.0-28-amd64"),
                                 ("initrd.img", "boot/initrd.img-6.1.0-28-amd64")):
                if not (root / link).is_symlink():
                    os.symlink(target, root / link)
            (root / "etc").mkdir(exist_ok=True)
            (root / "etc" / "fstab").write_text(
                "# <file system> <mount point>\nUUID=5e1f-root / ext4 errors=remount-ro 0 1\n"
            )
        return result


def test_a_real_image_starts_on_its_own_kernel_and_logs_in_again(machine):
    kernel, clock, kexec = RealImageKernel(machine), Clock(), FakeKexec()
    (machine / "proc" / "cmdline").write_text(
        "BOOT_IMAGE=vmlinuz console=tty0 console=ttyS0,115200 quiet bmi.token=tok\n")
    server = FakeServer([attach_plan()])
    agent = make_agent(machine, server, kernel, clock, kexec)
    assert agent.run() is Outcome.PIVOTED
    assert ["mount", "-t", "ext4", "-o", "rw", "/dev/sda3", "/newroot"] in kernel.calls
    assert kernel.execs == []  # no switch_root: the image's userland needs its own kernel
    path, initrd, line = kexec.loaded
    assert path == machine / "newroot" / "boot" / "vmlinuz-6.1.0-28-amd64"
    assert line.split() == ["BOOT_IMAGE=/boot/vmlinuz-6.1.0-28-amd64", "root=UUID=5e1f-root",
                            "ro", "console=tty0", "console=ttyS0,115200"]
    assert SECRET not in line and "bmi.token" not in line
    assert initrd.startswith(b"INITRD!\0")  # the image's own initramfs, then ours
    config = initrd[initrd.index(b"etc/iscsi.initramfs"):]
    for value in (IQN, INITIATOR, "ISCSI_TARGET_IP='10.0.2.2'", "ISCSI_TARGET_PORT='3260'",
                  f"ISCSI_PASSWORD='{SECRET}'"):
        assert value.encode() in config
    assert kexec.executed and kernel.calls[-1] == ["umount", "/newroot"]
    assert [r[0] for r in server.reports][-1] == "PIVOTING"
    assert "6.1.0-28-amd64" in server.reports[-1][1] and server.closed


def test_an_image_without_its_initramfs_fails_with_the_reason(machine):
    class NoInitrd(RealImageKernel):
        def run(self, argv, **kwargs):
            result = super().run(argv, **kwargs)
            (self.base / "newroot" / "boot" / "initrd.img-6.1.0-28-amd64").unlink(missing_ok=True)
            return result

    kernel, clock = NoInitrd(machine), Clock()
    server = FakeServer([attach_plan(attempts=1)])
    agent = make_agent(machine, server, kernel, clock, FakeKexec())
    assert agent.run() is Outcome.SHELL
    assert "no /initrd.img" in next(r for r in server.reports if r[0] == "FAILED")[1]


def test_a_partitioned_disk_waits_for_its_partitions_and_a_retry_knows_its_portal(machine):
    """Right after login the kernel may not show a GPT disk's partitions yet: the agent
    waits for them instead of mounting the whole disk; a later attempt on the same
    session still knows which portal it went through (the OS logs in there again)."""
    kernel, clock = RealImageKernel(machine), Clock()
    attacher = Attacher(kernel, SysRoot(machine, machine="x86_64"), sleep=clock.sleep,
                        clock=clock)
    assert attacher.login(login("10.0.2.9:3260"), lambda p: None) == "10.0.2.9:3260"
    hidden = machine / "hidden"
    (machine / "sys" / "block" / "sda").rename(hidden)
    (machine / "sys" / "block" / "sda").mkdir()
    (machine / "dev" / "sda").write_bytes(b"\0" * 512 + b"EFI PART" + b"\0" * 504)
    real_sleep = clock.sleep

    def sleep_then_show(seconds):
        real_sleep(seconds)
        if len(clock.slept) == 3:  # the partition scan finishes
            for part in hidden.iterdir():
                part.rename(machine / "sys" / "block" / "sda" / part.name)

    attacher._sleep = sleep_then_show
    assert attacher.partitions_of("/dev/sda") == ["/dev/sda3", "/dev/sda2", "/dev/sda1"]
    assert len(clock.slept) == 3
    assert attacher.login(login("10.0.2.2:3260", "10.0.2.9:3260"), lambda p: None) == (
        "10.0.2.9:3260")  # the existing session's, not the plan's first


def test_a_whole_disk_file_system_is_not_waited_for(machine):
    kernel, clock = FakeKernel(machine), Clock()
    attacher = Attacher(kernel, SysRoot(machine, machine="x86_64"), sleep=clock.sleep,
                        clock=clock)
    attacher.login(login("10.0.2.2:3260"), lambda p: None)
    (machine / "dev" / "sda").write_bytes(b"\0" * 1024 + b"ext4 superblock")
    assert attacher.partitions_of("/dev/sda") == [] and clock.slept == []
