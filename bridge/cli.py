"""Command line: ``zkbridge run | check-config | verify``.

Exit status: 0 success, 1 problems found (bad config, differences, fatal
error), 2 usage errors or an unreachable server. Expected failures print one
clear line per problem and never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from bridge import __version__
from bridge.config import Settings, describe, load_settings
from bridge.errors import BridgeError, ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zkbridge",
        description="Keep ZooKeeper subtrees identical across regions through Kafka.",
    )
    p.add_argument("--version", action="version", version=f"zkbridge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the bridge service for one region")
    run.add_argument("-c", "--config", required=True, metavar="FILE")
    run.add_argument(
        "--allow-mass-delete",
        action="store_true",
        help="announce a scan's deletions even above mass_delete.max_ratio (use once, on purpose)",
    )

    chk = sub.add_parser("check-config", help="validate a config file; exit 0 valid, 1 invalid")
    chk.add_argument("-c", "--config", required=True, metavar="FILE")

    ver = sub.add_parser(
        "verify", help="compare replicated subtrees across regions (read-only); exit 1 if differ"
    )
    ver.add_argument("-c", "--config", required=True, action="append", metavar="FILE",
                     help="one region's config; give two or more")
    ver.add_argument("--meta", action="store_true", help="also compare metadata vector clocks")
    ver.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _load(path: str) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{path}: {problem}", file=sys.stderr)
        raise SystemExit(1) from None


def _check_config(path: str) -> int:
    settings = _load(path)
    print(f"{path}: OK")
    print(describe(settings))
    return 0


def _verify(paths: Sequence[str], meta: bool, as_json: bool) -> int:
    if len(paths) < 2:
        print("zkbridge verify: give at least two configs (-c A.yaml -c B.yaml)", file=sys.stderr)
        return 2
    configs = [_load(p) for p in paths]
    from bridge.verify import verify

    try:
        diffs = asyncio.run(verify(configs, meta=meta))
    except BridgeError as exc:
        print(f"zkbridge verify: {exc}", file=sys.stderr)
        return 2
    regions = ", ".join(c.region for c in configs)
    if as_json:
        print(json.dumps({
            "regions": [c.region for c in configs],
            "identical": not diffs,
            "differences": [{"subtree": d.subtree, "path": d.path, "detail": d.detail}
                            for d in diffs],
        }, indent=2))
    elif diffs:
        print(f"{len(diffs)} difference(s) across {regions}:")
        for d in diffs:
            print(f"  {d.subtree}:{d.path}  {d.detail}")
    else:
        print(f"identical: {regions}")
    return 1 if diffs else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            return _check_config(args.config)
        if args.command == "verify":
            return _verify(args.config, args.meta, args.json)
        if args.command == "run":
            from bridge.daemon import run

            return run(_load(args.config), allow_mass_delete=args.allow_mass_delete)
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:
        return int(exc.code or 0)
    return 2
