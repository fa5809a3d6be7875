"""Issue 13: what the driver sees and hears. The machine's Indicate/Prompt effects on
their own, then a press through the whole daemon (mock button, real dispatcher) with the
LED read back from gpiozero's MockFactory pin history and decoded into patterns."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import wait_for
from dashsos.devices.mock import MockDevices
from dashsos.effects import Indicate, MuteSpeaker, Prompt
from dashsos.feedback.indicator import PATTERNS
from dispatcher import Dispatcher
from inprocess import RunningApp, apps, call_section, calls_connected
from test_incident import Effects, _machine, run

# --- the machine decides: light and voice as effects ---


def _car(effects: Effects) -> list[str]:
    return [f"{type(e).__name__}:{getattr(e, 'pattern', getattr(e, 'name', ''))}"
            for e in effects.all if isinstance(e, Indicate | Prompt)]


def test_patterns_and_prompts_of_a_connected_call_and_a_cancel() -> None:
    async def scenario() -> None:
        machine, effects = _machine(call=True, grace_seconds=5)
        incident, _ = machine.trigger("panic_button", "button")
        assert incident is not None
        machine.call_connected(incident, {}, holds=True)
        machine.cancel("button long press")
        await asyncio.sleep(0.5)  # post window over: closed
        assert _car(effects) == ["Indicate:slow_blink", "Prompt:calling", "Indicate:steady",
                                 "Prompt:connected", "Indicate:fast_blink",
                                 "Prompt:cancelled", "Indicate:off"]
    run(scenario)


def test_unreachable_dispatcher_double_blinks_and_says_so_once() -> None:
    async def scenario() -> None:
        machine, effects = _machine(call=True, post_seconds=0.5)
        incident, _ = machine.trigger("panic_button", "button")
        assert incident is not None
        machine.call_round_failed(incident)
        machine.call_round_failed(incident)
        await asyncio.sleep(0.7)
        assert _car(effects) == ["Indicate:slow_blink", "Prompt:calling",
                                 "Indicate:double_blink", "Prompt:no_connection",
                                 "Indicate:off"]
    run(scenario)


def test_covert_shows_and_says_nothing() -> None:
    async def scenario() -> None:
        machine, effects = _machine(call=True, covert=True)
        incident, _ = machine.trigger("panic_button", "button")
        assert incident is not None
        machine.call_connected(incident, {}, holds=False)
        machine.cancel("button long press")
        machine.set_device_fault(True)
        await asyncio.sleep(0.5)
        assert _car(effects) == []
    run(scenario)


def test_test_incident_says_so_first_and_idle_shows_fault_or_heartbeat() -> None:
    async def scenario() -> None:
        machine, effects = _machine(heartbeat=True)
        machine.set_device_fault(True)
        machine.set_device_fault(False)
        machine.trigger("local", "installer", test=True)
        await asyncio.sleep(0.5)
        assert _car(effects) == ["Indicate:fault", "Indicate:heartbeat", "Prompt:test",
                                 "Indicate:double_blink", "Prompt:no_connection",
                                 "Indicate:heartbeat"]
    run(scenario)


def _cancel_then(duress: str) -> tuple[list[tuple[float, str]], Effects, Any]:
    """A connected call, a cancel (plain, duress PIN or press after cancel), the car's
    light and voice with their times from the cancel."""
    out: dict[str, Any] = {}

    async def scenario() -> None:
        machine, effects = _machine(call=True, grace_seconds=5, post_seconds=0.6,
                                    duress_pin="4711", duress_press_seconds=2)
        seen: list[tuple[float, str]] = []
        t0 = [0.0]
        machine.handlers.append(lambda e: seen.append(
            (time.monotonic() - t0[0], _car(Effects.of_one(e))[0]))
            if isinstance(e, Indicate | Prompt) else None)
        incident, _ = machine.trigger("panic_button", "button")
        assert incident is not None
        machine.call_connected(incident, {}, holds=True)
        t0[0] = time.monotonic()
        seen.clear()
        if duress == "pin":
            assert machine.cancel("control socket", pin="4711") == (True, "cancelled")
        else:
            assert machine.cancel("button long press") == (True, "cancelled")
        if duress == "press":
            machine.button_pressed("button")
            machine.button_released("button")
            machine.call_connected(incident, {}, holds=True)  # the re-dial answered
        await asyncio.sleep(2.5)  # a cancel stays open duress_press_seconds (2 s)
        out.update(seen=seen, effects=effects, incident=incident, machine=machine)
    run(scenario)
    return out["seen"], out["effects"], out


def test_duress_looks_like_a_cancel_in_the_car_and_goes_on() -> None:
    plain, plain_effects, _ = _cancel_then("none")
    for how in ("pin", "press"):
        seen, effects, out = _cancel_then(how)
        # the same light and voice, in the same order, at the same moments
        assert [s for _, s in seen] == [s for _, s in plain] == [
            "Indicate:fast_blink", "Prompt:cancelled", "Indicate:off"], how
        assert all(abs(a - b) < 0.15 for (a, _), (b, _) in zip(seen, plain, strict=True))
        incident, machine = out["incident"], out["machine"]
        assert incident.duress is not None and incident.cancelled is None, how
        assert machine.current is incident  # still open: held by the call
        assert "duress" in effects.events() and MuteSpeaker(True) in effects.all
        assert "duress" not in plain_effects.events()
    # the gesture re-dials at once (the cancel hung up); the PIN never hung up
    assert plain_effects.names().count("Dial") == 1


def _of_one(effect: Any) -> Effects:
    e = Effects()
    e.all.append(effect)
    return e


Effects.of_one = staticmethod(_of_one)  # type: ignore[attr-defined]


def test_press_after_the_duress_window_uncancels_visibly() -> None:
    async def scenario() -> None:
        machine, effects = _machine(call=True, grace_seconds=5, post_seconds=2,
                                    duress_press_seconds=0.2)
        incident, _ = machine.trigger("panic_button", "button")
        assert incident is not None
        machine.cancel("button long press")
        await asyncio.sleep(0.3)
        machine.button_pressed("button")
        machine.button_released("button")
        assert incident.duress is None and incident.cancelled is None
        assert _car(effects)[-2:] == ["Indicate:slow_blink", "Prompt:calling"]
        assert "duress" not in effects.events()
        await machine.shutdown()
    run(scenario)


def test_duress_pin_after_a_real_cancel_undoes_it_quietly() -> None:
    async def scenario() -> None:
        machine, effects = _machine(call=True, grace_seconds=5, post_seconds=0.5,
                                    duress_pin="4711")
        incident, _ = machine.trigger("panic_button", "button")
        assert incident is not None
        machine.call_connected(incident, {}, holds=True)
        machine.cancel("button long press")  # real: hung up
        assert machine.cancel("control socket", pin="4711") == (False, "already cancelled")
        assert incident.cancelled is None and incident.duress is not None
        assert effects.names().count("Dial") == 2  # called again
        machine.call_connected(incident, {}, holds=True)
        await asyncio.sleep(0.7)
        assert machine.current is incident
        assert _car(effects)[-3:] == ["Indicate:fast_blink", "Prompt:cancelled",
                                      "Indicate:off"]
        await machine.shutdown()
    run(scenario)


def test_heartbeat_shows_at_start() -> None:
    async def scenario() -> None:
        machine, effects = _machine(heartbeat=True)
        machine.refresh_indicator()
        assert _car(effects) == ["Indicate:heartbeat"]
    run(scenario)


# --- the whole daemon: the LED's pin history decoded ---

LED_PIN = 27


def segments(pin: Any) -> list[tuple[bool, float]]:
    """(state, seconds) from a MockPin's history, the current state up to now."""
    states = list(pin.states)
    out = [(bool(prev.state), nxt.timestamp) for prev, nxt in
           zip(states, states[1:], strict=False)]
    out.append((bool(states[-1].state), time.monotonic() - pin._last_change))
    return [s for s in out if s[1] > 0]


def _fits(seconds: float, expected: float) -> bool:
    return abs(seconds - expected) <= max(0.08, 0.35 * expected)


def decode(pin: Any) -> list[str]:
    """The documented patterns (feedback.indicator.PATTERNS) seen on the pin, in order."""
    segs = segments(pin)
    found: list[str] = []
    i = 0
    while i < len(segs):
        state, seconds = segs[i]
        best, length = None, 1
        if not state and seconds >= 0.8:
            best = "off"
        elif state and seconds >= 0.8:
            best = "steady"
        elif state:
            for name, steps in PATTERNS.items():
                if len(steps) < 2:
                    continue
                n = 0
                while (i + n < len(segs) and segs[i + n][0] == (n % 2 == 0)
                       and _fits(segs[i + n][1], steps[n % len(steps)])):
                    n += 1
                if n >= min(len(steps), 3) and n > length:
                    best, length = name, n
        if best is not None and (not found or found[-1] != best):
            found.append(best)
        i += length
    return found


@pytest.fixture
def start_app(tmp_path: Path) -> Iterator[Callable[..., RunningApp]]:
    with apps(tmp_path, prompts={"enabled": False}) as start:
        yield start


def _led(car: RunningApp) -> Any:
    return car.devices.pin_factory.pin(LED_PIN)


def test_led_connectedcall_section(tmp_path: Path, dispatcher: Dispatcher,
                            start_app: Callable[..., RunningApp]) -> None:
    car = start_app(MockDevices(), call=call_section(tmp_path, dispatcher))
    car.press()
    wait_for(dispatcher.connected, 15, "the dispatcher to answer")
    time.sleep(1.0)
    assert decode(_led(car))[-1] == "steady"
    assert car.request("status")["status"]["sources"]["indicator"]["detail"] == \
        "pin GPIO27, steady"


def test_led_unreachable_dispatcher(tmp_path: Path,
                                    start_app: Callable[..., RunningApp]) -> None:
    token = tmp_path / "call.token"
    token.write_text("x\n")
    car = start_app(MockDevices(), call={"endpoints": ["http://127.0.0.1:9/whip"],
                                         "token_file": str(token),
                                         "redial_max_seconds": 2},
                    incident={"post_seconds": 4})
    car.press()
    time.sleep(3.0)
    assert decode(_led(car)) == ["double_blink"]  # slow blink for a moment, then this
    time.sleep(2.0)
    assert decode(_led(car)) == ["double_blink", "off"]  # the incident is over


def _cancel_in_car(tmp_path: Path, dispatcher: Dispatcher,
                   start_app: Callable[..., RunningApp], duress: bool) -> tuple[
                       list[str], RunningApp]:
    car = start_app(MockDevices(), call=call_section(tmp_path, dispatcher),
                    incident={"post_seconds": 3, "cancel_grace_seconds": 10,
                              "duress_press_seconds": 3})  # the same car both times
    car.press()
    wait_for(dispatcher.connected, 15, "the dispatcher to answer")
    time.sleep(1.0)
    car.press(0.8)  # the cancel gesture
    if duress:
        time.sleep(0.3)
        car.press()  # and the duress press
    time.sleep(4.0)  # past the moment the cancelled incident closes
    return decode(_led(car)), car


def test_led_cancel_and_duress_cancel_look_the_same(
        tmp_path: Path, dispatcher: Dispatcher,
        start_app: Callable[..., RunningApp]) -> None:
    plain, car = _cancel_in_car(tmp_path, dispatcher, start_app, duress=False)
    assert plain == ["steady", "fast_blink", "off"], plain
    car.stop()
    seen, coerced = _cancel_in_car(tmp_path, dispatcher, start_app, duress=True)
    assert seen == plain
    status = coerced.request("status")["status"]
    incident = status["incident"]
    assert incident is not None and incident["duress"] is not None  # still going
    assert incident["cancelled"] is None
    wait_for(lambda: calls_connected(dispatcher), 10, "the call to the desk again")
    record = wait_for(lambda: coerced.record(incident["id"]), 10, "the record")
    assert record["duress"]["kind"] == "duress"
    gate = coerced.app.feedback.gate  # the call's audio to the car is off
    assert gate.muted and gate.speakers and gate.speakers[-1]._stop.is_set()


def test_led_covert_never_lights(tmp_path: Path, dispatcher: Dispatcher,
                                 start_app: Callable[..., RunningApp]) -> None:
    car = start_app(MockDevices(), call=call_section(tmp_path, dispatcher),
                    incident={"covert": True, "post_seconds": 1, "cancel_grace_seconds": 5})
    car.press()
    wait_for(dispatcher.connected, 15, "the dispatcher to answer")
    time.sleep(0.5)
    car.press(0.8)
    time.sleep(2.0)
    assert not any(s.state for s in _led(car).states)
    assert car.app.feedback.indicator is None and car.app.feedback.prompts is None


# --- the speaker: prompts found in PulseAudio's null sink by energy and duration ---


def _wav_seconds(path: Path) -> float:
    """How long the prompt sounds (its file has silence at both ends)."""
    import wave
    with wave.open(str(path), "rb") as wav:
        rate, pcm = wav.getframerate(), wav.readframes(wav.getnframes())
    found = bursts(pcm, rate)
    return found[-1][0] + found[-1][1] - found[0][0]


def bursts(pcm: bytes, rate: int = 48000, gap: float = 0.4) -> list[tuple[float, float]]:
    """(start, seconds) of the sounding stretches of s16le mono, split at `gap` of silence."""
    import numpy as np
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    window = rate // 50  # 20 ms: 50 windows a second
    rms = [float(np.sqrt(np.mean(samples[i:i + window] ** 2)))
           for i in range(0, len(samples) - window, window)]
    loud = [r > 300 for r in rms]
    out: list[tuple[float, float]] = []
    start, quiet = None, 0
    for i, on in enumerate(loud + [False] * int(gap * 50 + 1)):
        if on:
            start = i if start is None else start
            quiet = 0
        elif start is not None:
            quiet += 1
            if quiet > gap * 50:
                out.append((start / 50, (i - quiet + 1 - start) / 50))
                start, quiet = None, 0
    return out


class Recorder:
    """Records the car's speaker sink on a thread while the test acts."""

    def __init__(self, pulse: dict[str, str], seconds: float) -> None:
        import threading

        from conftest import record_sink
        self.pcm = b""
        self.began = time.monotonic()

        def run() -> None:
            self.pcm = record_sink(pulse, "speaker", seconds)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self) -> bytes:
        self.thread.join(60)
        return self.pcm


@pytest.fixture
def speaker_env(pulse: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for key, value in {**pulse, "PULSE_SINK": "speaker"}.items():
        monkeypatch.setenv(key, value)
    return pulse


def test_prompts_heard_in_order_at_their_moments(
        tmp_path: Path, dispatcher: Dispatcher, speaker_env: dict[str, str],
        start_app: Callable[..., RunningApp]) -> None:
    car = start_app(MockDevices(), call={**call_section(tmp_path, dispatcher), "speaker": "pulse"},
                    prompts={"enabled": True},
                    incident={"post_seconds": 3, "cancel_grace_seconds": 30})
    player = car.app.feedback.prompts
    assert player is not None
    wait_for(lambda: all(player.path(n).exists() for n in ("calling", "connected",
                                                         "cancelled")), 20, "the prompts rendered")
    expected = {n: _wav_seconds(player.path(n)) for n in ("calling", "connected", "cancelled")}
    rec = Recorder(speaker_env, 14.0)
    time.sleep(1.0)
    pressed = time.monotonic() - rec.began
    car.press()
    wait_for(dispatcher.connected, 15, "the dispatcher to answer")
    wait_for(lambda: player.said == ["calling", "connected"], 15, "two prompts said")
    time.sleep(1.0)
    cancelled = time.monotonic() - rec.began
    car.press(0.8)
    wait_for(lambda: player.said[-1:] == ["cancelled"], 15, "the cancel said")
    heard = bursts(rec.result())
    print("expected", expected, "heard", heard, "press", pressed, "cancel", cancelled)
    assert player.said == ["calling", "connected", "cancelled"]
    assert heard, "nothing heard on the speaker"
    # Energy and duration, summed: a loaded sound path (PortAudio's ALSA "pulse" device
    # stalls under load) can drop or split part of a word. Too little sound, or more than
    # the three prompts, fails.
    total, want = sum(seconds for _, seconds in heard), sum(expected.values())
    assert 0.5 * want <= total <= 1.3 * want + 0.3, heard
    # Order and moments, from the first sound ("Calling", at the press): "Calling" and
    # "Connected" before the cancel, "Cancelled" after it and within 4 s.
    t0, cut = heard[0][0], cancelled - pressed
    before = [(start, secs) for start, secs in heard if start - t0 < cut - 0.25]
    after = [(start, secs) for start, secs in heard if start - t0 >= cut - 0.25]
    assert sum(secs for _, secs in before) >= 0.5 * (expected["calling"]
                                                      + expected["connected"]), heard
    assert after and sum(secs for _, secs in after) >= 0.5 * expected["cancelled"], heard
    assert after[0][0] - t0 - cut < 4.0, heard


def test_covert_speaker_stays_silent(
        tmp_path: Path, dispatcher: Dispatcher, speaker_env: dict[str, str],
        start_app: Callable[..., RunningApp]) -> None:
    car = start_app(MockDevices(), call={**call_section(tmp_path, dispatcher), "speaker": "pulse"},
                    prompts={"enabled": True},
                    incident={"covert": True, "post_seconds": 2, "cancel_grace_seconds": 30})
    rec = Recorder(speaker_env, 6.0)
    car.press()
    wait_for(dispatcher.connected, 15, "the dispatcher to answer")
    time.sleep(1.0)
    car.press(0.8)
    assert bursts(rec.result()) == []
    assert not any(s.state for s in _led(car).states)


# --- duress for the fleet: MQTT `duress`, the MSD stays real, the evidence says so ---


def test_duress_reaches_mqtt_and_the_evidence(tmp_path: Path, dispatcher: Dispatcher,
                                              start_app: Callable[..., RunningApp]) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from dashsos.fleet.commands import sign
    from mqttbroker import Broker, Subscriber

    (tmp_path / "broker").mkdir()
    broker = Broker(tmp_path / "broker")
    key = bytes(range(32))
    key_file = tmp_path / "command.key"
    key_file.write_text(key.hex() + "\n")
    try:
        car = start_app(MockDevices(), call=call_section(tmp_path, dispatcher),
                        mqtt={"enabled": True, "host": "127.0.0.1", "port": broker.port},
                        commands={"enabled": True, "key_file": str(key_file)},
                        incident={"post_seconds": 2, "cancel_grace_seconds": 30,
                                  "duress_press_seconds": 3, "duress_pin": "1357"})
        wait_for(lambda: car.request("status")["status"]["links"]["mqtt"]["state"] == "ok",
                 15, "mqtt connected")
        sub = Subscriber(broker.port, "dashsos/#")
        # 1. the gesture: cancel, then a press within 3 s
        car.press()
        wait_for(dispatcher.connected, 15, "the dispatcher to answer")
        car.press(0.8)
        time.sleep(0.3)
        car.press()
        duress = sub.wait_json("/incident", lambda m: m["event"] == "duress", 15)
        assert duress["duress"]["source"].endswith("press after cancel")
        assert duress["msd"]["msdStructure"]["control"]["testCall"] is False  # real
        first = duress["id"]
        events = [m["event"] for m in sub.json("/incident") if m["id"] == first]
        assert events.index("cancelled") < events.index("duress")
        record = wait_for(lambda: (r := car.record(first)) and r["duress"] and r, 15,
                          "the record to say duress")  # written while the incident goes on
        assert record["duress"]["kind"] == "duress" and record["cancelled"] is None
        # 2. the PIN over MQTT, on another car
        other = start_app(MockDevices(), call=call_section(tmp_path, dispatcher),
                          vehicle={"id": "car-2"},
                          mqtt={"enabled": True, "host": "127.0.0.1", "port": broker.port},
                          commands={"enabled": True, "key_file": str(key_file)},
                          incident={"post_seconds": 2, "cancel_grace_seconds": 30,
                                    "duress_pin": "1357"})
        wait_for(lambda: other.request("status")["status"]["links"]["mqtt"]["state"] == "ok",
                 15, "mqtt connected")
        pub = mqtt.Client(CallbackAPIVersion.VERSION2)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        reply_sub = Subscriber(broker.port, "dashsos/car-2/cmd/+/reply")
        pub.publish("dashsos/car-2/cmd/trigger", sign("car-2", key, "trigger"), qos=1)
        opened = reply_sub.wait_json("/trigger/reply", lambda m: m["ok"], 10)
        second = opened["result"]["incident"]
        pub.publish("dashsos/car-2/cmd/cancel", sign("car-2", key, "cancel", {"pin": "1357"}),
                    qos=1)
        reply = reply_sub.wait_json("/cancel/reply", lambda m: True, 10)
        assert reply["ok"] and reply["result"] == {"outcome": "cancelled"}  # like a cancel
        message = sub.wait_json("/incident", lambda m: m["id"] == second
                                and m["event"] == "duress", 10)
        assert message["duress"]["source"].endswith("duress PIN")
        assert "cancelled" not in [m["event"] for m in sub.json("/incident")
                                   if m["id"] == second]
        assert other.request("status")["status"]["incident"]["id"] == second
        pub.loop_stop()
        pub.disconnect()
        sub.close()
        reply_sub.close()
    finally:
        broker.stop()


# --- status: indicator and speaker health; no espeak-ng or no speaker is a warning ---


def test_status_shows_indicator_prompts_and_a_missing_speaker(
        tmp_path: Path, start_app: Callable[..., RunningApp]) -> None:
    car = start_app(MockDevices(), prompts={"enabled": True},
                    call={"speaker": "no-such-device-here"},
                    incident={"post_seconds": 1, "cancel_grace_seconds": 5})
    sources = car.request("status")["status"]["sources"]
    assert sources["indicator"]["backend"] == "mock"
    assert sources["prompts"]["state"] == "ok"  # espeak-ng is installed here
    reply = car.request("test")  # what an installer runs: light and voice end to end
    player = car.app.feedback.prompts
    assert player is not None
    wait_for(lambda: car.request("status")["status"]["sources"]["speaker"]["state"] == "down",
             20, "the missing speaker reported")
    speaker = car.request("status")["status"]["sources"]["speaker"]
    assert "no-such-device-here" in speaker["detail"], speaker
    record = wait_for(lambda: (r := car.record(reply["incident"])) and
                      r["status"] == "saved" and r, 20, "the test incident saved anyway")
    assert record["test"] is True
    assert car.app.feedback.indicator is not None
    assert car.app.feedback.indicator.history[:2] == ["double_blink", "off"]


def test_no_espeak_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dashsos.config import PromptsConfig
    from dashsos.feedback.prompts import PromptPlayer, SpeakerGate

    monkeypatch.setenv("PATH", str(tmp_path))  # no espeak-ng on it

    async def scenario() -> None:
        player = PromptPlayer(PromptsConfig(), tmp_path / "cache", "", SpeakerGate(None))
        assert player.health.state == "down" and "espeak-ng" in player.health.detail
        player.handle(Prompt("calling"))
        await asyncio.sleep(0.2)
        assert player.said == []
    run(scenario)


def _heard_around_a_cancel(tmp_path: Path, dispatcher: Dispatcher, pulse: dict[str, str],
                           start_app: Callable[..., RunningApp], duress: bool
                           ) -> list[tuple[float, float]]:
    car = start_app(MockDevices(), call={**call_section(tmp_path, dispatcher), "speaker": "pulse"},
                    prompts={"enabled": True},
                    incident={"post_seconds": 3, "cancel_grace_seconds": 30,
                              "duress_press_seconds": 3})  # the same car both times
    player = car.app.feedback.prompts
    assert player is not None
    wait_for(lambda: player.path("cancelled").exists(), 20, "the prompts rendered")
    car.press()
    wait_for(lambda: player.said[:2] == ["calling", "connected"], 40, "the call's prompts")
    time.sleep(0.5)
    rec = Recorder(pulse, 7.0)
    time.sleep(1.0)
    car.press(0.8)  # the cancel
    if duress:
        time.sleep(0.3)
        car.press()
    heard = bursts(rec.result())
    if duress:  # while the car sounds cancelled, the desk has the car again
        assert wait_for(lambda: calls_connected(dispatcher), 10, "the desk called again")
    car.stop()
    return heard


def test_duress_sounds_like_a_cancel(tmp_path: Path, dispatcher: Dispatcher,
                                     speaker_env: dict[str, str],
                                     start_app: Callable[..., RunningApp]) -> None:
    plain = _heard_around_a_cancel(tmp_path, dispatcher, speaker_env, start_app, False)
    coerced = _heard_around_a_cancel(tmp_path, dispatcher, speaker_env, start_app, True)
    print("cancel", plain, "duress", coerced)
    # "Cancelled" and nothing after it: the same sound, starting at the same moment (a
    # busy CPU during the duress re-dial may split the word with a short gap: summed).
    assert plain and coerced
    # Nothing after it in the duress case (no "Connected" when the desk has the car again).
    span = plain[-1][0] + plain[-1][1] - plain[0][0]
    assert coerced[-1][0] + coerced[-1][1] - coerced[0][0] < span + 1.0, (plain, coerced)
    # As long as each other, within what a loaded sound path drops of a word.
    said, heard = sum(s for _, s in plain), sum(s for _, s in coerced)
    assert abs(said - heard) < 0.4 * max(said, heard) + 0.1, (plain, coerced)
    assert abs(plain[0][0] - coerced[0][0]) < 1.0


def test_prompts_wait_for_the_dispatcher(tmp_path: Path) -> None:
    from dashsos.config import PromptsConfig
    from dashsos.feedback.prompts import PromptPlayer, SpeakerGate

    class Talking:
        writing = True

    async def scenario() -> None:
        gate = SpeakerGate(None)
        gate.speakers = [Talking()]  # type: ignore[list-item]
        player = PromptPlayer(PromptsConfig(), tmp_path / "cache", "", gate)
        played: list[str] = []

        async def play(path: Path) -> None:
            played.append(path.name.split("-")[0])

        player._play = play  # type: ignore[method-assign]
        player.handle(Prompt("cancelled"))
        player.handle(Prompt("connected"))
        await asyncio.sleep(1.5)
        assert played == []  # queued while the dispatcher plays, in order
        Talking.writing = False
        await asyncio.sleep(2.0)
        assert played == ["cancelled", "connected"]
    run(scenario)
