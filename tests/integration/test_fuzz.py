"""Fuzzing (hypothesis) of every parser that reads untrusted bytes, and of a live acceptor over real sockets.

Seeds are real: the traffic of DCMTK storescu and echoscu, pynetdicom and the node's requestor,
recorded by a tap in front of the node's acceptor (:mod:`tests.traffic`), and the data sets of the
files in ``../shared/realdata`` (phantoms when it is absent). Hypothesis mutates them (byte flips,
inserted and deleted runs, cuts, length fields set to edge values, PDUs dropped, repeated and
reordered) and also draws plain random bytes.

What must hold: each parser returns or raises its one documented error; the live acceptor
answers every stream without an exception escaping a connection thread, keeps answering C-ECHO,
and ends with no connection, thread or descriptor left over. The default suite runs a few hundred
cases per target in seconds; ``pytest -m fuzz`` runs ``FUZZ_CASES`` (default 20000) per target and
prints how many ran.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analyzers.phantoms import PhantomPatient, image_dataset, save
from dicomnode.uids import CT_IMAGE
from dicomnode.config import Config
from dicomnode.dimse import pdu
from dicomnode.dimse.commands import parse_command
from dicomnode.dimse.part10 import read_file_meta
from dicomnode.dimse.requestor import echo
from dicomnode.header import read_header
from dicomnode.receiver import Receiver
from dicomnode.store import Store
from tests.conftest import REALDATA
from tests.dimse_raw import rss_bytes
from tests.peers import have_peers
from tests.traffic import record, split_pdus

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not have_peers(), reason="DCMTK not installed")]

DEFAULT_CASES = int(os.environ.get("FUZZ_DEFAULT_CASES", "150"))
FUZZ_CASES = int(os.environ.get("FUZZ_CASES", "20000"))
CALLERS = ("STORESCU", "ECHOSCU", "NODE", "PYSCU")
CRASH_EVENTS = {"association_crashed", "acceptor_gate_crashed", "acceptor_connection_crashed",
                "acceptor_request_failed"}
EDGE_LENGTHS = (0, 1, 2, 5, 6, 0x7F, 0xFF, 0x4000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF)


# -- seeds -----------------------------------------------------------------------------------

class Seeds:
    def __init__(self, conversations, datasets, file_heads) -> None:
        self.streams = [bytes(c.sent) for c in conversations]
        sent = [p for c in conversations for p in split_pdus(bytes(c.sent))]
        answered = [p for c in conversations for p in split_pdus(bytes(c.answered))]
        self.pdus = sent + answered
        self.rq = [p[6:] for p in sent if p[0] == pdu.ASSOCIATE_RQ]
        self.ac = [p[6:] for p in answered if p[0] == pdu.ASSOCIATE_AC]
        self.p_data = [p[6:] for p in self.pdus if p[0] == pdu.P_DATA_TF][:200]
        self.commands = []
        for body in self.p_data:
            for _, mch, fragment in pdu.pdvs(memoryview(body)):
                if mch & 1 == 1 and mch & 2:
                    self.commands.append(bytes(fragment))
        self.datasets = datasets
        self.file_heads = file_heads
        assert self.rq and self.ac and self.p_data and self.commands and self.datasets


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Seeds:
    folder = tmp_path_factory.mktemp("traffic")
    conversations = record(folder, REALDATA if REALDATA.is_dir() else None)
    datasets, heads = [], []
    files = sorted(REALDATA.rglob("*.dcm")) if REALDATA.is_dir() else []
    rng = np.random.default_rng(5)
    files += [save(image_dataset((rng.random((24, 24)) * 4000).astype(np.uint16), modality="CT",
                                 patient=PhantomPatient.make(rng, "fz", 1), sop_class_uid=CT_IMAGE), folder / "ph")]
    for f in files:
        try:
            meta = read_file_meta(f)
        except (OSError, ValueError):
            continue
        whole = f.read_bytes()
        heads.append(whole[:meta.offset + 256])
        raw = whole[meta.offset:]
        if len(raw) <= 1 << 20:  # whole data sets, so the success paths are fuzzed too
            datasets.append((raw, meta.transfer_syntax))
    return Seeds(conversations, datasets, heads)


@st.composite
def mutated(draw, seeds: list[bytes], max_mutations: int = 6) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, max_mutations))):
        op = draw(st.sampled_from(("flip", "insert", "delete", "cut", "length")))
        pos = draw(st.integers(0, len(data)))
        if op == "flip" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif op == "cut":
            del data[pos:]
        elif op == "length":
            value = draw(st.sampled_from(EDGE_LENGTHS))
            size, order = draw(st.sampled_from(((2, ">"), (4, ">"), (2, "<"), (4, "<"))))
            if value < 1 << (8 * size):
                data[pos:pos + size] = struct.pack(order + ("H" if size == 2 else "I"), value)
    return bytes(data)


def fuzzed(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(mutated(seeds), st.binary(max_size=4096))


def run_cases(strategy, check, cases: int) -> int:
    """``check(example)`` for ``cases`` examples drawn by hypothesis; returns how many ran."""
    ran = [0]

    @settings(max_examples=cases, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def property_holds(example) -> None:
        ran[0] += 1
        check(example)

    property_holds()
    return ran[0]


# -- the parsers -----------------------------------------------------------------------------

def check_associate_rq(body: bytes) -> None:
    try:
        rq = pdu.parse_associate_rq(body)
    except pdu.ProtocolError:
        return
    ids = [pcid for pcid, _, _ in rq.contexts]
    assert all(pcid & 1 for pcid in ids) and len(set(ids)) == len(ids)
    assert len(rq.called_ae) <= 16 and len(rq.calling_ae) <= 16


def check_associate_ac(body: bytes) -> None:
    try:
        pdu.parse_associate_ac(body)
    except pdu.ProtocolError:
        pass


def check_pdvs(body: bytes) -> None:
    try:
        total = sum(len(fragment) + 6 for _, _, fragment in pdu.pdvs(memoryview(body)))
    except pdu.ProtocolError:
        return
    assert total == len(body)


def check_command(data: bytes) -> None:
    try:
        fields = parse_command(data)
    except pdu.ProtocolError:
        return
    assert 0x0100 in fields and sum(len(v) + 8 for v in fields.values()) <= len(data)


def check_header(example: tuple[bytes, str]) -> None:
    data, syntax = example
    try:
        header = read_header(data, syntax)
    except ValueError:
        return
    json.dumps(header)  # what the index keeps must be plain values


def check_file_meta(data: bytes, folder: Path) -> None:
    path = folder / f"meta-{threading.get_ident()}.dcm"
    path.write_bytes(data)
    try:
        meta = read_file_meta(path)
    except ValueError:
        return
    assert 132 <= meta.offset <= len(data)


SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
            "1.2.840.10008.1.2.4.90")


def parser_targets(seeds: Seeds, folder: Path):
    headers = st.one_of(
        st.tuples(mutated([d for d, _ in seeds.datasets]), st.sampled_from(SYNTAXES)),
        st.sampled_from(seeds.datasets).flatmap(lambda pair: st.tuples(mutated([pair[0]]), st.just(pair[1]))))
    return {
        "A-ASSOCIATE-RQ": (fuzzed(seeds.rq), check_associate_rq),
        "A-ASSOCIATE-AC": (fuzzed(seeds.ac), check_associate_ac),
        "P-DATA-TF PDVs": (fuzzed(seeds.p_data), check_pdvs),
        "command set": (fuzzed(seeds.commands), check_command),
        "data set header": (headers, check_header),
        "file meta": (fuzzed(seeds.file_heads), lambda data: check_file_meta(data, folder)),
    }


TARGETS = ("A-ASSOCIATE-RQ", "A-ASSOCIATE-AC", "P-DATA-TF PDVs", "command set", "data set header", "file meta")


@pytest.mark.parametrize("target", TARGETS)
def test_parser_fuzz(seeds, tmp_path, target, record_property):
    strategy, check = parser_targets(seeds, tmp_path)[target]
    ran = run_cases(strategy, check, DEFAULT_CASES)
    record_property("answer", f"{ran} cases, each returned or raised its one documented error")
    assert ran == DEFAULT_CASES


@pytest.mark.fuzz
@pytest.mark.parametrize("target", TARGETS)
def test_parser_fuzz_long(seeds, tmp_path, target, capsys, record_property):
    strategy, check = parser_targets(seeds, tmp_path)[target]
    t0 = time.monotonic()
    ran = run_cases(strategy, check, FUZZ_CASES)
    record_property("answer", f"{ran} cases, each returned or raised its one documented error")
    with capsys.disabled():
        print(f"\nfuzz {target}: {ran} cases in {time.monotonic() - t0:.0f} s, nothing found")


# -- the live acceptor -----------------------------------------------------------------------

@st.composite
def streams(draw, seeds: Seeds) -> tuple[bytes, list[int]]:
    """A byte stream a requestor might send, and the sizes it is sent in."""
    kind = draw(st.sampled_from(("bytes", "pdus", "mixed", "random")))
    if kind == "bytes":
        stream = draw(mutated(seeds.streams, max_mutations=8))
    elif kind == "pdus":
        pdus = split_pdus(draw(st.sampled_from(seeds.streams)))
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(pdus) - 1))
            op = draw(st.sampled_from(("drop", "repeat", "swap", "mutate")))
            if op == "drop" and len(pdus) > 1:
                pdus.pop(i)
            elif op == "repeat":
                pdus.insert(i, pdus[i])
            elif op == "swap":
                j = draw(st.integers(0, len(pdus) - 1))
                pdus[i], pdus[j] = pdus[j], pdus[i]
            else:
                pdus[i] = draw(mutated([pdus[i]], max_mutations=3))
        stream = b"".join(pdus)
    elif kind == "mixed":  # a real association request, then PDUs of other conversations, some mutated
        head = split_pdus(draw(st.sampled_from(seeds.streams)))[0]
        tail = draw(st.lists(fuzzed(seeds.pdus), max_size=6))
        stream = head + b"".join(tail)
    else:
        stream = draw(st.binary(max_size=2048))
    cuts = draw(st.lists(st.integers(1, 4096), max_size=8))
    return stream, cuts


class LiveNode:
    def __init__(self, folder: Path) -> None:
        cfg = Config.model_validate({
            "node": {"host": "127.0.0.1", "port": 0, "network_timeout": 1, "max_pdu": 16384, "max_associations": 8},
            "storage": {"data_dir": str(folder / "data")},
            "callers": [{"ae_title": ae} for ae in CALLERS],
        })
        self.rx = Receiver(cfg, Store(cfg.data_dir))
        self.rx.start()
        self.outcomes: dict[str, int] = {}
        self.echo_ms: list[float] = []

    def send(self, stream: bytes, cuts: list[int]) -> None:
        with socket.create_connection(("127.0.0.1", self.rx.port), timeout=5) as s:
            pos = 0
            try:
                for size in cuts + [len(stream)]:
                    if pos >= len(stream):
                        break
                    s.sendall(stream[pos:pos + size])
                    pos += size
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            answer = b""
            try:
                while True:
                    data = s.recv(65536)
                    if not data:
                        break
                    answer += data
            except OSError:
                pass
        first = answer[:1]
        kind = {b"\x02": "accepted", b"\x03": "rejected", b"\x07": "aborted"}.get(first, "closed")
        if kind == "accepted" and b"\x07\x00\x00\x00\x00\x04" in answer:
            kind = "accepted, then aborted"
        self.outcomes[kind] = self.outcomes.get(kind, 0) + 1

    def echo(self) -> None:
        t0 = time.monotonic()
        ok, message = echo("127.0.0.1", self.rx.port, "DICOMNODE", "ECHOSCU", timeout=5)
        assert ok, message
        self.echo_ms.append((time.monotonic() - t0) * 1000)


def open_sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:  # the descriptor listdir itself used
            pass
    return count


def fuzz_live(seeds: Seeds, folder: Path, cases: int) -> tuple[int, LiveNode, float]:
    escaped: list[BaseException] = []
    previous_hook = threading.excepthook
    threading.excepthook = lambda args: escaped.append(args.exc_value)
    sockets0 = open_sockets()
    node = LiveNode(folder)
    rss0 = rss_bytes()
    try:
        with structlog.testing.capture_logs() as events:
            def check(example) -> None:
                node.send(*example)
                if sum(node.outcomes.values()) % 25 == 0:
                    node.echo()

            ran = run_cases(streams(seeds), check, cases)
            node.echo()
            deadline = time.monotonic() + 10
            scp = node.rx._scp
            while scp.active_associations or scp.waiting_connections:
                assert time.monotonic() < deadline, "connections left over after the fuzzing"
                time.sleep(0.05)
        grown = rss_bytes() - rss0
    finally:
        node.rx.stop()
        threading.excepthook = previous_hook
    assert escaped == []
    crashes = [e for e in events if e.get("event") in CRASH_EVENTS]
    assert crashes == []
    assert open_sockets() <= sockets0  # every connection's socket was closed
    return ran, node, grown


def live_summary(ran: int, node: LiveNode, grown: int) -> str:
    return (f"{ran} streams: {', '.join(f'{n} {k}' for k, n in sorted(node.outcomes.items()))}; "
            f"{len(node.echo_ms)} C-ECHOs answered (slowest {max(node.echo_ms):.0f} ms); RSS +{grown / 1e6:.1f} MB")


def test_live_acceptor_fuzz(seeds, tmp_path, record_property):
    ran, node, grown = fuzz_live(seeds, tmp_path, DEFAULT_CASES)
    record_property("answer", live_summary(ran, node, grown))
    assert ran == DEFAULT_CASES and len(node.echo_ms) >= DEFAULT_CASES // 25
    assert grown < 64 << 20


@pytest.mark.fuzz
def test_live_acceptor_fuzz_long(seeds, tmp_path, capsys, record_property):
    t0 = time.monotonic()
    ran, node, grown = fuzz_live(seeds, tmp_path, FUZZ_CASES)
    record_property("answer", live_summary(ran, node, grown))
    with capsys.disabled():
        print(f"\nfuzz live acceptor: {ran} streams in {time.monotonic() - t0:.0f} s, outcomes {node.outcomes}, "
              f"{len(node.echo_ms)} C-ECHOs all answered (slowest {max(node.echo_ms):.0f} ms), "
              f"RSS +{grown / 1e6:.1f} MB, nothing found")
