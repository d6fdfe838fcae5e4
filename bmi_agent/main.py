"""The agent: network, inventory, registration, boot plan, attach, start the OS.

Runs as PID 1 of the initramfs (the image's /init execs it), so it never simply exits:
it ends by starting the OS -- kexec into the image's own kernel when it has one
(os_kernel.py), else switch_root into its init under the agent's kernel --, by
rebooting, or in a rescue shell on the console. Every step is printed to the console as
``bmi-agent: ...`` with the seconds since the kernel started.
"""

from __future__ import annotations

import enum
import fnmatch
import logging
import os
import random
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence

from bmi.v1 import boot_pb2

from .attach import Attacher, IscsiLogin, StepFailed
from .client import BootClient, ServerRefused, TokenRejected
from .cmdline import AgentConfig, CmdlineError, parse_cmdline
from .inventory import Collector, collect, load_plugins
from .kexec import Kexec, KexecFailed, SyscallKexec
from .network import Network
from .os_kernel import (
    NoUsableKernel,
    command_line,
    find_os_kernel,
    initrd_with_config,
    iscsi_config,
)
from .runner import CommandFailed, Runner, SubprocessRunner
from .sysroot import SysRoot

log = logging.getLogger("bmi_agent")

MODULES_FILE = "/etc/bmi/modules"
OS_INITRD = "/tmp/bmi-os-initrd"  # the image's initramfs + its iSCSI settings, in RAM
TOKEN_REJECTED_REBOOT_SECONDS = 30
Phase = boot_pb2.AgentPhase


class Outcome(enum.Enum):
    PIVOTED = "pivoted"  # only seen when the runner does not really exec (tests)
    SHELL = "shell"
    REBOOT = "reboot"


def uptime(root: SysRoot) -> float:
    try:
        return float(root.read("/proc/uptime").split()[0])
    except (ValueError, IndexError):
        return 0.0


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        runner: Runner,
        client: BootClient,
        root: SysRoot,
        *,
        sleep: Callable[[float], None] = time.sleep,
        collectors: Sequence[Collector] | None = None,
        network: Network | None = None,
        attacher: Attacher | None = None,
        kexec: Kexec | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self._run = runner
        self._client = client
        self._root = root
        self._sleep = sleep
        self._collectors = collectors
        self._network = network or Network(runner, root, sleep=sleep)
        self._attacher = attacher or Attacher(runner, root, sleep=sleep)
        self._kexec = kexec or SyscallKexec()
        self._say = say or (lambda text: print(text, flush=True))

    def say(self, text: str) -> None:
        self._say(f"bmi-agent: [{uptime(self._root):7.2f}] {text}")

    def run(self) -> Outcome:
        """Everything from modules to pivot; returns what to do when it did not pivot."""
        try:
            self.say("started")
            self.load_modules()
            self.say("modules loaded")
            nic = self._network.up(self.config.boot_mac)
            self.say(f"network up on {nic}")
            inventory = collect(self._root, self._collectors)
            registered = self._client.register(inventory)
            self.say(
                f"registered as {registered.name} ({registered.node_id}): "
                f"{inventory.cpu.count} CPUs, {inventory.memory.physical_bytes >> 20} MiB, "
                f"{len(inventory.interfaces)} NICs, {len(inventory.block_devices)} disks"
            )
            plan = self.wait_for_plan(max(registered.heartbeat_seconds, 1))
        except TokenRejected as exc:
            self.say(f"the server refused this boot's token ({exc}); rebooting for a new one")
            self._sleep(TOKEN_REJECTED_REBOOT_SECONDS)
            return Outcome.REBOOT
        except (StepFailed, CommandFailed, ServerRefused) as exc:
            self.say(f"cannot go on: {exc}")
            return Outcome.SHELL
        if plan.action == boot_pb2.BOOT_PLAN_ACTION_REBOOT:
            self.say(f"the server says reboot: {plan.reason}")
            return Outcome.REBOOT
        return self.attach_and_pivot(plan)

    def load_modules(self) -> None:
        """The image's boot modules (network, iSCSI, disks, file system) by name, then the
        drivers of the PCI devices present (NICs of real machines) by their modalias."""
        names = [
            line.strip()
            for line in self._root.read(MODULES_FILE).splitlines()
            if line.strip() and not line.startswith("#")
        ]
        for name in names:
            self._modprobe(name)
        for name in self.coldplug_modules():  # asked after: the named ones are loaded now
            self._modprobe(name)

    def _modprobe(self, name: str) -> None:
        result = self._run.run(["modprobe", name], check=False)
        if not result.ok:
            self.say(f"modprobe {name} failed: {result.output.strip()}")

    def coldplug_modules(self) -> list[str]:
        """Modules of the image whose aliases match a PCI device and are not loaded yet."""
        release = self._root.read("/proc/sys/kernel/osrelease")
        aliases = [
            line.split()[1:3]
            for line in self._root.read(f"/lib/modules/{release}/modules.alias").splitlines()
            if line.startswith("alias pci:") and len(line.split()) == 3
        ]
        wanted: list[str] = []
        for device in self._root.listdir("/sys/bus/pci/devices"):
            modalias = self._root.read(f"/sys/bus/pci/devices/{device}/modalias")
            if not modalias:
                continue
            for pattern, module in aliases:
                # "pci:v<vendor>": compare the vendor before the (slow, under TCG) match.
                head = pattern[:13]
                if "*" not in head and head != modalias[:13]:
                    continue
                loaded = self._root.exists(f"/sys/module/{module}")
                if module not in wanted and not loaded and fnmatch.fnmatchcase(modalias, pattern):
                    wanted.append(module)
        return wanted

    def wait_for_plan(self, heartbeat_seconds: int) -> boot_pb2.BootPlan:
        """Ask for the plan; while it says WAIT, heartbeat (with jitter) and ask again."""
        said = ""
        while True:
            plan = self._client.boot_plan()
            if plan.action != boot_pb2.BOOT_PLAN_ACTION_WAIT:
                return plan
            if plan.reason != said:
                self.say(f"no plan yet: {plan.reason}; waiting")
                said = plan.reason
            waited, retry = 0.0, max(plan.retry_after_seconds, heartbeat_seconds)
            while waited < retry:
                pause = heartbeat_seconds * random.uniform(0.8, 1.2)
                self._sleep(pause)
                waited += pause
                try:
                    beat = self._client.heartbeat()
                except ServerRefused as exc:
                    self.say(f"heartbeat failed: {exc}")
                    continue
                heartbeat_seconds = max(beat.heartbeat_seconds, 1)
                if beat.plan_ready:
                    break

    def attach_and_pivot(self, plan: boot_pb2.BootPlan) -> Outcome:
        target = plan.target
        login = IscsiLogin(
            portals=tuple(target.portals),
            iqn=target.iqn,
            lun=target.lun or 1,
            initiator_iqn=target.initiator_iqn,
            chap_user=target.chap_user,
            chap_secret=target.chap_secret,
        )
        attempts = max(plan.attach_attempts, 1)
        for attempt in range(1, attempts + 1):
            try:
                self._attempt(plan, login, attempt)
                return Outcome.PIVOTED
            except TokenRejected as exc:
                self.say(f"the server refused this boot's token ({exc}); rebooting")
                return Outcome.REBOOT
            except (StepFailed, CommandFailed, ServerRefused) as exc:
                retry = attempt < attempts
                self.say(f"attempt {attempt} of {attempts} failed: {exc}")
                self._attacher.unmount_root()
                try:
                    self._client.report(
                        Phase.AGENT_PHASE_FAILED,
                        str(exc),
                        attempt=attempt,
                        will_retry=retry,
                    )
                except (ServerRefused, TokenRejected) as report_error:
                    self.say(f"could not report the failure: {report_error}")
                if retry:
                    self._sleep(max(plan.retry_delay_seconds, 0))
        if plan.on_failure == boot_pb2.FAILURE_POLICY_REBOOT:
            return Outcome.REBOOT
        return Outcome.SHELL

    def _attempt(self, plan: boot_pb2.BootPlan, login: IscsiLogin, attempt: int) -> None:
        def report(phase: int, detail: str) -> None:
            self.say(f"{boot_pb2.AgentPhase.Name(phase).removeprefix('AGENT_PHASE_')}: {detail}")
            self._client.report(phase, detail, attempt=attempt)

        portal = self._attacher.login(
            login, lambda p: report(Phase.AGENT_PHASE_ATTACHING, f"{login.iqn} via {p}")
        )
        disk = self._attacher.wait_for_disk(login.iqn, login.lun)
        report(Phase.AGENT_PHASE_ATTACHED, f"LUN {login.lun} of {login.iqn} is {disk} ({portal})")
        init = plan.init or "/sbin/init"
        device = self._attacher.mount_os_root(
            disk, plan.root.partition, init, plan.root.fs_type, plan.root.mount_options
        )
        report(Phase.AGENT_PHASE_MOUNTED, f"{device} on {self._attacher.new_root}")
        try:
            os_kernel = find_os_kernel(self._root.path(self._attacher.new_root))
        except NoUsableKernel as exc:
            raise StepFailed(str(exc)) from None
        if os_kernel is None:  # no kernel of its own (the busybox test OS): same kernel
            report(Phase.AGENT_PHASE_PIVOTING, f"switch_root into {init} on {device}")
            self._client.close()
            self._attacher.pivot(init, list(plan.kernel_args))
            return
        self._start_os_kernel(os_kernel, plan, login, portal, report, device)

    def _start_os_kernel(self, os_kernel, plan, login, portal, report, device) -> None:
        """kexec into the image's own kernel, which logs in to the target again."""
        try:
            config = iscsi_config(login, portal)
        except NoUsableKernel as exc:
            raise StepFailed(str(exc)) from None
        initrd = self._root.path(OS_INITRD)
        initrd.parent.mkdir(parents=True, exist_ok=True)
        initrd.write_bytes(initrd_with_config(os_kernel.initrd.read_bytes(), config))
        os.chmod(initrd, 0o600)
        consoles = [a for a in self._root.read("/proc/cmdline").split()
                    if a.startswith("console=")]
        line = command_line(os_kernel, [*consoles, *plan.kernel_args])
        try:
            self._kexec.load(os_kernel.kernel, initrd, line)
        except KexecFailed as exc:
            raise StepFailed(f"cannot load the image's kernel {os_kernel.version}: {exc}") from None
        report(Phase.AGENT_PHASE_PIVOTING,
               f"kexec into the image's kernel {os_kernel.version} (root on {device})")
        self._client.close()
        self._attacher.unmount_root()
        try:
            self._kexec.execute()
        except KexecFailed as exc:
            raise StepFailed(str(exc)) from None


def rescue_shell(say: Callable[[str], None]) -> None:
    """A shell on the console for the operator, respawned when it exits (PID 1 must live)."""
    while True:
        say("bmi-agent: rescue shell (exit for a new one; 'reboot -f' to reboot)")
        try:
            subprocess.call(["setsid", "cttyhack", "sh", "-l"])
        except OSError:
            time.sleep(60)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="bmi-agent: %(levelname)s %(message)s")
    root = SysRoot("/")
    runner = SubprocessRunner()
    say = print
    outcome = Outcome.SHELL
    try:
        config: AgentConfig = parse_cmdline(root.read("/proc/cmdline"))
        if config.debug:
            logging.getLogger().setLevel(logging.DEBUG)
        for problem in load_plugins():
            log.warning("%s", problem)
        client = BootClient(config)
        outcome = Agent(config, runner, client, root).run()
    except CmdlineError as exc:
        say(f"bmi-agent: {exc}")
    except Exception:
        say("bmi-agent: crashed:\n" + traceback.format_exc())
    sys.stdout.flush()
    if os.getpid() != 1:  # run by hand, not as init: just report
        sys.exit(0 if outcome is Outcome.PIVOTED else 1)
    if outcome is Outcome.REBOOT:
        runner.run(["sync"], check=False)
        runner.run(["reboot", "-f"], check=False)
    rescue_shell(say)
