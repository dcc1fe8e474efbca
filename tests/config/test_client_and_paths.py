"""Client precedence (env > ~/.orion > /etc/orion > defaults), env validation, paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from orion_vgpu import config
from orion_vgpu.config import (
    ConfigError,
    load_client_config,
    load_server_config,
    resolve_pool_token,
)


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(etc dir, ORION_HOME) under tmp_path; the real /etc/orion is never read."""
    etc, home = tmp_path / "etc", tmp_path / "home"
    etc.mkdir()
    home.mkdir()
    monkeypatch.setattr(config, "ETC_DIR", etc)
    monkeypatch.setenv("ORION_HOME", str(home))
    return etc, home


def env_with(home: Path, **values: str) -> dict[str, str]:
    return {"ORION_HOME": str(home), **values}


def test_defaults(dirs: tuple[Path, Path]) -> None:
    _, home = dirs
    cfg = load_client_config(env_with(home))
    assert cfg.controller_addr == "127.0.0.1:9123" and cfg.controller_addr_source == "default"
    assert cfg.vgpu is None and cfg.gmem_mib is None and cfg.ratio is None
    assert cfg.cross_node is False and cfg.enable_net is False
    assert cfg.log_dir == home / "log"
    assert cfg.files == ()


def test_precedence_env_over_home_over_etc(dirs: tuple[Path, Path]) -> None:
    etc, home = dirs
    (etc / "client.conf").write_text(
        "[controller]\n    controller_addr = 10.0.0.1:9123\n[client]\n    enable_net = true\n"
    )
    (home / "client.conf").write_text("[controller]\n    controller_addr = 10.0.0.2:9123\n")
    cfg = load_client_config(env_with(home, ORION_CONTROLLER="10.0.0.3:9123"))
    assert cfg.controller_addr == "10.0.0.3:9123" and cfg.controller_addr_source == "env"
    assert cfg.enable_net is True  # only /etc sets it: keys merge, they don't shadow files

    cfg = load_client_config(env_with(home))
    assert cfg.controller_addr == "10.0.0.2:9123"
    assert cfg.controller_addr_source == str(home / "client.conf")
    assert cfg.files == (etc / "client.conf", home / "client.conf")

    (home / "client.conf").unlink()
    cfg = load_client_config(env_with(home))
    assert cfg.controller_addr == "10.0.0.1:9123"
    assert cfg.controller_addr_source == str(etc / "client.conf")


def test_env_variables(dirs: tuple[Path, Path]) -> None:
    _, home = dirs
    cfg = load_client_config(
        env_with(
            home,
            ORION_VGPU="2",
            ORION_GMEM="12000",
            ORION_RATIO="100",
            ORION_CROSS_NODE="1",
            ORION_TOKEN="user-token-1",
            ORION_POOL_TOKEN="pool-token-1",
            ORION_ENABLE_NET="true",
        )
    )
    assert (cfg.vgpu, cfg.gmem_mib, cfg.ratio, cfg.cross_node) == (2, 12000, 100, True)
    assert (cfg.token, cfg.pool_token, cfg.enable_net) == ("user-token-1", "pool-token-1", True)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("ORION_GMEM", "lots", "environment ORION_GMEM=lots: expected an integer"),
        ("ORION_RATIO", "150", "environment ORION_RATIO=150: expected an integer 1..100"),
        ("ORION_VGPU", "-1", "environment ORION_VGPU=-1: expected an integer 0..1024"),
        ("ORION_CROSS_NODE", "yes", "environment ORION_CROSS_NODE=yes: expected 0 or 1"),
        ("ORION_CONTROLLER", "host", "environment ORION_CONTROLLER=host: expected HOST:PORT"),
    ],
)
def test_bad_env_names_the_variable(dirs: tuple[Path, Path], name: str, value: str, expected: str) -> None:
    _, home = dirs
    with pytest.raises(ConfigError, match="^" + expected.replace(".", r"\.")):
        load_client_config(env_with(home, **{name: value}))


def test_controller_env_accepts_http_prefix(dirs: tuple[Path, Path]) -> None:
    _, home = dirs
    cfg = load_client_config(env_with(home, ORION_CONTROLLER="http://10.1.2.3:9123/"))
    assert cfg.controller_addr == "10.1.2.3:9123"


def test_bad_client_conf_key(dirs: tuple[Path, Path]) -> None:
    _, home = dirs
    path = home / "client.conf"
    path.write_text("[client]\n    enable_nett = true\n")
    with pytest.raises(ConfigError, match=f"^{path} \\[client\\] enable_nett: unknown key; accepted: enable_net, token$"):
        load_client_config(env_with(home))


def test_server_keys_are_not_client_keys(dirs: tuple[Path, Path]) -> None:
    etc, home = dirs
    (etc / "client.conf").write_text("[server]\n    vgpu_count = 4\n")
    with pytest.raises(ConfigError, match=r"\[server\]: unknown section; accepted: \[log\], \[controller\], \[client\]"):
        load_client_config(env_with(home))


# ----------------------------------------------------------------------------- paths


def test_non_root_falls_back_to_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORION_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(config, "is_root", lambda: False)
    assert config.orion_home() == tmp_path / ".orion"
    assert config.default_log_dir("server") == tmp_path / ".orion/log/server"
    assert config.default_log_dir("controller") == tmp_path / ".orion/log/controller"
    assert config.default_log_dir("client") == tmp_path / ".orion/log"
    assert config.default_data_dir("controller") == tmp_path / ".orion/controller"
    assert config.default_run_dir() == tmp_path / ".orion/run"


def test_root_uses_system_dirs_when_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORION_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "root"))
    monkeypatch.setattr(config, "is_root", lambda: True)
    monkeypatch.setattr(config, "SYSTEM_LOG_DIR", tmp_path / "var/log/orion")
    assert config.default_log_dir("server") == tmp_path / "var/log/orion"
    # Not writable (here: a file sits where a parent directory should be) -> home.
    (tmp_path / "blocked").write_text("")
    monkeypatch.setattr(config, "SYSTEM_LOG_DIR", tmp_path / "blocked/orion")
    assert config.default_log_dir("server") == tmp_path / "root/.orion/log/server"


def test_orion_home_keeps_everything_under_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORION_HOME", str(tmp_path / "oh"))
    monkeypatch.setattr(config, "is_root", lambda: True)
    assert config.default_log_dir("server") == tmp_path / "oh/log/server"
    assert config.default_data_dir("controller") == tmp_path / "oh/controller"


def test_unix_socket_default_stays_short(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORION_HOME", str(tmp_path / ("x" * 120)))
    path = config.default_unix_socket(9960)
    assert len(str(path)) <= config.MAX_UNIX_SOCKET_PATH
    assert path.name == "oriond-9960.sock"


def test_server_conf_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "ETC_DIR", tmp_path / "etc")
    monkeypatch.setenv("ORION_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ORION_SERVER_CONF", raising=False)
    assert load_server_config().path is None  # nothing anywhere: defaults
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/server.conf").write_text("[server]\nvgpu_count = 2\n")
    assert load_server_config().vgpu_count == 2
    named = tmp_path / "named.conf"
    named.write_text("[server]\nvgpu_count = 3\n")
    monkeypatch.setenv("ORION_SERVER_CONF", str(named))
    assert load_server_config().vgpu_count == 3
    assert load_server_config(tmp_path / "etc/server.conf").vgpu_count == 2  # explicit wins


def test_pool_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORION_HOME", str(tmp_path))
    token_file = tmp_path / "tok"
    token_file.write_text("from-file-123\n")
    assert resolve_pool_token(None, token_file, {}) == "from-file-123"
    assert resolve_pool_token("given-token-1", token_file, {}) == "given-token-1"
    assert resolve_pool_token("given-token-1", None, {"ORION_POOL_TOKEN": "env-token-1"}) == "env-token-1"
    (tmp_path / "controller").mkdir()
    (tmp_path / "controller/pool_token").write_text("local-controller-1\n")
    assert resolve_pool_token(None, None, {}) == "local-controller-1"  # same-host controller
    with pytest.raises(ConfigError, match="no pool token: set \\[controller\\] pool_token"):
        resolve_pool_token(None, tmp_path / "missing", {})


def test_server_conf_in_home_when_etc_has_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "ETC_DIR", tmp_path / "etc")
    monkeypatch.setenv("ORION_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ORION_SERVER_CONF", raising=False)
    (tmp_path / "home").mkdir()
    (tmp_path / "home/server.conf").write_text("[server]\nvgpu_count = 5\n")
    assert load_server_config().vgpu_count == 5
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/server.conf").write_text("[server]\nvgpu_count = 6\n")
    assert load_server_config().vgpu_count == 6  # /etc/orion first, as seed 002 says
