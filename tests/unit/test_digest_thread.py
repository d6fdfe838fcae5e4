"""The server's digest thread (bmi_server.main._digests): hashes while there is work,
polls when there is none, lives through a failure, stops when told."""

from __future__ import annotations

import logging
import threading

from bmi_server import main


class _Core:
    """Answers fill_digests from a script: a count, None (another replica has the job)
    or an exception; stops the thread once the script is used up."""

    def __init__(self, script, stop: threading.Event) -> None:
        self.script = list(script)
        self.stop = stop
        self.calls = 0

    def fill_digests(self):
        self.calls += 1
        answer = self.script.pop(0)
        if not self.script:
            self.stop.set()
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_the_digest_thread_keeps_hashing_while_work_is_done_and_survives_a_failure(
        monkeypatch, caplog):
    monkeypatch.setattr(main, "DIGEST_POLL_SECONDS", 0.01)
    stop = threading.Event()
    # Poll 1: 3 images, then 1, then none left; poll 2: fails; poll 3: another replica
    # has the job; poll 4: 1 image, then none.
    core = _Core([3, 1, 0, RuntimeError("ceph went away"), None, 1, 0], stop)
    thread = threading.Thread(target=main._digests, args=(core, stop), daemon=True)
    with caplog.at_level(logging.ERROR, logger="bmi_server"):
        thread.start()
        thread.join(timeout=10)
    assert not thread.is_alive() and core.calls == 7
    failed = [r for r in caplog.records if "hashing images failed" in r.getMessage()]
    assert len(failed) == 1 and "ceph went away" in failed[0].exc_text


def test_the_digest_thread_stops_without_a_call_once_told():
    stop = threading.Event()
    stop.set()
    core = _Core([0], stop)
    main._digests(core, stop)
    assert core.calls == 0
