"""``python -m orion_vgpu.controller``: run the controller without the ``orion`` CLI."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orion_vgpu.controller.main import DEFAULT_LISTEN, run_controller
from orion_vgpu.controller.settings import AUTH_MODES, SettingsError
from orion_vgpu.controller.store import StoreError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m orion_vgpu.controller", description="orion-vgpu controller"
    )
    p.add_argument(
        "--listen", default=DEFAULT_LISTEN, help="HOST:PORT to serve on (default %(default)s)"
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="state directory (default /var/lib/orion/controller as root, else ~/.orion/controller)",
    )
    p.add_argument(
        "--db", dest="db_url", default=None, help="SQLAlchemy URL (default SQLite in the data dir)"
    )
    p.add_argument(
        "--pool-token",
        default=None,
        help="pool secret for servers (default env ORION_POOL_TOKEN, else <data-dir>/pool_token)",
    )
    p.add_argument(
        "--lease-s",
        type=float,
        default=30.0,
        help="seconds a client has to open its sessions (default %(default)s)",
    )
    p.add_argument(
        "--heartbeat-interval-s",
        type=float,
        default=2.0,
        help="server heartbeat interval; 3 missed = node down (default %(default)s)",
    )
    p.add_argument(
        "--policy",
        choices=("binpack", "spread"),
        default="binpack",
        help="default placement policy",
    )
    p.add_argument("--log-file", type=Path, default=None, help="also write the log here")
    add_access_arguments(p)
    return p


def add_access_arguments(p: argparse.ArgumentParser) -> None:
    """Flags for who may do what; shared with `orion controller`."""
    p.add_argument(
        "--auth",
        choices=AUTH_MODES,
        default="required",
        help="required: allocations need a user token (ORION_TOKEN); open: without one they "
        "are recorded as the OS user the client reports (default %(default)s)",
    )
    p.add_argument(
        "--public-read",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pool summary, dashboard pages and /metrics readable without signing in "
        "(default: only with --auth open)",
    )
    p.add_argument(
        "--admin-password",
        default=None,
        help="password of the admin user (default env ORION_ADMIN_PASSWORD, else generated "
        "at first start and printed once; prefer the env: flags show in ps)",
    )
    p.add_argument(
        "--sample-interval-s",
        type=float,
        default=60.0,
        help="seconds between usage samples for the dashboard charts (default %(default)s)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_controller(
            listen=args.listen,
            data_dir=args.data_dir,
            db_url=args.db_url,
            pool_token=args.pool_token,
            lease_s=args.lease_s,
            heartbeat_interval_s=args.heartbeat_interval_s,
            log_file=args.log_file,
            policy=args.policy,
            auth=args.auth,
            public_read=args.public_read,
            admin_password=args.admin_password,
            sample_interval_s=args.sample_interval_s,
        )
    except (ValueError, SettingsError, StoreError) as exc:
        print(f"orion controller: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
