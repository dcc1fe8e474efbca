"""Run the controller in the foreground: ``orion controller`` and ``python -m orion_vgpu.controller``."""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

from orion_vgpu import DEFAULT_CONTROLLER_PORT
from orion_vgpu.controller.settings import ControllerSettings, default_data_dir

log = logging.getLogger("orion.controller")

DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_CONTROLLER_PORT}"


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT``, ``:PORT`` or ``PORT`` -> (host, port)."""
    text = listen.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or "0.0.0.0"
    try:
        number = int(port)
    except ValueError:
        raise ValueError(
            f"bad listen address {listen!r}: expected HOST:PORT, e.g. 0.0.0.0:9123"
        ) from None
    if not 0 <= number <= 65535:
        raise ValueError(f"bad listen address {listen!r}: port must be 0..65535")
    return host, number


def setup_logging(log_file: Path | None) -> None:
    """One line per event on stderr (and the log file); the token never gets here."""
    logger = logging.getLogger("orion")
    if getattr(logger, "_orion_controller_configured", False):
        return
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger._orion_controller_configured = True  # type: ignore[attr-defined]


def run_controller(
    listen: str = DEFAULT_LISTEN,
    data_dir: Path | None = None,
    db_url: str | None = None,
    pool_token: str | None = None,
    lease_s: float = 30.0,
    heartbeat_interval_s: float = 2.0,
    log_file: Path | None = None,
    policy: str = "binpack",
    auth: str = "required",
    public_read: bool | None = None,
    admin_password: str | None = None,
    sample_interval_s: float = 60.0,
) -> None:
    """Serve the controller until interrupted. Raises ValueError/SettingsError on bad input.

    ``auth="required"``: allocations need a user token; ``"open"``: they may come without
    one (recorded as the OS user the client reports). ``admin_password`` (else env
    ORION_ADMIN_PASSWORD) sets the admin's password; without either, the first start
    prints a generated one on stdout, once.
    """
    import uvicorn

    from orion_vgpu.controller.app import create_app

    host, port = parse_listen(listen)
    setup_logging(log_file)
    settings = ControllerSettings(
        data_dir=Path(data_dir) if data_dir else default_data_dir(),
        db_url=db_url,
        pool_token=pool_token,
        lease_s=lease_s,
        heartbeat_interval_s=heartbeat_interval_s,
        policy=policy,
        auth=auth,
        public_read=public_read,
        admin_password=admin_password,
        sample_interval_s=sample_interval_s,
    )
    app = create_app(settings)
    db = db_url.split("://", 1)[0] + "://…" if db_url else str(settings.data_dir / "controller.db")
    shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown
    reads = "open" if settings.reads_open else "need a token or sign-in"
    print(
        f"orion controller {app.version} API http://{shown}:{port}/api/v1 "
        f"(listening on {host}:{port}; data {settings.data_dir}; db {db}; "
        f"pool token from {app.state.token_source})",
        flush=True,
    )
    print(
        f"orion controller dashboard http://{shown}:{port}/ (auth {settings.auth}: allocations "
        f"{'need a user token' if settings.auth == 'required' else 'may come without a token'}; "
        f"reads {reads})",
        flush=True,
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    uvicorn.Server(config).run()
