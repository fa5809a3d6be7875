"""Home Assistant discovery: topics, keys HA documents, templates against our own payloads."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from dashsos.fleet.discovery import discovery_messages, removal_messages

VEHICLE = "car-1"
BASE = "dashsos/car-1"
NODE = "dashsos_car-1"

# Allow-lists copied from the configuration variables of HA's documentation pages "MQTT Sensor"
# and "MQTT device tracker". Left out on purpose: `platform` (only for device-based discovery),
# `object_id` (replaced by `default_entity_id`), and the tracker's deprecated
# `state_topic`/`value_template`/`payload_home`/`payload_not_home`/`payload_reset`.
COMMON_KEYS = {
    "availability", "availability_mode", "availability_template", "availability_topic",
    "default_entity_id", "device", "enabled_by_default", "icon", "json_attributes_template",
    "json_attributes_topic", "name", "payload_available", "payload_not_available", "qos",
    "unique_id",
    "origin",  # page "MQTT", section on the origin of a discovery message
}
ALLOWED_KEYS = {
    "sensor": COMMON_KEYS | {
        "device_class", "encoding", "entity_category", "entity_picture", "expire_after",
        "force_update", "last_reset_value_template", "options", "suggested_display_precision",
        "state_class", "state_topic", "unit_of_measurement", "value_template",
    },
    "device_tracker": COMMON_KEYS | {"group", "source_type"},
}
DEVICE_KEYS = {
    "configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model",
    "model_id", "name", "serial_number", "suggested_area", "sw_version", "via_device",
}
ORIGIN_KEYS = {"name", "sw_version", "support_url"}

STATUS: dict[str, Any] = {
    "state": "active",
    "incident": {"id": "20240501T120000Z", "trigger": "panic_button"},
    "sources": {
        "video": {"state": "ok", "backend": "picamera2", "detail": "1280x720@30"},
        "audio": {"state": "degraded", "backend": "pulse", "detail": "overruns"},
        "gps": {"state": "down", "backend": "gpsd", "detail": "no fix", "last_known": None},
    },
    "buffer": {"seconds": 30},
    "storage": {"free_bytes": 12_345_678_901},
    "version": "0.1.0",
    "time": "2024-05-01T12:00:00Z",
}
LOCATION: dict[str, Any] = {
    "time": "2024-05-01T12:00:00Z", "lat": 52.52, "lon": 13.405, "mode": 3, "speed": 13.9,
    "epx": 4.0, "epy": 6.5, "received": "2024-05-01T12:00:00.100Z",
}
LOCATION_BARE: dict[str, Any] = {
    "time": "2024-05-01T12:00:00Z", "lat": 52.52, "lon": 13.405, "mode": 2,
    "received": "2024-05-01T12:00:00.100Z",
}


def _configs(prefix: str = "homeassistant") -> dict[str, dict[str, Any]]:
    messages = discovery_messages(VEHICLE, BASE, "0.1.0", prefix)
    configs = {topic: json.loads(payload.decode("utf-8")) for topic, payload in messages}
    assert len(configs) == len(messages), "a topic twice"
    return configs


def _by_object(configs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {topic.split("/")[3]: config for topic, config in configs.items()}


@pytest.mark.parametrize("prefix", ["homeassistant", "ha-test"])
def test_topics_follow_the_discovery_format(prefix: str) -> None:
    configs = _configs(prefix)
    pattern = re.compile(
        rf"{re.escape(prefix)}/(sensor|device_tracker)/{NODE}/[A-Za-z0-9_-]+/config")
    assert all(pattern.fullmatch(topic) for topic in configs), list(configs)
    components = sorted(topic.split("/")[1] for topic in configs)
    assert components.count("device_tracker") == 1
    assert components.count("sensor") == 6


def test_keys_are_the_documented_ones() -> None:
    for topic, config in _configs().items():
        component = topic.split("/")[1]
        unknown = set(config) - ALLOWED_KEYS[component]
        assert not unknown, (topic, unknown)
        assert set(config["device"]) <= DEVICE_KEYS
        assert set(config["origin"]) <= ORIGIN_KEYS


def test_every_entity_is_on_the_same_device_and_available_with_the_car() -> None:
    configs = _configs()
    unique_ids = [config["unique_id"] for config in configs.values()]
    assert len(set(unique_ids)) == len(unique_ids)
    for topic, config in configs.items():
        component, _, object_id = topic.split("/")[1:4]
        assert config["unique_id"] == f"{NODE}_{object_id}"
        assert config["default_entity_id"] == f"{component}.dashsos_car_1_{object_id}"
        assert config["availability_topic"] == f"{BASE}/availability"
        assert config["payload_available"] == "online"
        assert config["payload_not_available"] == "offline"
        assert config["qos"] == 1
        assert config["device"] == {
            "identifiers": [NODE], "name": "dashsos car-1", "manufacturer": "dashsos",
            "model": "Emergency recorder", "sw_version": "0.1.0",
        }
        assert config["origin"] == {"name": "dashsos", "sw_version": "0.1.0"}
        topics = {key: value for key, value in config.items() if key.endswith("_topic")}
        assert set(topics.values()) <= {f"{BASE}/{leaf}"
                                       for leaf in ("availability", "status", "location")}


def test_entities_say_what_they_measure() -> None:
    entities = _by_object(_configs())
    assert set(entities) == {"incident_state", "video_health", "audio_health", "gps_health",
                             "speed", "storage_free", "location"}
    speed = entities["speed"]
    assert (speed["state_topic"], speed["device_class"], speed["unit_of_measurement"],
            speed["state_class"]) == (f"{BASE}/location", "speed", "km/h", "measurement")
    storage = entities["storage_free"]
    assert (storage["state_topic"], storage["device_class"], storage["unit_of_measurement"]) \
        == (f"{BASE}/status", "data_size", "GB")
    for source in ("video", "audio", "gps"):
        health = entities[f"{source}_health"]
        assert health["device_class"] == "enum"
        assert health["options"] == ["ok", "degraded", "down", "simulated"]
        assert health["json_attributes_topic"] == f"{BASE}/status"
        assert health["entity_category"] == "diagnostic"
    tracker = entities["location"]
    assert tracker["source_type"] == "gps"
    assert tracker["json_attributes_topic"] == f"{BASE}/location"
    assert "state_topic" not in tracker


def test_templates() -> None:
    entities = _by_object(_configs())
    assert entities["incident_state"]["value_template"] == "{{ value_json.state }}"
    assert entities["incident_state"]["json_attributes_template"] \
        == "{{ (value_json.incident or {}) | tojson }}"
    assert entities["gps_health"]["value_template"] == "{{ value_json.sources.gps.state }}"
    assert entities["gps_health"]["json_attributes_template"] == (
        "{{ {'backend': value_json.sources.gps.backend,"
        " 'detail': value_json.sources.gps.detail} | tojson }}")
    assert entities["speed"]["value_template"] == (
        "{{ (value_json.speed * 3.6) | round(1) if value_json.speed is defined else None }}")
    assert entities["storage_free"]["value_template"] == (
        "{{ (value_json.storage.free_bytes / 1e9) | round(2) "
        "if value_json.storage.free_bytes is number else None }}")
    assert entities["location"]["json_attributes_template"] == (
        "{{ {'latitude': value_json.lat, 'longitude': value_json.lon, 'gps_accuracy':"
        " [value_json.epx | default(0), value_json.epy | default(0)] | max} | tojson }}")


def test_templates_render_against_our_payloads() -> None:
    # HA renders with Jinja in an immutable sandbox; value_json is the parsed payload.
    sandbox = pytest.importorskip("jinja2.sandbox")
    env = sandbox.ImmutableSandboxedEnvironment()

    def render(template: str, payload: dict[str, Any]) -> str:
        text = json.dumps(payload)
        return str(env.from_string(template).render(value=text, value_json=json.loads(text)))

    entities = _by_object(_configs())
    incident = entities["incident_state"]
    assert render(incident["value_template"], STATUS) == "active"
    assert json.loads(render(incident["json_attributes_template"], STATUS)) == STATUS["incident"]
    idle = {**STATUS, "state": "idle", "incident": None}
    assert json.loads(render(incident["json_attributes_template"], idle)) == {}
    for source in ("video", "audio", "gps"):
        health = entities[f"{source}_health"]
        expected = STATUS["sources"][source]
        assert render(health["value_template"], STATUS) == expected["state"]
        assert json.loads(render(health["json_attributes_template"], STATUS)) \
            == {"backend": expected["backend"], "detail": expected["detail"]}
    assert render(entities["speed"]["value_template"], LOCATION) == "50.0"
    unknown = {**STATUS, "storage": {**STATUS["storage"], "free_bytes": None}}
    assert render(entities["storage_free"]["value_template"], unknown) == "None"
    # "None" is what HA's MQTT sensor turns into an unknown state.
    assert render(entities["speed"]["value_template"], LOCATION_BARE) == "None"
    assert render(entities["storage_free"]["value_template"], STATUS) == "12.35"
    tracker = entities["location"]["json_attributes_template"]
    assert json.loads(render(tracker, LOCATION)) \
        == {"latitude": 52.52, "longitude": 13.405, "gps_accuracy": 6.5}
    assert json.loads(render(tracker, LOCATION_BARE)) \
        == {"latitude": 52.52, "longitude": 13.405, "gps_accuracy": 0}


def test_removal_empties_the_same_topics() -> None:
    for prefix in ("homeassistant", "ha-test"):
        removal = removal_messages(VEHICLE, prefix)
        assert [topic for topic, _ in removal] \
            == [topic for topic, _ in discovery_messages(VEHICLE, BASE, "0.1.0", prefix)]
        assert all(payload == b"" for _, payload in removal)


@pytest.mark.parametrize("vehicle_id", ["", "car 1", "car/1", "car+", "car#"])
def test_vehicle_ids_that_break_topics_are_refused(vehicle_id: str) -> None:
    with pytest.raises(ValueError):
        discovery_messages(vehicle_id, BASE, "0.1.0")
    with pytest.raises(ValueError):
        removal_messages(vehicle_id)


@pytest.mark.parametrize("base_topic", ["", "dashsos/car-1/", "dashsos/+", "dashsos/#"])
def test_bad_base_topics_are_refused(base_topic: str) -> None:
    with pytest.raises(ValueError):
        discovery_messages(VEHICLE, base_topic, "0.1.0")
