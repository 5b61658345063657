"""Real DICOM traffic for fuzzing: what DCMTK, pynetdicom and the node's requestor put on the wire, recorded.

A tap (a TCP relay) sits between each real sender and the node's acceptor and keeps both byte
streams; :func:`record` returns them, and :func:`split_pdus` cuts a stream into its PDUs.
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from analyzers.phantoms import PhantomPatient, image_dataset, save
from dicomnode.uids import CR_IMAGE, CT_IMAGE
from dicomnode.dimse.acceptor import StorageSCP
from dicomnode.dimse.requestor import echo, send_files
from tests.peers import echoscu, storescu


@dataclass
class Conversation:
    """One connection's bytes, each way."""

    sent: bytearray = field(default_factory=bytearray)      # requestor -> acceptor
    answered: bytearray = field(default_factory=bytearray)  # acceptor -> requestor


class Tap:
    """Relays connections on :attr:`port` to ``target_port`` and records them."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.conversations: list[Conversation] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            conv = Conversation()
            self.conversations.append(conv)
            for src, dst, buf in ((client, server, conv.sent), (server, client, conv.answered)):
                t = threading.Thread(target=self._pipe, args=(src, dst, buf), daemon=True)
                t.start()
                self._threads.append(t)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, buf: bytearray) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                buf += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self._listener.close()
        for t in self._threads:
            t.join(5)


def split_pdus(stream: bytes) -> list[bytes]:
    """The whole PDUs (header included) of a byte stream, in order; a cut-off tail is left out."""
    out, pos = [], 0
    while len(stream) - pos >= 6:
        length = struct.unpack_from(">I", stream, pos + 2)[0]
        if pos + 6 + length > len(stream):
            break
        out.append(stream[pos: pos + 6 + length])
        pos += 6 + length
    return out


def _files(folder: Path) -> list[Path]:
    rng = np.random.default_rng(21)
    pat = PhantomPatient.make(rng, "traffic", 1)
    small = [save(image_dataset((rng.random((32, 32)) * 4000).astype(np.uint16), patient=pat, modality="CT",
                                sop_class_uid=CT_IMAGE, instance_number=i + 1), folder / "ct") for i in range(2)]
    large = save(image_dataset((rng.random((300, 300)) * 4000).astype(np.uint16), patient=pat, modality="CR",
                               sop_class_uid=CR_IMAGE), folder / "cr")
    return [*small, large]


def record(folder: Path, realdata: Path | None = None) -> list[Conversation]:
    """Traffic of DCMTK storescu and echoscu, pynetdicom and the node's requestor to a live acceptor."""
    scp = StorageSCP("DICOMNODE", "127.0.0.1", 0, store=lambda req: (0, ""), allow=lambda ae, host: True,
                     network_timeout=5, max_pdu=16384)
    scp.start()
    tap = Tap(scp.port)
    try:
        files = _files(folder)
        extra = []
        if realdata is not None:
            extra = [realdata / "pydicom-data/data_store/data/693_J2KR.dcm",
                     realdata / "dcmqi/data/sr-example/sr.dcm"]
            extra = [f for f in extra if f.exists()]
        storescu(tap.port, files)
        if extra:
            storescu(tap.port, extra[:1], extra=["-R", "-xv"])
        echoscu(tap.port)
        send_files("127.0.0.1", tap.port, "DICOMNODE", "NODE", [*files, *extra[1:]], timeout=10)
        echo("127.0.0.1", tap.port, "DICOMNODE", "NODE", timeout=10)
        from pynetdicom import AE

        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(CT_IMAGE, ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", tap.port, ae_title="DICOMNODE")
        if assoc.is_established:
            assoc.send_c_store(files[0])
            assoc.send_c_echo()
            assoc.release()
    finally:
        tap.close()
        scp.stop()
    return [c for c in tap.conversations if c.sent]
