from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support import RunningServer, start_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    """A real server subprocess on a free port, with admin/adminpass1 and short timeouts."""
    srv = start_server(tmp_path)
    yield srv
    if srv.proc is not None and srv.proc.poll() is None:
        srv.stop()
