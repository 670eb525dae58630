"""SCP-ECG (EN 1064 / ISO 11073-91064): one binary ``.scp`` file per ECG, read by hand.

No maintained Python reader exists, so this decodes what a resting ECG needs, all little-endian:

- section 0: pointers to the other sections (id, length, 1-based byte offset);
- section 1: patient and device tags; walked for structure only, nothing is kept (names, dates);
- section 2: Huffman tables; 19999 means the default table of the standard, else custom tables;
- section 3: the leads: start and end sample, SCP lead code (1 = I, 61 = III, ...), and whether the
  rhythm was compressed by reference-beat subtraction;
- section 6: the rhythm: amplitude multiplier (nV per count), sample interval (µs), difference coding
  (0 none, 1 first, 2 second differences), then the Huffman-coded bytes of each lead;
- sections 4 and 5, when section 3 says reference-beat subtraction was used: the QRS subtraction
  zones and the reference beat, added back to the residual rhythm of each zone.

Bimodal compression (a residual decimated outside protected zones) is refused as unsupported.

Two writer quirks that readers in the wild accept are read too: a lead table counting samples from 0
(start 0 is read as sample 1), and a lead byte length at the 16-bit ceiling (LENGTH_CEILING).

tests/data/test_formats.py checks the shared example file's leads, rate and amplitudes, against an
independent decoder (ecgdatakit) too, and both quirks on byte edits of it and of the Contec recording.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from crema.data.signals import RawRecord, RecordRejected
from crema.data.readers import SingleFileReader

SECTION_HEADER = 16  # CRC (2), id (2), length (4), version (1), protocol (1), reserved (6)
DEFAULT_TABLE_ID = 19999
# Section 6 gives each lead's byte length in 16 bits. Writers of leads that do not fit (an uncompressed lead
# of more than 32,767 samples, as a Contec recorder's 47 s at 800 Hz) store the ceiling instead, 65534 or
# 65535: such a length says "at least", and _decode_leads finds the real one.
LENGTH_CEILING = 0xFFFE

# SCP-ECG lead codes (EN 1064 table 14) for the leads a resting ECG carries; others keep "SCP<code>".
SCP_LEADS = {
    1: "I", 2: "II", 3: "V1", 4: "V2", 5: "V3", 6: "V4", 7: "V5", 8: "V6", 9: "V7",
    10: "V2R", 11: "V3R", 12: "V4R", 13: "V5R", 14: "V6R", 15: "V7R", 16: "X", 17: "Y", 18: "Z",
    61: "III", 62: "aVR", 63: "aVL", 64: "aVF", 65: "-aVR", 66: "V8", 67: "V9", 68: "V8R", 69: "V9R",
}


@dataclass(frozen=True)
class HuffmanCode:
    prefix: str  # the code's bits as read, most significant first ("100")
    extra_bits: int  # > 0: the value is the next `extra_bits` bits (two's complement), not `value`
    switch: bool  # True: switch to table `value` (1-based), no value is produced
    value: int


def _default_table() -> list[HuffmanCode]:
    """The standard's default table: 0 -> "0"; ±n (n = 1..8) -> n ones, a zero, a sign bit;
    then 9 ones + 0 + 8 bits, and 10 ones + 16 bits, for values that do not fit."""
    codes = [HuffmanCode("0", 0, False, 0)]
    for n in range(1, 9):
        codes += [HuffmanCode("1" * n + "00", 0, False, n), HuffmanCode("1" * n + "01", 0, False, -n)]
    codes += [HuffmanCode("1" * 9 + "0", 8, False, 0), HuffmanCode("1" * 10, 16, False, 0)]
    return codes


def _huffman_decode(data: bytes, n: int, tables: list[list[HuffmanCode]]) -> tuple[np.ndarray, int]:
    """`n` values from `data`, starting with table 1 (as the standard says), and the bits they took."""
    lookups = [({c.prefix: c for c in table}, sorted({len(c.prefix) for c in table})) for table in tables]
    codes, lengths = lookups[0]
    bits = "".join(f"{b:08b}" for b in data)  # as a '0'/'1' string, slicing and dict look-ups run in C
    out = np.empty(n, np.int64)
    pos, k = 0, 0
    while k < n:
        for length in lengths:
            code = codes.get(bits[pos:pos + length])
            if code is not None:
                break
        else:
            raise RecordRejected("bad_signal", f"no Huffman code at bit {pos} ({k} of {n} values decoded)")
        pos += length
        if code.switch:
            if not 1 <= code.value <= len(lookups):
                raise RecordRejected("bad_signal", f"switch to Huffman table {code.value} of {len(lookups)}")
            codes, lengths = lookups[code.value - 1]
            continue
        if code.extra_bits:
            field = bits[pos:pos + code.extra_bits]
            if len(field) < code.extra_bits:
                raise RecordRejected("truncated_signal", f"{k} of {n} values decoded")
            value = int(field, 2)
            if value >= 1 << (code.extra_bits - 1):
                value -= 1 << code.extra_bits
            pos += code.extra_bits
        else:
            value = code.value
        out[k] = value
        k += 1
    return out, pos


def _undo_differences(d: np.ndarray, order: int) -> np.ndarray:
    """Samples from first (x[n] = x[n-1] + d[n]) or second (x[n] = d[n] + 2x[n-1] - x[n-2]) differences,
    the first one or two values being sent as they are."""
    if order == 0 or d.size < 2:
        return d
    if order == 1:
        return np.cumsum(d)
    if order == 2:
        z = d.copy()
        z[1] = d[1] - 2 * d[0]  # so that two running sums give back x[0] = d[0] and x[1] = d[1]
        return np.cumsum(np.cumsum(z))
    raise RecordRejected("unsupported_compression", f"difference coding {order}")


class _File:
    """Bounds-checked access to the sections of one SCP-ECG file."""

    def __init__(self, data: bytes):
        self.data = data
        if len(data) < 6 + SECTION_HEADER:
            raise RecordRejected("truncated_signal", f"{len(data)} bytes is no SCP-ECG file")
        self.sections: dict[int, tuple[int, int]] = {}  # id -> (offset of the section's data, its end)
        (length,) = self.unpack("<I", 6 + 4)  # section 0 follows the file's CRC and length (6 bytes)
        start, end = self.section_bounds(0, 6, length)
        for pos in range(start, end - 9, 10):
            sid, slen, index = self.unpack("<HII", pos)
            if slen > 0 and index > 0:
                self.sections[sid] = self.section_bounds(sid, index - 1, slen)

    def unpack(self, fmt: str, offset: int) -> tuple:
        try:
            return struct.unpack_from(fmt, self.data, offset)
        except struct.error:
            raise RecordRejected("truncated_signal", f"read past the end at byte {offset}") from None

    def section_bounds(self, sid: int, offset: int, length: int) -> tuple[int, int]:
        if offset + length > len(self.data) or length < SECTION_HEADER:
            raise RecordRejected("truncated_signal", f"section {sid}: {length} bytes at {offset}, file {len(self.data)}")
        (found,) = self.unpack("<H", offset + 2)
        if found != sid:
            raise RecordRejected("bad_header", f"section {sid} pointer leads to section {found}")
        return offset + SECTION_HEADER, offset + length

    def section(self, sid: int) -> tuple[int, int] | None:
        return self.sections.get(sid)


class ScpEcgReader(SingleFileReader):
    """SCP-ECG: sections 0-3 and 6, Huffman decoding, reference-beat subtraction."""

    extensions = (".scp", ".SCP")

    def parse(self, record_id: str, data: bytes, path: str) -> RawRecord:
        """One file's bytes -> its RawRecord (RecordRejected for bad input)."""
        scp = _File(data)
        for sid in (1, 3, 6):
            if scp.section(sid) is None:
                raise RecordRejected("bad_header", f"no section {sid}")
        self._walk_tags(scp)
        tables = self._huffman_tables(scp)
        lead_codes, ranges, subtracted = self._leads(scp)

        start6, end6 = scp.section(6)
        avm_nv, interval_us, order, bimodal = scp.unpack("<HHBB", start6)
        if bimodal:
            raise RecordRejected("unsupported_compression", "SCP-ECG bimodal compression")
        if interval_us == 0 or avm_nv == 0:
            raise RecordRejected("bad_header", f"sample interval {interval_us} µs, multiplier {avm_nv} nV")
        fs = 1e6 / interval_us
        n_samples = max(end - start + 1 for start, end in ranges)
        if n_samples / fs > self.max_record_seconds:
            raise RecordRejected("absurd_length", f"{n_samples} samples at {fs:g} Hz")
        residual = self._decode_leads(scp, start6 + 6, end6, [end - start + 1 for start, end in ranges],
                                      tables, order, "rhythm")
        held = max(start - 1 + values.size for (start, _), values in zip(ranges, residual))
        meta = {"difference_coding": order, "reference_beat_subtraction": subtracted}
        if held < n_samples:  # leads cut at the 16-bit length ceiling by their writer: the samples that are there
            meta["samples_declared"], n_samples = n_samples, held
        signal = np.zeros((len(lead_codes), n_samples), np.float64)
        for row, ((start, _), values) in enumerate(zip(ranges, residual)):
            signal[row, start - 1:start - 1 + values.size] = values * avm_nv
        if subtracted:
            self._add_reference_beats(scp, signal, tables, interval_us)
        names = [SCP_LEADS.get(code, f"SCP{code}") for code in lead_codes]
        return RawRecord(record_id=record_id, signal=signal / 1000.0, fs=fs, channel_names=names,  # nV -> µV
                         units=[self.source.units or "uV"] * len(names), meta=meta)

    # ---------------------------------------------------------------------------------------- sections

    @staticmethod
    def _walk_tags(scp: _File) -> None:
        """Section 1 must be a well-formed tag list (tag, length, value; tag 255 ends it)."""
        pos, end = scp.section(1)
        while pos + 3 <= end:
            tag, length = scp.unpack("<BH", pos)
            pos += 3 + length
            if tag == 255:
                return
        if pos > end:
            raise RecordRejected("bad_header", "section 1 tag runs past the section")

    @staticmethod
    def _huffman_tables(scp: _File) -> list[list[HuffmanCode]]:
        """Section 2's Huffman tables, or the standard default table."""
        if scp.section(2) is None:
            return []  # no section 2: the values are stored as plain int16
        pos, end = scp.section(2)
        (n_tables,) = scp.unpack("<H", pos)
        if n_tables == DEFAULT_TABLE_ID:
            return [_default_table()]
        pos += 2
        tables = []
        for _ in range(n_tables):
            (n_codes,) = scp.unpack("<H", pos)
            pos += 2
            table = []
            for _ in range(n_codes):
                prefix_bits, total_bits, mode, value, code = scp.unpack("<BBBhI", pos)
                pos += 9
                if not 0 < prefix_bits <= 32 or total_bits < prefix_bits:
                    raise RecordRejected("bad_header", f"Huffman code of {prefix_bits}/{total_bits} bits")
                # Base codes are stored least significant bit first.
                prefix = "".join(str((code >> i) & 1) for i in range(prefix_bits))
                table.append(HuffmanCode(prefix, total_bits - prefix_bits, mode == 0, value))
            tables.append(table)
        if pos > end:
            raise RecordRejected("bad_header", "section 2 tables run past the section")
        return tables

    @staticmethod
    def _leads(scp: _File) -> tuple[list[int], list[tuple[int, int]], bool]:
        """Section 3's lead names and sample ranges."""
        pos, _ = scp.section(3)
        n_leads, flags = scp.unpack("<BB", pos)
        codes, ranges = [], []
        for k in range(n_leads):
            start, end, code = scp.unpack("<IIB", pos + 2 + 9 * k)
            if start == 0:
                start = 1  # a writer counting from 0 (0..10000 for 10000 samples): read from the first sample
            if end < start:
                raise RecordRejected("bad_header", f"lead {code}: samples {start}..{end}")
            codes.append(code)
            ranges.append((start, end))
        if not codes:
            raise RecordRejected("no_signals", "section 3 lists no leads")
        return codes, ranges, bool(flags & 0x01)

    @staticmethod
    def _decode_leads(scp: _File, pos: int, end: int, counts: list[int], tables, order: int,
                      what: str) -> list[np.ndarray]:
        """Each lead's values: the byte lengths of all leads, then each lead's Huffman-coded bytes.

        A lead whose length is the 16-bit ceiling (LENGTH_CEILING) may hold more. Huffman-coded, it ends
        where its samples' codes end (padded to an even byte count, as the shared example's writer pads
        every lead). Uncompressed, it holds all its samples when the section has room for them; else its
        writer cut it at the ceiling, and it holds the samples that fit (fewer than section 3 declares:
        the caller shortens the record to them)."""
        lengths = list(scp.unpack(f"<{len(counts)}H", pos))
        pos += 2 * len(counts)
        if not tables:
            whole = [2 * n if length >= LENGTH_CEILING and 2 * n > length else length
                     for n, length in zip(counts, lengths)]
            if pos + sum(whole) <= end:
                lengths = whole
        out = []
        for n, length in zip(counts, lengths):
            if tables and length >= LENGTH_CEILING:
                values, bits = _huffman_decode(scp.data[pos:end], n, tables)
                length = 2 * -(-bits // 16)  # its codes, padded to an even number of bytes as writers pad leads
            else:
                if pos + length > end:
                    raise RecordRejected("truncated_signal", f"{what} data runs past its section")
                chunk = scp.data[pos:pos + length]
                if tables:
                    values, _ = _huffman_decode(chunk, n, tables)
                elif length >= 2 * n or length >= LENGTH_CEILING:
                    values = np.frombuffer(chunk, "<i2", min(n, length // 2)).astype(np.int64)
                else:
                    raise RecordRejected("truncated_signal", f"{what}: {length} bytes for {n} samples")
            pos += length
            out.append(_undo_differences(values, order))
        return out

    def _add_reference_beats(self, scp: _File, signal: np.ndarray, tables, interval_us: int) -> None:
        """Add the reference beat (section 5) back into each subtraction zone of section 4 (in nV)."""
        if scp.section(4) is None or scp.section(5) is None:
            raise RecordRejected("bad_header", "reference-beat subtraction used but section 4 or 5 is missing")
        pos4, end4 = scp.section(4)
        length_ms, fiducial, n_qrs = scp.unpack("<HHH", pos4)
        pos5, end5 = scp.section(5)
        avm5, interval5, order5, _ = scp.unpack("<HHBB", pos5)
        if interval5 != interval_us:
            raise RecordRejected("unsupported_compression", "reference beat and rhythm at different rates")
        n_ref = int(round(length_ms * 1000 / interval5))
        beats = self._decode_leads(scp, pos5 + 6, end5, [n_ref] * signal.shape[0], tables, order5, "reference beat")
        for q in range(n_qrs):
            beat_type, start, fc, end = scp.unpack("<HIII", pos4 + 6 + 14 * q)
            if beat_type != 0:
                continue  # only beats of type 0 were subtracted
            samples = np.arange(start, end + 1)  # 1-based sample numbers of the zone
            offsets = samples - fc + fiducial  # aligns the zone's fiducial with the reference beat's
            keep = (offsets >= 0) & (offsets < n_ref) & (samples >= 1) & (samples <= signal.shape[1])
            for row, beat in enumerate(beats):
                signal[row, samples[keep] - 1] += beat[offsets[keep]] * avm5
