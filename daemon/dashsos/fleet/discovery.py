"""Home Assistant MQTT discovery: retained config messages that show the car as one device.

Keys are the full names from Home Assistant's documentation (no abbreviations):
- "MQTT" (integration page): discovery topic format, empty payload removes, `origin`
- "MQTT Sensor": sensor options, including `default_entity_id` (which replaced `object_id`;
  HA Core 2026.4 ignores `object_id`)
- "MQTT device tracker": location from `latitude`/`longitude`/`gps_accuracy` in the JSON
  attributes; `state_topic`/`value_template` there are deprecated, so not used
- "Sensor" (entity integration page): device classes `speed`, `data_size`, `enum`
"""

from __future__ import annotations

import json
import re

from dashsos.health import State

# Topic levels and entity ids allow only these characters (HA's "Discovery topic" section).
_TOPIC_LEVEL = re.compile(r"[A-Za-z0-9_-]+")

_SOURCES = (("video", "Video"), ("audio", "Audio"), ("gps", "GPS"))


def _source_health(source: str, name: str) -> tuple[str, str, dict[str, object]]:
    path = "value_json.sources." + source
    return ("sensor", source + "_health", {
        "name": name,
        "state_topic": "status",
        "value_template": "{{ " + path + ".state }}",
        "json_attributes_topic": "status",
        "json_attributes_template":
            "{{ {'backend': " + path + ".backend, 'detail': " + path + ".detail} | tojson }}",
        # A closed set (health.State); an enum sensor shows it as such and can be translated.
        "device_class": "enum",
        "options": [str(state) for state in State],
        "entity_category": "diagnostic",
    })


# (component, object id, config); topics are relative to the car's base topic, like HA's `~`.
_ENTITIES: tuple[tuple[str, str, dict[str, object]], ...] = (
    ("sensor", "incident_state", {
        "name": "Incident",
        "icon": "mdi:alarm-light",
        "state_topic": "status",
        # Not an enum: the set of states may grow, and an unknown option is an error in HA.
        "value_template": "{{ value_json.state }}",
        "json_attributes_topic": "status",
        # Attributes must be a dict: an empty one while there is no incident.
        "json_attributes_template": "{{ (value_json.incident or {}) | tojson }}",
    }),
    *(_source_health(source, name) for source, name in _SOURCES),
    ("sensor", "speed", {
        "name": "Speed",
        "state_topic": "location",
        # m/s to km/h; a fix without speed renders None, which HA takes as "unknown".
        "value_template":
            "{{ (value_json.speed * 3.6) | round(1) if value_json.speed is defined else None }}",
        "device_class": "speed",
        "unit_of_measurement": "km/h",
        "state_class": "measurement",
    }),
    ("sensor", "storage_free", {
        "name": "Free storage",
        "state_topic": "status",
        "value_template": "{{ (value_json.storage.free_bytes / 1e9) | round(2) "
                          "if value_json.storage.free_bytes is number else None }}",
        "device_class": "data_size",
        "unit_of_measurement": "GB",
        "state_class": "measurement",
        "entity_category": "diagnostic",
    }),
    ("device_tracker", "location", {
        "name": "Location",
        "source_type": "gps",
        "json_attributes_topic": "location",
        # Our fix says lat/lon/epx/epy; the tracker reads latitude/longitude/gps_accuracy.
        # epx/epy are 95% errors in metres: the larger one is the radius. Unknown gives 0,
        # which is what HA assumes when gps_accuracy is missing.
        "json_attributes_template":
            "{{ {'latitude': value_json.lat, 'longitude': value_json.lon, 'gps_accuracy':"
            " [value_json.epx | default(0), value_json.epy | default(0)] | max} | tojson }}",
    }),
)


def _node_id(vehicle_id: str) -> str:
    if not _TOPIC_LEVEL.fullmatch(vehicle_id):
        raise ValueError(f"vehicle id {vehicle_id!r}: only letters, digits, '_' and '-'")
    return "dashsos_" + vehicle_id


def _config_topic(prefix: str, component: str, node_id: str, object_id: str) -> str:
    return f"{prefix}/{component}/{node_id}/{object_id}/config"


def discovery_messages(vehicle_id: str, base_topic: str, version: str,
                       prefix: str = "homeassistant") -> list[tuple[str, bytes]]:
    """(topic, payload) pairs, all to be published retained with QoS 1; payloads JSON (UTF-8)."""
    node_id = _node_id(vehicle_id)
    if not base_topic or base_topic.endswith("/") or "+" in base_topic or "#" in base_topic:
        raise ValueError(f"base topic {base_topic!r}: no trailing '/', no wildcards")
    # Entity ids are lower case; the unique id keeps the vehicle id as it is.
    entity_slug = node_id.lower().replace("-", "_")
    device = {
        "identifiers": [node_id],
        "name": f"dashsos {vehicle_id}",
        "manufacturer": "dashsos",
        "model": "Emergency recorder",
        "sw_version": version,
    }
    messages = []
    for component, object_id, entity in _ENTITIES:
        config: dict[str, object] = {
            key: f"{base_topic}/{value}" if key.endswith("_topic") else value
            for key, value in entity.items()
        }
        config.update({
            "unique_id": f"{node_id}_{object_id}",
            "default_entity_id": f"{component}.{entity_slug}_{object_id}",
            "availability_topic": f"{base_topic}/availability",
            "payload_available": "online",
            "payload_not_available": "offline",
            # Status and fixes are state a dispatcher acts on: don't let the broker drop them.
            "qos": 1,
            "device": device,
            "origin": {"name": "dashsos", "sw_version": version},
        })
        messages.append((_config_topic(prefix, component, node_id, object_id),
                         json.dumps(config).encode()))
    return messages


def removal_messages(vehicle_id: str, prefix: str = "homeassistant") -> list[tuple[str, bytes]]:
    """The same topics with empty payloads (how HA is told to remove the entities)."""
    node_id = _node_id(vehicle_id)
    return [(_config_topic(prefix, component, node_id, object_id), b"")
            for component, object_id, _ in _ENTITIES]
