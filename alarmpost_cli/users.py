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
    from server.config import load_server_config
    from server.web.auth import UserError
    from server.web.users import add_user, list_users

    path = args.user_config or args.config
    if path is None:
        raise ConfigError("give the server's config: alarmpost server user ... --config server.toml")
    if args.user_action == "list":
        for row in list_users(path):
            state = " (disabled)" if row["disabled"] else ""
            print(f"{row['name']}\t{row['role']}{state}")
        return 0
    try:
        add_user(path, args.name, args.role, _password(args))
    except UserError as exc:
        print(f"alarmpost: {exc}", file=sys.stderr)
        return 2
    config = load_server_config(path)
    print(f"user {args.name} ({args.role}) created; log in at the console: "
          f"http://{config.http.host}:{config.http.port}/console/")
    return 0
