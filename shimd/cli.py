"""The `shimd` command: serve, check, config default, version."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shimd import __version__, config


def _serve(args: argparse.Namespace) -> int:
    try:
        cfg = config.load(Path(args.config) if args.config else None)
    except config.ConfigError as e:
        print(f"shimd: config error: {e}", file=sys.stderr)
        return 2
    if args.socket:
        cfg.daemon.socket = args.socket
    if args.log_level:
        cfg.daemon.log_level = args.log_level
    from shimd import daemon  # heavy imports only for serve

    return daemon.run(cfg)


def _config_default(_: argparse.Namespace) -> int:
    sys.stdout.write(config.DEFAULT_TOML)
    return 0


def _config_cni_default(_: argparse.Namespace) -> int:
    from shimd.network import defaults

    sys.stdout.write(defaults.render())
    return 0


def _config_check(args: argparse.Namespace) -> int:
    try:
        cfg = config.load(Path(args.path))
    except config.ConfigError as e:
        print(f"shimd: config error: {e}", file=sys.stderr)
        return 2
    print(f"{cfg.source}: ok ({len(cfg.handlers)} handlers)")
    return 0


def _check(args: argparse.Namespace) -> int:
    import asyncio

    from shimd import log

    # Before importing the checks: their modules bind loggers at import. The findings are the output.
    log.configure("error")
    from shimd import check

    try:
        cfg = config.load(Path(args.config) if args.config else None)
    except config.ConfigError as e:
        print(f"FAIL  config           {e}", file=sys.stderr)
        return 1
    findings = asyncio.run(check.run_checks(cfg, kubelet_config=Path(args.kubelet_config),
                                            probe_daemon=not args.no_daemon))
    print(check.to_json(findings) if args.json else check.render(findings))
    return check.exit_code(findings)


def _version(_: argparse.Namespace) -> int:
    print(f"shimd {__version__} (CRI runtime API v1)")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shimd", description="CRI v1 container runtime with per-pod shims")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the daemon in the foreground")
    s.add_argument("--config", help=f"config file (default {config.DEFAULT_CONFIG_PATH} if it exists)")
    s.add_argument("--socket", help="override daemon.socket")
    s.add_argument("--log-level", choices=config.LOG_LEVELS, help="override daemon.log_level")
    s.set_defaults(func=_serve)
    c = sub.add_parser("config", help="configuration helpers")
    csub = c.add_subparsers(dest="config_command", required=True)
    csub.add_parser("default", help="print every default as TOML").set_defaults(func=_config_default)
    csub.add_parser("cni-default", help="print a ready bridge CNI conflist (for an empty CNI conf dir)").set_defaults(
        func=_config_cni_default)
    chk = csub.add_parser("check", help="validate a config file")
    chk.add_argument("path")
    chk.set_defaults(func=_config_check)
    k = sub.add_parser("check", help="verify this node can run shimd; exit 1 when something is wrong")
    k.add_argument("--config", help=f"config file (default {config.DEFAULT_CONFIG_PATH} if it exists)")
    k.add_argument("--kubelet-config", default="/var/lib/kubelet/config.yaml",
                   help="KubeletConfiguration to compare cgroupDriver with (skipped when absent)")
    k.add_argument("--no-daemon", action="store_true", help="do not call the running shimd")
    k.add_argument("--json", action="store_true", help="machine-readable findings")
    k.set_defaults(func=_check)
    sub.add_parser("version", help="print the version").set_defaults(func=_version)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
