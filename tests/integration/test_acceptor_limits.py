"""The acceptor's resources under hostile peers: stalled and trickling connections, floods, memory in an association.

Every test talks to a live acceptor over real sockets and ends with a real C-ECHO (DCMTK echoscu)
that must still succeed.
"""

from __future__ import annotations

import gc
import shutil
import ssl
import subprocess
import threading
import time

import pytest
from pynetdicom import AE

from dicomnode.dimse import pdu
from dicomnode.dimse.acceptor import MAX_COMMAND, MAX_IGNORED_DATA_SET, StorageSCP
from dicomnode.dimse.commands import element, padded
from tests.dimse_raw import (
    abort_of, associate, connect, describe, echo_rq, p_data, read_pdu, request, response_status, rss_bytes,
    wait_closed,
)
from tests.peers import echoscu

pytestmark = pytest.mark.integration


def make_scp(**kw) -> StorageSCP:
    options = dict(store=lambda req: (0, ""), allow=lambda ae, host: ae in {"PYSCU", "ECHOSCU"}, network_timeout=5)
    options.update(kw)
    scp = StorageSCP("DICOMNODE", "127.0.0.1", 0, **options)
    scp.start()
    return scp


@pytest.fixture()
def scp_factory():
    started: list[StorageSCP] = []

    def make(**kw) -> StorageSCP:
        started.append(make_scp(**kw))
        return started[-1]

    yield make
    for scp in started:
        scp.stop()


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_200_stalled_connections_cost_no_thread_and_do_not_stop_a_c_echo(scp_factory, capsys, record_property):
    scp = scp_factory(max_associations=4, max_pdu=256 << 20, network_timeout=3)
    gc.collect()
    rss0, threads0 = rss_bytes(), threading.active_count()
    stalled = []
    head = request()[:40]  # the first 40 bytes of an A-ASSOCIATE-RQ, then nothing
    t_stall = time.monotonic()
    for _ in range(200):
        s = connect(scp.port)
        s.sendall(head)
        stalled.append(s)
    wait_until(lambda: scp.waiting_connections == 200)
    t0 = time.monotonic()
    r = echoscu(scp.port)
    echo_ms = (time.monotonic() - t0) * 1000
    assert r.returncode == 0, r.stderr
    grown = rss_bytes() - rss0
    assert threading.active_count() <= threads0 + 1  # none per stalled connection (the echo's may linger)
    assert grown < 32 << 20, f"200 stalled connections grew RSS by {grown / 1e6:.1f} MB"
    assert scp.active_associations == 0 or wait_until(lambda: scp.active_associations == 0) is None
    # each stalled connection is closed once the ARTIM time has passed since it connected
    wait_closed(stalled[0], 6)
    closed_after = time.monotonic() - t_stall
    record_property("answer", f"echoscu answered in {echo_ms:.0f} ms; RSS {grown / 1e6:+.1f} MB, no thread; "
                              f"network_timeout 3 s: stalled connections closed {closed_after:.1f} s after they "
                              "connected, without a word")
    wait_until(lambda: scp.waiting_connections == 0, 6)
    for s in stalled:
        s.close()
    with capsys.disabled():
        print(f"\n200 stalled connections with max_pdu 256 MiB: RSS +{grown / 1e6:.1f} MB, "
              f"threads +{threading.active_count() - threads0}, C-ECHO in {echo_ms:.0f} ms")


def test_a_trickling_peer_is_dropped_after_the_network_timeout_not_after_its_last_byte(scp_factory, record_property):
    scp = scp_factory(network_timeout=1)
    s = connect(scp.port)
    rq = request()
    t0 = time.monotonic()
    closed = None
    for i in range(20):  # one byte every 0.3 s would keep a per-read timeout happy for 6 s
        try:
            s.sendall(rq[i:i + 1])
        except OSError:
            closed = time.monotonic() - t0
            break
        time.sleep(0.3)
        s.settimeout(0.01)
        try:
            if s.recv(10) == b"":
                closed = time.monotonic() - t0
                break
        except (TimeoutError, OSError):
            pass
    record_property("answer", f"network_timeout 1 s, one byte every 0.3 s: closed after {closed or 0:.1f} s")
    assert closed is not None and closed < 2.5, closed
    assert echoscu(scp.port).returncode == 0


def test_a_flood_beyond_the_waiting_room_closes_the_oldest_and_a_sender_still_gets_in(scp_factory, record_property):
    scp = scp_factory(max_waiting=20, network_timeout=30)
    flood = [connect(scp.port) for _ in range(60)]
    for s in flood:
        s.sendall(b"\x01\x00")
    wait_until(lambda: scp.waiting_connections == 20)
    assert wait_closed(flood[0], 2) < 2  # the oldest went first
    r = echoscu(scp.port)
    record_property("answer", f"60 connections, room for 20: the oldest closed; echoscu exit status {r.returncode}")
    assert r.returncode == 0, r.stderr
    for s in flood:
        s.close()


def test_connections_beyond_max_associations_are_rejected_at_once(scp_factory, record_property):
    scp = scp_factory(max_associations=2)
    held = [associate(scp.port) for _ in range(2)]
    assert scp.active_associations == 2
    s = connect(scp.port)
    t0 = time.monotonic()
    s.sendall(request())
    answer = read_pdu(s)
    record_property("answer", f"{describe(answer)} after {(time.monotonic() - t0) * 1000:.0f} ms")
    assert answer is not None and answer[0] == pdu.ASSOCIATE_RJ
    assert tuple(answer[1][1:4]) == pdu.REJECT_LOCAL_LIMIT and time.monotonic() - t0 < 0.5
    s.close()
    r = echoscu(scp.port)
    assert r.returncode != 0 and "Local Limit Exceeded" in r.stderr
    held[0].sendall(pdu.RELEASE_RQ_PDU)
    assert read_pdu(held[0])[0] == pdu.RELEASE_RP
    held[0].close()
    wait_until(lambda: scp.active_associations == 1)
    assert echoscu(scp.port).returncode == 0
    held[1].close()


def test_artim_after_release_and_after_abort(scp_factory, record_property):
    scp = scp_factory(network_timeout=1)
    s = associate(scp.port)
    s.sendall(pdu.RELEASE_RQ_PDU)
    assert read_pdu(s)[0] == pdu.RELEASE_RP
    after_release = wait_closed(s, 3)
    assert 0.8 < after_release < 2  # the peer never closed: Sta13 ends with ARTIM
    s = associate(scp.port)
    s.sendall(p_data((3, 0x03, echo_rq())))  # a context that was never proposed: A-ABORT (AA-8)
    assert abort_of(read_pdu(s)) == (2, pdu.ABORT_UNEXPECTED_PARAMETER)
    s.sendall(request())  # Sta13 + A-ASSOCIATE-RQ is AA-7: another A-ABORT
    assert abort_of(read_pdu(s)) == (2, pdu.ABORT_UNEXPECTED_PDU)
    s.sendall(pdu.RELEASE_RQ_PDU)  # Sta13 + anything else is AA-6: ignored
    after_abort = wait_closed(s, 3)
    record_property("answer", f"network_timeout 1 s: closed {after_release:.1f} s after A-RELEASE-RP and "
                              f"{after_abort:.1f} s after the last PDU following A-ABORT; A-ASSOCIATE-RQ meanwhile "
                              "answered with another A-ABORT")
    assert 0.5 < after_abort < 2
    wait_until(lambda: scp.waiting_connections == 0 and scp.active_associations == 0)


def test_a_peer_stalling_inside_a_pdu_is_aborted_after_the_network_timeout(scp_factory, record_property):
    scp = scp_factory(network_timeout=1)
    s = associate(scp.port)
    whole = p_data((1, 0x03, echo_rq()))
    t0 = time.monotonic()
    for b in whole[:-1]:  # the whole PDU trickles in for longer than the timeout allows
        s.sendall(bytes((b,)))
        time.sleep(0.05)
        if time.monotonic() - t0 > 1.6:
            break
    s.settimeout(3)
    answer = read_pdu(s)
    record_property("answer", f"{describe(answer)} {time.monotonic() - t0:.1f} s into the PDU")
    assert abort_of(answer) == (0, 0)  # the node gave up: an A-ABORT of its own
    assert time.monotonic() - t0 < 2.5
    assert echoscu(scp.port).returncode == 0


def test_an_idle_association_is_aborted_after_the_network_timeout(scp_factory, record_property):
    scp = scp_factory(network_timeout=0.5)
    s = associate(scp.port)
    s.sendall(p_data((1, 0x03, echo_rq())))
    assert response_status(s) == (0x8030, 0)
    s.settimeout(3)
    t0 = time.monotonic()
    answer = read_pdu(s)
    record_property("answer", f"network_timeout 0.5 s: {describe(answer)} after {time.monotonic() - t0:.1f} s idle")
    assert abort_of(answer) == (0, 0)
    assert 0.4 < time.monotonic() - t0 < 1.5


# -- memory inside an association ------------------------------------------------------------

def test_endless_command_fragments_are_aborted_at_the_command_limit(scp_factory, record_property):
    scp = scp_factory()
    s = associate(scp.port)
    piece = bytes(16000)
    sent = 0
    answer = None
    s.settimeout(5)
    while sent < 4 * MAX_COMMAND:  # never the last fragment
        try:
            s.sendall(p_data((1, 0x01, piece)))
        except OSError:
            break
        sent += len(piece)
    answer = read_pdu(s)
    record_property("answer", f"{describe(answer)} (limit {MAX_COMMAND} bytes; {sent} sent before the answer was read)")
    assert abort_of(answer) == (2, pdu.ABORT_INVALID_PARAMETER)
    assert echoscu(scp.port).returncode == 0


def test_c_echo_announcing_a_data_set_is_aborted(scp_factory, record_property):
    scp = scp_factory()
    s = associate(scp.port)
    body = (element(0x0002, padded("1.2.840.10008.1.1", b"\x00")) + element(0x0100, b"\x30\x00")
            + element(0x0110, b"\x01\x00") + element(0x0800, b"\x00\x00"))  # data set present
    command = element(0x0000, len(body).to_bytes(4, "little")) + body
    s.sendall(p_data((1, 0x03, command)))
    answer = read_pdu(s)
    record_property("answer", describe(answer))
    assert abort_of(answer) == (2, pdu.ABORT_INVALID_PARAMETER)


def test_data_set_of_an_unsupported_request_is_not_kept_and_is_bounded(scp_factory, record_property):
    scp = scp_factory()
    find = "1.2.840.10008.5.1.4.1.2.2.1"  # refused as a context: C-FIND goes on the storage one
    ct = "1.2.840.10008.5.1.4.1.1.2"
    s = associate(scp.port, contexts=[(1, "1.2.840.10008.1.1", ["1.2.840.10008.1.2"]),
                                      (3, ct, ["1.2.840.10008.1.2.1"]), (5, find, ["1.2.840.10008.1.2"])])
    body = (element(0x0002, padded(ct, b"\x00")) + element(0x0100, b"\x20\x00")
            + element(0x0110, b"\x07\x00") + element(0x0800, b"\x00\x00"))
    command = element(0x0000, len(body).to_bytes(4, "little")) + body
    s.sendall(p_data((3, 0x03, command), (3, 0x02, b"\x08\x00\x50\x00\x02\x00\x00\x00CT")))
    short = response_status(s)
    assert short == (0x8020, 0x0211)  # a short identifier: answered "unrecognized operation"
    rss0 = rss_bytes()
    s.sendall(p_data((3, 0x03, command)))
    piece = bytes(15000)
    s.settimeout(5)
    try:
        for _ in range(4 * MAX_IGNORED_DATA_SET // len(piece)):
            s.sendall(p_data((3, 0x00, piece)))
    except OSError:
        pass
    answer = read_pdu(s)
    grown = rss_bytes() - rss0
    record_property("answer", f"C-FIND with a short identifier: status {short[1]:#06x}; with an endless one: "
                              f"{describe(answer)}, RSS {grown / 1e6:+.1f} MB")
    assert abort_of(answer) == (2, pdu.ABORT_INVALID_PARAMETER)
    assert grown < 8 << 20
    assert echoscu(scp.port).returncode == 0


def test_a_pdu_over_the_maximum_is_aborted_from_its_header(scp_factory, record_property):
    scp = scp_factory(max_pdu=16384)
    s = associate(scp.port)
    rss0 = rss_bytes()
    s.sendall(pdu.PDU_HEADER.pack(pdu.P_DATA_TF, 16385))  # one byte over, announced and never sent
    assert abort_of(read_pdu(s)) == (2, pdu.ABORT_INVALID_PARAMETER)
    s = associate(scp.port)
    s.sendall(pdu.PDU_HEADER.pack(pdu.P_DATA_TF, 0xFFFFFFF0))  # 4 GiB announced: nothing allocated for it
    answer = read_pdu(s)
    grown = rss_bytes() - rss0
    record_property("answer", f"{describe(answer)} for 1 byte over and for 4 GiB announced; RSS {grown / 1e6:+.1f} MB")
    assert abort_of(answer) == (2, pdu.ABORT_INVALID_PARAMETER)
    assert grown < 8 << 20


def test_a_made_up_transfer_syntax_is_never_accepted(scp_factory, record_property):
    scp = scp_factory()
    ct = "1.2.840.10008.5.1.4.1.1.2"
    s = connect(scp.port)
    s.sendall(request([(1, ct, ["1.2.840.10008.1.2.4.999"]), (3, ct, ["1.2.840.10008.1.2.1"])]))
    answer = read_pdu(s)
    assert answer is not None and answer[0] == pdu.ASSOCIATE_AC
    results = pdu.parse_associate_ac(answer[1]).results
    record_property("answer", f"context results {results}")
    assert results == {1: (4, "1.2.840.10008.1.2.4.999"), 3: (0, "1.2.840.10008.1.2.1")}
    s.close()


def test_a_failed_buffer_allocation_gives_back_the_socket_and_the_slot(scp_factory, monkeypatch, record_property):
    scp = scp_factory(max_associations=1)
    real_read = pdu.PDUReader.read
    failed = []

    def read(self, limit, deadline=None):  # the fault: the first PDU buffer of the association cannot be had
        if not failed:
            failed.append(1)
            raise MemoryError()
        return real_read(self, limit, deadline)

    monkeypatch.setattr(pdu.PDUReader, "read", read)
    s = associate(scp.port)
    s.sendall(p_data((1, 0x03, echo_rq())))
    answer = read_pdu(s)
    assert abort_of(answer) == (0, 0)
    s.close()
    wait_until(lambda: scp.active_associations == 0 and scp.waiting_connections == 0)
    r = echoscu(scp.port)
    record_property("answer", f"MemoryError injected: {describe(answer)}; the only slot free again, echoscu exit "
                              f"status {r.returncode}")
    assert r.returncode == 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a test certificate")
def test_stalled_tls_handshakes_cost_no_thread_and_do_not_stop_a_tls_association(scp_factory, tmp_path,
                                                                                  record_property):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    scp = scp_factory(ssl_context=server_ctx, network_timeout=2)
    threads0 = threading.active_count()
    stalled = []
    for _ in range(50):  # half a TLS record header, then nothing
        s = connect(scp.port)
        s.sendall(b"\x16\x03\x01")
        stalled.append(s)
    wait_until(lambda: scp.waiting_connections == 50)
    assert threading.active_count() == threads0
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    t0 = time.monotonic()
    assoc = ae.associate("127.0.0.1", scp.port, tls_args=(client_ctx, "localhost"))
    assert assoc.is_established
    status = assoc.send_c_echo().Status
    assoc.release()
    echo_ms = (time.monotonic() - t0) * 1000
    closed = wait_closed(stalled[0], 4)
    record_property("answer", f"50 stalled TLS handshakes held without a thread; a TLS association's C-ECHO status "
                              f"{status:#06x} in {echo_ms:.0f} ms; the stalled ones closed by ARTIM")
    assert status == 0 and closed < 4
    for s in stalled:
        s.close()
