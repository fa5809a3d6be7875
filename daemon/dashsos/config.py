"""TOML -> typed, validated config. Every error names the file and the key.

Each section is a dataclass; a field's metadata carries its documentation and its
limits, so the example config and the README reference are generated from one place.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path("/etc/dashsos/config.toml")


class ConfigError(Exception):
    """A config problem, already phrased for the installer."""


def setting(default: Any, doc: str, *, choices: tuple[str, ...] = (),
            minimum: float | None = None, maximum: float | None = None) -> Any:
    meta = {"doc": doc, "choices": choices, "minimum": minimum, "maximum": maximum}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class VehicleConfig:
    id: str = setting("car-1", "Vehicle id: names the car in evidence and in MQTT topics.")
    vin: str = setting("", "Vehicle identification number (17 characters) for the MSD; "
                       "empty if unknown.")
    type: str = setting("passenger_m1", "Vehicle type for the MSD (EN 15722 categories).",
                        choices=("passenger_m1", "bus_m2", "bus_m3", "light_commercial_n1",
                                 "heavy_duty_n2", "heavy_duty_n3", "motorcycle_l1e",
                                 "motorcycle_l2e", "motorcycle_l3e", "motorcycle_l4e",
                                 "motorcycle_l5e", "motorcycle_l6e", "motorcycle_l7e"))
    propulsion: tuple[str, ...] = setting(("gasoline",), "Energy stored on board, for the MSD.",
                                          choices=("gasoline", "diesel", "cng", "lpg",
                                                   "electric", "hydrogen", "other"))


@dataclass(frozen=True)
class StorageConfig:
    dir: str = setting("/var/lib/dashsos", "State directory: incidents/, state.db and the "
                       "device key live here.")
    max_bytes: int = setting(0, "Most bytes incidents may use; 0: no byte limit.", minimum=0)
    max_percent: float = setting(80.0, "Most of the filesystem incidents may use, in percent; "
                                 "0: no limit.", minimum=0, maximum=100)
    min_free_bytes: int = setting(256 * 1024 * 1024, "Free space always left on the "
                                  "filesystem.", minimum=0)


@dataclass(frozen=True)
class ControlConfig:
    socket: str = setting("/run/dashsos/control.sock",
                          "Local control socket (Unix, mode 0660). No TCP port is opened.")


@dataclass(frozen=True)
class BufferConfig:
    pre_seconds: float = setting(30.0, "Seconds kept in memory and saved before a trigger.",
                                 minimum=1, maximum=600)
    max_bytes: int = setting(64 * 1024 * 1024,
                             "Memory cap for the rolling buffer, all streams together.",
                             minimum=1024 * 1024)


@dataclass(frozen=True)
class IncidentConfig:
    post_seconds: float = setting(60.0, "Seconds recorded after the last trigger of an incident.",
                                  minimum=1, maximum=3600)
    cancel_grace_seconds: float = setting(10.0, "A cancel is accepted this long after the "
                                          "trigger; later cancels are refused (and reported).",
                                          minimum=0, maximum=300)
    cooldown_seconds: float = setting(60.0, "After an incident, automatic triggers are ignored "
                                      "this long (a press always triggers).",
                                      minimum=0, maximum=3600)
    covert: bool = setting(False, "No sound or light from the car during an incident (the "
                           "dispatcher's voice is not played).")
    duress_press_seconds: float = setting(
        0.0, "Duress gesture: a press this many seconds or less after a cancel looks like "
        "the cancel in the car but keeps the incident and the call going and reports duress "
        "(a later press un-cancels visibly); 0: off, every press after a cancel un-cancels.",
        minimum=0, maximum=60)
    duress_pin: str = setting("", "Duress PIN: a cancel carrying it (control socket `cancel` "
                              "with `pin`) looks like a cancel and is duress; empty: off.")


@dataclass(frozen=True)
class IndicatorConfig:
    backend: str = setting("none", "gpio drives a LED (or the button's ring light) through "
                           "gpiozero; mock is gpiozero's MockFactory; none has no light.",
                           choices=("gpio", "mock", "none"))
    pin: str = setting("GPIO27", "The LED's pin, as gpiozero names it.")
    active_high: bool = setting(True, "True: the pin drives the LED's anode (on = high).")
    heartbeat: bool = setting(False, "When idle, a short flash every 3 s instead of off.")


@dataclass(frozen=True)
class PromptsConfig:
    enabled: bool = setting(True, "Spoken prompts on the call's speaker (never in covert "
                            "mode, never over the dispatcher's voice).")
    language: str = setting("en", "espeak-ng voice or language (espeak-ng --voices).")
    speed: int = setting(150, "Words per minute.", minimum=80, maximum=450)
    calling: str = setting("Calling the police", "Said when an incident opens.")
    connected: str = setting("Connected: speak now", "Said when the dispatcher answers.")
    cancelled: str = setting("Cancelled", "Said when the incident is cancelled.")
    no_connection: str = setting("No connection: recording, will keep trying",
                                 "Said when no dispatcher could be reached.")
    test: str = setting("This is a test call", "Said first in a test incident.")


@dataclass(frozen=True)
class ButtonConfig:
    backend: str = setting("auto", "auto uses GPIO when gpiozero finds a pin factory (a Pi); "
                           "mock is gpiozero's MockFactory (simulated); none has no button.",
                           choices=("auto", "gpio", "mock", "none"))
    pin: str = setting("GPIO17", "The button's pin, as gpiozero names it (GPIO17, BOARD11, 17).")
    pull_up: bool = setting(True, "True: the button connects the pin to ground.")
    bounce_seconds: float = setting(0.05, "Contact bounce to ignore.", minimum=0, maximum=1)
    long_press_seconds: float = setting(3.0, "Holding this long cancels (within the grace "
                                        "window).", minimum=0.1, maximum=30)


@dataclass(frozen=True)
class AutoTriggerConfig:
    gps_crash: bool = setting(False, "Trigger on a sudden stop seen by GPS (a heuristic until "
                              "an accelerometer is supported).")
    min_speed_kmh: float = setting(40.0, "Speed the car must have had before the stop.",
                                   minimum=5, maximum=300)
    stop_speed_kmh: float = setting(5.0, "Speed that counts as stopped.", minimum=0,
                                    maximum=50)
    within_seconds: float = setting(2.0, "The drop from min to stop speed must happen "
                                    "within this time, on the receiver's clock (a 1 Hz "
                                    "receiver sees it in whole seconds).", minimum=0.5,
                                    maximum=10)
    confirm_fixes: int = setting(2, "Consecutive fixes at or below the stop speed that "
                                 "confirm a stop (one glitch is not a crash; each adds one "
                                 "receiver cycle of delay).", minimum=1, maximum=10)
    max_gap_seconds: float = setting(1.5, "A longer gap in receiver time is a dropout: "
                                     "nothing before it counts (set above the receiver's "
                                     "cycle).", minimum=0.1, maximum=10)


@dataclass(frozen=True)
class MqttConfig:
    enabled: bool = setting(False, "Connect to the fleet's MQTT broker.")
    host: str = setting("localhost", "Broker host.")
    port: int = setting(1883, "Broker port (8883 is usual with TLS).", minimum=1, maximum=65535)
    protocol: str = setting("3.1.1", "MQTT protocol version.", choices=("3.1.1", "5"))
    base_topic: str = setting("dashsos", "Topics are <base_topic>/<vehicle.id>/...")
    client_id: str = setting("", "Client id; empty means dashsos-<vehicle.id>.")
    username: str = setting("", "User name; empty for none.")
    password_file: str = setting("", "File holding the password (never logged).")
    tls: bool = setting(False, "Use TLS; the broker's certificate is verified.")
    ca_file: str = setting("", "CA certificate(s) for the broker; empty uses the system's.")
    cert_file: str = setting("", "Client certificate (PEM) for TLS client authentication.")
    key_file: str = setting("", "Client private key (PEM).")
    keepalive: int = setting(30, "Seconds between keepalive pings; the last will fires after "
                             "1.5 times this.", minimum=5, maximum=3600)
    status_interval: float = setting(60.0, "Seconds between periodic status messages (also "
                                     "sent on every change).", minimum=1, maximum=86400)
    location_interval: float = setting(10.0, "Seconds between location messages when idle; "
                                       "0 sends none (1 Hz during an incident regardless).",
                                       minimum=0, maximum=86400)
    outbox_max: int = setting(10000, "Messages kept for a broker that is away; incident "
                              "messages are never dropped, location goes first.",
                              minimum=100)


@dataclass(frozen=True)
class CommandsConfig:
    enabled: bool = setting(False, "Accept commands on cmd/<name> (each signed with the key).")
    key_file: str = setting("", "File with this vehicle's command key (hex or base64, at "
                            "least 32 bytes).")
    max_skew_seconds: float = setting(30.0, "Commands older or newer than this are refused.",
                                      minimum=1, maximum=600)
    allowed: tuple[str, ...] = setting(("trigger", "cancel", "test_call", "status"),
                                       "Commands this car accepts.",
                                       choices=("trigger", "cancel", "test_call", "status"))


@dataclass(frozen=True)
class HomeAssistantConfig:
    discovery: bool = setting(False, "Publish Home Assistant MQTT discovery messages.")
    prefix: str = setting("homeassistant", "Home Assistant's discovery prefix.")


@dataclass(frozen=True)
class VideoConfig:
    backend: str = setting("auto", "auto picks picamera2, then /dev/video0; test is a simulated "
                           "pattern; none records no video.",
                           choices=("auto", "picamera2", "ffmpeg", "test", "none"))
    input: str = setting("", "ffmpeg backend: a device (/dev/video0), a URL (rtsp://...) "
                         "or a file.")
    input_format: str = setting("", "ffmpeg backend: FFmpeg demuxer (v4l2, rtsp, lavfi); "
                                "empty lets FFmpeg guess.")
    input_options: dict[str, str] = setting({}, "ffmpeg backend: demuxer options, as strings.")
    transcode: str = setting("auto", "ffmpeg backend: auto copies suitable H.264 and encodes "
                             "anything else; always re-encodes.", choices=("auto", "always"))
    width: int = setting(1280, "Frame width in pixels.", minimum=64, maximum=3840)
    height: int = setting(720, "Frame height in pixels.", minimum=64, maximum=2160)
    fps: int = setting(30, "Frames per second.", minimum=1, maximum=60)
    bitrate: int = setting(2_000_000, "H.264 bit rate in bits per second.",
                           minimum=100_000, maximum=50_000_000)
    keyframe_interval: float = setting(1.0, "Seconds between keyframes (at most 1).",
                                       minimum=0.1, maximum=1.0)
    preset: str = setting("veryfast", "libx264 preset when dashsos encodes (not on the Pi).",
                          choices=("ultrafast", "superfast", "veryfast", "faster", "fast",
                                   "medium"))


@dataclass(frozen=True)
class AudioConfig:
    backend: str = setting("auto", "auto uses a PortAudio microphone when present; test is a "
                           "simulated tone; none records no audio.",
                           choices=("auto", "pyaudio", "test", "none"))
    device: str = setting("", "pyaudio backend: input device name (substring) or index; "
                          "empty is the default device.")
    sample_rate: int = setting(48000, "Capture sample rate in Hz (mono).",
                               minimum=8000, maximum=48000)
    tone_hz: float = setting(440.0, "test backend: frequency of the tone.",
                             minimum=20, maximum=20000)
    test_sound: str = setting("", "test backend: a 16-bit PCM WAV file (speech, say) "
                              "played in a loop instead of the tone.")


@dataclass(frozen=True)
class GpsConfig:
    backend: str = setting("auto", "auto and gpsd read gpsd; simulated drives a fixed loop; "
                           "none has no position.",
                           choices=("auto", "gpsd", "simulated", "none"))
    host: str = setting("127.0.0.1", "gpsd host.")
    port: int = setting(2947, "gpsd port.", minimum=1, maximum=65535)
    poll_interval: float = setting(0.5, "Unused: gpsd is streamed now (kept so older "
                                   "configs load).", minimum=0.05, maximum=10)
    epoch_settle: float = setting(0.6, "Seconds gpsd must be quiet after a report before "
                                  "its epoch counts as whole, until the receiver's whole "
                                  "epoch is learnt (longer than a burst of sentences).",
                                  minimum=0.02, maximum=2)
    timeout: float = setting(3.0, "Seconds without an answer from gpsd before it counts as down.",
                             minimum=0.5, maximum=60)
    track_seconds: float = setting(900.0, "Seconds of position history kept in memory.",
                                   minimum=10, maximum=86400)


@dataclass(frozen=True)
class IceConfig:
    stun_urls: tuple[str, ...] = setting((), "STUN servers (stun:host:port). Empty: none (no "
                                         "public server is ever asked).")
    turn_urls: tuple[str, ...] = setting((), "TURN servers (turn:host:port?transport=udp).")
    turn_username: str = setting("", "TURN user name.")
    turn_password_file: str = setting("", "File holding the TURN password.")
    relay_only: bool = setting(False, "Only relayed (TURN) candidates: hides the car's "
                               "addresses, works through any NAT.")
    interfaces: tuple[str, ...] = setting((), "Local addresses or interface names that may "
                                          "carry calls (e.g. wwan0); empty: all but loopback.")
    from_server: bool = setting(False, "Also use the ICE servers a WHIP endpoint offers in "
                                "its 201's Link rel=\"ice-server\" headers (from the next "
                                "dial of that endpoint on).")


@dataclass(frozen=True)
class CallConfig:
    enabled: bool = setting(True, "An incident calls the dispatcher by itself (needs "
                            "endpoints).")
    endpoints: tuple[str, ...] = setting((), "Dispatcher URLs, tried in order "
                                         "(https://desk.example/whip).")
    token_file: str = setting("", "File holding the Bearer token for the endpoints.")
    mode: str = setting("call", "call: two-way audio, video, telemetry data channel; whip: "
                        "strict RFC 9725 ingest for any WHIP server.", choices=("call", "whip"))
    connect_timeout: float = setting(10.0, "Seconds for an endpoint to answer and the call "
                                     "to connect before the next is tried.", minimum=1,
                                     maximum=120)
    redial_max_seconds: float = setting(2.0, "Longest wait between re-dials while the "
                                        "incident is open.", minimum=0.5, maximum=300)
    verify_tls: bool = setting(True, "Verify the dispatcher's certificate. Turning this off "
                               "is logged loudly.")
    ca_file: str = setting("", "CA certificate(s) for the dispatcher; empty uses the "
                           "system's.")
    redirect_origins: tuple[str, ...] = setting((), "Origins (https://host:port) an endpoint "
                                                "may redirect to with the token; redirects "
                                                "to any other origin are refused.")
    speaker: str = setting("", "PortAudio output device (name substring or index) for the "
                           "dispatcher's voice; empty: default; none: never play it.")


@dataclass(frozen=True)
class UploadConfig:
    enabled: bool = setting(True, "Send saved incidents to the dispatcher (needs endpoint).")
    endpoint: str = setting("", "The desk's evidence URL (https://desk.example/evidence).")
    token_file: str = setting("", "Bearer token file; empty reuses call.token_file.")
    interval: float = setting(10.0, "Seconds between upload rounds (each saved incident "
                              "also starts one).", minimum=1, maximum=3600)
    chunk_bytes: int = setting(262144, "Bytes per resumable chunk.", minimum=4096,
                               maximum=16 * 1024 * 1024)
    timeout: float = setting(30.0, "Seconds for one request (one chunk) on the worst link.",
                             minimum=1, maximum=600)


@dataclass(frozen=True)
class DispatchConfig:
    listen: str = setting("127.0.0.1", "Address the dispatcher listens on.")
    port: int = setting(8443, "Port the dispatcher listens on.", minimum=1, maximum=65535)
    tls_cert: str = setting("", "Certificate (PEM) for HTTPS; empty serves plain HTTP "
                            "(only behind a TLS proxy or on loopback).")
    tls_key: str = setting("", "Private key (PEM) for HTTPS.")
    car_tokens_file: str = setting("", "Lines of '<token> <vehicle id>': the cars allowed to "
                                   "call.")
    console_tokens_file: str = setting("", "Lines of '<token> <operator name>': who may use "
                                       "the console.")
    recordings_dir: str = setting("/var/lib/dashsos-dispatch",
                                  "Where each call's media and telemetry are kept.")
    media: str = setting("embedded", "Who carries the calls' media: 'embedded' (this "
                         "process answers with aiortc; one box, the demo) or 'janus' (Janus "
                         "VideoRooms at janus_urls; the desk only signals).",
                         choices=("embedded", "janus"))
    janus_urls: tuple[str, ...] = setting((), "Janus HTTP API URLs (http://host:8088/janus) "
                                          "for media = 'janus'; calls are spread over them.")
    map_tiles: str = setting("", "Street map tiles for the console, as a URL template "
                             "(https://tile.example.org/{z}/{x}/{y}.png; {s} for subdomains); "
                             "empty: cars and incidents on a plain background, no tiles fetched.")
    map_attribution: str = setting("", "The tiles' attribution shown on the map (e.g. "
                                   "'© OpenStreetMap contributors'); required with map_tiles.")


@dataclass(frozen=True)
class LogConfig:
    level: str = setting("info", "Log level.", choices=("debug", "info", "warning", "error"))


@dataclass(frozen=True)
class Config:
    vehicle: VehicleConfig = field(default_factory=VehicleConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    incident: IncidentConfig = field(default_factory=IncidentConfig)
    button: ButtonConfig = field(default_factory=ButtonConfig)
    indicator: IndicatorConfig = field(default_factory=IndicatorConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    auto_trigger: AutoTriggerConfig = field(default_factory=AutoTriggerConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    commands: CommandsConfig = field(default_factory=CommandsConfig)
    homeassistant: HomeAssistantConfig = field(default_factory=HomeAssistantConfig)
    call: CallConfig = field(default_factory=CallConfig)
    upload: UploadConfig = field(default_factory=UploadConfig)
    ice: IceConfig = field(default_factory=IceConfig)
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    gps: GpsConfig = field(default_factory=GpsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str = "<defaults>"

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source")
        return data


SECTIONS: dict[str, type[Any]] = {
    f.name: typing.get_type_hints(Config)[f.name]
    for f in dataclasses.fields(Config) if f.name != "source"
}


def load(path: Path | str = DEFAULT_PATH) -> Config:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from exc
    try:
        return from_dict(data, source=str(path))
    except RecursionError as exc:
        raise ConfigError(f"{path}: a value is nested too deeply") from exc


def from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    errors: list[str] = []
    sections: dict[str, Any] = {}
    for name, value in data.items():
        if name not in SECTIONS:
            errors.append(f"{_printable(name)}: unknown section (known: {', '.join(SECTIONS)})")
        elif not isinstance(value, dict):
            errors.append(f"{name}: expected a table [{name}], got {_kind(value)}")
        else:
            sections[name] = _section(SECTIONS[name], name, value, errors)
    if not errors:
        config = Config(**sections, source=source)
        errors.extend(_cross_checks(config))
    if errors:
        raise ConfigError("\n".join(f"{source}: {e}" for e in errors))
    return config


def _section(cls: type[Any], prefix: str, data: dict[str, Any], errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}"
        if key not in known:
            errors.append(f"{prefix}.{_printable(key)}: unknown key (known: "
                          f"{', '.join(known)})")
            continue
        problem = _check(hints[key], known[key].metadata, value)
        if problem:
            errors.append(f"{name}: {problem}")
        elif hints[key] is float:
            values[key] = float(value)
        elif typing.get_origin(hints[key]) is tuple:
            values[key] = tuple(value)
        else:
            values[key] = value
    return cls(**values)


def _map_checks(dispatch: DispatchConfig) -> list[str]:
    """A tile URL the console can use: http(s), with {z}, {x} and {y}; its host goes into
    the page's Content-Security-Policy, so nothing else may be loaded."""
    url = dispatch.map_tiles
    if not url:
        return []
    errors = []
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.removeprefix("{s}.")
    if parts.scheme not in ("http", "https") or not re.fullmatch(
            r"([A-Za-z0-9\-]+\.)*[A-Za-z0-9\-]+(:\d{1,5})?|\[[0-9a-fA-F:]+\](:\d{1,5})?", host):
        errors.append(f"dispatch.map_tiles: {url!r} is not an http(s) URL with a plain host")
    missing = [k for k in ("{z}", "{x}", "{y}") if k not in parts.path + parts.query]
    if missing:
        errors.append(f"dispatch.map_tiles: {url!r} lacks {', '.join(missing)}")
    if any(c in url for c in " '\"\\;,"):
        errors.append(f"dispatch.map_tiles: {url!r} has a space, quote, comma or semicolon")
    if not dispatch.map_attribution.strip():
        errors.append("dispatch.map_attribution: name the tiles' source (their licence "
                      "asks for it)")
    return errors


def _check(expected: Any, meta: Any, value: Any) -> str | None:
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) \
            and math.isfinite(value)
    elif expected is str:
        ok = isinstance(value, str) and "\0" not in value
    elif typing.get_origin(expected) is dict:
        ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    elif typing.get_origin(expected) is tuple:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:  # pragma: no cover - a new field type must be taught here
        raise TypeError(f"unsupported config type {expected}")
    if not ok:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return f"expected {_type_name(expected)}, got {_kind(value)} {shown}"
    if meta.get("choices"):
        chosen = value if isinstance(value, list) else [value]
        wrong = [v for v in chosen if v not in meta["choices"]]
        if wrong:
            return f"must be one of {', '.join(meta['choices'])}; got {wrong[0]!r}"
    if meta.get("minimum") is not None and value < meta["minimum"]:
        return f"must be at least {meta['minimum']:g}; got {value!r}"
    if meta.get("maximum") is not None and value > meta["maximum"]:
        return f"must be at most {meta['maximum']:g}; got {value!r}"
    return None


def _cross_checks(config: Config) -> list[str]:
    """Checks that need more than one key, or the machine."""
    errors = []
    video = config.video
    if video.backend == "ffmpeg":
        if not video.input:
            errors.append("video.input: the ffmpeg backend needs an input "
                          "(a device, a URL or a file)")
        elif video.input.startswith("/dev/") and not os.path.exists(video.input):
            errors.append(f"video.input: camera device {video.input} does not exist")
    if video.width % 2 or video.height % 2:
        errors.append("video.width, video.height: must be even for H.264 4:2:0")
    if not config.vehicle.id or any(c in config.vehicle.id for c in "/+#"):
        errors.append(f"vehicle.id: must be non-empty without / + #; got {config.vehicle.id!r}")
    errors.extend(_file_checks(config))
    if config.commands.enabled and not config.mqtt.enabled:
        errors.append("commands.enabled: commands arrive over MQTT; set mqtt.enabled too")
    if config.commands.enabled and not config.commands.key_file:
        errors.append("commands.key_file: commands need a key (refusing unauthenticated "
                      "remote triggers)")
    if config.homeassistant.discovery and not config.mqtt.enabled:
        errors.append("homeassistant.discovery: needs mqtt.enabled")
    if bool(config.mqtt.cert_file) != bool(config.mqtt.key_file):
        errors.append("mqtt.cert_file, mqtt.key_file: give both or neither")
    if any(c in config.mqtt.base_topic for c in "+#") or not config.mqtt.base_topic:
        errors.append("mqtt.base_topic: must be non-empty without + or #")
    if config.dispatch.media == "janus" and not config.dispatch.janus_urls:
        errors.append("dispatch.janus_urls: media = 'janus' needs at least one Janus URL")
    for url in config.dispatch.janus_urls:
        if not url.startswith(("https://", "http://")):
            errors.append(f"dispatch.janus_urls: {url!r} is not an http(s) URL")
    errors.extend(_map_checks(config.dispatch))
    for url in config.call.endpoints:
        if not url.startswith(("https://", "http://")):
            errors.append(f"call.endpoints: {url!r} is not an http(s) URL")
    if config.upload.endpoint and not config.upload.endpoint.startswith(("https://",
                                                                         "http://")):
        errors.append(f"upload.endpoint: {config.upload.endpoint!r} is not an http(s) URL")
    if config.upload.endpoint and not (config.upload.token_file or config.call.token_file):
        errors.append("upload.token_file: the desk needs a token (or set call.token_file)")
    for url in config.ice.stun_urls:
        if not url.startswith("stun:"):
            errors.append(f"ice.stun_urls: {url!r} does not start with stun:")
    for url in config.ice.turn_urls:
        if not url.startswith(("turn:", "turns:")):
            errors.append(f"ice.turn_urls: {url!r} does not start with turn: or turns:")
    if config.ice.relay_only and not config.ice.turn_urls:
        errors.append("ice.relay_only: needs ice.turn_urls")
    return errors


def _file_checks(config: Config) -> list[str]:
    """Files the config names must be readable now, not at the first incident."""
    errors = []
    files = {"mqtt.password_file": config.mqtt.password_file if config.mqtt.enabled else "",
             "mqtt.ca_file": config.mqtt.ca_file if config.mqtt.tls else "",
             "mqtt.cert_file": config.mqtt.cert_file if config.mqtt.tls else "",
             "mqtt.key_file": config.mqtt.key_file if config.mqtt.tls else "",
             "commands.key_file": config.commands.key_file if config.commands.enabled else "",
             "call.token_file": config.call.token_file if config.call.endpoints else "",
             "call.ca_file": config.call.ca_file,
             "upload.token_file": config.upload.token_file,
             "ice.turn_password_file": config.ice.turn_password_file}
    for key, path in files.items():
        if path and not os.access(path, os.R_OK):
            errors.append(f"{key}: cannot read {path}")
    if config.mqtt.enabled and config.mqtt.tls is False and (config.mqtt.cert_file
                                                             or config.mqtt.ca_file):
        errors.append("mqtt.tls: ca_file/cert_file are set but tls is false")
    return errors


def _printable(name: str) -> str:
    """A name from the file as-is, or escaped if it would break the one-line errors."""
    return name if name.isprintable() else repr(name)


def _type_name(expected: Any) -> str:
    if typing.get_origin(expected) is dict:
        return "a table of strings"
    if typing.get_origin(expected) is tuple:
        return "a list of strings"
    return {bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}.get(expected, str(expected))


def _kind(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", dict: "table",
            list: "array"}.get(type(value), type(value).__name__)


def reference() -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every key, in order: the docs come from here."""
    rows = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if callable(f.default_factory) else f.default
            doc = f.metadata["doc"]
            if f.metadata["choices"]:
                doc += f" One of: {', '.join(f.metadata['choices'])}."
            rows.append((f"{section}.{f.name}", _type_name(hints[f.name]), _toml(default), doc))
    return rows


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }" \
            if value else "{}"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def to_toml(config: Config) -> str:
    """The effective config as TOML (check-config prints it)."""
    lines = [f"# effective config from {config.source}"]
    for section, values in config.as_dict().items():
        lines.append(f"\n[{section}]")
        lines.extend(f"{k} = {_toml(v)}" for k, v in values.items())
    return "\n".join(lines) + "\n"



def example() -> str:
    """config/dashsos.toml: every key, its default and what it does."""
    lines = ["# dashsos configuration: every key with its default.",
             f"# Installed as {DEFAULT_PATH}. Unknown keys are errors; "
             "`dashsos check-config` validates.",
             "# Generated from daemon/dashsos/config.py by scripts/gen-docs: edit there."]
    section = ""
    for key, _type, default, doc in reference():
        name, field_name = key.split(".")
        if name != section:
            section = name
            lines += ["", f"[{section}]"]
        lines += [f"# {doc} ({_type})", f"{field_name} = {default}"]
    return "\n".join(lines) + "\n"


def markdown_table() -> str:
    """The README's config reference."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, type_name, default, doc in reference():
        rows.append(f"| `{key}` | {type_name} | `{default}` | {doc.replace('|', '/')} |")
    return "\n".join(rows) + "\n"
