"""``alarmpost server user add|list``: console accounts from the command line."""

from __future__ import annotations

import argparse
import getpass
import sys

from protocol.settings import ConfigError


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        raise ConfigError("the two passwords differ; nothing was changed")
    return first


def user_command(args: argparse.Namespace) -> int:
    import sqlite_utils

    from server.config import load_server_config
    from server.console.auth import Accounts, UserError

    path = args.user_config or args.config
    if path is None:
        raise ConfigError("give the server's config: alarmpost server user ... --config server.toml")
    config = load_server_config(path)
    db = sqlite_utils.Database(config.database.path)
    db.enable_wal()
    try:
        accounts = Accounts(db)
        if args.user_action == "list":
            for row in accounts.users():
                state = " (disabled)" if row["disabled"] else ""
                print(f"{row['name']}\t{row['role']}{state}")
            return 0
        try:
            accounts.add_user(args.name, args.role, _password(args))
        except UserError as exc:
            print(f"alarmpost: {exc}", file=sys.stderr)
            return 2
        print(f"user {args.name} ({args.role}) created; log in at the console: "
              f"http://{config.http.host}:{config.http.port}/console/")
        return 0
    finally:
        db.close()


def create_demo_user(server_config: object, name: str = "demo") -> tuple[str, str]:
    """An operator account with a fresh random password for ``alarmpost demo``."""
    import secrets

    import sqlite_utils

    from server.config import load_server_config
    from server.console.auth import Accounts

    config = load_server_config(server_config)  # type: ignore[arg-type]
    password = secrets.token_urlsafe(9)
    db = sqlite_utils.Database(config.database.path)
    try:
        db.enable_wal()
        Accounts(db).add_user(name, "operator", password, actor="demo")
    finally:
        db.close()
    return name, password
