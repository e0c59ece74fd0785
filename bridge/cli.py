"""Command line: ``zkbridge run | check-config | verify | lag | status | conflicts | resync``.

Exit status: 0 success, 1 problems found (bad config, differences, fatal
error), 2 usage errors or an unreachable server. Expected failures print one
clear line per problem and never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

from bridge import __version__
from bridge.config import Settings
from bridge.configload import load_settings
from bridge.configreload import describe
from bridge.errors import BridgeError, ConfigError, StateAccessError, UnsupportedServerError


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
    chk.add_argument("--connect", action="store_true",
                     help="also connect to ZooKeeper and Kafka as the bridge would (TLS, "
                          "client certificates, auth); exit 1 if either refuses or is "
                          "unreachable")

    ver = sub.add_parser(
        "verify", help="compare replicated subtrees across regions (read-only); exit 1 if differ"
    )
    ver.add_argument("-c", "--config", required=True, action="append", metavar="FILE",
                     help="one region's config; give two or more")
    ver.add_argument("--meta", action="store_true", help="also compare metadata vector clocks")
    ver.add_argument("--json", action="store_true", help="machine-readable output")
    lag = sub.add_parser("lag", help="how far behind each peer this region is (works offline)")
    lag.add_argument("-c", "--config", required=True, metavar="FILE")
    lag.add_argument("--json", action="store_true", help="machine-readable output")
    lag.add_argument("--max-seconds", type=float, metavar="N",
                     help="exit 1 when any lag or heartbeat age exceeds N seconds")
    lag.add_argument("--watch", type=_positive, nargs="?", const=2.0, metavar="SECONDS",
                     help="re-measure every SECONDS (default 2) with each row's trend; "
                          "in place on a terminal, one table per interval otherwise; Ctrl-C "
                          "quits")
    lag.add_argument("--timeout", type=float, default=30.0, help=argparse.SUPPRESS)

    st = sub.add_parser("status", help="leader, health, positions, counters, recent errors")
    st.add_argument("-c", "--config", required=True, metavar="FILE")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--check", action="store_true",
                    help="exit 1 unless the verdict is HEALTHY (a health check's exit status)")

    cf = sub.add_parser("conflicts", help="recent conflicts: path, both versions, winner, rule")
    cf.add_argument("-c", "--config", required=True, metavar="FILE")
    cf.add_argument("--limit", type=int, default=20, metavar="N")
    cf.add_argument("--json", action="store_true", help="machine-readable output")

    sk = sub.add_parser("skip", help="leave out one record a peer's stream waits on "
                        "(clock skew), as status names it; audited")
    sk.add_argument("-c", "--config", required=True, metavar="FILE")
    sk.add_argument("--topic", required=True)
    sk.add_argument("--partition", type=int, default=0)
    sk.add_argument("--offset", type=int, required=True)
    sk.add_argument("--timeout", type=float, default=15.0, help=argparse.SUPPRESS)

    rs = sub.add_parser("resync", help="re-announce this region's full state (after topic loss)")
    rs.add_argument("-c", "--config", required=True, metavar="FILE")
    rs.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0: {text!r}")
    return value


def _unreachable(command: str, exc: BaseException) -> int:
    if isinstance(exc, StateAccessError | UnsupportedServerError):  # reached, and refused
        print(f"zkbridge {command}: {exc}", file=sys.stderr)
        return 2
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError):
        reason = "timed out reaching ZooKeeper or Kafka"
    print(f"zkbridge {command}: cannot reach the servers: {reason}", file=sys.stderr)
    return 2


def _lag_watch(settings: Settings, every: float, as_json: bool, max_seconds: float | None,
               timeout: float) -> int:
    from bridge.lagwatch import watch

    def on_interrupt(_sig: int, _frame: object) -> None:
        # Ctrl-C quits at once: closing the Kafka and ZooKeeper clients may
        # wait on a slow server, and a watch has nothing left to save.
        def leave() -> None:
            sys.stdout.flush()
            os._exit(0)

        timer = threading.Timer(5.0, leave)
        timer.daemon = True
        timer.start()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_interrupt)
    try:
        asyncio.run(watch(settings, every, out=sys.stdout, terminal=sys.stdout.isatty(),
                          json_lines=as_json, max_seconds=max_seconds, sample_timeout=timeout))
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how a watch ends
    except (BridgeError, TimeoutError, OSError) as exc:
        return _unreachable("lag", exc)
    return 0


def _lag(path: str, as_json: bool, max_seconds: float | None, timeout: float,
         every: float | None) -> int:
    from bridge.lag import attention, run_measure, table

    settings = _load(path)
    if every is not None:
        return _lag_watch(settings, every, as_json, max_seconds, timeout)
    try:
        rows = run_measure(settings, timeout)
    except (BridgeError, TimeoutError, OSError) as exc:
        return _unreachable("lag", exc)
    if as_json:
        print(json.dumps({"region": settings.region, "rows": [r.as_dict() for r in rows]},
                         indent=2))
    else:
        print(table(rows))
    reasons = attention(rows, max_seconds) if max_seconds is not None else []
    if reasons:
        if not as_json:
            print("; ".join(reasons), file=sys.stderr)
        return 1
    return 0


def _status(path: str, as_json: bool, check: bool) -> int:
    from bridge.report import read_overview, render_status

    settings = _load(path)
    try:
        overview = asyncio.run(asyncio.wait_for(read_overview(settings, path), 30))
    except (BridgeError, TimeoutError, OSError) as exc:
        return _unreachable("status", exc)
    print(json.dumps(overview, indent=2) if as_json else render_status(overview))
    return 1 if check and not overview["verdict"]["healthy"] else 0


def _conflicts(path: str, limit: int, as_json: bool) -> int:
    from bridge.report import conflict_dict, read_conflicts, render_conflicts

    settings = _load(path)
    try:
        found = asyncio.run(asyncio.wait_for(read_conflicts(settings, limit), 30))
    except (BridgeError, TimeoutError, OSError) as exc:
        return _unreachable("conflicts", exc)
    if as_json:
        print(json.dumps([conflict_dict(c) for c in found], indent=2))
    else:
        print(render_conflicts(found))
    return 0


def _resync(path: str, as_json: bool) -> int:
    from bridge.progress import Progress
    from bridge.resync import resync

    settings = _load(path)
    try:
        with Progress(sys.stderr) as progress:
            counts = asyncio.run(resync(settings, progress))
    except (BridgeError, OSError) as exc:
        return _unreachable("resync", exc)
    if as_json:
        print(json.dumps({"region": settings.region, **counts}, indent=2))
        return 0
    print(f"re-announced {counts['published']} records from {settings.region}"
          + (f"; {counts['uncaptured']} local changes not yet captured (the bridge announces "
             "them)" if counts["uncaptured"] else ""))
    return 0


def _skip(path: str, topic: str, partition: int, offset: int, timeout: float) -> int:
    from bridge import skip, stateaccess
    from bridge.reporter import read_status
    from bridge.status import now_ms
    from bridge.verdict import STALE_RECORD_S
    from bridge.zk import ZooKeeper

    settings = _load(path)
    at = skip.where(topic, partition, offset)

    async def go() -> tuple[int, str]:
        zk = ZooKeeper(settings.zookeeper, private_root=settings.state_path)
        await stateaccess.start_checked(zk, settings)
        try:
            status = await read_status(zk, settings)
            if status is None or (now_ms() - status.updated_ms) / 1000 >= STALE_RECORD_S:
                return 1, (f"zkbridge skip: no fresh status record for {settings.region}: is its "
                           "bridge running? Nothing was requested.")
            if not skip.waiting_on(status.waiting, topic, partition, offset):
                now = ", ".join(status.waiting) or "nothing"
                return 1, (f"zkbridge skip: {settings.region}'s bridge does not wait on {at} "
                           f"(it waits on: {now}); see zkbridge status. Nothing was requested.")
            req = skip.new_request(topic, partition, offset)
            await skip.request(zk, settings.state_path, req)
            marker = f"{skip.skips_path(settings.state_path)}/{req.name}"
            deadline = asyncio.get_running_loop().time() + timeout
            while asyncio.get_running_loop().time() < deadline:
                if await zk.exists(marker) is None:
                    return 0, (f"skipped {at} in {settings.region} (requested by {req.by}); "
                               "logged as record_skipped and listed in zkbridge status")
                await asyncio.sleep(0.2)
            await zk.delete(marker)  # must not lie in wait for a later record
            return 1, (f"zkbridge skip: the bridge did not act on {at} within {timeout:.0f}s; "
                       "the request is withdrawn. Is the leader stuck? See zkbridge status.")
        finally:
            await zk.stop()

    try:
        code, text = asyncio.run(go())
    except (BridgeError, OSError) as exc:
        return _unreachable("skip", exc)
    print(text, file=sys.stderr if code else sys.stdout)
    return code


def _load(path: str) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as exc:
        for problem in exc.problems:
            # The file's own problems (unreadable, bad YAML) already name it.
            named = problem.startswith((f"{path}:", f"{path!r}:"))
            print(problem if named else f"{path}: {problem}", file=sys.stderr)
        raise SystemExit(1) from None


def _check_config(path: str, connect: bool) -> int:
    settings = _load(path)
    print(f"{path}: OK")
    print(describe(settings))
    from bridge import certexpiry

    for line in certexpiry.describe(settings, time.time()):
        print(line)
    if not connect:
        return 0
    from bridge.preflight import preflight

    answers = asyncio.run(preflight(settings))
    for a in answers:
        print(f"{a.side}: {'OK' if a.ok else 'FAILED'}: {a.text}",
              file=sys.stdout if a.ok else sys.stderr)
    return 0 if all(a.ok for a in answers) else 1


def _verify(paths: Sequence[str], meta: bool, as_json: bool) -> int:
    if len(paths) < 2:
        print("zkbridge verify: give at least two configs (-c A.yaml -c B.yaml)", file=sys.stderr)
        return 2
    configs = [_load(p) for p in paths]
    from bridge.progress import Progress
    from bridge.verify import verify

    try:
        with Progress(sys.stderr) as progress:
            diffs = asyncio.run(verify(configs, meta=meta, progress=progress))
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
    if args.command != "run":
        from bridge import log as logsetup

        logsetup.quiet()
        gc.enable()  # off while the entry point imported (bridge.__main__); run: bridge.daemon
    try:
        if args.command == "check-config":
            return _check_config(args.config, args.connect)
        if args.command == "verify":
            return _verify(args.config, args.meta, args.json)
        if args.command == "lag":
            return _lag(args.config, args.json, args.max_seconds, args.timeout, args.watch)
        if args.command == "status":
            return _status(args.config, args.json, args.check)
        if args.command == "conflicts":
            return _conflicts(args.config, args.limit, args.json)
        if args.command == "skip":
            return _skip(args.config, args.topic, args.partition, args.offset, args.timeout)
        if args.command == "resync":
            return _resync(args.config, args.json)
        if args.command == "run":
            from bridge.daemon import run

            return run(_load(args.config), allow_mass_delete=args.allow_mass_delete)
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:
        return int(exc.code or 0)
    return 2
