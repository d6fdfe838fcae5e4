"""The real-OS benchmark's breakdown of a boot into phases (bench/real_os.py)."""

from __future__ import annotations

import pytest

from bench.real_os import Boot, describe, median_marks, phases


def test_phases_follow_the_milestones_in_boot_order_to_ssh():
    marks = {"kernel": 30.0, "script": 10.0, "grub": 20.0, "san": 12.5}
    assert phases(marks, 90.0) == [
        ("power-on -> boot script fetched", 10.0),
        ("boot script fetched -> iPXE logged in to the target", 2.5),
        ("iPXE logged in to the target -> GRUB menu", 7.5),
        ("GRUB menu -> kernel banner", 10.0),
        ("kernel banner -> sshd answers", 60.0),
    ]


def test_phases_skip_milestones_not_seen_out_of_order_or_after_ssh():
    # A local boot has no boot script; systemd "before" the kernel is a stale match;
    # cloud-init after ssh answered is no part of the boot.
    marks = {"grub": 5.0, "kernel": 8.0, "systemd": 7.0, "cloud-init": 95.0}
    assert phases(marks, 90.0) == [
        ("power-on -> GRUB menu", 5.0),
        ("GRUB menu -> kernel banner", 3.0),
        ("kernel banner -> sshd answers", 82.0),
    ]
    assert sum(seconds for _, seconds in phases(marks, 90.0)) == pytest.approx(90.0)
    assert phases({}, 42.0) == [("power-on -> sshd answers", 42.0)]


def test_median_marks_over_the_boots_that_saw_each():
    boots = [Boot(90, {"grub": 4.0, "kernel": 9.0}), Boot(80, {"grub": 6.0}),
             Boot(85, {"grub": 5.0, "kernel": 11.0})]  # fmt: skip
    assert median_marks(boots) == {"grub": 5.0, "kernel": 10.0}
    assert describe(median_marks(boots), 85.0) == (
        "power-on -> GRUB menu 5.0 s; GRUB menu -> kernel banner 5.0 s; "
        "kernel banner -> sshd answers 75.0 s"
    )
