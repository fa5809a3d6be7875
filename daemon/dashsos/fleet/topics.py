"""The MQTT topic contract, in one place: dashsos/<vehicle_id>/..."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topics:
    base: str  # e.g. "dashsos/car-1"

    @classmethod
    def for_vehicle(cls, base_topic: str, vehicle_id: str) -> Topics:
        return cls(f"{base_topic.rstrip('/')}/{vehicle_id}")

    @property
    def availability(self) -> str:  # retained, QoS 1: online / offline (last will)
        return f"{self.base}/availability"

    @property
    def status(self) -> str:  # retained, QoS 1: JSON status
        return f"{self.base}/status"

    @property
    def location(self) -> str:  # QoS 0 idle; through the outbox during an incident
        return f"{self.base}/location"

    @property
    def incident(self) -> str:  # QoS 1 through the durable outbox: incident phases
        return f"{self.base}/incident"

    @property
    def commands(self) -> str:  # subscription filter for cmd/<name>
        return f"{self.base}/cmd/+"

    def command_name(self, topic: str) -> str | None:
        """The command a topic addresses, or None when it is not cmd/<name>."""
        prefix = f"{self.base}/cmd/"
        if not topic.startswith(prefix):
            return None
        name = topic[len(prefix):]
        return name if name and "/" not in name else None

    def reply(self, name: str) -> str:
        return f"{self.base}/cmd/{name}/reply"
