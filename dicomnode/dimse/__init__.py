"""The node's own DICOM upper layer (PS3.8) and DIMSE messages (PS3.7), on blocking sockets.

One file per idea from the standard:

- :mod:`.pdu` — PDU and item codecs, the association PDUs, the one PDV iterator, reading PDUs off a socket;
- :mod:`.syntaxes` — application context, Verification and the transfer syntaxes the node knows;
- :mod:`.commands` — DIMSE command sets (always Implicit VR Little Endian, PS3.7 6.3.1);
- :mod:`.status` — DIMSE status codes;
- :mod:`.part10` — the Part 10 file meta group, written and read;
- :mod:`.transport` — the gate: connections before and after an association, on one thread, with ARTIM;
- :mod:`.acceptor` — the C-STORE / C-ECHO service class provider the receiver runs, a thread per association;
- :mod:`.requestor` — the C-STORE / C-ECHO user the sender and ``dicomnode echo`` run.
"""
