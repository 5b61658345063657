"""The sender's C-STORE/C-ECHO requestor against real peers (DCMTK storescp, Orthanc, the node's own
acceptor) and against scripted peers that reject, go silent, abort, release or answer nonsense."""

from __future__ import annotations

import io
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from analyzers.phantoms import PhantomPatient, image_dataset, save
from dicomnode.uids import CR_IMAGE, CT_IMAGE
from dicomnode.dimse import commands, pdu
from dicomnode.dimse.acceptor import StorageSCP, negotiate
from dicomnode.dimse.commands import Command
from dicomnode.dimse.part10 import FileMeta, read_file_meta
from dicomnode.dimse.requestor import (
    MAX_CONTEXTS, AssociationError, StoreSCU, echo, plan_associations, propose_contexts, send_files,
)
from dicomnode.dimse.syntaxes import EXPLICIT_VR_LE, IMPLICIT_VR_LE
from tests.peers import PEER_ENV, Orthanc, free_port, have_peers, wait_port

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not have_peers(), reason="Orthanc/DCMTK not installed")]

J2K = Path("/work/shared/realdata/pydicom-data/data_store/data/693_J2KR.dcm")


def phantoms(folder: Path, n: int, size: int = 64, seed: int = 5, syntax: str | None = None) -> list[Path]:
    rng = np.random.default_rng(seed)
    pat = PhantomPatient.make(rng, "scu", seed)
    files = []
    for i in range(n):
        ds = image_dataset((rng.random((size, size)) * 4000).astype(np.uint16), patient=pat, modality="CT",
                           sop_class_uid=CT_IMAGE, instance_number=i + 1)
        if syntax == IMPLICIT_VR_LE:
            ds.file_meta.TransferSyntaxUID = syntax
        files.append(save(ds, folder))
    return files


def dataset_part(raw: bytes) -> bytes:
    """The bytes after a Part 10 file's meta group."""
    assert raw[128:132] == b"DICM"
    return raw[read_meta_offset(raw):]


def read_meta_offset(raw: bytes) -> int:
    group_length = struct.unpack_from("<I", raw, 132 + 8)[0]
    return 132 + 12 + group_length


@pytest.fixture()
def storescp(tmp_path):
    """DCMTK storescp writing what it receives bit for bit; yields (port, folder)."""
    def start(*flags: str) -> tuple[int, Path]:
        port, out = free_port(), tmp_path / "storescp"
        out.mkdir(exist_ok=True)
        procs.append(subprocess.Popen(["/usr/bin/storescp", "+B", *flags, "-od", str(out), str(port)], env=PEER_ENV,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(port, 10, procs[-1])
        return port, out

    procs: list[subprocess.Popen] = []
    yield start
    for p in procs:
        p.terminate()
        p.wait(10)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    o = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield o
    o.stop()


# -- real peers ------------------------------------------------------------------------------

def test_storescp_receives_data_sets_byte_equal(tmp_path, storescp):
    port, out = storescp()
    files = phantoms(tmp_path / "src", 50, size=256)
    kept, errors, assoc_error = send_files("127.0.0.1", port, "STORESCP", "DICOMNODE", files, timeout=10)
    assert (sorted(kept), errors, assoc_error) == (list(range(50)), {}, None)
    received = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in out.iterdir()}
    assert len(received) == 50
    for f in files:
        uid = read_file_meta(f).sop_instance_uid
        assert dataset_part(received[uid].read_bytes()) == dataset_part(f.read_bytes())


def test_small_peer_pdu_and_echo(tmp_path, storescp):
    port, out = storescp("--max-pdu", "4096")
    ok, message = echo("127.0.0.1", port, "STORESCP", "DICOMNODE", timeout=10)
    assert ok and message.startswith("C-ECHO success in"), message
    files = phantoms(tmp_path / "src", 3, size=128)
    with StoreSCU("127.0.0.1", port, "STORESCP", "DICOMNODE", contexts=propose_contexts([read_file_meta(f) for f in files]),
                  timeout=10) as scu:
        assert scu.peer_max_pdu == 4096
        assert [scu.store_file(f) for f in files] == [(0, "")] * 3
    assert scu.lost == "released"
    assert len(list(out.iterdir())) == 3


def test_jpeg2000_file_keeps_its_syntax(storescp):
    if not J2K.exists():
        pytest.skip(f"{J2K} is not present")
    port, out = storescp("+xa")
    kept, errors, assoc_error = send_files("127.0.0.1", port, "STORESCP", "DICOMNODE", [J2K], timeout=10)
    assert (kept, errors, assoc_error) == ([0], {}, None)
    [received] = out.iterdir()
    assert pydicom.dcmread(received).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    assert dataset_part(received.read_bytes()) == J2K.read_bytes()[read_file_meta(J2K).offset:]


def test_orthanc_stores_200_instances(tmp_path, orthanc):
    before = len(orthanc.instances())
    files = phantoms(tmp_path / "src", 200, seed=9)
    kept, errors, assoc_error = send_files("127.0.0.1", orthanc.dicom_port, orthanc.aet, "DICOMNODE", files, timeout=30)
    assert (len(kept), errors, assoc_error) == (200, {}, None)
    assert len(orthanc.instances()) - before == 200


def test_orthanc_accepts_the_nodes_results(tmp_path, orthanc):
    from dicomnode.encoders import EncoderContext, encode_result
    from sr_templates.loader import load_template
    from tests.encoders.results import FIXTURE_DIR, cr_study, fixture_result

    study = cr_study()
    objects = encode_result(fixture_result(study), study, EncoderContext(), load_template("fixture_spine", FIXTURE_DIR))
    files = []
    for i, ds in enumerate(objects):
        files.append(tmp_path / f"{i}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    kept, errors, assoc_error = send_files("127.0.0.1", orthanc.dicom_port, orthanc.aet, "DICOMNODE", files, timeout=30)
    assert (len(kept), errors, assoc_error) == (len(objects), {}, None)
    stored = {t["SOPInstanceUID"]: t["SOPClassUID"] for t in map(orthanc.tags, orthanc.instances())}
    sent = {str(ds.SOPInstanceUID): str(ds.SOPClassUID) for ds in objects}
    assert {uid: stored.get(uid) for uid in sent} == sent
    assert len(set(sent.values())) >= 3  # SR, SEG, SC and GSPS: one association, several classes


def test_rejected_and_unreachable_associations(tmp_path):
    files = phantoms(tmp_path / "src", 2)
    scp = StorageSCP("NODE", "127.0.0.1", 0, store=lambda req: (0, ""), allow=lambda ae, host: False)
    scp.start()
    try:
        kept, errors, assoc_error = send_files("127.0.0.1", scp.port, "NODE", "STRANGER", files, timeout=5)
    finally:
        scp.stop()
    assert (kept, errors) == ([], {})
    assert "rejected the association permanently: calling AE title not recognised" in assert_text(assoc_error)
    kept, errors, assoc_error = send_files("127.0.0.1", free_port(), "NODE", "DICOMNODE", files, timeout=5)
    assert (kept, errors) == ([], {}) and "cannot connect" in assert_text(assoc_error)
    ok, message = echo("127.0.0.1", free_port(), "NODE", "DICOMNODE", timeout=5)
    assert not ok and message.startswith("association failed: cannot connect to NODE@127.0.0.1")


def assert_text(value: str | None) -> str:
    assert isinstance(value, str) and value
    return value


def test_unreadable_files_are_errors_and_the_rest_goes(tmp_path, storescp):
    port, out = storescp()
    files = phantoms(tmp_path / "src", 2)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    kept, errors, assoc_error = send_files("127.0.0.1", port, "STORESCP", "DICOMNODE",
                                           [files[0], junk, tmp_path / "missing.dcm", files[1]], timeout=10)
    assert (kept, assoc_error) == ([0, 3], None)
    assert "not a DICOM Part 10 file" in errors[1] and "No such file" in errors[2]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a test certificate")
def test_tls_to_the_nodes_own_acceptor(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    got = []
    scp = StorageSCP("NODE", "127.0.0.1", 0, store=lambda req: (got.append(bytes(req.dataset)), (0, ""))[1],
                     allow=lambda ae, host: True, ssl_context=server_ctx, network_timeout=5)
    scp.start()
    try:
        client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        files = phantoms(tmp_path / "src", 3, size=256)
        kept, errors, assoc_error = send_files("localhost", scp.port, "NODE", "DICOMNODE", files, timeout=5,
                                               ssl_context=client_ctx)
        assert (kept, errors, assoc_error) == ([0, 1, 2], {}, None)
        assert got == [dataset_part(f.read_bytes()) for f in files]
        ok, message = echo("localhost", scp.port, "NODE", "DICOMNODE", timeout=5, ssl_context=client_ctx)
        assert ok, message
        ok, message = echo("localhost", scp.port, "NODE", "DICOMNODE", timeout=5)  # plain TCP to a TLS port
        assert not ok and message.startswith("association failed: "), message
    finally:
        scp.stop()


def test_request_command_sets_read_back_with_pydicom():
    store = pydicom.dcmread(io.BytesIO(commands.encode_store_rq(9, CT_IMAGE, "1.2.3.45")), force=True)
    assert (store.CommandField, store.MessageID, store.Priority, store.CommandDataSetType) == (1, 9, 0, 0)
    assert (store.AffectedSOPClassUID, store.AffectedSOPInstanceUID) == (CT_IMAGE, "1.2.3.45")
    raw = commands.encode_echo_rq(3)
    echo_rq = pydicom.dcmread(io.BytesIO(raw), force=True)
    assert (echo_rq.CommandField, echo_rq.MessageID, echo_rq.CommandDataSetType) == (0x30, 3, 0x0101)
    assert echo_rq.CommandGroupLength == len(raw) - 12


# -- scripted peers --------------------------------------------------------------------------

class ScriptedPeer:
    """A raw-socket acceptor: negotiates with the node's own rules, then follows ``behaviour`` on each C-STORE.

    Behaviours: ``store`` (answer success), ``silent`` (never answer), ``abort`` (A-ABORT),
    ``release`` (A-RELEASE-RQ), ``wrong_id`` (a response to another message). ``first_stores``
    answers that many C-STOREs with success on the first connection before the behaviour starts;
    later connections always store. ``fallback_only`` refuses contexts with a single transfer syntax.
    """

    def __init__(self, behaviour: str, first_stores: int = 0, fallback_only: bool = False) -> None:
        self.behaviour = behaviour
        self.first_stores = first_stores
        self.fallback_only = fallback_only
        self.stored: list[str] = []
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            t = threading.Thread(target=self._serve, args=(conn, self.connections), daemon=True)
            self.threads.append(t)
            t.start()

    @staticmethod
    def _read(conn: socket.socket) -> tuple[int, bytes]:
        header = b""
        while len(header) < 6:
            chunk = conn.recv(6 - len(header))
            if not chunk:
                raise ConnectionError
            header += chunk
        pdu_type, length = struct.unpack(">BxI", header)
        body = b""
        while len(body) < length:
            chunk = conn.recv(length - len(body))
            if not chunk:
                raise ConnectionError
            body += chunk
        return pdu_type, body

    def _serve(self, conn: socket.socket, number: int) -> None:
        with conn:
            try:
                _, body = self._read(conn)
                rq = pdu.parse_associate_rq(body)
                neg = negotiate(rq, lambda uid: True)
                if self.fallback_only:
                    for pcid, _, transfers in rq.contexts:
                        if len(transfers) == 1:
                            neg.contexts.pop(pcid, None)
                            neg.refused[pcid] = pdu.CONTEXT_TRANSFER_SYNTAXES_NOT_SUPPORTED
                conn.sendall(pdu.encode_associate_ac(rq.called_ae, rq.calling_ae, neg.results(rq), 1 << 20))
                answered = 0
                command = b""
                while True:
                    pdu_type, body = self._read(conn)
                    if pdu_type == pdu.RELEASE_RQ:
                        conn.sendall(pdu.RELEASE_RP_PDU)
                        return
                    if pdu_type != pdu.P_DATA_TF:
                        return
                    length, pcid, mch = struct.unpack_from(">IBB", body, 0)
                    if mch & 1:
                        command = body[6: 4 + length]
                        continue
                    if not mch & 2:
                        continue
                    fields = commands.parse_command(command)
                    message_id = commands.uint(fields.get(0x0110), 2, 0)
                    uid = commands.text(fields.get(0x1000))
                    behaviour = "store" if number > 1 or answered < self.first_stores else self.behaviour
                    answered += 1
                    if behaviour == "store":
                        self.stored.append(uid)
                        rsp = commands.encode_response(Command.C_STORE_RSP, message_id, 0, CT_IMAGE, uid)
                        conn.sendall(pdu.encode_p_data(pcid, rsp, 0))
                    elif behaviour == "abort":
                        conn.sendall(pdu.abort_pdu(0, 2))
                        return
                    elif behaviour == "release":
                        conn.sendall(pdu.RELEASE_RQ_PDU)
                    elif behaviour == "wrong_id":
                        rsp = commands.encode_response(Command.C_STORE_RSP, message_id + 7, 0, CT_IMAGE, uid)
                        conn.sendall(pdu.encode_p_data(pcid, rsp, 0))
            except (ConnectionError, OSError):
                return


@pytest.fixture()
def scripted():
    peers: list[ScriptedPeer] = []

    def make(*args, **kw) -> ScriptedPeer:
        peers.append(ScriptedPeer(*args, **kw))
        return peers[-1]

    yield make
    for p in peers:
        p.close()


def test_silent_peer_fails_after_the_timeout(tmp_path, scripted):
    peer = scripted("silent")
    files = phantoms(tmp_path / "src", 4)
    t0 = time.monotonic()
    kept, errors, assoc_error = send_files("127.0.0.1", peer.port, "PEER", "DICOMNODE", files, timeout=1)
    elapsed = time.monotonic() - t0
    assert (kept, assoc_error) == ([], None)
    assert "no response from PEER@127.0.0.1" in errors[0] and "within 1 s" in errors[0]
    assert all(errors[i].startswith("not sent: association lost") for i in (1, 2, 3))
    assert 1 <= elapsed < 4
    assert peer.connections == 1  # nothing was stored, so no second association is tried
    t0 = time.monotonic()
    ok, message = echo("127.0.0.1", peer.port, "PEER", "DICOMNODE", timeout=1)
    assert not ok and message.startswith("C-ECHO failed: no response from PEER@127.0.0.1") and "within 1 s" in message
    assert time.monotonic() - t0 < 3


@pytest.mark.parametrize("behaviour, words", [
    ("abort", "aborted the association (service provider, reason 0)"),
    ("release", "released the association before answering"),
    ("wrong_id", "expected response 0x8001 to message 3"),
])
def test_peer_ending_or_confusing_the_association(tmp_path, scripted, behaviour, words):
    peer = scripted(behaviour, first_stores=2)
    files = phantoms(tmp_path / "src", 5)
    t0 = time.monotonic()
    kept, errors, assoc_error = send_files("127.0.0.1", peer.port, "PEER", "DICOMNODE", files, timeout=5)
    assert time.monotonic() - t0 < 4
    # two stored, the third lost with the association, the last two sent again on a fresh association
    assert (kept, assoc_error) == ([0, 1, 3, 4], None)
    assert list(errors) == [2] and words in errors[2]
    assert peer.connections == 2 and len(peer.stored) == 4


def test_store_scu_reports_lost_association_to_every_later_file(tmp_path, scripted):
    peer = scripted("abort")
    files = phantoms(tmp_path / "src", 2)
    with StoreSCU("127.0.0.1", peer.port, "PEER", "DICOMNODE", contexts=[(CT_IMAGE, [EXPLICIT_VR_LE])],
                  timeout=5) as scu:
        status, comment = scu.store_file(files[0])
        assert status is None and "aborted the association" in comment
        assert not scu.is_established
        assert scu.store_file(files[1]) == (None, f"association lost: {comment}")
        with pytest.raises(AssociationError, match="association lost"):
            scu.echo()


def test_only_the_fallback_accepted_sends_matching_files_and_names_the_others(tmp_path, scripted):
    peer = scripted("store", fallback_only=True)
    explicit = phantoms(tmp_path / "explicit", 1, seed=1)
    implicit = phantoms(tmp_path / "implicit", 1, seed=2, syntax=IMPLICIT_VR_LE)
    kept, errors, assoc_error = send_files("127.0.0.1", peer.port, "PEER", "DICOMNODE", explicit + implicit, timeout=5)
    assert (kept, assoc_error) == ([0], None)
    assert "only in 1.2.840.10008.1.2.1" in errors[1] and "does not transcode" in errors[1]


def test_refused_sop_class_is_an_error_for_its_files(tmp_path):
    files = phantoms(tmp_path / "src", 1)
    cr = save(image_dataset(np.zeros((8, 8), np.uint16), patient=PhantomPatient.make(np.random.default_rng(0), "cr", 0),
                            modality="CR", sop_class_uid=CR_IMAGE), tmp_path / "cr")
    scp = StorageSCP("NODE", "127.0.0.1", 0, store=lambda req: (0, ""), allow=lambda ae, host: True,
                     accept_sop_class=lambda uid: uid == CT_IMAGE)
    scp.start()
    try:
        kept, errors, assoc_error = send_files("127.0.0.1", scp.port, "NODE", "DICOMNODE", [cr, files[0]], timeout=5)
    finally:
        scp.stop()
    assert (kept, assoc_error) == ([1], None)
    assert f"refused SOP class {CR_IMAGE} (abstract syntax not supported)" in errors[0]


# -- planning --------------------------------------------------------------------------------

def test_contexts_split_into_associations_of_at_most_128():
    metas = {i: FileMeta(Path(f"{i}.dcm"), f"1.2.3.{i // 2}", f"1.2.3.4.{i}",
                         EXPLICIT_VR_LE if i % 2 else "1.2.840.10008.1.2.4.90", 0) for i in range(200)}
    plans = plan_associations(metas)
    assert all(len(contexts) <= MAX_CONTEXTS for contexts, _ in plans)
    assert sorted(i for _, indices in plans for i in indices) == list(range(200))
    assert len(plans) == 3  # 100 classes x (J2K, Explicit, fallback) = 300 contexts
    for contexts, indices in plans:
        classes = {abstract for abstract, _ in contexts}
        assert {metas[i].sop_class_uid for i in indices} == classes
    assert propose_contexts([metas[1]]) == [("1.2.3.0", [EXPLICIT_VR_LE]),
                                            ("1.2.3.0", [EXPLICIT_VR_LE, IMPLICIT_VR_LE])]


def test_more_classes_than_one_association_holds_go_on_several(tmp_path, scripted):
    peer = scripted("store")
    pat = PhantomPatient.make(np.random.default_rng(0), "many", 0)
    files = [save(image_dataset(np.zeros((8, 8), np.uint16), patient=pat, modality="OT",
                                sop_class_uid=f"1.2.826.0.1.3680043.10.1137.999.{i}"), tmp_path) for i in range(65)]
    kept, errors, assoc_error = send_files("127.0.0.1", peer.port, "PEER", "DICOMNODE", files, timeout=5)
    assert (kept, errors, assoc_error) == (list(range(65)), {}, None)
    assert peer.connections == 2  # 65 classes x (own syntax, fallback) = 130 contexts
    assert sorted(peer.stored) == sorted(read_file_meta(f).sop_instance_uid for f in files)
