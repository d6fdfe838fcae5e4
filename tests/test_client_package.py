"""The Python client installs on its own: a wheel of clients/python carries the generated
stubs, the client and the `bmi` entry point, and imports without the server."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_client_wheel_is_self_contained(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path),
         str(ROOT / "clients" / "python")],
        check=True, capture_output=True, timeout=300,
    )
    wheel = next(tmp_path.glob("bmi_client-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for proto in (ROOT / "proto" / "bmi" / "v1").glob("*.proto"):
        assert f"bmi/v1/{proto.stem}_pb2.py" in names
    assert "bmi_client/client.py" in names and "bmi_client/cli.py" in names
    assert not any(n.startswith("bmi_server/") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "bmi = bmi_client.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    # It runs from the wheel alone, next to its dependencies but not the server.
    env_dir = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(env_dir)
    probe = ("import sys; import bmi_client, bmi.v1.images_pb2; "
             "assert 'bmi_server' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path[:0] = "
                          f"[{str(env_dir)!r}] + {sys.path[1:]!r}; {probe}"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
