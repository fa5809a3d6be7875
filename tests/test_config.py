"""Config: typed, validated; bad config names the file and key, and the daemon refuses to
start (issue 2, item 6)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dashsos import config

REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dashsos", *args], capture_output=True,
                          text=True, timeout=60)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dashsos.toml"
    path.write_text(text)
    return path


def test_defaults_and_types(tmp_path: Path) -> None:
    cfg = config.load(_write(tmp_path, "[video]\nfps = 25\n[buffer]\npre_seconds = 10\n"))
    assert cfg.video.fps == 25 and cfg.video.width == 1280
    assert cfg.buffer.pre_seconds == 10.0 and isinstance(cfg.buffer.pre_seconds, float)
    assert cfg.incident.post_seconds == 60.0


@pytest.mark.parametrize(("text", "key", "problem"), [
    ('[video]\nfps = "thirty"\n', "video.fps", "expected an integer"),
    ("[video]\nframerate = 30\n", "video.framerate", "unknown key"),
    ("[camera]\nfps = 30\n", "camera", "unknown section"),
    ('[video]\nbackend = "webcam"\n', "video.backend", "must be one of"),
    ("[buffer]\npre_seconds = 0\n", "buffer.pre_seconds", "at least"),
    ("[buffer]\npre_seconds = true\n", "buffer.pre_seconds", "expected a number"),
    ('[video]\nbackend = "ffmpeg"\ninput = "/dev/video9"\n', "video.input", "does not exist"),
    ('[video]\nbackend = "ffmpeg"\n', "video.input", "needs an input"),
    ("video = 3\n", "video", "expected a table"),
])
def test_bad_values_name_file_and_key(tmp_path: Path, text: str, key: str, problem: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    message = str(err.value)
    assert str(path) in message and f"{key}:" in message and problem in message, message


def test_missing_and_unreadable_files_are_named(tmp_path: Path) -> None:
    for path in (tmp_path / "absent.toml", tmp_path):  # a directory cannot be read either
        with pytest.raises(config.ConfigError, match=str(path)):
            config.load(path)
    if os.geteuid() != 0:  # root reads any file whatever its mode
        locked = _write(tmp_path, "")
        locked.chmod(0)
        with pytest.raises(config.ConfigError, match="cannot read"):
            config.load(locked)


def test_broken_toml_is_named(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.load(_write(tmp_path, "[video\nfps = 3"))


@pytest.mark.parametrize(("text", "key"), [
    ('[video]\nwidth = "wide"\n', "video.width"),
    ("[video]\nbogus = 1\n", "video.bogus"),
    ('[video]\nbackend = "ffmpeg"\ninput = "/dev/video9"\n', "video.input"),
    (None, "cannot read config file"),
])
def test_daemon_refuses_to_start_on_bad_config(tmp_path: Path, text: str | None,
                                               key: str) -> None:
    path = _write(tmp_path, text) if text is not None else tmp_path / "missing.toml"
    socket = tmp_path / "control.sock"
    result = _cli("--config", str(path), "run")
    assert result.returncode == 2, result
    assert key in result.stderr and str(path) in result.stderr, result.stderr
    assert not socket.exists()
    check = _cli("--config", str(path), "check-config")
    assert check.returncode == 2 and key in check.stderr


def test_check_config_prints_effective_config_that_loads_again(tmp_path: Path) -> None:
    path = _write(tmp_path, '[vehicle]\nid = "van-7"\n[video]\ninput_options = { a = "b" }\n')
    result = _cli("--config", str(path), "check-config")
    assert result.returncode == 0, result.stderr
    again = config.from_dict(__import__("tomllib").loads(result.stdout))
    assert again.vehicle.id == "van-7" and again.video.input_options == {"a": "b"}
    assert again.as_dict() == config.load(path).as_dict()


def test_documented_example_is_complete_and_valid() -> None:
    """config/dashsos.toml documents every key with its default."""
    example = (REPO / "config" / "dashsos.toml").read_text()
    assert example == config.example(), "config/dashsos.toml is stale: run scripts/gen-docs"
    assert config.load(REPO / "config" / "dashsos.toml").as_dict() == config.Config().as_dict()
    for key, _type, default, _doc in config.reference():
        assert f"{key.split('.')[1]} = {default}" in example


_toml_values = st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
                         st.booleans(), st.lists(st.integers(), max_size=3))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(list(config.SECTIONS) + ["other"]),
                       st.one_of(_toml_values, st.dictionaries(
                           st.sampled_from(["fps", "width", "backend", "pre_seconds", "id",
                                            "port", "nope", "input_options"]),
                           _toml_values, max_size=4)),
                       max_size=4))
def test_any_input_gives_config_or_clear_error(data: dict[str, object]) -> None:
    try:
        config.from_dict(data, source="fuzz.toml")
    except config.ConfigError as exc:
        assert all(line.startswith("fuzz.toml: ") for line in str(exc).splitlines())


def test_readme_config_reference_matches_model() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("<!-- config-reference:start -->\n", 1)[1].split(
        "<!-- config-reference:end -->", 1)[0]
    assert section == config.markdown_table(), "README config reference is stale: " \
        "run scripts/gen-docs"


@pytest.mark.parametrize("name", ["minimal.toml", "fleet-tls.toml"])
def test_example_configs_parse(name: str) -> None:
    """The examples are valid except for the files they name, which only a car has."""
    import tomllib

    data = tomllib.loads((REPO / "config" / name).read_text())
    try:
        config.from_dict(data, source=name)
    except config.ConfigError as exc:
        problems = str(exc).splitlines()
        assert all("cannot read /etc/dashsos/" in p for p in problems), problems
