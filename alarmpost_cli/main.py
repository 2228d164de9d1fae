"""``alarmpost``: one command for every part of the system.

Each subcommand imports only what it needs, so ``alarmpost edge`` on a post stays small.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

log = logging.getLogger("alarmpost")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_until_signal(main: Callable[[], Coroutine[Any, Any, int]],
                     on_stop: Callable[[], None]) -> int:
    """Run ``main``; SIGINT/SIGTERM call ``on_stop`` once, a second Ctrl-C exits at once."""

    async def wrapper() -> int:
        loop = asyncio.get_running_loop()
        stops = 0

        def handle() -> None:
            nonlocal stops
            stops += 1
            if stops == 1:
                log.info("stopping (Ctrl-C again to exit at once)")
                on_stop()
            else:
                raise SystemExit(130)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, handle)
        return await main()

    return asyncio.run(wrapper())


# ---------------------------------------------------------------------------- subcommands
def cmd_edge(args: argparse.Namespace) -> int:
    from edge.agent import EdgeAgent
    from edge.config import load_edge_config
    from protocol.settings import redacted

    config = load_edge_config(args.config)
    log.info("edge config: %s", redacted(config))
    agent = EdgeAgent(config)

    async def main() -> int:
        await agent.run()
        return 0

    return run_until_signal(main, agent.stop)


def cmd_server(args: argparse.Namespace) -> int:
    from protocol.settings import ConfigError, redacted
    from server.app import CentralServer
    from server.config import load_server_config

    if args.config is None:
        raise ConfigError("alarmpost server needs --config FILE (the server's TOML file)")
    config = load_server_config(args.config)
    log.info("server config: %s", redacted(config))
    holder: list[CentralServer] = []

    async def main() -> int:
        holder.append(CentralServer(config))
        await holder[0].run()
        return 0

    def stop() -> None:
        if holder:
            holder[0].stop()

    return run_until_signal(main, stop)


def cmd_server_user(args: argparse.Namespace) -> int:
    from alarmpost_cli.users import user_command

    return user_command(args)


def cmd_sim(args: argparse.Namespace) -> int:
    from firmware_sim.control import SimOptions, run_sim

    return run_sim(SimOptions(
        deployment=args.deployment, posts=args.posts, only=tuple(args.only),
        press_every=args.press_every, control=args.control, seed=args.seed,
    ))


def cmd_broker(args: argparse.Namespace) -> int:
    import time

    from alarmpost_cli.harness import Mosquitto
    from provisioning.deployment import open_deployment

    dep = open_deployment(Path(args.deployment))
    broker = Mosquitto.for_deployment(dep)
    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    # SIGHUP re-reads the password and ACL files (new or revoked posts); SIGTERM stops.
    signal.signal(signal.SIGHUP, lambda signum, frame: broker.reload())
    signal.signal(signal.SIGTERM, on_term)
    broker.start()
    print(f"mosquitto running on 127.0.0.1:{dep.broker_port} (log: {broker.log_path}); "
          "Ctrl-C stops it, SIGHUP reloads its password and ACL files", file=sys.stderr)
    try:
        while broker.running and not stopping:
            time.sleep(0.2)
        if stopping:
            return 0
        print("mosquitto exited; see its log", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        broker.stop()


TLS_PORT = 8883  # the broker's port in a TLS deployment unless --broker-port says otherwise


def _admin_password(args: argparse.Namespace) -> tuple[str, bool]:
    """(password, generated): read from stdin with --admin-password-stdin, else a new one."""
    from server.web.auth import MAX_PASSWORD, MIN_PASSWORD

    if not args.admin_password_stdin:
        from provisioning.credentials import new_secret

        return new_secret(15), True
    password = sys.stdin.readline().rstrip("\r\n")
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        from protocol.settings import ConfigError

        raise ConfigError(f"the admin password read from stdin must have {MIN_PASSWORD} to "
                          f"{MAX_PASSWORD} characters; nothing was written")
    return password, False


def _provision_init(args: argparse.Namespace) -> int:
    from protocol.settings import ConfigError
    from provisioning import deployment as d
    from server.web.auth import UserError
    from server.web.users import add_user

    tls = not args.plain_tcp
    if args.insecure_open and tls:
        raise ConfigError("--insecure-open only applies with --plain-tcp (TLS needs no opening)")
    if not tls and not d.is_loopback(args.listen) and not args.insecure_open:
        raise ConfigError(
            f"refusing plain TCP on {args.listen}: every post's and the server's password would "
            "cross the network in clear. Leave out --plain-tcp (TLS is the default), listen on "
            "127.0.0.1, or add --insecure-open if this network is really private")
    admin_password, generated = _admin_password(args)
    port = args.broker_port or (TLS_PORT if tls else None)
    dep = d.create(Path(args.dir), d.district_posts(args.posts), broker_port=port,
                   http_port=args.http_port, hardware_backend=args.hardware,
                   listen=args.listen, broker_host=args.broker_host, tls=tls,
                   insecure_open=args.insecure_open)
    try:
        add_user(dep.server_config, args.admin_name, "admin", admin_password, actor="provision")
    except UserError as exc:
        raise ConfigError(f"the deployment was written to {dep.directory}, but its admin account "
                          f"was not: {exc}; add one with `alarmpost server user add --config "
                          f"{dep.server_config} NAME --role admin`") from None
    transport = "TLS" if tls else "plain TCP"
    print(f"deployment written to {dep.directory}")
    print(f"  broker:  alarmpost broker --deployment {dep.directory}   ({transport}; listens on "
          f"{dep.listen}:{dep.broker_port}; posts connect to {dep.broker_host})")
    if tls:
        print(f"  CA:      {dep.ca_file} (its key ca.key beside it: keep it private); "
              "post and team configs trust it through the ca.crt beside them")
    print(f"  server:  alarmpost server --config {dep.server_config}")
    print(f"  console: admin account {args.admin_name!r} at "
          f"http://127.0.0.1:{dep.http_port}/console/")
    if generated:
        print(f"  admin password (shown only now, stored hashed): {admin_password}")
    for post in dep.posts[:3]:
        print(f"  post:    alarmpost edge --config {dep.post_config(post.id)}")
    if len(dep.posts) > 3:
        print(f"  ... {len(dep.posts) - 3} more post configs in {dep.directory / 'posts'}")
    return 0


def cmd_provision(args: argparse.Namespace) -> int:
    from provisioning import deployment as d

    if args.action == "init":
        return _provision_init(args)
    dep = d.open_deployment(Path(args.dir))
    spec = d.PostSpec(id=args.id, name=args.name or args.id, school=args.school,
                      address=args.address, lat=args.lat, lon=args.lon)
    path = d.add_post(dep, spec, hardware_backend=args.hardware)
    print(f"post {args.id} provisioned: copy {path} to the post (it holds the post's password)"
          + (f", with {path.parent / 'ca.crt'} beside it" if dep.tls else ""))
    print("then send SIGHUP to the broker and the server so they pick the new post up")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from alarmpost_cli.demo import run_demo

    return run_demo(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from bench import run_bench

    return int(run_bench(args.name, args.json, args.options))


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alarmpost",
        description="One-button school alarm posts: edge agent, central server, simulator, "
        "provisioning and benchmarks. Start with `alarmpost demo`.",
    )
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"], help="default: info")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="broker, server and a simulated fleet with a live status table",
                       description="Generate a throw-away deployment, start Mosquitto, the server "
                       "and simulated posts that press their buttons now and then; show a live "
                       "status table until Ctrl-C.")
    p.add_argument("--posts", type=int, default=20, help="simulated posts (default 20)")
    p.add_argument("--press-every", type=float, default=8.0, metavar="S",
                   help="mean seconds between presses across the fleet (default 8)")
    p.add_argument("--headless", action="store_true", help="no table; print a summary at the end")
    p.add_argument("--duration", type=float, default=0, metavar="S",
                   help="stop after S seconds (default: run until Ctrl-C)")
    p.add_argument("--dir", type=Path, help="where to write the deployment (default: a temp dir)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("server", help="run the central server",
                       description="Ingest events from every post, keep incidents, supervise "
                       "posts and serve the HTTP API. SIGHUP reloads the post registry.")
    p.add_argument("--config", type=Path, help="server TOML file (required)")
    p.set_defaults(func=cmd_server)
    ssub = p.add_subparsers(dest="server_action", metavar="ACTION")
    q = ssub.add_parser("user", help="console accounts (operators, supervisors, ...)")
    usub = q.add_subparsers(dest="user_action", required=True, metavar="ACTION")
    u = usub.add_parser("add", help="create a console account",
                        description="Create a console account; the password is asked for, or "
                        "read from standard input with --password-stdin.")
    u.add_argument("--config", dest="user_config", type=Path, help="server TOML file")
    u.add_argument("name")
    u.add_argument("--role", required=True,
                   choices=["operator", "supervisor", "technician", "admin"])
    u.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    u.set_defaults(func=cmd_server_user)
    u = usub.add_parser("list", help="list console accounts")
    u.add_argument("--config", dest="user_config", type=Path, help="server TOML file")
    u.set_defaults(func=cmd_server_user)

    p = sub.add_parser("edge", help="run the agent of one alarm post",
                       description="Read the button, drive strobe and siren, send events.")
    p.add_argument("--config", required=True, type=Path, help="the post's TOML file")
    p.set_defaults(func=cmd_edge)

    p = sub.add_parser("sim", help="run simulated posts (real agents on mock GPIO pins)",
                       description="Run simulated posts in one process. Presses come at random "
                       "(--press-every) and/or from commands on stdin (--control): "
                       "'press ID [HOLD_MS] [BOUNCES]', 'brush ID', 'quit'. Events are printed "
                       "on stdout as JSON lines.")
    p.add_argument("--deployment", required=True, type=Path, help="deployment directory")
    p.add_argument("--posts", type=int, help="only the first N posts")
    p.add_argument("--only", nargs="*", default=[], help="only these post ids")
    p.add_argument("--press-every", type=float, default=0, metavar="S",
                   help="mean seconds between random presses (0: none)")
    p.add_argument("--control", action="store_true", help="read commands from stdin")
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(func=cmd_sim)

    p = sub.add_parser("broker", help="run Mosquitto for a deployment (foreground)")
    p.add_argument("--deployment", required=True, type=Path)
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("provision", help="create a deployment or add a post to one")
    psub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = psub.add_parser("init", help="write a new deployment directory",
                        description="The deployment's own certificate authority, the broker's "
                        "and the server's certificates, a broker config with a TLS listener, "
                        "password and ACL files, a server config with a fresh API token, a "
                        "first admin console account, a post registry and one config per post.")
    q.add_argument("dir", help="new directory")
    q.add_argument("--posts", type=int, default=20, help="posts to create (default 20)")
    q.add_argument("--broker-port", type=int,
                   help=f"default: {TLS_PORT} with TLS, a free port with --plain-tcp")
    q.add_argument("--http-port", type=int, help="default: a free port")
    q.add_argument("--hardware", choices=["gpio", "mock"], default="mock",
                   help="backend written into the post configs (default mock)")
    q.add_argument("--listen", default="127.0.0.1", metavar="ADDR",
                   help="address the broker listens on (default 127.0.0.1; 0.0.0.0 for all)")
    q.add_argument("--broker-host", metavar="HOST",
                   help="address or name the posts connect to (default: the --listen address); "
                   "the broker's certificate names it")
    q.add_argument("--plain-tcp", action="store_true",
                   help="no TLS: a plain TCP listener, on a loopback address only")
    q.add_argument("--insecure-open", action="store_true",
                   help="with --plain-tcp: allow a --listen address other than loopback "
                   "(passwords then cross the network in clear)")
    q.add_argument("--admin-name", default="admin", help="the first console account (admin)")
    q.add_argument("--admin-password-stdin", action="store_true",
                   help="read its password from stdin (default: generate one and show it once)")
    q = psub.add_parser("post", help="add one post: account, registry entry, config file")
    q.add_argument("dir", help="the deployment directory")
    q.add_argument("--id", required=True)
    q.add_argument("--name", default="")
    q.add_argument("--school", default="")
    q.add_argument("--address", default="")
    q.add_argument("--lat", type=float, required=True)
    q.add_argument("--lon", type=float, required=True)
    q.add_argument("--hardware", choices=["gpio", "mock"], default="gpio")
    p.set_defaults(func=cmd_provision)

    from alarmpost_cli.patrol import add_parser as add_patrol_parser

    add_patrol_parser(sub)  # alarmpost patrol team add/list/remove

    p = sub.add_parser("bench", help="run a benchmark (see bench/)",
                       description="Benchmarks print figures; with --json the last line of output "
                       "is one JSON object.")
    p.add_argument("name", help="benchmark name, e.g. alarm-path")
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    p.add_argument("options", nargs="*", help="KEY=VALUE options for the benchmark")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # KEY=VALUE benchmark options may follow --json too (argparse won't fill a positional list
    # after a flag): collect the leftovers for `bench`, refuse them anywhere else.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command != "bench" or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.options = [*args.options, *extra]
    setup_logging(args.log_level)
    from alarmpost_cli.harness import HarnessError
    from protocol.settings import ConfigError
    from server.storage import DatabaseError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, HarnessError, DatabaseError) as exc:
        print(f"alarmpost: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
