"""dashsos run | trigger | test | cancel | status | check-config | sign-command | dispatch |
verify"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from dashsos import __version__, config
from dashsos.triggers import control_socket


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["verify"]:  # needs no config: it runs on a desk as well
        from dashsos.evidence.signing import main as verify

        return verify(args_list[1:])
    parser = argparse.ArgumentParser(prog="dashsos", description="Emergency recorder for cars.")
    parser.add_argument("--version", action="version", version=f"dashsos {__version__}")
    parser.add_argument("--config", type=Path, default=config.DEFAULT_PATH,
                        help=f"config file (default {config.DEFAULT_PATH})")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run the daemon")
    commands.add_parser("trigger", help="open an incident (or extend the open one)")
    commands.add_parser("test", help="open a test incident (MSD testCall set)")
    cancel = commands.add_parser("cancel", help="cancel the open incident (within the grace "
                                                "window)")
    cancel.add_argument("--pin", help="a PIN (the duress PIN answers like a cancel)")
    status = commands.add_parser("status", help="show the daemon's status")
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    commands.add_parser("check-config", help="validate the config and print it in effect")
    commands.add_parser("dispatch", help="run the reference dispatcher (the other end of "
                                         "the call)")
    commands.add_parser("verify", help="check an incident's signature and files: "
                                       "dashsos verify DIR [--trust FINGERPRINT]")
    signer = commands.add_parser("sign-command",
                                 help="print a signed MQTT command for this car (fleet side)")
    signer.add_argument("name", choices=("trigger", "cancel", "test_call", "status"))
    signer.add_argument("--key-file", type=Path, help="default: commands.key_file")
    signer.add_argument("--args", default="{}", help="JSON object of arguments")
    for sub in commands.choices.values():
        sub.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                         help="config file")
    args = parser.parse_args(argv)

    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        print(f"dashsos: config error:\n{exc}", file=sys.stderr)
        return 2

    if args.command == "check-config":
        print(config.to_toml(cfg), end="")
        return 0
    if args.command == "sign-command":
        return _sign(cfg, args.name, args.key_file, args.args)
    if args.command == "run":
        return _run(cfg)
    if args.command == "dispatch":
        return _dispatch(cfg)
    request = {"cmd": args.command}
    if getattr(args, "pin", None):
        request["pin"] = args.pin
    try:
        reply = control_socket.request(Path(cfg.control.socket), request)
    except (OSError, ValueError) as exc:
        print(f"dashsos: cannot reach the daemon at {cfg.control.socket}: {exc}",
              file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print(f"dashsos: {reply.get('error')}", file=sys.stderr)
        return 1
    if args.command == "status":
        if args.json:
            print(json.dumps(reply["status"], indent=2))
        else:
            print(format_status(reply["status"]))
    else:
        print(json.dumps(reply, indent=2))
    return 0


def _sign(cfg: config.Config, name: str, key_file: Path | None, args_json: str) -> int:
    from dashsos.fleet.commands import load_key, sign
    from dashsos.fleet.topics import Topics

    path = key_file or Path(cfg.commands.key_file)
    try:
        key = load_key(path)
        arguments = json.loads(args_json)
        if not isinstance(arguments, dict):
            raise ValueError("--args must be a JSON object")
    except ValueError as exc:
        print(f"dashsos: {exc}", file=sys.stderr)
        return 2
    topic = Topics.for_vehicle(cfg.mqtt.base_topic, cfg.vehicle.id)
    print(f"# mosquitto_pub -t '{topic.base}/cmd/{name}' -q 1 -m \\", file=sys.stderr)
    print(sign(cfg.vehicle.id, key, name, arguments).decode())
    return 0


def _run(cfg: config.Config) -> int:
    from dashsos import log
    from dashsos.app import App

    log.setup(cfg.log.level)
    return asyncio.run(App(cfg).run())


def _dispatch(cfg: config.Config) -> int:
    from dashsos import log
    from dashsos.dispatch.server import serve

    log.setup(cfg.log.level)
    try:
        asyncio.run(serve(cfg))
    except KeyboardInterrupt:
        pass
    return 0


def format_status(status: dict[str, Any]) -> str:
    lines = [f"state      {status['state']}"]
    if status.get("incident"):
        lines.append(f"incident   {status['incident']['id']} until {status['incident']['ends']}")
    for name, source in status["sources"].items():
        detail = source.get("detail", "")
        buffered = ""
        if "buffered_seconds" in source:
            buffered = (f"  [{source['buffered_seconds']:.1f} s, "
                        f"{source['buffered_bytes'] / 1e6:.1f} MB buffered]")
        lines.append(f"{name:<10} {source['state']:<9} {source['backend']:<10} {detail}{buffered}")
    for name, link in status.get("links", {}).items():
        extra = ""
        if name == "mqtt":
            extra = f"  [outbox {sum(link['outbox'].values())} waiting]"
        elif name == "call":
            extra = f"  [{link['call_state']}, {link['attempts']} attempts]"
        lines.append(f"{name:<10} {link['state']:<9} {link['backend']:<10} {link['detail']}"
                     f"{extra}")
    last = status["sources"].get("gps", {}).get("last_known")
    if last:
        lines.append(f"position   {last['lat']:.6f}, {last['lon']:.6f} "
                     f"({last['age_seconds']:.0f} s ago)")
    storage = status["storage"]
    free = storage.get("free_bytes")
    space = f"{free / 1e9:.1f} GB free" if isinstance(free, int) else "free space unknown"
    lines.append(f"storage    {space} in {storage['dir']}")
    return "\n".join(lines)
