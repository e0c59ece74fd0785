"""A region's application for the partition test: writes to its ensemble, records every answer.

Run inside the region's network namespace (``python -m
tests.integration.partition_writer ...``), so it keeps writing to its local
ensemble while the region is cut off. Each operation is one JSON line in
``--out``, flushed as soon as ZooKeeper answered: ``outcome`` is ``ok``
(acknowledged), ``fail`` (refused, nothing changed) or ``unknown`` (no answer:
it may or may not have happened). Values are ``<region>:<seq>``, unique in the
federation, so a surviving value names the write that produced it.

Paths (relative to the mount): ``/<region>-k<N>`` only this region writes,
``/shared-k<N>`` every region writes. SIGTERM ends the loop after the
operation in flight.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import time
from typing import IO

from kazoo.client import KazooClient
from kazoo.exceptions import NodeExistsError, NoNodeError

OP_TIMEOUT = 5.0


def _put(client: KazooClient, path: str, value: bytes) -> None:
    """Set, or create when missing; a create that lost to a replicated one becomes a set."""
    for _ in range(3):
        try:
            client.set_async(path, value).get(OP_TIMEOUT)
            return
        except NoNodeError:
            pass
        try:
            client.create_async(path, value).get(OP_TIMEOUT)
            return
        except NodeExistsError:
            continue
    raise NoNodeError(f"{path} kept appearing and vanishing")


def _record(out: IO[str], **fields: object) -> None:
    out.write(json.dumps(fields) + "\n")
    out.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", required=True)
    ap.add_argument("--mount", required=True)
    ap.add_argument("--region", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--own", type=int, default=20)
    ap.add_argument("--shared", type=int, default=5)
    ap.add_argument("--rate", type=float, default=20.0, help="operations per second")
    args = ap.parse_args()

    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    rng = random.Random(args.region)
    client = KazooClient(hosts=args.hosts, timeout=10.0)
    client.start(timeout=30)
    seq = 0
    try:
        with open(args.out, "a") as out:
            while not stopping:
                if rng.random() < 0.3:
                    rel = f"/shared-k{rng.randrange(args.shared)}"
                else:
                    rel = f"/{args.region}-k{rng.randrange(args.own)}"
                seq += 1
                value = f"{args.region}:{seq}"
                start = time.time()
                try:
                    _put(client, args.mount + rel, value.encode())
                    outcome = "ok"
                except NoNodeError:
                    outcome = "fail"
                except Exception:
                    outcome = "unknown"
                _record(out, path=rel, value=value, outcome=outcome, start=start,
                        end=time.time())
                time.sleep(1.0 / args.rate)
    finally:
        client.stop()
        client.close()


if __name__ == "__main__":
    main()
