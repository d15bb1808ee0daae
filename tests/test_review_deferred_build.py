"""A review's finding: the daemon's deferred state cache document is built at the flush.

A reload only replaces a working state, and anything that stops loading the new one keeps
the old state enforced (daemon._do_reload). Building the cache document was part of that
load; since 0423abe it runs in ``Cache.flush()``, outside that guard.
"""

from __future__ import annotations

import threading
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

import capkeeper.state as state_module
from capkeeper.daemon import Daemon
from capkeeper.settings import Settings
from tests.conftest import make_binary, setcap
from tests.test_daemon import wait_caps, write_state


def test_a_cache_document_that_cannot_be_built_does_not_end_the_daemon_at_a_reload(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building the state cache document failing (MemoryError injected: the OS will not
    produce one on demand) at a reload: the daemon keeps running and enforcing."""
    binary = make_binary(tree / "app")
    other = make_binary(tree / "other")
    state = write_state(tree.parent / "state.toml", {binary: "cap_net_raw=+ep"})
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    settings = Settings(
        state=state,
        status_file=tmp_path / "status.json",
        rescan_interval=3600,
        cache_directory=cache,
    )
    logs: list[MutableMapping[str, Any]]
    died: list[BaseException] = []
    with capture_logs() as logs:
        daemon = Daemon(settings, logger=structlog.get_logger(), install_signals=False)

        def run() -> None:
            try:
                daemon.run()
            except BaseException as exc:
                died.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        try:
            assert daemon.ready.wait(10), logs
            wait_caps(binary, "cap_net_raw=+ep")

            built = threading.Event()

            def failing(key: str, entries: Any) -> dict[str, object]:
                built.set()
                raise MemoryError

            monkeypatch.setattr(state_module, "_document", failing)
            write_state(state, {binary: "cap_net_raw=+ep", other: "cap_net_raw=+ep"})
            daemon.request_reload()
            # The new state is loaded and reconciled, then the flush builds its document
            # and fails. Only a daemon still running restores what is stripped after.
            assert built.wait(30), logs
            setcap("-r", binary)
            wait_caps(binary, "cap_net_raw=+ep")
            assert died == [], died
            assert thread.is_alive()
        finally:
            if thread.is_alive():
                daemon.request_stop()
            thread.join(10)
    assert died == [], died
