"""`dicomnode db migrate --to URL`: an SQLite node's index, queue and outbox move onto PostgreSQL."""

import json
import time

import pytest

from dicomnode.index import Index
from dicomnode.outbox import Outbox
from dicomnode.queue import JobQueue
from dicomnode.store import Store
from tests.unit.test_cli_state import _default_logging, arrive, finished_job, run, site  # noqa: F401  (fixtures)

pytestmark = pytest.mark.postgres


def test_migrate_copies_every_row_and_new_ids_follow_the_old(site, capsys, postgres):
    store = Store(site / "data", fsync=False)
    arrive(store, 1, time.time() - 100)
    arrive(store, 2, time.time() - 50, modality="CT", n=3)
    done = finished_job(store, "1.2.5", sent=True, when=time.time())
    queued = JobQueue(store).enqueue("1.2.6", "intensity_probe", "r", ["pacs"], ["1.1"])
    before = {"studies": Index(store).studies(), "jobs": JobQueue(store).list(), "outbox": Outbox(store).list()}
    url = postgres.new_database()

    code, out, err = run(capsys, "db", "migrate", "--to", url, "--json")
    assert code == 0, err
    assert json.loads(out)["copied"] == {"studies": 2, "series": 2, "instances": 5, "jobs": 2, "outbox": 1}

    pg = Store(site / "data", fsync=False, database=url)
    after = {"studies": Index(pg).studies(), "jobs": JobQueue(pg).list(), "outbox": Outbox(pg).list()}
    assert after == before
    assert JobQueue(pg).enqueue("1.2.7", "intensity_probe", "r", ["pacs"], ["1.1"]) == max(done, queued) + 1

    code, _, err = run(capsys, "db", "migrate", "--to", url)  # never merged into a database that has rows
    assert code == 1 and "already has rows" in err


def test_migrate_refuses_while_the_node_runs(site, capsys, postgres):
    import fcntl

    Store(site / "data", fsync=False)
    with open(site / "data" / "node.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = run(capsys, "db", "migrate", "--to", postgres.new_database())
    assert code == 1 and "stop it first" in err
