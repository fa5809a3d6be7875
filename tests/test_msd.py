"""The MSD (EN 15722) mapping: units, ranges, the unknown values and the optional fields."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dashsos import clock
from dashsos.clock import NS
from dashsos.location.fix import Fix
from dashsos.location.track import Track
from dashsos.msd import (
    PROPULSION,
    UNKNOWN_POSITION,
    VEHICLE_TYPES,
    Vehicle,
    build_msd,
    validate_vin,
)

VIN = "WVWZZZ1JZXW000001"
WALL = 1764329000  # 2025-11-28T11:23:20Z


@pytest.fixture(autouse=True)
def _wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    # Monotonic 0 is WALL seconds on the wall clock, so timestamps are predictable.
    monkeypatch.setattr(clock, "_system_offset_ns", lambda: WALL * NS)
    monkeypatch.setenv("DASHSOS_CLOCK_SYNC", "yes")
    monkeypatch.setattr(clock, "CLOCK", clock.Clock())


def fix(lat: float = 48.1374, lon: float = 11.5755, heading: float | None = 90.0,
        mode: int = 3, epx: float | None = 5.0, epy: float | None = 5.0,
        speed: float | None = 10.0, true_heading: float | None = None) -> Fix:
    """`heading` is the magnetic course (the MSD's); the true one is 3 degrees off."""
    if true_heading is None and heading is not None:
        true_heading = heading + 3.0
    return Fix(capture_ns=0, time="2025-11-28T11:23:20.000Z", lat=lat, lon=lon, mode=mode,
               heading=true_heading, magnetic_heading=heading, speed=speed, epx=epx, epy=epy)


def msd(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"message_id": 1, "automatic": False, "test_call": False,
                            "vehicle": Vehicle(vin=VIN), "triggered_ns": 0,
                            "position": fix(), "previous": []}
    args.update(overrides)
    return build_msd(**args)


def structure(**overrides: Any) -> dict[str, Any]:
    result: dict[str, Any] = msd(**overrides)["msdStructure"]
    return result


def test_position_in_milliarcseconds() -> None:
    location = structure()["vehicleLocation"]
    assert location == {"positionLatitude": 173294640, "positionLongitude": 41671800}


def test_southern_and_western_hemispheres() -> None:
    location = structure(position=fix(lat=-33.8688, lon=-70.6693))["vehicleLocation"]
    assert location == {"positionLatitude": -121927680, "positionLongitude": -254409480}


def test_extreme_coordinates_stay_in_range() -> None:
    location = structure(position=fix(lat=-90.0, lon=180.0))["vehicleLocation"]
    assert location == {"positionLatitude": -324000000, "positionLongitude": 648000000}


def test_timestamp_is_seconds_since_epoch_of_the_trigger() -> None:
    result = msd(triggered_ns=2 * NS + NS // 2)
    assert result["msdStructure"]["timestamp"] == WALL + 2
    assert result["decoded"]["time"] == "2025-11-28T11:23:22Z"


@pytest.mark.parametrize(("heading", "expected"), [
    (0.0, 0), (46.0, 23), (45.0, 23), (44.9, 22), (1.0, 1), (90.0, 45),
    (357.0, 179), (358.9, 179), (359.0, 0), (360.0, 0), (-2.0, 179),
])
def test_direction_in_two_degree_steps(heading: float, expected: int) -> None:
    assert structure(position=fix(heading=heading))["vehicleDirection"] == expected


@pytest.mark.parametrize("heading", [None, float("nan")])
def test_unknown_heading_is_255(heading: float | None) -> None:
    result = msd(position=fix(heading=heading))
    assert result["msdStructure"]["vehicleDirection"] == 255
    assert result["decoded"]["direction_degrees"] is None


def test_direction_is_from_magnetic_north() -> None:
    # EN 15722: "direction of travel in 2 degree steps from magnetic north".
    assert structure(position=fix(heading=100.0, true_heading=120.0))["vehicleDirection"] \
        == 50


@pytest.mark.parametrize(("speed", "expected"), [
    (None, 255), (0.0, 255), (0.3, 255), (0.99, 255), (1.0, 50), (30.0, 50)])
def test_direction_unknown_when_too_slow_for_a_course(speed: float | None,
                                                      expected: int) -> None:
    assert structure(position=fix(heading=100.0, speed=speed))["vehicleDirection"] == expected


def test_true_course_alone_is_not_a_magnetic_direction() -> None:
    position = Fix(capture_ns=0, time="2025-11-28T11:23:20.000Z", lat=1.0, lon=1.0, mode=3,
                   heading=181.4, speed=10.0)
    assert structure(position=position)["vehicleDirection"] == 255


def test_recent_locations_are_deltas_of_100_mas() -> None:
    # N1 is 10 units north and 5 west of the position; N2 another 3 south of N1.
    n1 = fix(lat=48.1374 + 1000 / 3_600_000, lon=11.5755 - 500 / 3_600_000)
    n2 = fix(lat=n1.lat - 300 / 3_600_000, lon=n1.lon)
    result = structure(previous=[n1, n2])
    assert result["recentVehicleLocationN1"] == {"latitudeDelta": 10, "longitudeDelta": -5}
    assert result["recentVehicleLocationN2"] == {"latitudeDelta": -3, "longitudeDelta": 0}


def test_deltas_are_clamped_to_the_standards_range() -> None:
    far = fix(lat=48.1374 + 0.1, lon=11.5755 - 0.1)  # 3600 units each way
    back = fix(lat=48.1374 - 0.1, lon=11.5755 + 0.1)
    result = structure(previous=[far, back])
    assert result["recentVehicleLocationN1"] == {"latitudeDelta": 511, "longitudeDelta": -512}
    assert result["recentVehicleLocationN2"] == {"latitudeDelta": -512, "longitudeDelta": 511}


def test_delta_across_the_antimeridian_is_the_short_way() -> None:
    here = fix(lat=-17.0, lon=179.99995)
    before = fix(lat=-17.0, lon=-179.99995)  # 0.0001 degrees further east
    result = structure(position=here, previous=[before])
    assert result["recentVehicleLocationN1"] == {"latitudeDelta": 0, "longitudeDelta": 4}


def test_only_the_recent_locations_that_exist() -> None:
    assert "recentVehicleLocationN1" not in structure(previous=[])
    one = structure(previous=[fix(lat=48.1375)])
    assert "recentVehicleLocationN1" in one and "recentVehicleLocationN2" not in one
    three = structure(previous=[fix(), fix(), fix()])
    assert "recentVehicleLocationN2" in three


def test_vin_is_split_as_iso_3779() -> None:
    assert structure()["vehicleIdentificationNumber"] == {
        "isowmi": "WVW", "isovds": "ZZZ1JZ", "isovisModelyear": "X", "isovisSeqPlant": "W000001"}


@pytest.mark.parametrize("vin", ["", "WVWZZZ1JZXW00000", "WVWZZZ1JZXW000001X",
                                 "WVWZZZ1JZOW000001", "wvwzzz1jzxw000001"])
def test_unknown_or_invalid_vin_is_left_out(vin: str) -> None:
    assert "vehicleIdentificationNumber" not in structure(vehicle=Vehicle(vin=vin))


def test_validate_vin() -> None:
    assert validate_vin(VIN) is None
    assert validate_vin("") is None
    assert "17 characters" in (validate_vin("WVWZZZ1JZ") or "")
    for letter in "IOQ":
        problem = validate_vin(VIN[:9] + letter + VIN[10:])
        assert problem is not None and letter in problem
    assert validate_vin("WVWZZZ1JZ-W000001") is not None
    assert validate_vin(VIN.lower()) is not None


@pytest.mark.parametrize(("given", "sent"), [(1, 1), (2, 2), (255, 255), (256, 1),
                                            (257, 2), (510, 255), (511, 1)])
def test_message_id_wraps_within_1_to_255(given: int, sent: int) -> None:
    assert structure(message_id=given)["messageIdentifier"] == sent


def test_message_id_counts_from_1() -> None:
    with pytest.raises(ValueError):
        msd(message_id=0)


@pytest.mark.parametrize(("automatic", "test_call"), [(False, False), (True, False),
                                                      (False, True), (True, True)])
def test_activation_and_test_call_flags(automatic: bool, test_call: bool) -> None:
    control = structure(automatic=automatic, test_call=test_call)["control"]
    assert control["automaticActivation"] is automatic
    assert control["testCall"] is test_call


def test_trust_follows_the_fix() -> None:
    assert structure()["control"]["positionCanBeTrusted"] is True
    assert structure(position=fix(mode=2))["control"]["positionCanBeTrusted"] is False
    assert structure(position=fix(epx=120.0))["control"]["positionCanBeTrusted"] is False


def test_no_position() -> None:
    result = msd(position=None, previous=[fix(), fix()])
    structure = result["msdStructure"]
    assert structure["vehicleLocation"] == {"positionLatitude": UNKNOWN_POSITION,
                                            "positionLongitude": UNKNOWN_POSITION}
    assert UNKNOWN_POSITION == 2147483647
    assert structure["control"]["positionCanBeTrusted"] is False
    assert structure["vehicleDirection"] == 255
    assert "recentVehicleLocationN1" not in structure
    assert "recentVehicleLocationN2" not in structure
    assert result["decoded"]["latitude"] is None and result["decoded"]["longitude"] is None
    assert structure["timestamp"] == WALL


def test_unusable_position_counts_as_unknown() -> None:
    location = structure(position=fix(lat=float("nan")))["vehicleLocation"]
    assert location["positionLatitude"] == UNKNOWN_POSITION


def test_vehicle_type_values() -> None:
    assert VEHICLE_TYPES["passenger_m1"] == 1
    assert VEHICLE_TYPES["light_commercial_n1"] == 4
    assert VEHICLE_TYPES["motorcycle_l7e"] == 13
    assert sorted(VEHICLE_TYPES.values()) == list(range(1, 14))
    bus = structure(vehicle=Vehicle(vin=VIN, type="bus_m3"))
    assert bus["control"]["vehicleType"] == 3
    with pytest.raises(ValueError):
        msd(vehicle=Vehicle(type="tractor"))


def test_propulsion_flags() -> None:
    flags = structure(vehicle=Vehicle(propulsion=("gasoline", "electric")))[
        "vehiclePropulsionStorageType"]
    assert flags == {"gasolineTankPresent": True, "dieselTankPresent": False,
                     "compressedNaturalGas": False, "liquidPropaneGas": False,
                     "electricEnergyStorage": True, "hydrogenStorage": False,
                     "otherStorage": False}
    every = structure(vehicle=Vehicle(propulsion=tuple(PROPULSION)))
    assert all(every["vehiclePropulsionStorageType"].values())
    none = structure(vehicle=Vehicle(propulsion=()))
    assert not any(none["vehiclePropulsionStorageType"].values())
    with pytest.raises(ValueError):
        msd(vehicle=Vehicle(propulsion=("coal",)))


def test_passengers() -> None:
    assert "numberOfPassengers" not in structure(passengers=None)
    assert structure(passengers=0)["numberOfPassengers"] == 0
    assert structure(passengers=2)["numberOfPassengers"] == 2
    assert structure(passengers=300)["numberOfPassengers"] == 255


def test_shape_and_json() -> None:
    n1 = fix(lat=48.13735)
    result = msd(message_id=3, automatic=True, previous=[n1, fix(lat=48.1373)], passengers=2,
                 position=fix(heading=46.0))
    assert json.loads(json.dumps(result)) == result
    assert result["msdVersion"] == 2
    assert list(result["msdStructure"]) == [
        "messageIdentifier", "control", "vehicleIdentificationNumber",
        "vehiclePropulsionStorageType", "timestamp", "vehicleLocation", "vehicleDirection",
        "recentVehicleLocationN1", "recentVehicleLocationN2", "numberOfPassengers"]
    assert result["decoded"] == {"latitude": 48.1374, "longitude": 11.5755,
                                 "direction_degrees": 46, "time": "2025-11-28T11:23:20Z"}
    assert json.loads(json.dumps(msd(position=None))) == msd(position=None)


def test_recent_locations_of_a_10_hz_receiver_are_a_second_apart() -> None:
    # N1/N2 from the fixes just before (0.1 s, centimetres) would show no direction.
    track = Track(60)
    for i in range(31):  # 3 s at 10 Hz, north at 10 m/s
        track.add(Fix(capture_ns=i * NS // 10, time="", lat=50.0 + i * 0.00009, lon=8.0,
                      mode=3, receiver_ns=WALL * NS + i * NS // 10))
    picked = track.previous(2)
    last = track.last
    assert last is not None and len(picked) == 2
    assert [(last.receiver_ns or 0) - (f.receiver_ns or 0) for f in picked] == [NS, 2 * NS]
    # Without receiver times, receipt times space them the same way.
    plain = Track(60)
    for i in range(31):
        plain.add(Fix(capture_ns=i * NS // 10, time="", lat=50.0, lon=8.0, mode=3))
    assert [f.capture_ns for f in plain.previous(2)] == [2 * NS, NS]
