"""Draws the wall-clock time into a frame's luma plane (the test pattern's running clock).

PyAV's FFmpeg has no drawtext filter, so a 5x7 bitmap font is drawn with numpy: only the
rectangle under the text is touched, which costs far less than converting the frame.
"""

from __future__ import annotations

import av
import numpy as np
import numpy.typing as npt

_FONT = {
    "0": ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11111", "00010", "00100", "00010", "00001", "10001", "01110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
    ":": ("00000", "01100", "01100", "00000", "01100", "01100", "00000"),
    ".": ("00000", "00000", "00000", "00000", "00000", "01100", "01100"),
    "-": ("00000", "00000", "00000", "11111", "00000", "00000", "00000"),
    "U": ("10001", "10001", "10001", "10001", "10001", "10001", "01110"),
    "T": ("11111", "00100", "00100", "00100", "00100", "00100", "00100"),
    "C": ("01110", "10001", "10000", "10000", "10000", "10001", "01110"),
    " ": ("00000",) * 7,
}


def _glyphs(scale: int) -> dict[str, npt.NDArray[np.bool_]]:
    out = {}
    for ch, rows in _FONT.items():
        bitmap = np.array([[c == "1" for c in row] for row in rows], dtype=bool)
        out[ch] = np.kron(bitmap, np.ones((scale, scale), dtype=bool))
    return out


class ClockOverlay:
    def __init__(self, frame_height: int) -> None:
        self.scale = max(1, frame_height // 120)
        self._glyphs = _glyphs(self.scale)
        self._cache: tuple[str, npt.NDArray[np.uint8]] | None = None

    def render(self, text: str) -> npt.NDArray[np.uint8]:
        """White text on black as a luma block, with a one-glyph margin."""
        if self._cache and self._cache[0] == text:
            return self._cache[1]
        s = self.scale
        gw, gh = 6 * s, 7 * s
        block = np.full((gh + 2 * s, gw * len(text) + 2 * s), 16, dtype=np.uint8)
        for i, ch in enumerate(text):
            glyph = self._glyphs.get(ch, self._glyphs[" "])
            region = block[s:s + gh, s + i * gw:s + i * gw + 5 * s]
            region[glyph] = 235
        self._cache = (text, block)
        return block

    def draw(self, frame: av.VideoFrame, text: str) -> None:
        """Draw `text` at the bottom left of a yuv420p frame, in place, on neutral grey."""
        block = self.render(text)
        planes = [np.frombuffer(memoryview(p), np.uint8).reshape(-1, p.line_size)
                  for p in frame.planes]
        luma = planes[0][:frame.height, :frame.width]
        h, w = min(block.shape[0], luma.shape[0]), min(block.shape[1], luma.shape[1])
        y, x = luma.shape[0] - h - 2 * self.scale, 2 * self.scale
        y, x = max(0, y) & ~1, x & ~1  # even, so the chroma rectangle lines up
        h, w = min(h, luma.shape[0] - y), min(w, luma.shape[1] - x)
        luma[y:y + h, x:x + w] = block[:h, :w]
        for chroma in planes[1:3]:
            chroma[y // 2:(y + h + 1) // 2, x // 2:(x + w + 1) // 2] = 128
