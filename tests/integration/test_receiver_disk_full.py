"""The data disk full while instances arrive: Out of Resources for that one, nothing half-written, the node goes on.

The node's data folder is a small tmpfs (mounting needs root; the test skips without it), so the
disk really fills: no write is faked.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from analyzers.phantoms import PhantomPatient, image_dataset, save
from dicomnode.uids import CR_IMAGE
from dicomnode.config import Config
from dicomnode.dimse.requestor import StoreSCU
from dicomnode.dimse.syntaxes import EXPLICIT_VR_LE, IMPLICIT_VR_LE, VERIFICATION
from dicomnode.index import Index
from dicomnode.receiver import Receiver
from dicomnode.store import Store

pytestmark = pytest.mark.integration


@pytest.fixture()
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or 'not root'})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(folder: Path, leave: int) -> Path:
    """A file that takes all free space on ``folder``'s file system but ``leave`` bytes."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        st = os.statvfs(folder)
        free = st.f_bavail * st.f_frsize - leave
        try:
            while free > 0:
                free -= f.write(bytes(min(free, 1 << 20)))
        except OSError:
            pass
    return filler


def cr_files(folder: Path, n: int, size: int) -> list[Path]:
    rng = np.random.default_rng(9)
    pat = PhantomPatient.make(rng, "full", 1)
    return [save(image_dataset((rng.random((size, size)) * 4000).astype(np.uint16), patient=pat, modality="CR",
                               sop_class_uid=CR_IMAGE, instance_number=i + 1), folder) for i in range(n)]


@pytest.mark.parametrize("leave", [300_000, 0], ids=["space-for-the-first-part", "no-space-at-all"])
def test_disk_full_on_the_streaming_path_answers_out_of_resources(small_disk, tmp_path, leave, record_property):
    cfg = Config.model_validate({
        "node": {"host": "127.0.0.1", "port": 0, "network_timeout": 10},
        "storage": {"data_dir": str(small_disk / "data")},
        "callers": [{"ae_title": "STORESCU"}],
    })
    store = Store(cfg.data_dir)
    rx = Receiver(cfg, store)
    rx.start()
    try:
        big = cr_files(tmp_path / "in", 2, size=1100)  # 2.4 MB each: past the 1 MiB streaming threshold
        contexts = [(CR_IMAGE, [EXPLICIT_VR_LE]), (VERIFICATION, [IMPLICIT_VR_LE])]
        with StoreSCU("127.0.0.1", rx.port, "DICOMNODE", "STORESCU", contexts=contexts, timeout=10) as scu:
            assert scu.store_file(big[0]) == (0, "")
            filler = fill(small_disk, leave)
            status, comment = scu.store_file(big[1])
            echo_status = scu.echo()
            leftovers = list(store.tmp.iterdir())
            filler.unlink()  # space returns: the same instance is stored
            again = scu.store_file(big[1])
            record_property("answer", f"C-STORE status {status:#06x} ({comment}); C-ECHO on the same association "
                                      f"{echo_status:#06x}; {len(leftovers)} temporary files left; once space "
                                      f"returned the same instance: {again[0]:#06x}")
            assert status == 0xA700 and "cannot write" in comment
            assert echo_status == 0  # the same association goes on: no reset, no abort
            assert leftovers == []  # nothing half-written stays
            assert again == (0, "")
        assert Index(store).studies()[0]["n_instances"] == 2
    finally:
        rx.stop()
