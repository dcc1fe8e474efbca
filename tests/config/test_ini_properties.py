"""Property tests: any layout of sections, keys, values and comments either round-trips
through the parser or is refused with ConfigError — never any other exception."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from orion_vgpu.config import (
    CLIENT_SCHEMA,
    SERVER_SCHEMA,
    ConfigError,
    EmulatedGpus,
    parse_ini,
    server_config_from,
    validate,
)

NAME = st.from_regex(r"[a-z0-9_][a-z0-9_.\-]{0,15}", fullmatch=True)
SECTION = st.from_regex(r"[a-z0-9][a-z0-9 _\-]{0,15}", fullmatch=True).map(str.strip).filter(bool)
VALUE_CHARS = st.sampled_from(
    list("abcXYZ019 .:/_-=;#'\"[]\t") + ["中", "文", "é"]
)
VALUE = st.text(VALUE_CHARS, max_size=24)
INDENT = st.sampled_from(["", " ", "    ", "\t", "  \t"])
EQ = st.sampled_from(["=", " = ", "\t=\t", "= ", " ="])
COMMENT = st.sampled_from(["", " ; note", "; 注释", " # hash", "\t;x=y [z]"])
NEWLINE = st.sampled_from(["\n", "\r\n"])


def render_value(value: str) -> tuple[str, str] | None:
    """(text to write, value the parser must return), or None if not expressible."""
    stripped = value.strip()
    plain_ok = value == stripped and not any(c in value for c in ";#") and value[:1] not in "\"'"
    if plain_ok:
        return value, value
    for quote in "\"'":
        if quote not in value:
            return f"{quote}{value}{quote}", value
    return None


@st.composite
def layouts(draw: st.DrawFn) -> tuple[str, dict[str, dict[str, str]]]:
    expected: dict[str, dict[str, str]] = {}
    lines: list[str] = []
    for section in draw(st.lists(SECTION, max_size=4, unique=True)):
        if draw(st.booleans()):
            lines.append(draw(INDENT) + draw(st.sampled_from(["; c", "# c", ""])))
        lines.append(f"{draw(INDENT)}[{section}]{draw(COMMENT)}")
        expected[section] = {}
        for key in draw(st.lists(NAME, max_size=5, unique=True)):
            rendered = render_value(draw(VALUE))
            if rendered is None:
                continue
            text, value = rendered
            comment = draw(COMMENT)
            if text == "" and comment.startswith("\t"):
                comment = ""
            lines.append(f"{draw(INDENT)}{key}{draw(EQ)}{text}{comment}")
            expected[section][key] = value
    newline = draw(NEWLINE)
    return newline.join(lines) + draw(st.sampled_from(["", newline])), expected


@given(layouts())
@settings(max_examples=300, deadline=None)
def test_layouts_round_trip(layout: tuple[str, dict[str, dict[str, str]]]) -> None:
    text, expected = layout
    raw = parse_ini(text, "test.conf")
    assert {s: {k: v.value for k, v in keys.items()} for s, keys in raw.items()} == expected


@given(st.text(max_size=300))
@settings(max_examples=400, deadline=None)
def test_arbitrary_text_parses_or_config_error(text: str) -> None:
    for schema in (SERVER_SCHEMA, CLIENT_SCHEMA):
        try:
            typed = validate(parse_ini(text, "fuzz.conf"), schema, "fuzz.conf")
            if schema is SERVER_SCHEMA:
                server_config_from(typed, Path("fuzz.conf"))
        except ConfigError as exc:
            assert "\n" not in str(exc)
            assert str(exc).startswith("fuzz.conf")


KEY_LINES = st.sampled_from(
    [
        "vgpu_count", "listen_port", "bind_addr", "bind_net", "enable_shm", "emulated_gpus",
        "name", "unix_socket", "heartbeat_interval", "log_level", "throttle_level", "nope",
    ]
)  # fmt: skip


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["server", "log", "throttle", "controller", "client"]),
            KEY_LINES,
            st.text(VALUE_CHARS, max_size=16),
        ),
        max_size=8,
    )
)
@settings(max_examples=300, deadline=None)
def test_known_keys_with_random_values(entries: list[tuple[str, str, str]]) -> None:
    text = "".join(f"[{section}]\n  {key} = {value}\n" for section, key, value in entries)
    try:
        server_config_from(validate(parse_ini(text, "s.conf"), SERVER_SCHEMA, "s.conf"), None)
    except ConfigError as exc:
        assert str(exc).startswith("s.conf") or "bind_addr, bind_net" in str(exc)


BOOL_TEXT = {True: ["true", "True", '"true"', "yes", "on", "1"], False: ["false", "FALSE", '"false', "no", "off", "0"]}


@given(
    vgpu=st.integers(1, 64),
    port=st.integers(1, 65535),
    shm=st.booleans(),
    shm_style=st.integers(0, 5),
    count=st.integers(1, 64),
    gib=st.integers(1, 80),
    level=st.integers(0, 100),
)
@settings(max_examples=200, deadline=None)
def test_typed_server_settings_round_trip(
    vgpu: int, port: int, shm: bool, shm_style: int, count: int, gib: int, level: int
) -> None:
    text = (
        f"[server]\n    vgpu_count = {vgpu}\n    listen_port = {port}   ; port\n"
        f"    enable_shm = {BOOL_TEXT[shm][shm_style]}\n    emulated_gpus = {count}x{gib}GiB\n"
        f"[throttle]\n    throttle_level = {level}\n"
    )
    cfg = server_config_from(validate(parse_ini(text, "t"), SERVER_SCHEMA, "t"), None)
    assert (cfg.vgpu_count, cfg.listen_port, cfg.enable_shm) == (vgpu, port, shm)
    assert cfg.emulated_gpus == EmulatedGpus(count, gib * 1024)
    assert cfg.throttle.throttle_level == level
    assert cfg.unix_socket.name == f"oriond-{port}.sock"
