"""The incident's data set, shaped like the eCall Minimum Set of Data (EN 15722, MSD v2).

We send JSON, not ASN.1 PER, but keep the MSD's field names, units and value ranges so a
PSAP-side engineer recognises every field and could encode it unchanged:
latitude/longitude in integer milliarcseconds (WGS-84), direction in 2-degree steps,
timestamp in seconds since 1970-01-01 UTC, recent locations as deltas of 100 mas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from dashsos import clock
from dashsos.clock import NS
from dashsos.location.fix import Fix
from dashsos.location.track import Track

if TYPE_CHECKING:
    from dashsos.incident import Incident

MSD_VERSION = 2
FRESH_FIX_NS = 10 * NS  # an older fix is not "the position" at the trigger

# VehicleType ENUMERATED of MSD v2; M/N classes per 2007/46/EC, L classes per 2002/24/EC.
VEHICLE_TYPES: dict[str, int] = {
    "passenger_m1": 1,  # passengerVehicleClassM1
    "bus_m2": 2,  # busesAndCoachesClassM2
    "bus_m3": 3,  # busesAndCoachesClassM3
    "light_commercial_n1": 4,  # lightCommercialVehiclesClassN1
    "heavy_duty_n2": 5,  # heavyDutyVehiclesClassN2
    "heavy_duty_n3": 6,  # heavyDutyVehiclesClassN3
    "motorcycle_l1e": 7,  # motorcyclesClassL1e
    "motorcycle_l2e": 8,
    "motorcycle_l3e": 9,
    "motorcycle_l4e": 10,
    "motorcycle_l5e": 11,
    "motorcycle_l6e": 12,
    "motorcycle_l7e": 13,
}

# VehiclePropulsionStorageType flags, in the order of the ASN.1 SEQUENCE.
PROPULSION: dict[str, str] = {
    "gasoline": "gasolineTankPresent",
    "diesel": "dieselTankPresent",
    "cng": "compressedNaturalGas",
    "lpg": "liquidPropaneGas",
    "electric": "electricEnergyStorage",
    "hydrogen": "hydrogenStorage",
    "other": "otherStorage",
}

MAS_PER_DEGREE = 3_600_000
UNKNOWN_POSITION = 0x7FFFFFFF  # the standard's value for an invalid or unknown lat/lon
UNKNOWN_DIRECTION = 255
# Below this speed (m/s, 3.6 km/h) a GPS course means nothing: receivers hold their last
# course or report the direction of position noise.
MIN_COURSE_SPEED = 1.0
DELTA_UNIT_MAS = 100  # one unit of latitudeDelta/longitudeDelta, about 3 m
DELTA_MIN, DELTA_MAX = -512, 511
TIMESTAMP_FAILURE = 0  # the standard's "no time" value
MAX_UINT32 = 0xFFFFFFFF

# ISO 3779 characters: digits and capitals without I, O and Q (they look like 1 and 0).
VIN_CHARACTERS = frozenset("ABCDEFGHJKLMNPRSTUVWXYZ0123456789")


@dataclass(frozen=True)
class Vehicle:
    vin: str = ""  # 17 characters, ISO 3779, or "" when unknown
    type: str = "passenger_m1"  # a key of VEHICLE_TYPES
    propulsion: tuple[str, ...] = ("gasoline",)  # keys of PROPULSION


def validate_vin(vin: str) -> str | None:
    """None if `vin` is a valid ISO 3779 VIN or "" (unknown); otherwise the problem."""
    if vin == "":
        return None
    if len(vin) != 17:
        return f"a VIN has 17 characters, this one has {len(vin)}"
    bad = sorted(set(vin) - VIN_CHARACTERS)
    if bad:
        return ("a VIN uses only digits and capital letters other than I, O and Q; "
                f"not {''.join(bad)!r}")
    return None


def build_msd(*, message_id: int, automatic: bool, test_call: bool, vehicle: Vehicle,
              triggered_ns: int, position: Fix | None, previous: list[Fix],
              passengers: int | None = None) -> dict[str, Any]:
    """The MSD of an incident as a JSON-serialisable dict.

    `message_id` counts the MSDs of one incident from 1 and wraps after 255 back to 1.
    `triggered_ns` is the incident's monotonic time. `previous` holds the fixes before
    `position`, newest first; the first two usable ones become recentVehicleLocationN1/N2.
    """
    if message_id < 1:
        raise ValueError(f"message_id counts from 1, got {message_id}")
    if vehicle.type not in VEHICLE_TYPES:
        raise ValueError(f"unknown vehicle type {vehicle.type!r}")
    unknown = [p for p in vehicle.propulsion if p not in PROPULSION]
    if unknown:
        raise ValueError(f"unknown propulsion {', '.join(unknown)}")

    here = _mas(position)
    trusted = here is not None and position is not None and position.trustworthy
    timestamp = _timestamp(triggered_ns)
    direction = _direction(position) if here is not None else UNKNOWN_DIRECTION

    structure: dict[str, Any] = {
        "messageIdentifier": (message_id - 1) % 255 + 1,
        "control": {
            "automaticActivation": automatic,
            "testCall": test_call,
            "positionCanBeTrusted": trusted,
            "vehicleType": VEHICLE_TYPES[vehicle.type],
        },
    }
    # The VIN is mandatory in the MSD but has no "unknown" value: leave it out rather than
    # send a made-up one.
    if vehicle.vin and validate_vin(vehicle.vin) is None:
        structure["vehicleIdentificationNumber"] = {
            "isowmi": vehicle.vin[0:3],
            "isovds": vehicle.vin[3:9],
            "isovisModelyear": vehicle.vin[9:10],
            "isovisSeqPlant": vehicle.vin[10:17],
        }
    structure["vehiclePropulsionStorageType"] = {
        flag: name in vehicle.propulsion for name, flag in PROPULSION.items()}
    structure["timestamp"] = timestamp
    structure["vehicleLocation"] = {
        "positionLatitude": here[0] if here else UNKNOWN_POSITION,
        "positionLongitude": here[1] if here else UNKNOWN_POSITION,
    }
    structure["vehicleDirection"] = direction
    if here is not None:
        # N1 is relative to the position, N2 to N1; an unknown position has no history.
        recent = [m for m in (_mas(f) for f in previous) if m is not None][:2]
        anchor = here
        for name, point in zip(("recentVehicleLocationN1", "recentVehicleLocationN2"),
                               recent, strict=False):
            structure[name] = _delta(anchor, point)
            anchor = point
    if passengers is not None and passengers >= 0:
        structure["numberOfPassengers"] = min(passengers, 255)

    return {
        "msdStructure": structure,
        "msdVersion": MSD_VERSION,
        "decoded": {
            "latitude": here[0] / MAS_PER_DEGREE if here else None,
            "longitude": here[1] / MAS_PER_DEGREE if here else None,
            "direction_degrees": direction * 2 if direction != UNKNOWN_DIRECTION else None,
            "time": _iso(timestamp),
        },
    }


def _mas(fix: Fix | None) -> tuple[int, int] | None:
    """(latitude, longitude) in milliarcseconds, or None if there is no usable position."""
    if fix is None or not (math.isfinite(fix.lat) and math.isfinite(fix.lon)):
        return None
    if not (-90 <= fix.lat <= 90 and -180 <= fix.lon <= 180):
        return None
    return round(fix.lat * MAS_PER_DEGREE), round(fix.lon * MAS_PER_DEGREE)


def _direction(fix: Fix | None) -> int:
    """Course in 2-degree steps clockwise from magnetic north, 0..179; 255 when unknown.

    EN 15722 defines vehicleDirection as the "direction of travel in 2°-degrees steps
    from magnetic north (0-358, clockwise)", so this is gpsd's `magtrack`, not `track`
    (true north; they differ by the declination, 20° in New Zealand). Unknown (255) when
    the receiver gave no course, or the speed is unknown or below MIN_COURSE_SPEED:
    there a course is position noise or the receiver's frozen last value.
    """
    if fix is None or fix.magnetic_heading is None or not math.isfinite(fix.magnetic_heading):
        return UNKNOWN_DIRECTION
    if fix.speed is None or not fix.speed >= MIN_COURSE_SPEED:
        return UNKNOWN_DIRECTION
    # Round half up, then 359 degrees (step 180) is north again.
    return math.floor(fix.magnetic_heading % 360 / 2 + 0.5) % 180


def _delta(origin: tuple[int, int], point: tuple[int, int]) -> dict[str, int]:
    """`point` minus `origin` in units of 100 mas, clamped to the standard's -512..511."""
    lat = point[0] - origin[0]
    lon = point[1] - origin[1]
    full_turn = 360 * MAS_PER_DEGREE
    # Across the antimeridian the short way round is the real movement.
    if lon > full_turn // 2:
        lon -= full_turn
    elif lon < -full_turn // 2:
        lon += full_turn
    return {"latitudeDelta": _units(lat), "longitudeDelta": _units(lon)}


def _units(mas: int) -> int:
    return max(DELTA_MIN, min(DELTA_MAX, round(mas / DELTA_UNIT_MAS)))


def _timestamp(triggered_ns: int) -> int:
    seconds = clock.to_wall_ns(triggered_ns) // NS
    return seconds if 0 < seconds <= MAX_UINT32 else TIMESTAMP_FAILURE


def _iso(timestamp: int) -> str | None:
    if timestamp == TIMESTAMP_FAILURE:
        return None
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat().replace("+00:00", "Z")


class IncidentMsd:
    """The MSD of an incident from the track as it is now: the incident machine calls it
    when it opens an incident (message 1) and when a test becomes real (message 2)."""

    def __init__(self, vehicle: Vehicle, track: Track) -> None:
        self._vehicle = vehicle
        self._track = track

    def __call__(self, incident: Incident, message_id: int) -> dict[str, Any]:
        fix = self._track.last
        fresh = fix if fix and clock.now_ns() - fix.capture_ns < FRESH_FIX_NS else None
        return build_msd(message_id=message_id, automatic=incident.trigger.automatic,
                         test_call=incident.test, vehicle=self._vehicle,
                         triggered_ns=incident.trigger.at_ns, position=fresh,
                         previous=self._track.previous(2) if fresh else [])
