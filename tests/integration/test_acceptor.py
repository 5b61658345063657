"""The acceptor (storage SCP) against real senders: DCMTK storescu/echoscu, pynetdicom, and broken peers."""

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
from pynetdicom import AE

from analyzers.phantoms import PhantomPatient, image_dataset, save
from dicomnode.uids import CR_IMAGE, CT_IMAGE
from dicomnode.dimse.acceptor import StorageSCP, StoreRequest, negotiate
from dicomnode.dimse.commands import encode_response, parse_command
from dicomnode.dimse.pdu import IMPLEMENTATION_CLASS_UID, AssociateRequest
from tests.peers import echoscu, storescu

pytestmark = pytest.mark.integration

ALLOWED = {"STORESCU", "ECHOSCU", "PYSCU"}


class Recorder:
    """A store callback that keeps every request and answers with a chosen status."""

    def __init__(self) -> None:
        self.requests: list[StoreRequest] = []
        self.associations: list = []
        self.status = (0x0000, "")
        self.lock = threading.Lock()

    def store(self, req: StoreRequest) -> tuple[int, str]:
        with self.lock:
            self.requests.append(req)
        return self.status

    def by_uid(self) -> dict[str, StoreRequest]:
        return {r.affected_sop_instance_uid: r for r in self.requests}


@pytest.fixture()
def scp():
    rec = Recorder()
    server = StorageSCP("DICOMNODE", "127.0.0.1", 0, store=rec.store, allow=lambda ae, host: ae in ALLOWED,
                        network_timeout=5, on_association=rec.associations.append)
    server.start()
    yield server, rec
    server.stop()


def phantoms(folder: Path, n: int, size: int = 64, modality: str = "CT") -> list[Path]:
    rng = np.random.default_rng(11)
    pat = PhantomPatient.make(rng, "fs", 1)
    sop = CT_IMAGE if modality == "CT" else CR_IMAGE
    return [save(image_dataset((rng.random((size, size)) * 4000).astype(np.uint16), patient=pat, modality=modality,
                               sop_class_uid=sop, instance_number=i + 1), folder) for i in range(n)]


def dataset_part(path: Path) -> bytes:
    """The bytes after the file meta group: what a sender puts in the P-DATA fragments."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    group_length = struct.unpack_from("<I", raw, 132 + 8)[0]
    return raw[132 + 12 + group_length:]


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.01)


def test_storescu_instances_arrive_byte_for_byte(scp, tmp_path):
    server, rec = scp
    files = phantoms(tmp_path / "in", 50)
    r = storescu(server.port, files)
    assert r.returncode == 0, r.stderr
    got = rec.by_uid()
    assert len(rec.requests) == 50 and len(got) == 50
    for f in files:
        src = pydicom.dcmread(f, stop_before_pixels=True)
        req = got[src.SOPInstanceUID]
        assert bytes(req.dataset) == dataset_part(f)
        assert (req.sop_class_uid, req.affected_sop_class_uid) == (CT_IMAGE, CT_IMAGE)
        assert req.transfer_syntax == "1.2.840.10008.1.2.1" and (req.calling_ae, req.host) == ("STORESCU", "127.0.0.1")
    wait_until(lambda: rec.associations)
    info = rec.associations[0]
    assert (info.outcome, info.instances, info.failures) == ("released", 50, 0)
    assert info.bytes == sum(len(dataset_part(f)) for f in files)
    # file_meta() + dataset is a complete Part 10 file that reads back as the original
    req = got[pydicom.dcmread(files[0]).SOPInstanceUID]
    back = pydicom.dcmread(io.BytesIO(req.file_meta() + req.dataset))
    assert back.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert back.PixelData == pydicom.dcmread(files[0]).PixelData


def test_echo_and_disallowed_caller(scp, tmp_path):
    server, rec = scp
    r = echoscu(server.port)
    assert r.returncode == 0, r.stderr
    r = storescu(server.port, phantoms(tmp_path / "in", 1), aet="INTRUDER")
    assert r.returncode != 0 and "Calling AE Title Not Recognized" in r.stderr
    assert rec.requests == []
    wait_until(lambda: server.active_associations == 0)
    assert [a.echoes for a in rec.associations] == [1]  # the rejected one never became an association


def test_jpeg2000_keeps_its_transfer_syntax(scp, realdata):
    server, rec = scp
    src = realdata / "pydicom-data/data_store/data/693_J2KR.dcm"
    r = storescu(server.port, [src], extra=["-R", "-xv"])
    assert r.returncode == 0, r.stderr
    (req,) = rec.requests
    assert req.transfer_syntax == "1.2.840.10008.1.2.4.90"
    back = pydicom.dcmread(io.BytesIO(req.file_meta() + req.dataset))
    orig = pydicom.dcmread(src)
    assert back.file_meta.TransferSyntaxUID == orig.file_meta.TransferSyntaxUID
    assert back.PixelData == orig.PixelData and back.SOPInstanceUID == orig.SOPInstanceUID


def test_pynetdicom_gets_the_status_the_callback_chose(scp, tmp_path):
    server, rec = scp
    rec.status = (0xA700, "disk full on the node")
    ds = pydicom.dcmread(phantoms(tmp_path / "in", 1)[0])
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CT_IMAGE, ["1.2.840.10008.1.2.1"])
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.2.2.1")  # study root C-FIND: not ours
    assoc = ae.associate("127.0.0.1", server.port, ae_title="DICOMNODE")
    assert assoc.is_established
    results = {c.abstract_syntax: c.result for c in assoc.accepted_contexts + assoc.rejected_contexts}
    assert results == {CT_IMAGE: 0, "1.2.840.10008.1.1": 0, "1.2.840.10008.5.1.4.1.2.2.1": 3}
    assert assoc.acceptor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
    assert assoc.acceptor.implementation_version_name == "DICOMNODE"
    assert assoc.acceptor.maximum_length == 1 << 20
    status = assoc.send_c_store(ds)
    assert status.Status == 0xA700 and status.ErrorComment == "disk full on the node"
    assert assoc.send_c_echo().Status == 0x0000
    # a request this SCP does not serve, on an accepted context, gets "unrecognised operation"
    rsp, _ = assoc.send_n_get([0x00100010], CT_IMAGE, ds.SOPInstanceUID)
    assert rsp.Status == 0x0211
    assoc.release()
    assert assoc.is_released
    wait_until(lambda: rec.associations)
    assert (rec.associations[0].instances, rec.associations[0].failures) == (0, 2)


def test_too_many_associations_are_rejected(tmp_path):
    rec = Recorder()
    server = StorageSCP("DICOMNODE", "127.0.0.1", 0, store=rec.store, allow=lambda ae, host: True,
                        max_associations=1, network_timeout=5)
    server.start()
    try:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context("1.2.840.10008.1.1")
        held = ae.associate("127.0.0.1", server.port)
        assert held.is_established
        r = echoscu(server.port)
        assert r.returncode != 0 and "Local Limit Exceeded" in r.stderr
        held.release()
        wait_until(lambda: server.active_associations == 0)
        assert echoscu(server.port).returncode == 0
    finally:
        server.stop()


def _raw(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    return s


def test_garbage_and_cut_connections_do_not_break_the_server(scp, tmp_path):
    server, rec = scp
    with _raw(server.port) as s:  # not a PDU at all: Sta2 + invalid PDU is AA-1, A-ABORT from the service user
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(10) == bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0))
    with _raw(server.port) as s:  # an A-ASSOCIATE-RQ header promising more than arrives
        s.sendall(bytes((0x01, 0, 0, 0, 0x10, 0)) + b"\x00\x01" + b"x" * 40)
    with _raw(server.port) as s:  # an association request whose items overrun it
        s.sendall(bytes((0x01, 0, 0, 0, 0, 72)) + b"\x00\x01\x00\x00" + b"ANY".ljust(16) + b"X".ljust(16) + bytes(32)
                  + bytes((0x10, 0, 0xFF, 0xFF)))
        assert s.recv(10)[:1] == b"\x07"
    # cut mid-P-DATA on an established association
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CT_IMAGE, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", server.port)
    assert assoc.is_established
    sock = assoc.dul.socket.socket
    sock.sendall(bytes((0x04, 0, 0, 0, 0x40, 0)) + b"\x00" * 20)
    sock.shutdown(socket.SHUT_RDWR)
    assoc.abort()
    wait_until(lambda: server.active_associations == 0)
    assert rec.associations and rec.associations[-1].outcome.startswith("aborted")
    files = phantoms(tmp_path / "in", 3)
    r = storescu(server.port, files)
    assert r.returncode == 0, r.stderr
    assert len(rec.requests) == 3


def test_silent_peer_is_dropped_after_the_network_timeout(tmp_path):
    rec = Recorder()
    server = StorageSCP("DICOMNODE", "127.0.0.1", 0, store=rec.store, allow=lambda ae, host: True,
                        network_timeout=0.3)
    server.start()
    try:
        with _raw(server.port) as s:
            t0 = time.monotonic()
            assert s.recv(10) == b""  # Sta2 + ARTIM expired is AA-2: the connection is closed without a word
            assert 0.25 < time.monotonic() - t0 < 3
        wait_until(lambda: server.waiting_connections == 0)
    finally:
        server.stop()


def test_big_instances_use_big_pdus(scp, tmp_path):
    server, rec = scp
    files = phantoms(tmp_path / "cr", 2, size=2048, modality="CR")
    r = storescu(server.port, files[:1])  # DCMTK caps its PDUs at 128 KiB
    assert r.returncode == 0, r.stderr
    ae = AE(ae_title="PYSCU")  # pynetdicom fills our 1 MiB maximum
    ae.add_requested_context(CR_IMAGE, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", server.port)
    assert assoc.send_c_store(files[1]).Status == 0x0000
    assoc.release()
    got = rec.by_uid()
    for f in files:
        assert bytes(got[pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID].dataset) == dataset_part(f)


def test_stop_ends_open_associations(tmp_path):
    rec = Recorder()
    server = StorageSCP("DICOMNODE", "127.0.0.1", 0, store=rec.store, allow=lambda ae, host: True,
                        on_association=rec.associations.append)
    server.start()
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", server.port)
    assert assoc.is_established
    port = server.port
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 3 and server.active_associations == 0
    assert rec.associations and rec.associations[0].outcome == "aborted: the node is stopping"
    wait_until(lambda: assoc.is_aborted)  # the peer was told with an A-ABORT, not left hanging
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a test certificate")
def test_tls(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    rec = Recorder()
    server = StorageSCP("DICOMNODE", "127.0.0.1", 0, store=rec.store, allow=lambda ae, host: True,
                        ssl_context=server_ctx, network_timeout=5)
    server.start()
    try:
        client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(CT_IMAGE, ["1.2.840.10008.1.2.1"])
        assoc = ae.associate("127.0.0.1", server.port, tls_args=(client_ctx, "localhost"))
        assert assoc.is_established
        f = phantoms(tmp_path / "in", 1)[0]
        assert assoc.send_c_store(f).Status == 0x0000
        assoc.release()
        assert bytes(rec.requests[0].dataset) == dataset_part(f)
        held = ae.associate("127.0.0.1", server.port, tls_args=(client_ctx, "localhost"))
        assert held.is_established
        server.stop()
        wait_until(lambda: held.is_aborted)
        assert server.active_associations == 0
    finally:
        server.stop()


def test_command_sets_read_back_with_pydicom():
    raw = encode_response(0x8001, 7, 0xA700, CT_IMAGE, "1.2.3.4", "odd-length comment")
    ds = pydicom.dcmread(io.BytesIO(raw), force=True)
    assert (ds.CommandField, ds.MessageIDBeingRespondedTo, ds.Status) == (0x8001, 7, 0xA700)
    assert ds.AffectedSOPInstanceUID == "1.2.3.4" and ds.ErrorComment == "odd-length comment"
    assert ds.CommandGroupLength == len(raw) - 12
    assert parse_command(raw)[0x0900] == struct.pack("<H", 0xA700)


def test_negotiation_results():
    explicit, implicit, j2k, private = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.90", "1.2.840.113619.5.2"
    rq = AssociateRequest(protocol_version=1, called_ae="ANY", calling_ae="X", contexts=[
        (1, "1.2.840.10008.1.1", [explicit, implicit]),  # Verification: always Implicit VR LE
        (3, "1.2.840.10008.1.1", [explicit]),
        (5, CT_IMAGE, [j2k, explicit]),                   # the sender's first choice wins
        (7, CT_IMAGE, [private, explicit]),               # private syntaxes are skipped
        (9, CR_IMAGE, [private]),
        (11, "1.2.840.10008.5.1.4.1.2.2.1", [implicit]),  # C-FIND is not storage
        (13, "1.2.840.10008.5.1.4.1.1.4", [implicit]),    # refused by the callback
        (15, CR_IMAGE, ["1.2.840.10008.1.2.4.999", "1.2.840.10008.1.2.1.42", explicit]),  # made-up ones are skipped
        (17, CR_IMAGE, ["1.2.840.10008.1.2.77"]),
        (19, CR_IMAGE, ["1.2.840.10008.1.2.4.94"]),       # JPIP: the pixel data would be elsewhere
    ])
    neg = negotiate(rq, lambda uid: uid != "1.2.840.10008.5.1.4.1.1.4")
    assert {k: v.transfer_syntax for k, v in neg.contexts.items()} == {1: implicit, 5: j2k, 7: explicit, 15: explicit}
    assert neg.refused == {3: 4, 9: 4, 11: 3, 13: 3, 17: 4, 19: 4}


def test_a_failing_callback_gets_0xC211_and_the_association_carries_on(tmp_path):
    answers = iter([RuntimeError("disk gone"), "not a status"])

    def store(req: StoreRequest):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    server = StorageSCP("DICOMNODE", "127.0.0.1", 0, store=store, allow=lambda ae, host: True, network_timeout=5)
    server.start()
    try:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(CT_IMAGE, ["1.2.840.10008.1.2.1"])
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", server.port)
        files = phantoms(tmp_path / "in", 2)
        assert [assoc.send_c_store(f).Status for f in files] == [0xC211, 0xC211]
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    finally:
        server.stop()
