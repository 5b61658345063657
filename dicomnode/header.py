"""What the receiver needs from a data set's header, read without building a pydicom Dataset.

The receiver answers every C-STORE only after it has checked the instance, so this runs once per
instance on the hot path. :func:`read_header` walks the encoded elements up to the pixel data
with ``struct`` (sequences are skipped by their lengths or delimiters, nothing is copied but the
values it keeps), decodes the few attributes the node indexes and routes on, and checks that
nothing was cut short: an element running past the end, pixel data shorter than its header says
or than the image needs, encapsulated pixel data without its sequence delimiter.

Anything out of the ordinary (non-ASCII text, which needs the Specific Character Set; a value
that does not parse as its VR; an unknown VR; deflated syntaxes; very deep nesting) is handed to
pydicom, which reads the same attributes the slow way: both paths give the same values. Whatever
pydicom meets in a damaged data set comes out as :class:`ValueError`, so a caller has one error
to answer. A deflated data set is inflated to at most 256 MiB.
"""

from __future__ import annotations

import io
import struct
from typing import Any, Callable

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset

from .index import ROUTING_KEYWORDS, to_jsonable

TAG_PIXEL_DATA = 0x7FE00010
# Pixel Data, Float Pixel Data and Double Float Pixel Data (PS3.5 8.1.1): an image has one of them.
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, TAG_PIXEL_DATA})
_PIXEL_GROUP_ELEMENTS = frozenset((tag >> 16, tag & 0xFFFF) for tag in PIXEL_TAGS)
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95")

#: Attributes kept from every received instance: identity, routing and the image size checks.
KEYWORDS = tuple(dict.fromkeys(
    ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "InstanceNumber", "StudyDate",
     "Rows", "Columns", "BitsAllocated", "NumberOfFrames", "SamplesPerPixel", *ROUTING_KEYWORDS)))
_TAGS = {tag_for_keyword(kw): kw for kw in KEYWORDS}
_DICT_VR = {tag: dictionary_VR(tag) for tag in _TAGS}

_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))
_SHORT_VRS = frozenset((b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN",
                        b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"))
_MAX_DEPTH = 32


class CutShort(ValueError):
    """The data set ends inside an element: the transfer was cut short."""


class _Unusual(Exception):
    """Something the fast reader leaves to pydicom."""


Header = dict  # keyword -> JSON-able value, only attributes present with a non-empty value


def text(header: Header, keyword: str) -> str:
    """An attribute as stripped text ('' when absent)."""
    value = header.get(keyword)
    return str(value).strip() if value is not None else ""


def read_header(dataset: Any, transfer_syntax: str) -> Header:
    """The indexed attributes of an encoded data set (no file meta), after checking it is whole.

    ``dataset`` is anything that slices like bytes (bytes, bytearray, memoryview, mmap). Raises
    :class:`CutShort` or :class:`ValueError` for a truncated or malformed data set.
    """
    if transfer_syntax not in _DEFLATED:
        implicit = transfer_syntax == _IMPLICIT_LE
        little = transfer_syntax != _EXPLICIT_BE
        try:
            found, pos = _scan(dataset, implicit, little)
            header = {}
            for tag, (vr, start, length) in found.items():
                value = _decode(vr if vr is not None else _DICT_VR[tag], bytes(dataset[start:start + length]), little)
                if value is not None:
                    header[_TAGS[tag]] = value
        except _Unusual:
            pass
        else:
            _check_pixels(dataset, pos, header, implicit, little)
            return header
    return header_from_dataset(parse_dataset(dataset, transfer_syntax))


def header_from_dataset(ds: Dataset) -> Header:
    """The same attributes from a pydicom Dataset."""
    header = {}
    for tag, kw in _TAGS.items():
        elem = ds.get(tag)
        if elem is not None and elem.value is not None and elem.value != "":
            header[kw] = to_jsonable(elem.value)
    return header


# -- the fast reader ---------------------------------------------------------------------------

def _scan(buf: Any, implicit: bool, little: bool) -> tuple[dict[int, tuple[bytes | None, int, int]], int]:
    """Top-level elements of interest as (VR, value offset, length), and where PixelData (or the end) starts."""
    found: dict[int, tuple[bytes | None, int, int]] = {}
    pos = _walk(buf, 0, implicit, little, found, 0)
    return found, pos


def _walk(buf: Any, pos: int, implicit: bool, little: bool, found: dict | None, depth: int) -> int:
    """Walk elements from ``pos``: at depth 0 to PixelData or the end, inside an item to its delimiter."""
    if depth > _MAX_DEPTH:
        raise _Unusual()
    end = len(buf)
    tag_of = struct.Struct("<HH" if little else ">HH").unpack_from
    u32 = struct.Struct("<I" if little else ">I").unpack_from
    u16 = struct.Struct("<H" if little else ">H").unpack_from
    while pos < end:
        if end - pos < 8:
            raise CutShort(f"data set ends inside an element header at byte {pos}")
        group, element = tag_of(buf, pos)
        tag = group << 16 | element
        if depth == 0:
            if tag in PIXEL_TAGS:
                return pos
            if group == 0xFFFE:
                raise _Unusual()
        elif tag == _ITEM_END:
            return pos + 8
        if implicit or group == 0xFFFE:
            vr = None
            length = u32(buf, pos + 4)[0]
            value_at = pos + 8
        else:
            vr = bytes(buf[pos + 4:pos + 6])
            if vr in _LONG_VRS:
                if end - pos < 12:
                    raise CutShort(f"data set ends inside an element header at byte {pos}")
                length = u32(buf, pos + 8)[0]
                value_at = pos + 12
            elif vr in _SHORT_VRS:
                length = u16(buf, pos + 6)[0]
                value_at = pos + 8
            else:
                raise _Unusual()
        if length == _UNDEFINED:
            if vr is None or vr == b"SQ":
                pos = _skip_sequence(buf, value_at, implicit, little, depth)
            elif vr == b"UN":  # PS3.5 6.2.2: contents of an undefined-length UN are implicit VR little endian
                pos = _skip_sequence(buf, value_at, True, True, depth)
            else:
                raise _Unusual()
            continue
        if value_at + length > end:
            raise CutShort(f"data set ends inside element ({group:04X},{element:04X})")
        if found is not None and tag in _TAGS:
            found[tag] = (vr, value_at, length)
        pos = value_at + length
    if depth > 0:
        raise CutShort("data set ends inside a sequence item")
    return pos


def _skip_sequence(buf: Any, pos: int, implicit: bool, little: bool, depth: int) -> int:
    end = len(buf)
    tag_of = struct.Struct("<HH" if little else ">HH").unpack_from
    u32 = struct.Struct("<I" if little else ">I").unpack_from
    while True:
        if end - pos < 8:
            raise CutShort("data set ends inside a sequence")
        group, element = tag_of(buf, pos)
        tag = group << 16 | element
        length = u32(buf, pos + 4)[0]
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _Unusual()
        if length == _UNDEFINED:
            pos = _walk(buf, pos, implicit, little, None, depth + 1)
        elif pos + length > end:
            raise CutShort("data set ends inside a sequence item")
        else:
            pos += length


def _ascii(raw: bytes) -> str:
    if not raw.isascii():
        raise _Unusual()  # the Specific Character Set decides: pydicom decodes it
    return raw.decode("ascii")


def _number(convert: Callable[[str], Any], item: str) -> Any:
    item = item.strip()
    if not item:
        raise _Unusual()
    try:
        value = convert(item)
    except ValueError:
        raise _Unusual() from None
    if value != value or value in (float("inf"), float("-inf")):
        raise _Unusual()
    return value


_BINARY = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}


def _decode(vr: str | bytes, raw: bytes, little: bool) -> Any:
    """A value as pydicom (then :func:`to_jsonable`) gives it; None for an empty one."""
    vr = vr.decode("ascii") if isinstance(vr, bytes) else vr
    if not raw:
        return None
    if vr in _BINARY:
        code = _BINARY[vr]
        size = struct.calcsize(code)
        if len(raw) % size:
            raise _Unusual()
        values = list(struct.unpack(("<" if little else ">") + code * (len(raw) // size), raw))
        return values[0] if len(values) == 1 else values
    if vr in ("UI", "CS", "AS", "DA", "DT", "TM"):
        items = _ascii(raw).rstrip(" \x00").split("\\")
    elif vr == "AE":
        items = [s.strip() for s in _ascii(raw).split("\\")]
    elif vr in ("LO", "SH", "UC"):
        items = [s.rstrip("\x00 ") for s in _ascii(raw).split("\\")]
    elif vr in ("LT", "ST", "UT"):
        items = [_ascii(raw).rstrip("\x00 ")]
    elif vr == "DS":
        items = _ascii(raw).rstrip(" \x00").split("\\")
        if items == [""]:
            return None
        values = [_number(float, s) for s in items]
        return values[0] if len(values) == 1 else values
    elif vr == "IS":
        items = _ascii(raw).rstrip(" \x00").split("\\")
        if items == [""]:
            return None
        values = [_number(int, s) for s in items]
        return values[0] if len(values) == 1 else values
    else:
        raise _Unusual()
    if len(items) == 1:
        return items[0] or None
    return items


def _check_pixels(buf: Any, pos: int, header: Header, implicit: bool, little: bool) -> None:
    """Raise when the pixel data (or the image without it) shows the transfer was cut short."""
    remaining = len(buf) - pos
    if remaining <= 0:
        if "Rows" in header:
            raise CutShort("an image data set without its pixel data: transfer cut short")
        return
    head = bytes(buf[pos:pos + 12])
    if len(head) < 8:
        raise CutShort("pixel data element header cut short")
    endian = "<" if little else ">"
    if implicit:
        length, header_size = struct.unpack(endian + "I", head[4:8])[0], 8
    elif head[4:6] in _LONG_VRS:
        if len(head) < 12:
            raise CutShort("pixel data element header cut short")
        length, header_size = struct.unpack(endian + "I", head[8:12])[0], 12
    else:
        length, header_size = struct.unpack(endian + "H", head[6:8])[0], 8
    if length == _UNDEFINED:
        # encapsulated: the fragments end with a sequence delimitation item
        tail = buf if hasattr(buf, "rfind") else bytes(buf)
        if tail.rfind(b"\xfe\xff\xdd\xe0" if little else b"\xff\xfe\xe0\xdd", pos + header_size) < 0:
            raise CutShort("encapsulated pixel data has no sequence delimiter: transfer cut short")
    elif remaining - header_size < length:
        raise CutShort(f"PixelData has {remaining - header_size} bytes, its header says {length}")
    else:
        need = _native_pixel_bytes(header)
        if need is not None and length < need:
            raise ValueError(f"PixelData has {length} bytes, the image needs {need}")


def _native_pixel_bytes(header: Header) -> int | None:
    """Bytes an uncompressed image needs (Rows x Columns x frames x samples x bits), None when unknown."""
    try:
        rows, cols, bits = int(header["Rows"]), int(header["Columns"]), int(header["BitsAllocated"])
        frames = int(header.get("NumberOfFrames") or 1)
        spp = int(header.get("SamplesPerPixel") or 1)
    except (KeyError, TypeError, ValueError):
        return None
    return (rows * cols * frames * spp * bits + 7) // 8


# -- the slow reader -----------------------------------------------------------------------------

_HEAD = 1 << 16
_MAX_INFLATED = 256 << 20


class _StrictReader(io.BytesIO):
    """pydicom only warns when a value is cut off; reading part of what was asked for is an error here."""

    def read(self, n: int | None = -1) -> bytes:  # type: ignore[override]
        data = super().read(n)
        if n is not None and n > 0 and 0 < len(data) < n:
            raise CutShort(f"data set ends inside an element at byte {self.tell()}")
        return data


def _parse_with_pydicom(dataset: Any, transfer_syntax: str) -> Dataset:
    if transfer_syntax in _DEFLATED:
        import zlib

        inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        raw = inflate.decompress(bytes(dataset), _MAX_INFLATED + 1)
        if len(raw) > _MAX_INFLATED:
            raise ValueError(f"deflated data set inflates beyond {_MAX_INFLATED >> 20} MiB")
        ds = read_dataset(io.BytesIO(raw), False, True)
        _ = [e for e in ds]  # converts every element: raises on damage
        return ds
    implicit = transfer_syntax == _IMPLICIT_LE
    little = transfer_syntax != _EXPLICIT_BE
    ds, pos = _read_until_pixels(dataset, implicit, little)
    _check_pixels(dataset, pos, header_from_dataset(ds), implicit, little)
    return ds


def _read_until_pixels(dataset: Any, implicit: bool, little: bool) -> tuple[Dataset, int]:
    """Parse the elements before PixelData; returns them and the offset where PixelData (or the end) starts.

    A 64 KiB slice is parsed first, so a large image's pixel bytes are never copied; the whole data
    set when the header is longer.
    """
    def stop(tag: int, vr: str | None, length: int) -> bool:
        return tag in PIXEL_TAGS

    if len(dataset) > _HEAD:
        head = bytes(dataset[:_HEAD])
        fp = _StrictReader(head)
        try:
            ds = read_dataset(fp, implicit, little, stop_when=stop)
            pos = fp.tell()
            tag_at = struct.unpack_from("<HH" if little else ">HH", head, pos) if len(head) - pos >= 4 else None
            if tag_at in _PIXEL_GROUP_ELEMENTS:
                return ds, pos
        except Exception:  # the header runs past the slice: parse the whole data set below
            pass
    fp = _StrictReader(bytes(dataset))
    ds = read_dataset(fp, implicit, little, stop_when=stop)
    return ds, fp.tell()


def parse_dataset(dataset: Any, transfer_syntax: str) -> Dataset:
    """The data set's elements before the pixel data as a pydicom Dataset, checked as :func:`read_header` does.

    Raises
    ------
    ValueError
        For a truncated or malformed data set, whatever pydicom raised for it.
    """
    try:
        return _parse_with_pydicom(dataset, transfer_syntax)
    except (ValueError, MemoryError):
        raise
    except Exception as exc:  # pydicom's errors for damaged input: NotImplementedError, OSError, zlib.error, ...
        raise ValueError(f"the data set cannot be read ({type(exc).__name__})") from exc
