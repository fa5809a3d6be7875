"""Just enough H.264 Annex-B parsing: NAL units, keyframes, parameter sets, profile."""

from __future__ import annotations

from collections.abc import Iterator

NAL_IDR, NAL_SPS, NAL_PPS = 5, 7, 8
START_CODE = b"\x00\x00\x00\x01"

# profile_idc and the constraint_set1 flag: Constrained Baseline is what WebRTC decodes
PROFILE_BASELINE = 66


def nal_units(data: bytes) -> Iterator[bytes]:
    """Yield the NAL units of an Annex-B buffer, without start codes."""
    start = data.find(b"\x00\x00\x01")
    while start >= 0:
        start += 3
        nxt = data.find(b"\x00\x00\x01", start)
        if nxt < 0:
            yield data[start:]
            return
        # A 4-byte start code's leading zero belongs to the next start code.
        end = nxt - 1 if data[nxt - 1] == 0 else nxt
        yield data[start:end]
        start = nxt


def nal_type(nal: bytes) -> int:
    return nal[0] & 0x1F if nal else -1


def is_keyframe(data: bytes) -> bool:
    return any(nal_type(n) == NAL_IDR for n in nal_units(data))


def parameter_sets(data: bytes) -> bytes:
    """SPS and PPS of an access unit, as Annex-B (what an MP4 muxer takes as extradata)."""
    return b"".join(START_CODE + n for n in nal_units(data) if nal_type(n) in (NAL_SPS, NAL_PPS))


def has_parameter_sets(data: bytes) -> bool:
    types = {nal_type(n) for n in nal_units(data)}
    return NAL_SPS in types and NAL_PPS in types


def profile(data: bytes) -> tuple[int, bool] | None:
    """(profile_idc, constrained) from the first SPS in `data`, or None without one."""
    for nal in nal_units(data):
        if nal_type(nal) == NAL_SPS and len(nal) >= 3:
            return nal[1], bool(nal[2] & 0x40)
    return None


def annexb(avcc: bytes, length_size: int = 4) -> bytes:
    """An MP4 sample (length-prefixed NAL units) as Annex B (start codes)."""
    out, data = [], memoryview(avcc)
    while len(data) >= length_size:
        size = int.from_bytes(data[:length_size], "big")
        out.append(START_CODE + bytes(data[length_size:length_size + size]))
        data = data[length_size + size:]
    return b"".join(out)
