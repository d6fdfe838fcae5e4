"""Builds the node agent's boot image: a Debian kernel and an initramfs holding busybox,
iscsistart, a minimal Python with grpcio/protobuf, the bmi.v1 boot stubs and bmi_agent.

    python -m bmi_server.devenv.agent_image [--out DIR] [--force]     (make agent-image)

Everything comes from Debian packages fetched with ``apt-get download`` (into
``<out>/debs``, kept) and unpacked with ``dpkg -x`` -- nothing is installed on the host:

- kernel: ``linux-image-6.1.0-<abi>-amd64`` (the one ``linux-image-amd64`` names); the
  modules the agent needs (virtio_pci/virtio_net, sd_mod, iscsi_tcp, crc32c_generic,
  ext4, vfat and common NIC drivers) with every dependency ``depmod`` finds, and a fresh
  ``modules.dep``/``modules.alias`` for them;
- ``busybox-static`` (sh, mount, switch_root, modprobe, ip, udhcpc, ...);
- ``iscsistart`` from ``open-iscsi`` with its libraries (``libopeniscsiusr``);
- Debian's ``python3.11`` binary with only the stdlib modules the agent imports (found by
  running the agent's import probe with that interpreter), compiled to .pyc;
- grpcio and protobuf from this venv (same CPython 3.11 ABI), the generated
  ``bmi.v1`` boot stubs and ``bmi_agent``;
- every shared library ``ldd`` reports for those binaries;
- ``ipxe/agent_image/init`` as /init and ``ipxe/agent_image/udhcpc.script``.

The result is ``<out>/vmlinuz``, ``<out>/initrd`` (gzip'd newc cpio, written here in
Python so it can hold /dev/console without root) and ``<out>/manifest.json``. A build is
skipped when the manifest's key -- package versions, module list, the agent, the stubs,
this builder, the static files and the grpcio/protobuf versions -- is unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import gzip
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bmi_server.cpio import Cpio

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "build" / "agent-image"
STATIC = REPO / "ipxe" / "agent_image"
AGENT_SRC = REPO / "bmi_agent"
STUBS_SRC = REPO / "clients" / "python" / "bmi"
STUB_FILES = ("__init__.py", "v1/__init__.py", "v1/boot_pb2.py", "v1/boot_pb2_grpc.py",
              "v1/inventory_pb2.py")  # fmt: skip

KERNEL_META = "linux-image-amd64"
KERNEL_PATTERN = re.compile(r"linux-image-6\.1\.0-\d+-amd64")
PACKAGES = (
    "busybox-static",
    "open-iscsi",
    "libopeniscsiusr",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
)
PYTHON_PACKAGES = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib")
# Loaded by name at boot, in this order (dependencies through modules.dep). vfat and its
# code pages: an OS started by switch_root runs on this kernel with no modules of its own,
# and must still be able to mount its config drive (a FAT file system, LUN 2).
BOOT_MODULES = ("virtio_pci", "virtio_net", "crc32c_generic", "sd_mod", "iscsi_tcp", "ext4",
                "vfat", "nls_cp437", "nls_ascii")  # fmt: skip
# Put in the image too; the agent loads them only for PCI devices that match (modalias).
NIC_MODULES = ("e1000", "e1000e", "igb", "ixgbe", "i40e", "ice", "bnxt_en", "tg3")
# Site packages taken whole from this venv (their own imports may be lazy).
APP_PACKAGES = ("grpc", "google/protobuf", "google/_upb")
# Imported opportunistically by grpc (``try: import grpc_tools``): never put in the image.
OPTIONAL_THIRD_PARTY = (
    "grpc_tools", "grpc_health", "grpc_reflection", "grpc_status", "grpc_testing",
)  # fmt: skip
# Imported by the agent only on some paths, so the probe imports them explicitly.
STDLIB_EXTRAS = ("encodings.latin_1", "encodings.ascii", "encodings.idna", "encodings.aliases",
                 "traceback", "linecache", "tokenize", "shlex", "fnmatch", "random",
                 "concurrent.futures.thread", "importlib.metadata", "json")  # fmt: skip
PY_VERSION = "3.11"
LIB_DIR = "lib/x86_64-linux-gnu"
LOADER = "lib64/ld-linux-x86-64.so.2"


class BuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class AgentImage:
    kernel: Path
    initrd: Path
    manifest: dict
    cached: bool  # True when the previous build was reused

    @property
    def directory(self) -> Path:
        return self.kernel.parent


def _run(argv: list[str], **kwargs) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise BuildError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout


# -- packages ---------------------------------------------------------------------------


def resolve_packages() -> dict[str, str]:
    """Package -> candidate version, the kernel resolved from linux-image-amd64."""
    depends = _run(["apt-cache", "depends", KERNEL_META])
    kernels = KERNEL_PATTERN.findall(depends)
    if not kernels:
        raise BuildError(f"{KERNEL_META} depends on no linux-image-6.1.0-*-amd64:\n{depends}")
    versions = {}
    for package in (kernels[0], *PACKAGES):
        policy = _run(["apt-cache", "policy", package])
        match = re.search(r"Candidate:\s*(\S+)", policy)
        if not match or match.group(1) == "(none)":
            raise BuildError(f"no candidate version of {package} (apt-get update?)")
        versions[package] = match.group(1)
    return versions


def _apt_lists_newer_than(path: Path) -> bool:
    lists = list(Path("/var/lib/apt/lists").glob("*_Packages*"))
    return not lists or max(p.stat().st_mtime for p in lists) > path.stat().st_mtime


def _deb_name(package: str, version: str) -> str:
    return f"{package}_{version.replace(':', '%3a')}_amd64.deb"


def fetch_packages(versions: dict[str, str], debs: Path) -> dict[str, Path]:
    """The .deb of each package at its version; downloaded only when not cached."""
    debs.mkdir(parents=True, exist_ok=True)
    missing = [f"{p}={v}" for p, v in versions.items() if not (debs / _deb_name(p, v)).exists()]
    if missing:
        _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *missing], cwd=debs)
    paths = {}
    for package, version in versions.items():
        path = debs / _deb_name(package, version)
        if not path.exists():
            # Some versions are stored with a different epoch spelling: take what apt wrote.
            found = sorted(debs.glob(f"{package}_*_amd64.deb"))
            if not found:
                raise BuildError(f"apt-get download left no {path.name}")
            path = found[-1]
        paths[package] = path
    return paths


# -- cache key ---------------------------------------------------------------------------


def _files_digest(paths: Iterable[Path], base: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(base)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def cache_key(versions: dict[str, str], extra: Iterable[Path] = ()) -> str:
    extra_files = [f for p in extra for f in ([p] if p.is_file() else p.rglob("*.py"))]
    inputs = {
        "extra": _files_digest(extra_files, Path("/")),
        "packages": versions,
        "modules": [BOOT_MODULES, NIC_MODULES],
        "agent": _files_digest(AGENT_SRC.rglob("*.py"), REPO),
        "stubs": _files_digest([STUBS_SRC / f for f in STUB_FILES], REPO),
        "static": _files_digest([p for p in STATIC.rglob("*") if p.is_file()], REPO),
        "builder": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "python": [importlib.metadata.version(d) for d in ("grpcio", "protobuf")],
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


# -- cpio ----------------------------------------------------------------------------------


# -- building the tree ---------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst, follow_symlinks=True)


def _is_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def add_libraries(root: Path, binaries: Iterable[Path], search: list[Path]) -> list[str]:
    """Copy every library ``ldd`` names for ``binaries`` into root's lib dir."""
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(str(p) for p in search)}
    added = set()
    for binary in binaries:
        done = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env)
        if "not a dynamic executable" in done.stdout + done.stderr:
            continue
        for line in done.stdout.splitlines():
            line = line.strip()
            if "not found" in line:
                raise BuildError(f"{binary.name}: {line} (add its package to PACKAGES)")
            match = re.match(r"(\S+) => (\S+) \(", line) or re.match(r"(/\S+) \(", line)
            if not match:
                continue  # linux-vdso
            if match.re.groups == 2:
                name, path = match.group(1), Path(match.group(2))
                target = root / LIB_DIR / name
            else:
                path = Path(match.group(1))
                target = root / LOADER
            if not target.exists():
                _copy(path, target)
                added.add(str(target.relative_to(root)))
    return sorted(added)


def add_kernel_modules(root: Path, kernel_tree: Path, kver: str) -> list[str]:
    _run(["depmod", "-b", str(kernel_tree), kver])
    base = kernel_tree / "lib" / "modules" / kver
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (base / "modules.dep").read_text().splitlines():
        module, _, rest = line.partition(":")
        deps[module] = rest.split()
        by_name[Path(module).name.removesuffix(".ko").replace("-", "_")] = module
    wanted: list[str] = []

    def visit(module: str) -> None:
        if module in wanted:
            return
        for dep in deps[module]:
            visit(dep)
        wanted.append(module)

    for name in (*BOOT_MODULES, *NIC_MODULES):
        if name not in by_name:
            raise BuildError(f"kernel {kver} has no module {name}")
        visit(by_name[name])
    target = root / "lib" / "modules" / kver
    for module in wanted:
        _copy(base / module, target / module)
    for extra in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (base / extra).exists():
            _copy(base / extra, target / extra)
    _run(["depmod", "-b", str(root), kver])
    (root / "etc" / "bmi").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "bmi" / "modules").write_text(
        "# Loaded by the agent in this order (dependencies through modules.dep).\n"
        + "\n".join(BOOT_MODULES)
        + "\n"
    )
    return wanted


def add_busybox(root: Path, busybox: Path) -> None:
    _copy(busybox, root / "bin" / "busybox")
    applets = _run([str(busybox), "--list-full"]).split()
    for applet in applets:
        link = root / applet
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(root / "bin" / "busybox", link.parent))


PROBE = r"""
import json, sys, traceback
import bmi_agent.main, bmi_agent.client, bmi_agent.inventory, bmi_agent.attach
import bmi_agent.network, bmi_agent.cmdline, bmi_agent.runner, bmi_agent.sysroot
from bmi_agent.cmdline import parse_cmdline
from bmi_agent.client import BootClient, inventory_message
from bmi_agent.inventory import collect, load_plugins
from bmi_agent.sysroot import SysRoot
from bmi_agent.runner import SubprocessRunner
import logging
logging.basicConfig()
logging.getLogger("probe").debug("probe")
load_plugins({})
config = parse_cmdline("bmi.server=127.0.0.1:9 bmi.node=node-0 bmi.token=t "
                       "BOOTIF=01-52-54-00-00-00-01")
inventory_message(collect(SysRoot("/"))).SerializeToString()
SubprocessRunner().run(["true"], check=False)
client = BootClient(config, timeout=0.5)
try:
    client.heartbeat(attempts=1)
except Exception:
    traceback.format_exc()
client.close()
for name in sys.argv[1].split(","):
    __import__(name)
print(json.dumps(sorted({m.__file__ for m in list(sys.modules.values())
                         if getattr(m, "__file__", None)})))
"""


def _python_env(home: Path, path: list[Path]) -> dict[str, str]:
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONHOME": str(home),
        "PYTHONPATH": ":".join(str(p) for p in path),
        "PYTHONDONTWRITEBYTECODE": "1",
        "GRPC_VERBOSITY": "NONE",
    }


def _compile(python: Path, home: Path, folder: Path, root: Path, keep_source: bool) -> None:
    """Byte-compile ``folder`` as it will sit in the image (unchecked hashes: the image's
    mtimes do not matter); without sources, .pyc files sit where the .py files were."""
    argv = [str(python), "-S", "-m", "compileall", "-q", "-j", "0",
            "--invalidation-mode", "unchecked-hash", "-s", str(root), "-p", "/"]  # fmt: skip
    if not keep_source:
        argv.append("-b")
    _run([*argv, str(folder)], env=_python_env(home, []))
    if not keep_source:
        for source in folder.rglob("*.py"):
            source.unlink()
        for cache in list(folder.rglob("__pycache__")):
            shutil.rmtree(cache)


def add_python(
    root: Path, pydeb: Path, venv_site: Path, extra: Iterable[Path] = ()
) -> tuple[int, list[Path]]:
    """Debian's python3.11, the stdlib subset the agent imports, grpc/protobuf, the agent
    and ``extra`` modules or packages (site collectors). Returns (stdlib files, ELF files)."""
    python = pydeb / "usr" / "bin" / f"python{PY_VERSION}"
    home = pydeb / "usr"
    stdlib = home / "lib" / f"python{PY_VERSION}"
    _copy(python, root / "usr" / "bin" / f"python{PY_VERSION}")
    (root / "usr" / "bin" / "python3").symlink_to(f"python{PY_VERSION}")
    app = root / "opt" / "bmi" / "python"
    for package in APP_PACKAGES:
        shutil.copytree(
            venv_site / package,
            app / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyi", "*.pyx", "*.pxd", "tests"),
        )
    for name in STUB_FILES:
        _copy(STUBS_SRC / name, app / "bmi" / name)
    shutil.copytree(AGENT_SRC, app / "bmi_agent", ignore=shutil.ignore_patterns("__pycache__"))
    for path in extra:
        if path.is_dir():
            shutil.copytree(path, app / path.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            _copy(path, app / path.name)

    # Which modules does the agent really import? Ask Debian's interpreter itself, with
    # the venv last on its path so third-party imports outside APP_PACKAGES show up too.
    probe = subprocess.run(
        [str(python), "-S", "-c", PROBE, ",".join(STDLIB_EXTRAS)],
        capture_output=True,
        text=True,
        env=_python_env(home, [app, venv_site]),
        timeout=120,
    )
    if probe.returncode != 0:
        raise BuildError(f"the agent's import probe failed:\n{probe.stderr[-3000:]}")
    loaded = [Path(p) for p in json.loads(probe.stdout.strip().splitlines()[-1])]
    extensions = []
    for path in loaded:
        if path.is_relative_to(stdlib):
            rel = path.relative_to(stdlib)
            _copy(path, root / "usr" / "lib" / f"python{PY_VERSION}" / rel)
            if path.suffix == ".so":
                extensions.append(path)
        elif path.is_relative_to(venv_site):
            top = path.relative_to(venv_site).parts[0]
            source = venv_site / top
            if (app / top).exists() or top in ("google", *OPTIONAL_THIRD_PARTY):
                continue
            if source.is_dir():
                shutil.copytree(source, app / top, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                _copy(source, app / top)
    # The landmark Python looks for to find its stdlib.
    _copy(stdlib / "os.py", root / "usr" / "lib" / f"python{PY_VERSION}" / "os.py")
    image_python = root / "usr" / "lib" / f"python{PY_VERSION}"
    _compile(python, home, image_python, root, keep_source=False)
    for top in app.iterdir():
        _compile(python, home, top, root, keep_source=top.name == "bmi_agent")
    app_elves = list(app.rglob("*.so"))
    for so in app_elves:
        subprocess.run(["strip", "--strip-unneeded", str(so)], capture_output=True)
    stdlib_files = sum(1 for p in image_python.rglob("*") if p.is_file())
    return stdlib_files, [python, *extensions, *app_elves]


def _unpack(deb: Path, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(into)])


def _find(tree: Path, pattern: str) -> Path:
    for path in sorted(tree.rglob("*")):
        if fnmatch.fnmatch(str(path.relative_to(tree)), pattern):
            return path
    raise BuildError(f"no {pattern} in {tree}")


def smoke_test(root: Path) -> str:
    """Run the image's own Python in a chroot (root only): libraries and stdlib complete."""
    if os.geteuid() != 0 or shutil.which("chroot") is None:
        return "skipped (not root)"
    env = {
        "PATH": "/sbin:/bin:/usr/sbin:/usr/bin",
        "PYTHONHOME": "/usr",
        "PYTHONPATH": "/opt/bmi/python",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    check = (
        "import bmi_agent.main, grpc, bmi.v1.boot_pb2_grpc; "
        "from bmi_agent.inventory import collect; from bmi_agent.sysroot import SysRoot; "
        "print(grpc.__version__)"
    )
    out = _run(["chroot", str(root), f"/usr/bin/python{PY_VERSION}", "-S", "-c", check], env=env)
    _run(["chroot", str(root), "/sbin/iscsistart", "-v"], env=env)
    return f"ok (grpc {out.strip()})"


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # parallel builders wait, then reuse
        yield


def build(
    out: Path = DEFAULT_OUT, *, force: bool = False, extra: Iterable[Path] = (), log=print
) -> AgentImage:
    """Build (or reuse) the agent's kernel + initramfs in ``out``. ``extra``: Python modules
    or packages to add (e.g. a site's collectors: name them in BMI_AGENT_COLLECTORS on the
    agent's kernel command line, see bmi_agent/inventory.py)."""
    out = out.resolve()
    extra = [Path(p).resolve() for p in extra]
    with _lock(out):
        started = time.monotonic()
        manifest_path = out / "manifest.json"
        kernel, initrd = out / "vmlinuz", out / "initrd"
        previous = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        # apt-cache is slow (seconds): ask it again only when apt's lists changed.
        if previous.get("packages") and not _apt_lists_newer_than(manifest_path):
            versions = previous["packages"]
        else:
            versions = resolve_packages()
        key = cache_key(versions, extra)
        if not force and previous.get("key") == key and kernel.exists() and initrd.exists():
            return AgentImage(kernel, initrd, previous, cached=True)
        log(f"building the agent image in {out} ...")
        debs = fetch_packages(versions, out / "debs")
        with tempfile.TemporaryDirectory(dir=out, prefix="work-") as tmp:
            work = Path(tmp)
            kernel_package = next(p for p in versions if KERNEL_PATTERN.fullmatch(p))
            kver = kernel_package.removeprefix("linux-image-")
            _unpack(debs[kernel_package], work / "kernel")
            for package in PYTHON_PACKAGES:
                _unpack(debs[package], work / "python")
            for package in ("busybox-static", "open-iscsi", "libopeniscsiusr"):
                _unpack(debs[package], work / "tools")
            root = work / "root"
            for folder in ("proc", "sys", "dev", "run", "tmp", "newroot", "root", "etc/bmi",
                           LIB_DIR, "lib64", "usr/bin", "sbin"):  # fmt: skip
                (root / folder).mkdir(parents=True, exist_ok=True)
            add_busybox(root, _find(work / "tools", "*bin/busybox"))
            iscsistart = _find(work / "tools", "*sbin/iscsistart")
            (root / "sbin" / "iscsistart").unlink(missing_ok=True)
            _copy(iscsistart, root / "sbin" / "iscsistart")
            modules = add_kernel_modules(root, work / "kernel", kver)
            venv_site = Path(sysconfig.get_paths()["purelib"])
            stdlib_files, elves = add_python(root, work / "python", venv_site, extra)
            search = [p for p in (work / "tools").rglob("x86_64-linux-gnu") if p.is_dir()]
            search += [p for p in (work / "python").rglob("x86_64-linux-gnu") if p.is_dir()]
            libraries = add_libraries(root, [iscsistart, *elves], search)
            _copy(STATIC / "init", root / "init")
            _copy(STATIC / "udhcpc.script", root / "etc" / "bmi" / "udhcpc.script")
            (root / "etc" / "resolv.conf").touch()
            (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
            (root / "etc" / "group").write_text("root:x:0:\n")
            smoke = smoke_test(root)
            archive = Cpio()
            archive.add_tree(root)
            archive.add_device("dev/console", 5, 1)
            archive.add_device("dev/null", 1, 3, 0o666)
            raw = archive.finish()
            (work / "initrd").write_bytes(gzip.compress(raw, compresslevel=6, mtime=0))
            _copy(work / "kernel" / "boot" / f"vmlinuz-{kver}", work / "vmlinuz")
            os.replace(work / "vmlinuz", kernel)
            os.replace(work / "initrd", initrd)
        manifest = {
            "key": key,
            "kernel": kver,
            "packages": versions,
            "modules": [Path(m).name for m in modules],
            "libraries": libraries,
            "stdlib_files": stdlib_files,
            "initrd_bytes": initrd.stat().st_size,
            "initrd_uncompressed_bytes": len(raw),
            "kernel_bytes": kernel.stat().st_size,
            "build_seconds": round(time.monotonic() - started, 1),
            "smoke_test": smoke,
            "venv_python": sys.version.split()[0],
        }
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        return AgentImage(kernel, initrd, manifest, cached=False)


def busybox_binary(out: Path = DEFAULT_OUT) -> Path:
    """The static busybox of the image's busybox-static package (for test root file
    systems), unpacked once into ``out``."""
    out = out.resolve()
    with _lock(out):
        manifest = out / "manifest.json"
        known = json.loads(manifest.read_text()).get("packages", {}) if manifest.exists() else {}
        version = known.get("busybox-static") or resolve_packages()["busybox-static"]
        binary = out / f"busybox-{version.replace(':', '_')}"
        if not binary.exists():
            deb = fetch_packages({"busybox-static": version}, out / "debs")["busybox-static"]
            with tempfile.TemporaryDirectory(dir=out, prefix="work-") as tmp:
                _unpack(deb, Path(tmp))
                shutil.copy2(_find(Path(tmp), "*bin/busybox"), binary)
        return binary


# iscsid for test OS images: the daemon that recovers an iSCSI session when its
# connection drops (iscsistart logs in and leaves; an OS takes the session over by
# starting iscsid, as Debian's and dracut's root-on-iSCSI setups do).
ISCSID_PACKAGES = ("open-iscsi", "libopeniscsiusr", "libisns0")


def iscsid_tree(out: Path = DEFAULT_OUT) -> Path:
    """A folder with ``sbin/iscsid`` and every library it needs (``lib/x86_64-linux-gnu``,
    the loader in ``lib64``), to copy into a test root file system. Built once into ``out``."""
    out = out.resolve()
    with _lock(out):
        manifest = out / "manifest.json"
        known = json.loads(manifest.read_text()).get("packages", {}) if manifest.exists() else {}
        versions = {}
        for package in ISCSID_PACKAGES:
            version = known.get(package)
            if version is None:
                policy = _run(["apt-cache", "policy", package])
                match = re.search(r"Candidate:\s*(\S+)", policy)
                if not match or match.group(1) == "(none)":
                    raise BuildError(f"no candidate version of {package} (apt-get update?)")
                version = match.group(1)
            versions[package] = version
        tree = out / ("iscsid-" + hashlib.sha256(json.dumps(versions, sort_keys=True).encode())
                      .hexdigest()[:12])
        if (tree / "sbin" / "iscsid").exists():
            return tree
        debs = fetch_packages(versions, out / "debs")
        with tempfile.TemporaryDirectory(dir=out, prefix="work-") as tmp:
            work = Path(tmp)
            for deb in debs.values():
                _unpack(deb, work / "pkgs")
            staged = work / "tree"
            (staged / "sbin").mkdir(parents=True)
            iscsid = _find(work / "pkgs", "*sbin/iscsid")
            _copy(iscsid, staged / "sbin" / "iscsid")
            search = [p for p in (work / "pkgs").rglob("x86_64-linux-gnu") if p.is_dir()]
            add_libraries(staged, [iscsid], search)
            shutil.rmtree(tree, ignore_errors=True)
            os.replace(staged, tree)
        return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument(
        "--add",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="a Python module or package to add (e.g. site collectors); repeatable",
    )
    args = parser.parse_args()
    started = time.monotonic()
    try:
        image = build(args.out, force=args.force, extra=args.add)
    except BuildError as exc:
        sys.exit(f"agent-image: {exc}")
    m = image.manifest
    state = "up to date" if image.cached else f"built in {m['build_seconds']}s"
    print(
        f"agent image {state} ({time.monotonic() - started:.1f}s): {image.kernel} "
        f"({m['kernel_bytes'] >> 20} MiB), {image.initrd} ({m['initrd_bytes'] / 2**20:.1f} MiB, "
        f"{m['initrd_uncompressed_bytes'] / 2**20:.1f} MiB unpacked)"
    )


if __name__ == "__main__":
    main()
