"""Structural limits on a received data set, checked before anything walks it recursively.

pydicom reads, copies and writes sequences by recursion. A slice that carries one
sequence nested a few hundred levels deep (legal in the encoding, absurd in content)
passes every header check, is stored, and then sends the writer of the derived series
into a runaway: gigabytes of memory and a crash, again after every restart. So the
nesting depth is measured here without recursion and without converting anything: the
encoded bytes of each top-level sequence are walked with an explicit stack, in the
transfer syntax they arrived in. Element sizes and the syntax of the UIDs that name
files, jobs and derived objects are checked on the same pass.
"""

from __future__ import annotations

import re
import struct

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

PIXEL_DATA = 0x7FE00010
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
# Explicit VRs whose length field is 4 bytes (after 2 reserved bytes); the others have 2.
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
# The UIDs that name spool folders, jobs and the derived objects (derived UIDs are hashed from them).
NAMING_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID")
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
MAX_UID_CHARS = 64
# Defaults of [intake] (config.IntakeConfig) and of the offline reader: real CT images nest sequences a few
# levels deep (SR content trees a dozen); no header element but Pixel Data needs megabytes.
MAX_SEQUENCE_DEPTH = 32
MAX_ELEMENT_MB = 16


class StructureError(ValueError):
    """The encoded bytes of a sequence do not add up (lengths that overrun their container)."""


def _implicit_is_sequence(tag: int) -> bool:
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:  # private or unknown: opaque bytes, as pydicom treats them
        return False


def encoded_sequence_depth(value: bytes, little: bool, implicit: bool, stop_at: int) -> int:
    """How deeply sequences nest inside one sequence's encoded value (the sequence itself is level 1).

    Walks the bytes once with an explicit stack; returns early once ``stop_at`` is passed. Raises
    StructureError when a length overruns its container.
    """
    end = "<" if little else ">"
    u16, u32 = struct.Struct(end + "H"), struct.Struct(end + "I")
    # Each open container: (end offset or None for undefined length, is a sequence, content is implicit VR).
    stack: list[tuple[int | None, bool, bool]] = [(len(value), True, implicit)]
    depth = deepest = 1
    pos, n = 0, len(value)
    while stack:
        limit, _, impl = stack[-1]
        if limit is not None and pos >= limit:
            if pos > limit:
                raise StructureError("an element runs past the end of its item or sequence")
            _, was_seq, _ = stack.pop()
            depth -= was_seq
            continue
        if pos + 8 > n:
            if limit is None:
                raise StructureError("a sequence of undefined length has no delimiter")
            raise StructureError("an item or element header is cut short")
        group, element = u16.unpack_from(value, pos)[0], u16.unpack_from(value, pos + 2)[0]
        tag = (group << 16) | element
        if tag in (ITEM_END, SEQUENCE_END):
            pos += 8
            if limit is None:
                _, was_seq, _ = stack.pop()
                depth -= was_seq
            continue
        if tag == ITEM:
            length = u32.unpack_from(value, pos + 4)[0]
            pos += 8
            stack.append((None if length == UNDEFINED else pos + length, False, impl))
            continue
        vr = b""
        if impl:
            length = u32.unpack_from(value, pos + 4)[0]
            pos += 8
        else:
            vr = bytes(value[pos + 4:pos + 6])
            if vr in LONG_VRS:
                if pos + 12 > n:
                    raise StructureError("an element header is cut short")
                length = u32.unpack_from(value, pos + 8)[0]
                pos += 12
            else:
                length = u16.unpack_from(value, pos + 6)[0]
                pos += 8
        if tag == PIXEL_DATA and length == UNDEFINED:  # encapsulated (an icon image): skip its fragments
            while True:
                if pos + 8 > n:
                    raise StructureError("encapsulated Pixel Data has no sequence delimiter")
                fragment, size = u32.unpack_from(value, pos)[0], u32.unpack_from(value, pos + 4)[0]
                pos += 8
                if fragment != (0xE000FFFE if little else ITEM) or size == UNDEFINED:
                    break
                pos += size
            continue
        nested = vr == b"SQ" or (impl and _implicit_is_sequence(tag)) or length == UNDEFINED
        if nested:
            depth += 1
            deepest = max(deepest, depth)
            if deepest > stop_at:
                return deepest
            # UN of undefined length holds implicit VR little endian (PS3.5 6.2.2).
            stack.append((None if length == UNDEFINED else pos + length, True, impl or vr == b"UN"))
        else:
            pos += length
    return deepest


def sequence_depth(ds: Dataset, stop_at: int = 1 << 30) -> int:
    """The deepest nesting of sequences in a data set, raw or already converted (0: none)."""
    deepest = 0
    todo: list[tuple[Dataset, int]] = [(ds, 0)]
    while todo and deepest <= stop_at:
        current, level = todo.pop()
        for tag in tuple(current.keys()):
            elem = current.get_item(tag)
            if isinstance(elem, RawDataElement):
                raw_vr = elem.VR or ("SQ" if _implicit_is_sequence(int(tag)) else "")
                if tag == PIXEL_DATA or elem.value is None:
                    continue
                if raw_vr == "SQ" or (raw_vr == "UN" and elem.length == UNDEFINED):
                    inner = encoded_sequence_depth(bytes(elem.value), elem.is_little_endian,
                                                   elem.is_implicit_VR or raw_vr == "UN", stop_at - level)
                    deepest = max(deepest, level + inner)
            elif isinstance(elem, DataElement) and isinstance(elem.value, Sequence):
                deepest = max(deepest, level + 1)
                todo.extend((item, level + 1) for item in elem.value)
    return deepest


def element_too_large(ds: Dataset, max_bytes: int) -> str | None:
    """The first top-level element (Pixel Data aside) longer than ``max_bytes``, or None; 0 = no limit."""
    if max_bytes <= 0:
        return None
    for tag in tuple(ds.keys()):
        if tag == PIXEL_DATA:
            continue
        elem = ds.get_item(tag)
        size = elem.length if isinstance(elem, RawDataElement) else 0
        if isinstance(elem, RawDataElement) and size == UNDEFINED:
            size = len(elem.value or b"")
        if size > max_bytes:
            return f"element {tag} is {size} bytes, more than the {max_bytes} accepted"
    return None


def uid_problem(ds: Dataset) -> str | None:
    """Why one of the UIDs that name our files and outputs is not a valid DICOM UID (PS3.5 9.1), or None.

    Such a UID would be copied into the derived series' references: components of digits separated by
    single dots, at most 64 characters, ASCII only. (Leading zeros, also forbidden, are common in old
    archives and harmless here, so they pass.)
    """
    for keyword in NAMING_UIDS:
        if keyword not in ds:
            continue
        elem = ds.get_item(keyword)
        raw = elem.value if isinstance(elem, RawDataElement) else str(elem.value or "").encode("utf-8", "replace")
        if raw is None:
            continue
        text = bytes(raw).rstrip(b"\x00 ")
        if not text:
            continue
        if len(text) > MAX_UID_CHARS:
            return f"{keyword} is {len(text)} characters long; a DICOM UID has at most {MAX_UID_CHARS}"
        try:
            uid = text.decode("ascii")
        except UnicodeDecodeError:
            return f"{keyword} holds non-ASCII bytes; a DICOM UID is digits and dots"
        if not _UID.fullmatch(uid):
            return f"{keyword} {uid!r} is not a valid DICOM UID (digits separated by single dots)"
    return None


def structure_problem(ds: Dataset, max_depth: int, max_element_bytes: int) -> str | None:
    """Why a data set's structure is refused (too deep, an oversized element, broken sequence lengths), or None.

    ``max_depth`` 0 turns the depth check off (for tests of what the node does without it).
    """
    problem = element_too_large(ds, max_element_bytes)
    if problem:
        return problem
    if max_depth <= 0:
        return None
    try:
        depth = sequence_depth(ds, stop_at=max_depth)
    except StructureError as exc:
        return f"a sequence's encoding is damaged: {exc}"
    if depth > max_depth:
        return f"sequences nested more than {max_depth} levels deep (the limit; no CT image needs more)"
    return None
