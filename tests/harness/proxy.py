"""A TCP proxy that can add latency, refuse, stall or cut connections (no tc/netem here).

It runs an asyncio loop in its own daemon thread; the control methods are
called from test code (any thread) and return once the change is in effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from tests.harness.managed import Managed

if TYPE_CHECKING:
    from tests.harness.zookeeper import ZooKeeperServer

T = TypeVar("T")

_CHUNK = 64 * 1024


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN: the peer sees 'connection reset' at once."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Conn:
    """One proxied client connection: two pumps (one per direction)."""

    def __init__(
        self,
        proxy: TcpProxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.proxy = proxy
        self.client_r, self.client_w = client
        self.up_r, self.up_w = upstream
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [
            asyncio.create_task(self._pump(self.client_r, self.up_w)),
            asyncio.create_task(self._pump(self.up_r, self.client_w)),
        ]

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        # Reader and sender are decoupled by a queue so that a delay shifts
        # every chunk by the same amount instead of throttling throughput.
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            try:
                while True:
                    due, data = await queue.get()
                    wait = due - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    # A stalled partition: hold the bytes (TCP would retransmit
                    # them later), never drop them, or the stream would be corrupt.
                    await self.proxy._flowing.wait()
                    if not data:
                        break
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            self.close()

        sender = asyncio.create_task(send())
        try:
            while True:
                data = await src.read(_CHUNK)
                queue.put_nowait((time.monotonic() + self.proxy._delay, data))
                if not data:
                    break
            await sender
        except (ConnectionError, OSError):
            self.close()
        finally:
            if not sender.done():
                sender.cancel()

    def close(self, reset: bool = False) -> None:
        for w in (self.client_w, self.up_w):
            if reset:
                _reset(w)
            else:
                w.close()
        current = asyncio.current_task()
        for t in self.tasks:
            if t is not current:
                t.cancel()
        self.proxy._conns.discard(self)


class TcpProxy(Managed):
    """Listens on `listen_host`:`listen_port` (127.0.0.1, any free port), forwards to target.

    - `cut()`: reset every open connection; new ones are accepted and then
      ignored (a blackhole: clients time out) or, with `refuse=True`, reset.
      `cut(stall=True)` keeps open connections but stops moving bytes, like a
      network partition; `restore()` lets the held bytes through.
    - `set_delay(s)`: every byte arrives `s` seconds late, both directions.
    - `drop_new(True)`: new connections are reset; open ones keep working.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        listen_port: int = 0,
        name: str = "proxy",
        listen_host: str = "127.0.0.1",
    ) -> None:
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.name = name
        self._listen_port = listen_port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[_Conn] = set()
        self._held: set[asyncio.StreamWriter] = set()
        self._delay = 0.0
        self._cut = False
        self._refuse = False
        self._drop_new = False
        self._flowing: asyncio.Event
        self._stopping: asyncio.Event
        self.accepted = 0
        """Client connections accepted so far (including refused and blackholed ones)."""

    # -- lifecycle -------------------------------------------------------

    def start(self) -> TcpProxy:
        if self._thread is not None:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(self._main(ready))
            except BaseException as exc:
                failure.append(exc)
            finally:
                ready.set()

        self._thread = threading.Thread(target=run, name=f"TcpProxy-{self.name}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            self._thread.join(10)
            self._thread = None
            raise failure[0]
        return self

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(
            self._accept, self.listen_host, self._listen_port, reuse_address=True
        )
        self._listen_port = server.sockets[0].getsockname()[1]
        ready.set()
        async with server:
            await self._stopping.wait()
            server.close()
            self._close_all(reset=True)
            self._release_held()
            self._flowing.set()
            # Let the pumps and blackhole readers see their sockets closed.
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in others:
                t.cancel()
            await asyncio.gather(*others, return_exceptions=True)

    def stop(self) -> None:
        """Close the listener and every connection; join the thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(self._stopping.set)
        thread.join(10)
        self._thread = None
        self._loop = None

    def close(self) -> None:
        self.stop()

    # -- addresses ---------------------------------------------------------

    @property
    def port(self) -> int:
        if self._thread is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._listen_port

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.port}"

    hosts = address

    @property
    def connection_count(self) -> int:
        """Open forwarded connections (blackholed ones are not counted)."""
        return len(self._conns)

    # -- faults ------------------------------------------------------------

    def cut(self, *, stall: bool = False, refuse: bool = False) -> None:
        self._call(self._do_cut(stall, refuse))

    async def _do_cut(self, stall: bool, refuse: bool) -> None:
        self._cut = True
        self._refuse = refuse
        if stall:
            self._flowing.clear()
        else:
            self._close_all(reset=True)

    def restore(self) -> None:
        """Undo `cut`: stalled bytes flow, blackholed clients are reset so they reconnect."""
        self._call(self._do_restore())

    async def _do_restore(self) -> None:
        self._cut = False
        self._refuse = False
        self._release_held()
        self._flowing.set()

    def set_delay(self, seconds: float) -> None:
        """Latency added to every chunk from now on (0 to remove)."""
        self._delay = max(0.0, seconds)

    def drop_new(self, drop: bool = True) -> None:
        self._drop_new = drop

    # -- internals -----------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        loop = self._loop
        if loop is None:
            coro.close()
            raise RuntimeError(f"{self.name} is not started")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(10)

    def _close_all(self, reset: bool) -> None:
        for conn in list(self._conns):
            conn.close(reset=reset)

    def _release_held(self) -> None:
        for w in list(self._held):
            _reset(w)
        self._held.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._drop_new or (self._cut and self._refuse):
            _reset(writer)
            return
        if self._cut:
            # Blackhole: read and discard so the client's writes never block,
            # answer nothing; restore() resets it.
            self._held.add(writer)
            with contextlib.suppress(ConnectionError, OSError):
                while await reader.read(_CHUNK):
                    pass
            self._held.discard(writer)
            writer.close()
            return
        try:
            upstream = await asyncio.wait_for(asyncio.open_connection(*self.target), 5)
        except (OSError, TimeoutError):
            _reset(writer)
            return
        conn = _Conn(self, (reader, writer), upstream)
        self._conns.add(conn)
        conn.start()

    def __repr__(self) -> str:
        port = self._listen_port or "?"
        target = f"{self.target[0]}:{self.target[1]}"
        return f"TcpProxy({self.name}, {self.listen_host}:{port} -> {target})"


ProxyFactory = Callable[["ZooKeeperServer | str"], TcpProxy]
"""The `tcp_proxy` fixture: a started proxy in front of a server or "host:port"."""
