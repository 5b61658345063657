import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
REALDATA = SHARED / "realdata"

os.environ.setdefault("TCP_NODELAY", "1")


@pytest.fixture(scope="session")
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.skip("../shared/realdata is not present (fresh clone)")
    return REALDATA
