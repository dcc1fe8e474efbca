"""The `orion` command and its aliases `oriond`, `orion-check`, `orion-shm`, `orion-smi`.

Subcommands import their machinery lazily, so `orion version` or `orion shm` does not pay
for torch or the web stack. Errors the user can fix print one line `orion: error: ...`
on stderr and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from orion_vgpu import API_VERSION, DATA_VERSION, DEFAULT_SERVER_PORT, PROTOCOL_VERSION, __version__
from orion_vgpu.config import UserError, default_data_dir, default_log_dir

Handler = Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------- handlers


def _controller(args: argparse.Namespace) -> int:
    from orion_vgpu.controller.main import run_controller
    from orion_vgpu.controller.settings import SettingsError
    from orion_vgpu.controller.store import StoreError

    log_dir = default_log_dir("controller")
    try:
        run_controller(
            listen=args.listen,
            data_dir=args.data_dir or default_data_dir("controller"),
            db_url=args.db,
            pool_token=None,  # the controller reads ORION_POOL_TOKEN, else <data-dir>/pool_token
            lease_s=args.lease_s,
            heartbeat_interval_s=args.heartbeat_interval_s,
            log_file=args.log_file or log_dir / "controller.log",
            policy=args.policy,
            auth=args.auth,
            public_read=args.public_read,
            admin_password=args.admin_password,  # None: ORION_ADMIN_PASSWORD, else generated once
        )
    except (ValueError, SettingsError, StoreError) as exc:
        raise UserError(str(exc)) from None
    except KeyboardInterrupt:
        pass
    return 0


def _server(args: argparse.Namespace) -> int:
    from orion_vgpu.server.daemon import run_server

    return run_server(args.config)


def _up(args: argparse.Namespace) -> int:
    from orion_vgpu.allinone import UpOptions, run_up

    return run_up(
        UpOptions(
            listen=args.listen,
            data_dir=args.data_dir,
            emulated_gpus=args.emulated_gpus,
            vgpu_count=args.vgpu_count,
            server_port=args.server_port,
        )
    )


def _check(args: argparse.Namespace) -> int:
    from orion_vgpu.tools import check

    return check.run(args.kind, args.role, args.config)


def _shm(args: argparse.Namespace) -> int:
    from orion_vgpu.tools import shm

    return shm.run(args.index, args.size, args.dir)


def _smi(args: argparse.Namespace) -> int:
    from orion_vgpu.config import load_client_config
    from orion_vgpu.tools import smi

    return smi.run(load_client_config(), args.controller, args.json)


def _run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UserError("give the command to run after --, e.g. `orion run --vgpu 1 -- python train.py`")
    from orion_vgpu.client.launcher import run_command

    try:
        return run_command(command, args.vgpu, args.gmem, args.ratio, args.cross_node)
    except ValueError as exc:  # the launcher's user errors (e.g. command not found)
        raise UserError(str(exc)) from None


def _user(args: argparse.Namespace) -> int:
    from orion_vgpu.tools import users

    return users.run(args)


def _version(_args: argparse.Namespace) -> int:
    print(
        f"orion-vgpu {__version__} (api_version={API_VERSION},data_version={DATA_VERSION}, "
        f"protocol {PROTOCOL_VERSION})"
    )
    return 0


# --------------------------------------------------------------------------- arguments


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _percent(text: str) -> int:
    value = _positive_int(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"expected a percentage 1..100, got {text!r}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port 1..65535, got {text!r}")
    return value


def _index(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _add_controller(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--listen", default="0.0.0.0:9123", help="HOST:PORT to serve on (default %(default)s)")
    p.add_argument("--data-dir", type=Path, help="state: database and pool_token (default /var/lib/orion/controller, or ~/.orion/controller when not root)")
    p.add_argument("--db", help="SQLAlchemy URL, e.g. postgresql://... (default SQLite in the data dir)")
    p.add_argument("--lease-s", type=float, default=30.0, help="seconds a client has to open its sessions (default %(default)s)")
    p.add_argument("--heartbeat-interval-s", type=float, default=2.0, help="server heartbeat interval (default %(default)s)")
    p.add_argument("--policy", choices=("binpack", "spread"), default="binpack", help="default placement policy")
    p.add_argument("--log-file", type=Path, help="log file (default /var/log/orion/controller.log, or ~/.orion/log/controller/)")
    p.add_argument("--auth", choices=("required", "open"), default="required", help="required: allocations need a user token (ORION_TOKEN); open: recorded as the OS user the client reports (default %(default)s)")
    p.add_argument("--public-read", action=argparse.BooleanOptionalAction, default=None, help="pool summary, dashboard pages and /metrics readable without signing in (default: only with --auth open)")
    p.add_argument("--admin-password", help="admin's password (default env ORION_ADMIN_PASSWORD, else generated at first start and printed once)")
    return _controller


def _add_server(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--config", type=Path, help="server.conf (default $ORION_SERVER_CONF, ~/.orion/server.conf, /etc/orion/server.conf)")
    return _server


def _add_up(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--listen", default="127.0.0.1:9123", help="controller HOST:PORT (default %(default)s)")
    p.add_argument("--data-dir", type=Path, help="state, generated server.conf and logs (default ~/.orion/up)")
    p.add_argument("--emulated-gpus", help="COUNTxSIZE GPUs on the CPU when there is no NVIDIA GPU (default 2x16GiB)")
    p.add_argument("--vgpu-count", type=_positive_int, default=4, help="vGPUs per GPU (default %(default)s)")
    p.add_argument("--server-port", type=_port, default=DEFAULT_SERVER_PORT, help="oriond data-plane port (default %(default)s)")
    return _up


def _add_check(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("kind", choices=("runtime", "install"), help="check the running system or the installation")
    p.add_argument("role", choices=("server", "client"), help="which side to check")
    p.add_argument("--config", type=Path, help="server.conf to check (server only; default: the running oriond's)")
    return _check


def _add_shm(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("-i", "--index", type=_index, default=0, help="creates DIR/orionsock<N> (default 0)")
    p.add_argument("-s", "--size", type=_positive_int, default=128, help="size in MiB (default %(default)s)")
    p.add_argument("-d", "--dir", type=Path, default=Path("/dev/shm"), help="directory (default %(default)s)")
    return _shm


def _add_smi(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--controller", help="HOST:PORT (default ORION_CONTROLLER, else client.conf)")
    p.add_argument("--json", action="store_true", help="print the pool and allocations as JSON")
    return _smi


def _add_run(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--vgpu", type=_positive_int, help="number of vGPUs (ORION_VGPU, default 1)")
    p.add_argument("--gmem", type=_positive_int, help="MiB per vGPU (ORION_GMEM)")
    p.add_argument("--ratio", type=_percent, help="%% of a GPU's compute per vGPU (ORION_RATIO)")
    p.add_argument("--cross-node", action="store_true", help="allow vGPUs on several nodes (ORION_CROSS_NODE=1)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    return _run


def _add_user(p: argparse.ArgumentParser) -> Handler:
    from orion_vgpu.tools.users import add_arguments

    add_arguments(p)
    return _user


def _add_version(_p: argparse.ArgumentParser) -> Handler:
    return _version


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Handler]]] = {
    "controller": ("run the pool's controller (scheduler, REST API, dashboard)", _add_controller),
    "server": ("run the GPU node daemon (same as oriond)", _add_server),
    "up": ("start a controller and a server on this machine, in the foreground", _add_up),
    "check": ("diagnose the installation or the running system (same as orion-check)", _add_check),
    "shm": ("create /dev/shm/orionsock<N> for containers (same as orion-shm)", _add_shm),
    "smi": ("show the pool's GPUs, vGPUs and who holds them (same as orion-smi)", _add_smi),
    "run": ("run a command on vGPUs: orion run --vgpu 1 -- python train.py", _add_run),
    "user": ("manage users, tokens and limits (admin token: ORION_TOKEN or --token)", _add_user),
    "version": ("print versions", _add_version),
}


def build_parser(prog: str = "orion") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="orion-vgpu: GPU pooling for unmodified PyTorch programs")
    sub = parser.add_subparsers(dest="command_name", metavar="COMMAND", required=True)
    for name, (summary, add) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary)
        p.set_defaults(func=add(p))
    return parser


def _single(prog: str, name: str) -> argparse.ArgumentParser:
    summary, add = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=prog, description=summary)
    parser.set_defaults(func=add(parser))
    return parser


# --------------------------------------------------------------------------- entry points


def _execute(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UserError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    return _execute(build_parser(), argv)


def oriond_main(argv: Sequence[str] | None = None) -> int:
    return _execute(_single("oriond", "server"), argv)


def check_main(argv: Sequence[str] | None = None) -> int:
    return _execute(_single("orion-check", "check"), argv)


def shm_main(argv: Sequence[str] | None = None) -> int:
    return _execute(_single("orion-shm", "shm"), argv)


def smi_main(argv: Sequence[str] | None = None) -> int:
    return _execute(_single("orion-smi", "smi"), argv)


if __name__ == "__main__":
    sys.exit(main())
