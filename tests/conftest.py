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


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL server for the session (tests marked ``postgres``)."""
    from tests.pg import Postgres, server_bin

    if server_bin() is None:
        pytest.fail("PostgreSQL is not installed (apt-get install postgresql); the postgres tests need it")
    server = Postgres().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def open_store(request):
    """``open_store(data_dir, **kw)``: a Store on SQLite, or on a fresh PostgreSQL database (one per test)."""
    from dicomnode.store import Store

    url = request.getfixturevalue("postgres").new_database() if request.param == "postgres" else None
    opened = []

    def make(data_dir, **kw):
        store = Store(data_dir, database=url, **{"fsync": False, **kw})
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()
