"""PS3.8 protocol cases no real peer sends, over raw sockets to a live acceptor.

The answers follow PS3.8's state table (table 9-10): before an association (Sta2) an unexpected
or invalid PDU gets AA-1, an A-ABORT from the service user; on an established association (Sta6)
AA-8, an A-ABORT from the service provider whose reason names the fault (PS3.8 9.3.8).
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from analyzers.phantoms import PhantomPatient, image_dataset
from dicomnode.uids import CT_IMAGE
from dicomnode.dimse import pdu
from dicomnode.dimse.acceptor import StorageSCP, StoreRequest
from dicomnode.dimse.commands import encode_store_rq
from tests.dimse_raw import (
    ECHO_CONTEXT, abort_of, associate, connect, describe, echo_rq, p_data, read_pdu, request, response_status,
)
from tests.peers import echoscu

pytestmark = pytest.mark.integration

EXPLICIT = "1.2.840.10008.1.2.1"
CT_CONTEXT = (3, CT_IMAGE, [EXPLICIT])


@pytest.fixture()
def scp():
    got: list[StoreRequest] = []
    server = StorageSCP("DICOMNODE", "127.0.0.1", 0, store=lambda req: (got.append(req), (0, ""))[1],
                        allow=lambda ae, host: True, network_timeout=2, max_pdu=16384)
    server.start()
    yield server, got
    assert echoscu(server.port).returncode == 0  # whatever a test sent, the node still answers
    server.stop()


def ct_dataset() -> tuple[str, bytes]:
    rng = np.random.default_rng(2)
    ds = image_dataset((rng.random((40, 40)) * 4000).astype(np.uint16), patient=PhantomPatient.make(rng, "pc", 1),
                       modality="CT", sop_class_uid=CT_IMAGE)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return ds.SOPInstanceUID, buf.getvalue()


# -- before an association (Sta2) -------------------------------------------------------------

@pytest.mark.parametrize("contexts", [
    [(2, CT_IMAGE, [EXPLICIT])],                       # even
    [ECHO_CONTEXT, (1, CT_IMAGE, [EXPLICIT])],         # the same ID twice
], ids=["even", "duplicate"])
def test_even_or_duplicate_presentation_context_ids_are_refused(scp, contexts, record_property):
    server, _ = scp
    s = connect(server.port)
    s.sendall(request(contexts))
    answer = read_pdu(s)
    record_property("answer", describe(answer))
    assert abort_of(answer) == (0, 0)
    s.close()


@pytest.mark.parametrize("first", [
    p_data((1, 0x03, echo_rq())),
    pdu.RELEASE_RQ_PDU,
    pdu.RELEASE_RP_PDU,
    bytes((pdu.ASSOCIATE_AC, 0, 0, 0, 0, 2, 0, 1)),
    bytes((pdu.ASSOCIATE_RJ, 0, 0, 0, 0, 4, 0, 1, 1, 1)),
    bytes((0x09, 0, 0, 0, 0, 0)),
], ids=["p-data", "release-rq", "release-rp", "associate-ac", "associate-rj", "unknown-type"])
def test_anything_but_an_association_request_first_gets_aa1(scp, first, record_property):
    server, _ = scp
    s = connect(server.port)
    s.sendall(first)
    answer = read_pdu(s)
    record_property("answer", describe(answer))
    assert abort_of(answer) == (0, 0)
    s.close()


def test_an_abort_before_the_association_just_closes(scp, record_property):
    server, _ = scp
    s = connect(server.port)
    s.sendall(pdu.abort_pdu(0, 0))
    answer = read_pdu(s)
    record_property("answer", describe(answer))
    assert answer is None  # AA-2: nothing sent back


# -- on an established association (Sta6) ----------------------------------------------------

@pytest.mark.parametrize("unexpected, reason", [
    (request(), pdu.ABORT_UNEXPECTED_PDU),
    (bytes((pdu.ASSOCIATE_AC, 0, 0, 0, 0, 2, 0, 1)), pdu.ABORT_UNEXPECTED_PDU),
    (bytes((pdu.ASSOCIATE_RJ, 0, 0, 0, 0, 4, 0, 1, 1, 1)), pdu.ABORT_UNEXPECTED_PDU),
    (pdu.RELEASE_RP_PDU, pdu.ABORT_UNEXPECTED_PDU),
    (bytes((0x0A, 0, 0, 0, 0, 0)), pdu.ABORT_UNRECOGNIZED_PDU),
    (bytes((pdu.P_DATA_TF, 0, 0, 0, 0, 4, 0, 0, 0, 1)), pdu.ABORT_INVALID_PARAMETER),       # PDV of length 1
    (bytes((pdu.P_DATA_TF, 0, 0, 0, 0, 6, 0, 0, 0, 9, 1, 3)), pdu.ABORT_INVALID_PARAMETER),  # PDV overruns its PDU
    (p_data((1, 0x02, b"\x00" * 8)), pdu.ABORT_UNEXPECTED_PARAMETER),                          # data set, no command
    (p_data((1, 0x03, b"\x08\x00\x00\x00\x02\x00")), pdu.ABORT_INVALID_PARAMETER),             # not a command set
], ids=["associate-rq", "associate-ac", "associate-rj", "release-rp", "unknown-type", "short-pdv", "overrun-pdv",
        "data-without-command", "garbage-command"])
def test_unexpected_or_invalid_pdus_get_aa8_with_their_reason(scp, unexpected, reason, record_property):
    server, _ = scp
    s = associate(server.port)
    s.sendall(unexpected)
    answer = read_pdu(s)
    record_property("answer", describe(answer))
    assert abort_of(answer) == (2, reason)
    s.close()


def test_several_pdvs_in_one_pdu(scp, record_property):
    server, got = scp
    uid, data = ct_dataset()
    s = associate(server.port, contexts=[ECHO_CONTEXT, CT_CONTEXT])
    # two whole C-ECHO requests in one PDU, answered in order
    s.sendall(p_data((1, 0x03, echo_rq(1)), (1, 0x03, echo_rq(2))))
    echoes = [response_status(s), response_status(s)]
    assert echoes == [(0x8030, 0), (0x8030, 0)]
    # a C-STORE's command and its data set, in five PDVs of one PDU
    half = len(data) // 2
    command = encode_store_rq(3, CT_IMAGE, uid)
    s.sendall(p_data((3, 0x01, command[:20]), (3, 0x03, command[20:]), (3, 0x00, data[:half]),
                     (3, 0x00, data[half:-10]), (3, 0x02, data[-10:])))
    store = response_status(s)
    same = bytes(got[0].dataset) == data
    record_property("answer", f"two C-ECHO-RSP with status {echoes[0][1]:#06x} and {echoes[1][1]:#06x}; "
                              f"C-STORE-RSP status {store[1]:#06x}, data set byte for byte: {same}")
    assert store == (0x8001, 0)
    assert bytes(got[0].dataset) == data and got[0].affected_sop_instance_uid == uid
    s.sendall(pdu.RELEASE_RQ_PDU)
    assert read_pdu(s)[0] == pdu.RELEASE_RP
    s.close()


def test_a_command_split_over_pdus_and_a_data_set_in_pdus_of_the_maximum_length(scp, record_property):
    server, got = scp
    uid, data = ct_dataset()
    s = associate(server.port, contexts=[ECHO_CONTEXT, CT_CONTEXT])
    command = encode_store_rq(5, CT_IMAGE, uid)
    for i in range(0, len(command), 7):  # seven bytes of command per PDU
        last = i + 7 >= len(command)
        s.sendall(p_data((3, 0x03 if last else 0x01, command[i:i + 7])))
    fragment = 16384 - 6  # the PDU's length is then exactly our maximum
    for i in range(0, len(data), fragment):
        s.sendall(p_data((3, 0x02 if i + fragment >= len(data) else 0x00, data[i:i + fragment])))
    store = response_status(s)
    assert store == (0x8001, 0)
    assert bytes(got[0].dataset) == data
    back = pydicom.dcmread(io.BytesIO(got[0].file_meta() + got[0].dataset))
    assert back.SOPInstanceUID == uid
    s.sendall(p_data((3, 0x01, command[:10]), (1, 0x03, echo_rq(9))))  # a command interleaved with another
    answer = read_pdu(s)
    record_property("answer", f"C-STORE-RSP status {store[1]:#06x}; then a command interleaved with another: "
                              f"{describe(answer)}")
    assert abort_of(answer) == (2, pdu.ABORT_UNEXPECTED_PARAMETER)
    s.close()


def test_max_pdu_overflow(scp, record_property):
    server, _ = scp
    s = associate(server.port)
    piece = bytes(16384 - 6 + 1)  # one byte more than the maximum we announced
    s.sendall(struct.pack(">BxI", pdu.P_DATA_TF, len(piece) + 6) + struct.pack(">IBB", len(piece) + 2, 1, 0x01) + piece)
    answer = read_pdu(s)
    record_property("answer", describe(answer))
    assert abort_of(answer) == (2, pdu.ABORT_INVALID_PARAMETER)
    s.close()
