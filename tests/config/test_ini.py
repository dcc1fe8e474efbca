"""INI syntax of server.conf / client.conf, as the seeds write it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from orion_vgpu.config import (
    ConfigError,
    EmulatedGpus,
    load_server_config,
    parse_ini,
)

# Seed 002's server.conf, comments and all.
SEED_002_SERVER = """\
[log]
    log_with_time = true    ; 记录日志的时候是否添加时间戳
    log_to_screen = true    ; 日志是否输出到屏幕的标准输出
    log_to_file = true      ; 是否记录日志至磁盘文件中
    log_level = INFO        ; 日志级别，支持 INFO， DEBUG
    file_log_level = INFO   ; 日志输出到文件中的日志级别

[controller]
    controller_addr = 127.0.0.1:9123    ; Orion Controller的调度器IP地址和端口

[server]
    vgpu_count = 4          ; 默认一个物理GPU被拆分成多少个vGPU
    bind_addr = 127.0.0.1   ; data plane的IP地址
    ;bind_net =             ; data plane的网络名字，例如eth0, eth1。bind_addr 和 bind_net 仅能配置1个
    listen_port = 9960      ; Orion Server的服务端口
    enable_kvm = true       ; 是否支持Orion Client运行在KVM的VM中
    enable_shm = true       ; 是否使用共享内存加速通讯
    enable_rdma = true      ; 是否使用RDMA加速通讯
    ibverbs_device = mlx5_0 ; 如果使用RDMA，硬件设备名。仅在Orion Server无法推断硬件时需要配置

[server-nccl]
    comm_id = 127.0.0.1:9970; nvidia NCCL通讯的网络和端口

[throttle]
    throttle_level = 100                ; 算力控制的隔离程度，取值范围[0, 100]。数字越少隔离越好
    enable_computation_throttle = true  ; 是否启动算力控制
    computation_throttle_mode2 = true   ; 算力控制的模式，仅支持true
"""

# Seed 000's [server] section: quoted values, one with its closing quote missing.
SEED_000_SERVER = """\
[server]
    listen_port = 9960
    bind_addr = 172.17.0.1
    enable_shm = "true"
    enable_rdma = "false"
    enable_kvm = "false
"""


def write(tmp_path: Path, text: str, name: str = "server.conf") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_seed_002_server_conf(tmp_path: Path) -> None:
    cfg = load_server_config(write(tmp_path, SEED_002_SERVER))
    assert cfg.log.log_level == "INFO" and cfg.log.log_to_file
    assert cfg.controller_addr == "127.0.0.1:9123"
    assert cfg.vgpu_count == 4 and cfg.listen_port == 9960
    assert cfg.bind_addr == "127.0.0.1" and cfg.bind_net is None
    assert cfg.enable_kvm and cfg.enable_shm and cfg.enable_rdma
    assert cfg.ibverbs_device == "mlx5_0"
    assert cfg.nccl_comm_id == "127.0.0.1:9970"
    assert cfg.throttle.throttle_level == 100
    assert cfg.throttle.enable_computation_throttle and cfg.throttle.computation_throttle_mode2


def test_seed_000_quotes_even_unbalanced(tmp_path: Path) -> None:
    cfg = load_server_config(write(tmp_path, SEED_000_SERVER))
    assert cfg.enable_shm is True
    assert cfg.enable_rdma is False
    assert cfg.enable_kvm is False
    assert cfg.bind_addr == "172.17.0.1"


def test_defaults_are_seed_000_defaults(tmp_path: Path) -> None:
    cfg = load_server_config(write(tmp_path, "[server]\n"))
    assert (cfg.listen_port, cfg.bind_addr) == (9960, "127.0.0.1")
    assert (cfg.enable_shm, cfg.enable_rdma, cfg.enable_kvm) == (True, False, False)
    assert cfg.vgpu_count == 4 and cfg.emulated_gpus is None
    assert cfg.unix_socket.name == "oriond-9960.sock"


def test_our_additions(tmp_path: Path) -> None:
    cfg = load_server_config(write(tmp_path, """
        [log]
            log_dir = /tmp/orion-logs
        [controller]
            pool_token = "abc;def#ghi-123"   ; quoted, so ; and # stay
        [server]
            emulated_gpus = 2x16GiB
            name = node-7
            unix_socket = /tmp/o.sock
            heartbeat_interval = 0.5
            listen_port = 9961
    """))
    assert cfg.emulated_gpus == EmulatedGpus(2, 16384)
    assert cfg.pool_token == "abc;def#ghi-123"
    assert cfg.name == "node-7"
    assert cfg.unix_socket == Path("/tmp/o.sock")
    assert cfg.heartbeat_interval == 0.5
    assert cfg.log_dir == Path("/tmp/orion-logs")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2x16GiB", EmulatedGpus(2, 16384)),
        ("1x512MiB", EmulatedGpus(1, 512)),
        ("4 x 16GB", EmulatedGpus(4, 16384)),  # GB means GiB, as the seeds use MB for MiB
        ("3X1000MB", EmulatedGpus(3, 1000)),
        ("1x4096", EmulatedGpus(1, 4096)),
        ("2x1.5GiB", EmulatedGpus(2, 1536)),
    ],
)
def test_emulated_gpus_sizes(tmp_path: Path, text: str, expected: EmulatedGpus) -> None:
    cfg = load_server_config(write(tmp_path, f"[server]\nemulated_gpus = {text}\n"))
    assert cfg.emulated_gpus == expected


def test_empty_value_means_default(tmp_path: Path) -> None:
    cfg = load_server_config(write(tmp_path, "[server]\n  bind_net =\n  vgpu_count = ; later\n"))
    assert cfg.bind_net is None and cfg.bind_addr == "127.0.0.1" and cfg.vgpu_count == 4


def test_bad_value_names_file_section_key_and_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\n    vgpu_count = abc\n")
    with pytest.raises(ConfigError) as err:
        load_server_config(path)
    assert str(err.value) == f"{path} [server] vgpu_count = abc: expected an integer 1..64"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("[server]\nlisten_port = 70000", "[server] listen_port = 70000: expected an integer 1..65535"),
        ("[server]\nenable_shm = maybe", "[server] enable_shm = maybe: expected true or false"),
        ("[log]\nlog_level = LOUD", "[log] log_level = LOUD: expected one of INFO, DEBUG, WARNING, ERROR"),
        ("[controller]\ncontroller_addr = nowhere", "[controller] controller_addr = nowhere: expected HOST:PORT"),
        ("[server]\nemulated_gpus = 0x16GiB", "[server] emulated_gpus = 0x16GiB: expected COUNTxSIZE"),
        ("[throttle]\nthrottle_level = 101", "[throttle] throttle_level = 101: expected an integer 0..100"),
        ("[server]\nunix_socket = relative/path", "[server] unix_socket = relative/path: expected an absolute path"),
    ],
)
def test_bad_values(tmp_path: Path, line: str, expected: str) -> None:
    path = write(tmp_path, line + "\n")
    with pytest.raises(ConfigError, match="^" + __import__("re").escape(f"{path} {expected}")):
        load_server_config(path)


def test_unknown_key_lists_accepted_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\n    vgpu_cnt = 4\n")
    with pytest.raises(ConfigError) as err:
        load_server_config(path)
    message = str(err.value)
    assert message.startswith(f"{path} [server] vgpu_cnt: unknown key; accepted: vgpu_count, bind_addr")
    assert "\n" not in message


def test_unknown_section(tmp_path: Path) -> None:
    path = write(tmp_path, "[sever]\n    vgpu_count = 4\n")
    with pytest.raises(ConfigError, match=r"\[sever\]: unknown section; accepted: \[log\], \[controller\], \[server\]"):
        load_server_config(path)


def test_bind_addr_and_bind_net_exclusive(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\n bind_addr = 127.0.0.1\n bind_net = eth0\n")
    with pytest.raises(ConfigError, match=r"\[server\] bind_addr, bind_net: set only one of them"):
        load_server_config(path)


def test_bind_net_alone(tmp_path: Path) -> None:
    cfg = load_server_config(write(tmp_path, "[server]\n bind_net = eth0\n"))
    assert cfg.bind_net == "eth0" and cfg.bind_addr is None


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("vgpu_count = 4\n", ":1: vgpu_count = ... appears before any [section]"),
        ("[server]\nthis is not ini\n", ":2: expected `[section]`, `key = value` or a comment"),
        ("[server]\nvgpu_count = 1\nvgpu_count = 2\n", "[server] vgpu_count: set twice (lines 2 and 3)"),
        ("[]\n", ":1: empty section name"),
        ('[server]\nname = "a" b\n', "[server] name: unexpected text 'b' after the quoted value"),
    ],
)
def test_syntax_errors_name_the_line(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_ini(text, "/etc/orion/server.conf")
    assert fragment in str(err.value)
    assert str(err.value).startswith("/etc/orion/server.conf")


def test_comments_and_case() -> None:
    raw = parse_ini("# top\n; also\n[Server] ; hi\n  VGPU_Count=2#x\n\tlisten_port\t=\t9961\n", "f")
    assert {k: v.value for k, v in raw["server"].items()} == {"vgpu_count": "2", "listen_port": "9961"}


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_server_config(tmp_path / "nope.conf")
