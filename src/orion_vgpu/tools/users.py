"""`orion user …`: manage the controller's users, tokens and limits from a shell.

Talks to ``/api/v1/users`` with an admin's token (``--token``, else ORION_TOKEN / the
``[client] token`` of client.conf). Secrets the controller generates (passwords,
tokens) are printed once on stdout, alone on their line, so scripts can capture them;
everything else goes to stderr.

    orion user login [--user admin]          # password -> a new token for yourself
    orion user list
    orion user add alice [--role admin] [--password-stdin] [--max-vgpus 2] [--max-gmem 16384]
    orion user token alice [--label laptop] | --list | --revoke ID
    orion user limit alice [--max-vgpus N|none] [--max-gmem MIB|none]
    orion user passwd alice [--password-stdin]
    orion user del alice
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from orion_vgpu.config import UserError


def _limit(text: str) -> int | None:
    if text.strip().lower() in ("none", "unlimited", "-"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, or 'none', got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Sub-commands of `orion user` (cheap: no imports beyond argparse)."""
    p.add_argument("--controller", help="HOST:PORT (default ORION_CONTROLLER, else client.conf)")
    p.add_argument("--token", help="an admin's API token (default ORION_TOKEN, else client.conf)")
    sub = p.add_subparsers(dest="user_action", metavar="ACTION", required=True)
    login = sub.add_parser("login", help="sign in with a password; prints a new API token once")
    login.add_argument("--user", default="admin", help="user name (default %(default)s)")
    login.add_argument("--label", default="orion user login", help="label of the new token")
    login.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    ls = sub.add_parser("list", help="users, roles, limits, what they hold, their tokens")
    ls.add_argument("--json", action="store_true", help="print the API's JSON")
    add = sub.add_parser("add", help="create a user (prints a generated password once)")
    add.add_argument("name")
    add.add_argument("--role", choices=("user", "admin"), default="user")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add.add_argument("--max-vgpus", type=_limit, help="vGPUs the user may hold at once")
    add.add_argument("--max-gmem", type=_limit, help="MiB of GPU memory the user may hold")
    tok = sub.add_parser("token", help="create (default), list or revoke a user's API tokens")
    tok.add_argument("name")
    tok.add_argument("--label", default="", help="what the token is for, e.g. 'laptop'")
    what = tok.add_mutually_exclusive_group()
    what.add_argument("--list", action="store_true", help="list the user's tokens")
    what.add_argument("--revoke", metavar="ID", help="revoke the token with this id")
    lim = sub.add_parser("limit", help="set per-user limits ('none' removes one)")
    lim.add_argument("name")
    lim.add_argument("--max-vgpus", type=_limit, default=argparse.SUPPRESS)
    lim.add_argument("--max-gmem", type=_limit, default=argparse.SUPPRESS, help="MiB")
    pw = sub.add_parser("passwd", help="set a password (prints a generated one once)")
    pw.add_argument("name")
    pw.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    rm = sub.add_parser("del", help="delete a user and their tokens")
    rm.add_argument("name")


class UsersApi:
    """The few calls `orion user` makes; raises UserError with the controller's reason."""

    def __init__(self, addr: str, token: str | None, timeout: float = 10.0) -> None:
        import httpx

        self.addr = addr
        self._http = httpx
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(base_url=f"http://{addr}/api/v1", timeout=timeout,
                                    headers=headers)  # fmt: skip

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            r = self._client.request(method, path, json=body)
        except self._http.TransportError as exc:
            raise UserError(f"cannot reach the Orion Controller at {self.addr} ({exc}); set "
                            "--controller or ORION_CONTROLLER") from None  # fmt: skip
        try:
            data = r.json()
        except ValueError:
            data = {"detail": r.text[:200]}
        if r.status_code >= 400:
            detail = data.get("detail") if isinstance(data, dict) else data
            raise UserError(f"{method} {path}: HTTP {r.status_code}: {detail}")
        return data

    def close(self) -> None:
        self._client.close()


def _read_password(stdin: TextIO) -> str:
    text = stdin.readline().rstrip("\r\n")
    if not text:
        raise UserError("no password on stdin")
    return text


def _ask() -> str:
    import getpass

    return getpass.getpass("Password: ")


def _limits_text(u: dict[str, Any]) -> str:
    v = u.get("max_vgpus")
    m = u.get("max_gmem_mib")
    return f"{'∞' if v is None else v} vGPU / {'∞' if m is None else f'{m} MiB'}"


def _print_users(users: list[dict[str, Any]], out: TextIO) -> None:
    rows = [("USER", "ROLE", "LIMITS", "HOLDS", "TOKENS")]
    for u in users:
        held = u.get("holding", {})
        tokens = ", ".join(f"{t['id']}({t['label']})" if t.get("label") else t["id"]
                           for t in u.get("tokens", [])) or "-"  # fmt: skip
        rows.append((u["name"], u["role"], _limits_text(u),
                     f"{held.get('vgpus', 0)} vGPU / {held.get('gmem_mib', 0)} MiB", tokens))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=out)


def run(args: argparse.Namespace, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout,
        err: TextIO = sys.stderr) -> int:  # fmt: skip
    from orion_vgpu.config import load_client_config

    cfg = load_client_config()
    token = args.token or cfg.token
    if not token and args.user_action != "login":
        raise UserError("`orion user` needs an admin's token: pass --token or set ORION_TOKEN "
                        "(get one with `orion user login`, or on the dashboard's Users page)")  # fmt: skip
    api = UsersApi(args.controller or cfg.controller_addr, None if args.user_action == "login" else token)
    try:
        return _dispatch(api, args, stdin, out, err)
    finally:
        api.close()


def _dispatch(api: UsersApi, args: argparse.Namespace, stdin: TextIO, out: TextIO,
              err: TextIO) -> int:  # fmt: skip
    action, name = args.user_action, getattr(args, "name", None)
    if action == "login":
        password = _read_password(stdin) if args.password_stdin or not stdin.isatty() else _ask()
        t = api.call("POST", "/login", {"username": args.user, "password": password,
                                        "label": args.label})  # fmt: skip
        print(f"token {t['id']} for {t['user']} (shown once; export ORION_TOKEN=...):", file=err)
        print(t["token"], file=out)
    elif action == "list":
        users = api.call("GET", "/users")
        if args.json:
            print(json.dumps(users, indent=2), file=out)
        else:
            _print_users(users, out)
    elif action == "add":
        body: dict[str, Any] = {"name": name, "role": args.role,
                                "max_vgpus": args.max_vgpus, "max_gmem_mib": args.max_gmem}  # fmt: skip
        if args.password_stdin:
            body["password"] = _read_password(stdin)
        user = api.call("POST", "/users", body)
        print(f"created user {name} ({args.role}, limits {_limits_text(user)})", file=err)
        if "password" in user:
            print(f"password of {name} (shown once):", file=err)
            print(user["password"], file=out)
    elif action == "token":
        if args.list:
            for t in api.call("GET", f"/users/{name}/tokens"):
                used = t.get("last_used_at")
                print(f"{t['id']}  {t.get('label') or '-'}  {t['prefix']}  "
                      f"{'never used' if used is None else 'used'}", file=out)  # fmt: skip
        elif args.revoke:
            api.call("DELETE", f"/users/{name}/tokens/{args.revoke}")
            print(f"revoked token {args.revoke} of {name}", file=err)
        else:
            t = api.call("POST", f"/users/{name}/tokens", {"label": args.label})
            print(f"token {t['id']} for {name} (shown once; use it as ORION_TOKEN):", file=err)
            print(t["token"], file=out)
    elif action == "limit":
        patch = {}
        if "max_vgpus" in args:
            patch["max_vgpus"] = args.max_vgpus
        if "max_gmem" in args:
            patch["max_gmem_mib"] = args.max_gmem
        if not patch:
            raise UserError("give --max-vgpus and/or --max-gmem (a number, or 'none')")
        user = api.call("PATCH", f"/users/{name}", patch)
        print(f"limits of {name}: {_limits_text(user)}", file=err)
    elif action == "passwd":
        pbody: dict[str, Any] = ({"password": _read_password(stdin)} if args.password_stdin
                                 else {"new_password": True})  # fmt: skip
        user = api.call("PATCH", f"/users/{name}", pbody)
        if "password" in user:
            print(f"new password of {name} (shown once):", file=err)
            print(user["password"], file=out)
        else:
            print(f"password of {name} changed", file=err)
    elif action == "del":
        api.call("DELETE", f"/users/{name}")
        print(f"deleted user {name}", file=err)
    return 0
