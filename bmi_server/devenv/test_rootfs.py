"""A tiny root file system for agent boot tests: its init says where it runs from.

An ext4 image (``mke2fs -d``: no root, no loop device) holding a static busybox and an
``/sbin/init`` that prints to the serial port::

    BMI-ROOT-MARKER id=<label> node=<bmi.node> pid=<its pid> root=<device of />

so a test sees that the agent's ``switch_root`` ran this init as PID 1 on the node's
iSCSI disk. Then it looks for its config drive, LUN 2 of the iSCSI target its root is
LUN 1 of, mounts it (vfat, read-only) as cloud-init would, and prints what its
``meta-data`` says::

    BMI-CONFIG-MARKER lun=<H:C:T:L> session=<its iSCSI session> root_session=<root's>
        label=<volume label in its boot sector> instance=<instance-id> hostname=<local-hostname>

(one line; ``BMI-CONFIG-MARKER none`` when there is no such LUN). It then idles (PID 1
must not exit).

    python -m bmi_server.devenv.test_rootfs OUT.img [--label GOLDEN] [--size-mib 16]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

MARKER_RE = re.compile(
    r"BMI-ROOT-MARKER id=(?P<label>\S+) node=(?P<node>\S*) pid=(?P<pid>\d+) root=(?P<root>\S*)"
)
CONFIG_RE = re.compile(
    r"BMI-CONFIG-MARKER lun=(?P<lun>\S*) session=(?P<session>\S*) "
    r"root_session=(?P<root_session>\S*) label=(?P<label>\S*) instance=(?P<instance>\S*) "
    r"hostname=(?P<hostname>\S*)"
)

INIT = """#!/bin/sh
# The OS of BMI's agent boot tests: say where we run, then idle as PID 1.
export PATH=/bin
mount -t proc proc /proc 2>/dev/null
node=$(sed -n 's/.*bmi\\.node=\\([^ ]*\\).*/\\1/p' /proc/cmdline)
root=$(awk '$2 == "/" && $1 != "rootfs" { print $1 }' /proc/mounts | tail -n 1)
echo "BMI-ROOT-MARKER id=$(cat /etc/bmi-label) node=$node pid=$$ root=$root" > /dev/ttyS0
# The config drive: LUN 2 of the target whose LUN 1 is the root (same iSCSI session).
session_of() { readlink -f "/sys/block/$1" | grep -o 'session[0-9]*' | head -n 1; }
root_session=$(session_of "${root#/dev/}")
drive=""
for try in 1 2 3 4 5 6 7 8 9 10; do
  for block in /sys/block/sd*; do
    lun=$(basename "$(readlink -f "$block/device")")
    case "$lun" in *:2) drive=${block##*/}; break 2 ;; esac
  done
  sleep 1
done
if [ -n "$drive" ]; then
  label=$(dd if="/dev/$drive" bs=1 skip=43 count=11 2>/dev/null | tr -d ' ')  # the BPB's
  mkdir -p /run/cidata
  mount -t vfat -o ro "/dev/$drive" /run/cidata
  meta=$(tr -d '\\n' < /run/cidata/meta-data)
  instance=$(echo "$meta" | sed -n 's/.*"instance-id": *"\\([^"]*\\)".*/\\1/p')
  host=$(echo "$meta" | sed -n 's/.*"local-hostname": *"\\([^"]*\\)".*/\\1/p')
  echo "BMI-CONFIG-MARKER lun=$lun session=$(session_of "$drive") root_session=$root_session" \\
    "label=$label instance=$instance hostname=$host" > /dev/ttyS0
else
  echo "BMI-CONFIG-MARKER none" > /dev/ttyS0
fi
while true; do sleep 3600; done
"""


# The OS of the tgtd fault test: the marker, then it hands its iSCSI session to iscsid
# (which re-logs in when the connection drops; iscsistart, which logged in, is gone) and
# writes, syncs and reads back a file on its disk every second, printing a counter and
# how many I/O errors the kernel has logged. A pause while tgtd is away is expected; an
# error is not.
IO_RE = re.compile(r"BMI-IO n=(?P<n>\d+) ok=(?P<ok>[01]) kernel_io_errors=(?P<errors>\d+)")
IO_INIT = """#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc 2>/dev/null
node=$(sed -n 's/.*bmi\\.node=\\([^ ]*\\).*/\\1/p' /proc/cmdline)
root=$(awk '$2 == "/" && $1 != "rootfs" { print $1 }' /proc/mounts | tail -n 1)
echo "BMI-ROOT-MARKER id=$(cat /etc/bmi-label) node=$node pid=$$ root=$root" > /dev/ttyS0
mkdir -p /etc/iscsi /var/lib/iscsi /run/lock/iscsi
echo "InitiatorName=$(cat /sys/class/iscsi_session/session*/initiatorname | head -n 1)" \\
  > /etc/iscsi/initiatorname.iscsi
echo "node.session.timeo.replacement_timeout = 300" > /etc/iscsi/iscsid.conf
/sbin/iscsid -f > /dev/ttyS0 2>&1 &
n=0
while true; do
  n=$((n + 1))
  ok=0
  if echo "$n" > /io-counter && sync && echo 3 > /proc/sys/vm/drop_caches \\
      && [ "$(cat /io-counter)" = "$n" ]; then ok=1; fi
  errors=$(dmesg | grep -ci 'i/o error')
  echo "BMI-IO n=$n ok=$ok kernel_io_errors=$errors" > /dev/ttyS0
  sleep 1
done
"""


def build_root_fs(
    path: Path,
    busybox: Path,
    label: str = "GOLDEN",
    size_mib: int = 16,
    *,
    init: str = INIT,
    extra_trees: tuple[Path, ...] = (),
) -> Path:
    """Write an ext4 image of ``size_mib`` MiB with busybox and ``init`` (the marker init
    by default); ``extra_trees`` are copied in (e.g. ``agent_image.iscsid_tree()``)."""
    if not re.fullmatch(r"[!-~]{1,32}", label):
        raise ValueError(f"label must be 1-32 printable ASCII chars, no spaces: {label!r}")
    with tempfile.TemporaryDirectory(prefix="bmi-rootfs-") as tmp:
        tree = Path(tmp)
        for folder in ("bin", "sbin", "etc", "dev", "proc", "sys", "run", "tmp", "root"):
            (tree / folder).mkdir()
        (tree / "bin" / "busybox").write_bytes(busybox.read_bytes())
        (tree / "bin" / "busybox").chmod(0o755)
        applets = subprocess.run(
            [str(busybox), "--list"], capture_output=True, text=True, check=True
        ).stdout.split()
        for applet in applets:
            if applet != "busybox":
                (tree / "bin" / applet).symlink_to("busybox")
        for extra in extra_trees:
            shutil.copytree(extra, tree, symlinks=True, dirs_exist_ok=True)
        (tree / "sbin" / "init").write_text(init)
        (tree / "sbin" / "init").chmod(0o755)
        (tree / "etc" / "bmi-label").write_text(label + "\n")
        # Daemons look their callers up (iscsid admits IPC from known users only).
        (tree / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (tree / "etc" / "group").write_text("root:x:0:\n")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        subprocess.run(
            ["mke2fs", "-q", "-F", "-t", "ext4", "-L", "bmi-root", "-E", "root_owner=0:0",
             "-d", str(tree), str(path), f"{size_mib}M"],
            check=True,
            capture_output=True,
        )  # fmt: skip
    return path


def main() -> None:
    from .agent_image import DEFAULT_OUT, busybox_binary

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--label", default="GOLDEN")
    parser.add_argument("--size-mib", type=int, default=16)
    args = parser.parse_args()
    print(build_root_fs(args.path, busybox_binary(DEFAULT_OUT), args.label, args.size_mib))


if __name__ == "__main__":
    main()
