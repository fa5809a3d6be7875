"""A map tile server on 127.0.0.1 for the console's street map: /{z}/{x}/{y}.png answers a
256x256 PNG (a checkerboard of two greys with a grid line, so a screenshot shows tiles),
and every request is kept, so a test knows which tiles the browser asked for."""

from __future__ import annotations

import http.server
import re
import struct
import threading
import zlib
from types import TracebackType

SIZE = 256


def tile_png(z: int, x: int, y: int) -> bytes:
    """A valid PNG (8-bit greyscale), lighter or darker by (x + y) parity."""
    shade = 225 if (x + y) % 2 else 205
    row = bytes([0]) + bytes([150]) + bytes([shade]) * (SIZE - 1)  # filter byte, then pixels
    edge = bytes([0]) + bytes([150]) * SIZE
    raw = edge + row * (SIZE - 1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", SIZE, SIZE, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


class TileServer:
    PATH = re.compile(r"^/(\d+)/(\d+)/(\d+)\.png$")

    def __init__(self) -> None:
        self.requests: list[tuple[int, int, int]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                found = server.PATH.match(self.path)
                if not found:
                    self.send_error(404)
                    return
                z, x, y = (int(g) for g in found.groups())
                server.requests.append((z, x, y))
                body = tile_png(z, x, y)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.template = f"http://127.0.0.1:{self.port}/{{z}}/{{x}}/{{y}}.png"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    def __enter__(self) -> TileServer:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()
