"""Configuration: the seeds' INI files (`server.conf`, `client.conf`) and environment.

File format (seed 002): `[section]` headers, indented `key = value` lines, `;` and `#`
comments on their own line or after a value (`comm_id = 127.0.0.1:9970; comment`), values
optionally quoted (`enable_shm = "true"`; seed 000 even has `enable_kvm = "false` with the
closing quote missing, so an unbalanced opening quote is accepted). An empty value means
"use the default". Quote a value that must contain `;` or `#`.

Every problem is a `ConfigError` whose message is one line naming the file, section, key
and what is accepted, e.g.
`/etc/orion/server.conf [server] vgpu_count = abc: expected an integer 1..64`.

Client precedence: environment > `~/.orion/client.conf` > `/etc/orion/client.conf` > defaults.
`ORION_HOME` replaces `~/.orion`; when it is set, or when not running as root (or the
system directory is not writable), files we write (logs, data, sockets) go under it
instead of `/var/log`, `/var/lib`, `/run`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orion_vgpu import DEFAULT_CONTROLLER_PORT, DEFAULT_SERVER_PORT

ETC_DIR = Path("/etc/orion")
SYSTEM_LOG_DIR = Path("/var/log/orion")
SYSTEM_LIB_DIR = Path("/var/lib/orion")
SYSTEM_RUN_DIR = Path("/run/orion")
# sun_path is 108 bytes including the NUL.
MAX_UNIX_SOCKET_PATH = 107


class UserError(Exception):
    """Something the user can fix; the CLI prints it as one line and exits 2."""


class ConfigError(UserError):
    """A configuration file or environment variable is invalid."""


# --------------------------------------------------------------------------- paths


def orion_home(env: Mapping[str, str] | None = None) -> Path:
    """`$ORION_HOME`, else `~/.orion`."""
    env = os.environ if env is None else env
    home = env.get("ORION_HOME")
    return Path(home).expanduser() if home else Path.home() / ".orion"


def is_root() -> bool:
    return os.geteuid() == 0


def _dir_writable(path: Path) -> bool:
    """True if `path` exists and is writable, or could be created by us."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate.is_dir() and os.access(candidate, os.W_OK | os.X_OK)
    return False


def _system_or_home(system: Path, home_relative: str) -> Path:
    # ORION_HOME means "keep everything of mine under here" (tests, `orion up`, users).
    if "ORION_HOME" not in os.environ and is_root() and _dir_writable(system):
        return system
    return orion_home() / home_relative


def default_log_dir(component: str) -> Path:
    """Where `component` ("server", "controller", "client") writes its logs.

    Seed 002: the server logs to /var/log/orion (server.log + session/), the client to
    ~/.orion/log (one file per run).
    """
    if component == "client":
        return orion_home() / "log"
    if component in ("server", "controller"):
        return _system_or_home(SYSTEM_LOG_DIR, f"log/{component}")
    raise ValueError(f"unknown component {component!r}")


def default_data_dir(component: str) -> Path:
    """Persistent state, e.g. the controller's database and pool token."""
    return _system_or_home(SYSTEM_LIB_DIR / component, component)


def default_run_dir() -> Path:
    return _system_or_home(SYSTEM_RUN_DIR, "run")


def default_unix_socket(port: int) -> Path:
    path = default_run_dir() / f"oriond-{port}.sock"
    if len(os.fsencode(path)) <= MAX_UNIX_SOCKET_PATH:
        return path
    # Deep ORION_HOME (e.g. pytest tmp dirs) would overflow sun_path; /tmp always fits.
    return Path("/tmp") / f"orion-{os.geteuid()}" / f"oriond-{port}.sock"


def default_pool_token_file() -> Path:
    """The pool token a controller on this host writes (`<data-dir>/pool_token`)."""
    return default_data_dir("controller") / "pool_token"


# --------------------------------------------------------------------------- INI syntax


@dataclass(frozen=True)
class RawValue:
    value: str
    line: int


RawIni = dict[str, dict[str, RawValue]]

_SECTION_RE = re.compile(r"^\[([^\[\]]*)\]\s*(?:[;#].*)?$")
_KEY_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_COMMENT_CHARS = ";#"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _cut_comment(text: str) -> str:
    cut = min((i for i in (text.find(c) for c in _COMMENT_CHARS) if i >= 0), default=len(text))
    return text[:cut].strip()


def _parse_value(text: str, where: str) -> str:
    text = text.strip()
    if not text or text[0] not in "\"'":
        return _cut_comment(text)
    quote = text[0]
    end = text.find(quote, 1)
    if end < 0:
        # Unbalanced opening quote (seed 000: `enable_kvm = "false`): take the rest.
        return _cut_comment(text[1:])
    rest = text[end + 1 :].strip()
    if rest and rest[0] not in _COMMENT_CHARS:
        raise ConfigError(f"{where}: unexpected text {rest!r} after the quoted value")
    return text[1:end]


def parse_ini(text: str, source: str) -> RawIni:
    """Parse INI text into {section: {key: RawValue}}; sections and keys lower-cased."""
    sections: RawIni = {}
    current: str | None = None
    # Only \n, \r\n and \r end a line (str.splitlines would also split on \u2028 etc.).
    for lineno, raw in enumerate(_LINE_BREAK.split(text.lstrip("\ufeff")), start=1):
        line = raw.strip()
        if not line or line[0] in _COMMENT_CHARS:
            continue
        header = _SECTION_RE.match(line)
        if header:
            current = header.group(1).strip().lower()
            if not current:
                raise ConfigError(f"{source}:{lineno}: empty section name []")
            sections.setdefault(current, {})
            continue
        key, eq, value = line.partition("=")
        key = key.strip().lower()
        if not eq or not _KEY_RE.match(key):
            raise ConfigError(
                f"{source}:{lineno}: expected `[section]`, `key = value` or a comment, "
                f"got {_short(line)!r}"
            )
        if current is None:
            raise ConfigError(f"{source}:{lineno}: {key} = ... appears before any [section]")
        where = f"{source} [{current}] {key}"
        if key in sections[current]:
            first = sections[current][key].line
            raise ConfigError(f"{where}: set twice (lines {first} and {lineno}); keep one")
        sections[current][key] = RawValue(_parse_value(value, where), lineno)
    return sections


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- value types


class _Bad(ValueError):
    """A value parser's complaint: the text after 'expected'."""


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "yes", "on", "1"):
        return True
    if low in ("false", "no", "off", "0"):
        return False
    raise _Bad("true or false")


def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise _Bad(f"an integer {lo}..{hi}") from None
        if not lo <= value <= hi:
            raise _Bad(f"an integer {lo}..{hi}")
        return value

    return parse


def _float_range(lo: float, hi: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        body = text.strip().lower().removesuffix("s").strip()
        try:
            value = float(body)
        except ValueError:
            raise _Bad(f"seconds {lo:g}..{hi:g} (e.g. 5)") from None
        if not lo <= value <= hi:
            raise _Bad(f"seconds {lo:g}..{hi:g} (e.g. 5)")
        return value

    return parse


LOG_LEVELS = ("INFO", "DEBUG", "WARNING", "ERROR")


def parse_log_level(text: str) -> str:
    level = text.strip().upper()
    level = "WARNING" if level == "WARN" else level
    if level not in LOG_LEVELS:
        raise _Bad("one of " + ", ".join(LOG_LEVELS))
    return level


_HOST_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)*$")


def parse_host(text: str) -> str:
    host = text.strip()
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if _HOST_RE.match(host) and not host.replace(".", "").isdigit():
        return host
    raise _Bad("an IP address or host name (e.g. 127.0.0.1)")


def parse_host_port(text: str) -> str:
    """`HOST:PORT` (IPv6 as `[::1]:9123`), returned normalised."""
    body = text.strip().removeprefix("http://").rstrip("/")
    expected = "HOST:PORT (e.g. 127.0.0.1:9123)"
    if body.startswith("["):
        host, sep, port = body[1:].partition("]:")
    else:
        host, sep, port = body.rpartition(":")
    if not sep or not host:
        raise _Bad(expected)
    try:
        port_no = _int_range(1, 65535)(port)
        host = parse_host(host)
    except _Bad:
        raise _Bad(expected) from None
    return f"[{host}]:{port_no}" if ":" in host else f"{host}:{port_no}"


_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,15}$")


def parse_ifname(text: str) -> str:
    name = text.strip()
    if not _IFNAME_RE.match(name):
        raise _Bad("a network interface name (e.g. eth0)")
    return name


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def parse_name(text: str) -> str:
    name = text.strip()
    if not _NAME_RE.match(name):
        raise _Bad("a name of letters, digits, '.', '_' or '-' (max 64)")
    return name


_TOKEN_RE = re.compile(r"^[\x21-\x7e]{8,512}$")


def parse_token(text: str) -> str:
    token = text.strip()
    if not _TOKEN_RE.match(token):
        raise _Bad("a token of 8..512 printable characters without spaces")
    return token


def parse_path(text: str) -> Path:
    path = Path(text.strip()).expanduser()
    if not path.is_absolute():
        raise _Bad("an absolute path")
    return path


def parse_socket_path(text: str) -> Path:
    path = parse_path(text)
    if len(os.fsencode(path)) > MAX_UNIX_SOCKET_PATH:
        raise _Bad(f"an absolute path of at most {MAX_UNIX_SOCKET_PATH} bytes (Unix socket limit)")
    return path


_SIZE_UNITS = {"": 1, "m": 1, "mb": 1, "mib": 1, "g": 1024, "gb": 1024, "gib": 1024}
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([a-z]*)$")


def parse_size_mib(text: str) -> int:
    """`16GiB`, `16GB`, `512MiB`, `4096` (MiB). MB/GB mean MiB/GiB, as in the seeds."""
    match = _SIZE_RE.match(text.strip().lower())
    if not match or match.group(2) not in _SIZE_UNITS:
        raise _Bad("a size like 16GiB, 16GB, 512MiB or 4096 (MiB)")
    mib = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if not 1 <= mib <= 16 * 1024 * 1024:
        raise _Bad("a size between 1MiB and 16TiB")
    return mib


@dataclass(frozen=True)
class EmulatedGpus:
    """`[server] emulated_gpus = COUNTxSIZE`: GPUs that run on the CPU."""

    count: int
    memory_mib: int

    def __str__(self) -> str:
        return f"{self.count}x{format_mib(self.memory_mib)}"


def format_mib(mib: int) -> str:
    return f"{mib // 1024}GiB" if mib % 1024 == 0 else f"{mib}MiB"


def parse_emulated_gpus(text: str) -> EmulatedGpus:
    expected = "COUNTxSIZE with COUNT 1..64 (e.g. 2x16GiB)"
    count_text, sep, size_text = text.strip().lower().replace("×", "x").partition("x")
    if not sep:
        raise _Bad(expected)
    try:
        count = _int_range(1, 64)(count_text)
        size = parse_size_mib(size_text)
    except _Bad:
        raise _Bad(expected) from None
    return EmulatedGpus(count, size)


# --------------------------------------------------------------------------- schema

Schema = dict[str, dict[str, Callable[[str], Any]]]

_LOG_KEYS: dict[str, Callable[[str], Any]] = {
    "log_with_time": parse_bool,
    "log_to_screen": parse_bool,
    "log_to_file": parse_bool,
    "log_level": parse_log_level,
    "file_log_level": parse_log_level,
    "log_dir": parse_path,
}
_CONTROLLER_KEYS: dict[str, Callable[[str], Any]] = {
    "controller_addr": parse_host_port,
    "pool_token": parse_token,
    "pool_token_file": parse_path,
}
SERVER_SCHEMA: Schema = {
    "log": _LOG_KEYS,
    "controller": _CONTROLLER_KEYS,
    "server": {
        "vgpu_count": _int_range(1, 64),
        "bind_addr": parse_host,
        "bind_net": parse_ifname,
        "listen_port": _int_range(1, 65535),
        "enable_kvm": parse_bool,
        "enable_shm": parse_bool,
        "enable_rdma": parse_bool,
        "ibverbs_device": parse_ifname,
        "emulated_gpus": parse_emulated_gpus,
        "name": parse_name,
        "unix_socket": parse_socket_path,
        "heartbeat_interval": _float_range(0.1, 3600),
    },
    "server-nccl": {"comm_id": parse_host_port},
    "throttle": {
        "throttle_level": _int_range(0, 100),
        "enable_computation_throttle": parse_bool,
        "computation_throttle_mode2": parse_bool,
    },
}
CLIENT_SCHEMA: Schema = {
    "log": _LOG_KEYS,
    "controller": {"controller_addr": parse_host_port, "pool_token": parse_token},
    "client": {"enable_net": parse_bool, "token": parse_token},
}


def validate(raw: RawIni, schema: Schema, source: str) -> dict[str, dict[str, Any]]:
    """Typed values for every non-empty key; ConfigError for anything unknown or bad."""
    typed: dict[str, dict[str, Any]] = {}
    for section, entries in raw.items():
        keys = schema.get(section)
        if keys is None:
            accepted = ", ".join(f"[{s}]" for s in schema)
            raise ConfigError(f"{source} [{section}]: unknown section; accepted: {accepted}")
        typed[section] = {}
        for key, entry in entries.items():
            parse = keys.get(key)
            where = f"{source} [{section}] {key}"
            if parse is None:
                raise ConfigError(f"{where}: unknown key; accepted: {', '.join(keys)}")
            if entry.value == "":
                continue
            try:
                typed[section][key] = parse(entry.value)
            except _Bad as bad:
                raise ConfigError(f"{where} = {_short(entry.value)}: expected {bad}") from None
    return typed


def read_ini(path: Path, schema: Schema) -> dict[str, dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read configuration file: {exc}") from None
    return validate(parse_ini(text, str(path)), schema, str(path))


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class LogConfig:
    log_with_time: bool = True
    log_to_screen: bool = True
    log_to_file: bool = True
    log_level: str = "INFO"
    file_log_level: str = "INFO"
    log_dir: Path | None = None  # None: default_log_dir(component)


@dataclass(frozen=True)
class ThrottleConfig:
    throttle_level: int = 100
    enable_computation_throttle: bool = True
    computation_throttle_mode2: bool = True


def _hostname() -> str:
    name = socket.gethostname().split(".")[0] or "localhost"
    try:
        return parse_name(name)
    except _Bad:
        return re.sub(r"[^A-Za-z0-9_.\-]", "-", name)[:64] or "localhost"


@dataclass(frozen=True)
class ServerConfig:
    """`server.conf`. Defaults are seed 000's ("即默认值")."""

    path: Path | None = None  # the file read, None when running on defaults
    log: LogConfig = field(default_factory=LogConfig)
    controller_addr: str = f"127.0.0.1:{DEFAULT_CONTROLLER_PORT}"
    pool_token: str | None = None
    pool_token_file: Path | None = None
    vgpu_count: int = 4
    bind_addr: str | None = "127.0.0.1"  # None only when bind_net names an interface
    bind_net: str | None = None
    listen_port: int = DEFAULT_SERVER_PORT
    enable_kvm: bool = False
    enable_shm: bool = True
    enable_rdma: bool = False
    ibverbs_device: str | None = None
    emulated_gpus: EmulatedGpus | None = None
    name: str = field(default_factory=_hostname)
    unix_socket: Path = None  # type: ignore[assignment]  # None -> default for listen_port
    heartbeat_interval: float | None = None  # None: what the controller asks for
    nccl_comm_id: str | None = None
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)

    def __post_init__(self) -> None:
        if self.unix_socket is None:
            object.__setattr__(self, "unix_socket", default_unix_socket(self.listen_port))

    @property
    def log_dir(self) -> Path:
        return self.log.log_dir or default_log_dir("server")


def _log_config(values: Mapping[str, Any], base: LogConfig | None = None) -> LogConfig:
    base = base or LogConfig()
    return LogConfig(**{**base.__dict__, **values})


def server_config_from(typed: Mapping[str, Mapping[str, Any]], path: Path | None) -> ServerConfig:
    server = dict(typed.get("server", {}))
    source = str(path) if path else "server configuration"
    if "bind_addr" in server and "bind_net" in server:
        raise ConfigError(
            f"{source} [server] bind_addr, bind_net: set only one of them "
            "(bind_addr = IP address, or bind_net = interface name such as eth0)"
        )
    if "bind_net" in server:
        server["bind_addr"] = None
    controller = typed.get("controller", {})
    return ServerConfig(
        path=path,
        log=_log_config(typed.get("log", {})),
        controller_addr=controller.get("controller_addr", ServerConfig.controller_addr),
        pool_token=controller.get("pool_token"),
        pool_token_file=controller.get("pool_token_file"),
        nccl_comm_id=typed.get("server-nccl", {}).get("comm_id"),
        throttle=ThrottleConfig(**typed.get("throttle", {})),
        **server,
    )


def server_config_path(env: Mapping[str, str] | None = None) -> Path | None:
    """The server.conf to read: $ORION_SERVER_CONF, /etc/orion/server.conf, then (for
    users who cannot write /etc) ~/.orion/server.conf; None means defaults."""
    env = os.environ if env is None else env
    if env.get("ORION_SERVER_CONF"):
        return Path(env["ORION_SERVER_CONF"]).expanduser()
    for candidate in (ETC_DIR / "server.conf", orion_home(env) / "server.conf"):
        if candidate.is_file():
            return candidate
    return None


def load_server_config(path: Path | None = None) -> ServerConfig:
    """Read `path` (else the default location); defaults when there is no file."""
    path = path if path is not None else server_config_path()
    if path is None:
        return ServerConfig()
    return server_config_from(read_ini(path, SERVER_SCHEMA), path)


def resolve_pool_token(
    pool_token: str | None, pool_token_file: Path | None, env: Mapping[str, str] | None = None
) -> str:
    """The pool token: ORION_POOL_TOKEN, `pool_token`, `pool_token_file`, or the local
    controller's `<data-dir>/pool_token`. ConfigError says where to put it when missing."""
    env = os.environ if env is None else env
    if env.get("ORION_POOL_TOKEN"):
        try:
            return parse_token(env["ORION_POOL_TOKEN"])
        except _Bad as bad:
            raise ConfigError(f"environment ORION_POOL_TOKEN: expected {bad}") from None
    if pool_token:
        return pool_token
    candidates = [pool_token_file] if pool_token_file else [default_pool_token_file()]
    for candidate in candidates:
        try:
            return parse_token(candidate.read_text().strip())
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(f"{candidate}: cannot read pool token: {exc.strerror}") from None
        except _Bad as bad:
            raise ConfigError(f"{candidate}: pool token file: expected {bad}") from None
    raise ConfigError(
        f"no pool token: set [controller] pool_token (or pool_token_file) to the controller's "
        f"<data-dir>/pool_token, or export ORION_POOL_TOKEN (looked for {candidates[0]})"
    )


# --------------------------------------------------------------------------- client


@dataclass(frozen=True)
class ClientConfig:
    controller_addr: str = f"127.0.0.1:{DEFAULT_CONTROLLER_PORT}"
    # Where controller_addr came from: "env", a config file path, or "default".
    controller_addr_source: str = "default"
    vgpu: int | None = None
    gmem_mib: int | None = None
    ratio: int | None = None
    cross_node: bool = False
    enable_net: bool = False
    token: str | None = None
    pool_token: str | None = None
    log: LogConfig = field(default_factory=LogConfig)
    log_dir: Path = field(default_factory=lambda: default_log_dir("client"))
    files: tuple[Path, ...] = ()  # config files read, lowest precedence first


def _env_value(env: Mapping[str, str], name: str, parse: Callable[[str], Any]) -> Any:
    text = env.get(name)
    if text is None or text.strip() == "":
        return None
    try:
        return parse(text)
    except _Bad as bad:
        raise ConfigError(f"environment {name}={_short(text)}: expected {bad}") from None


def _cross_node(text: str) -> bool:
    if text.strip() not in ("0", "1"):
        raise _Bad("0 or 1")
    return text.strip() == "1"


# Environment variable -> (ClientConfig field, parser). Seed 002 plus our additions.
CLIENT_ENV: dict[str, tuple[str, Callable[[str], Any]]] = {
    "ORION_CONTROLLER": ("controller_addr", parse_host_port),
    "ORION_VGPU": ("vgpu", _int_range(0, 1024)),
    "ORION_GMEM": ("gmem_mib", _int_range(1, 16 * 1024 * 1024)),
    "ORION_RATIO": ("ratio", _int_range(1, 100)),
    "ORION_CROSS_NODE": ("cross_node", _cross_node),
    "ORION_TOKEN": ("token", parse_token),
    "ORION_POOL_TOKEN": ("pool_token", parse_token),
    "ORION_ENABLE_NET": ("enable_net", parse_bool),
}


def client_config_files(env: Mapping[str, str], etc_dir: Path | None = None) -> list[Path]:
    """Existing client.conf files, lowest precedence first."""
    candidates = [(etc_dir or ETC_DIR) / "client.conf", orion_home(env) / "client.conf"]
    return [p for p in candidates if p.is_file()]


def load_client_config(
    env: Mapping[str, str] = os.environ, *, etc_dir: Path | None = None
) -> ClientConfig:
    """env > ~/.orion/client.conf > /etc/orion/client.conf > defaults."""
    values: dict[str, Any] = {}
    log_values: dict[str, Any] = {}
    files = client_config_files(env, etc_dir)
    for path in files:
        typed = read_ini(path, CLIENT_SCHEMA)
        log_values.update(typed.get("log", {}))
        controller = typed.get("controller", {})
        if "controller_addr" in controller:
            values["controller_addr"] = controller["controller_addr"]
            values["controller_addr_source"] = str(path)
        if "pool_token" in controller:
            values["pool_token"] = controller["pool_token"]
        values.update(typed.get("client", {}))
    for name, (attr, parse) in CLIENT_ENV.items():
        value = _env_value(env, name, parse)
        if value is not None:
            values[attr] = value
            if attr == "controller_addr":
                values["controller_addr_source"] = "env"
    log = _log_config(log_values)
    log_dir = log.log_dir or orion_home(env) / "log"
    return ClientConfig(log=log, log_dir=log_dir, files=tuple(files), **values)
