"""The call path runs no video encoder: the camera's packets are packetized as they are
(issue 4, item 4). In-process, so the encoders can be counted."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiortc.codecs.h264
import pytest

from conftest import wait_for
from dashsos import config
from dashsos.app import App
from dashsos.devices.mock import MockDevices
from dashsos.media import encoder as dashsos_encoder
from whipserver import WhipServer


def test_call_packetizes_camera_packets_without_encoding(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    counts = {"aiortc_encode": 0, "aiortc_pack": 0, "dashsos_encoders": 0}
    original_pack = aiortc.codecs.h264.H264Encoder.pack
    original_init = dashsos_encoder.H264Encoder.__init__

    def encode(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts["aiortc_encode"] += 1
        raise AssertionError("the call encoded video")

    def pack(self: Any, packet: Any) -> Any:
        counts["aiortc_pack"] += 1
        return original_pack(self, packet)

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        counts["dashsos_encoders"] += 1
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(aiortc.codecs.h264.H264Encoder, "encode", encode)
    monkeypatch.setattr(aiortc.codecs.h264.H264Encoder, "pack", pack)
    monkeypatch.setattr(dashsos_encoder.H264Encoder, "__init__", init)

    whip = WhipServer()
    token = tmp_path / "token"
    token.write_text(whip.token)
    cfg = config.from_dict({
        "storage": {"dir": str(tmp_path / "state")},
        "control": {"socket": str(tmp_path / "control.sock")},
        "buffer": {"pre_seconds": 2}, "incident": {"post_seconds": 2},
        "call": {"endpoints": [whip.url], "token_file": str(token)},
        "ice": {"interfaces": ["127.0.0.1"]},
    })
    app = App(cfg, devices=MockDevices())  # camera, microphone, GPS, speaker, button

    async def scenario() -> None:
        running = asyncio.create_task(app.run())
        await asyncio.sleep(2.5)
        app.machine.trigger("local", "test")
        deadline = asyncio.get_running_loop().time() + 20
        while not any(s.video_frames > 30 for s in whip.sessions.values()):
            assert asyncio.get_running_loop().time() < deadline, "no video at the dispatcher"
            await asyncio.sleep(0.1)
        app.stop()
        await running

    try:
        asyncio.run(scenario())
    finally:
        whip.stop()
    assert counts["aiortc_pack"] > 30  # frames went out ...
    assert counts["aiortc_encode"] == 0  # ... without an encoder in the call path
    assert counts["dashsos_encoders"] == 1  # the one encoder: the camera's
    session = next(iter(whip.sessions.values()))
    wait_for(lambda: session.video_frames > 30, 1, "decoded frames at the server")
