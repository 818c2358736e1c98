"""The run's events: kept in order, stored length-delimited, streamed live over gRPC.

``EventLog`` numbers the events of a run and appends each to the run record's ``events.pb``
(a varint length, then the serialised ``umbel.v1.Event``). ``serve`` exposes the log as the
``umbel.v1.Monitor`` service: ``Watch`` replays the run so far, then streams new events as
they happen, and ends after the run's ``RunFinished``. ``watch`` is the client side.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

# gRPC's INFO lines about fork() (Ray forks workers while the monitor serves) are noise.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
import grpc  # noqa: E402

from proto.umbel.v1 import monitor_pb2 as pb  # noqa: E402
from proto.umbel.v1 import monitor_pb2_grpc as pb_grpc  # noqa: E402

EVENTS = "events.pb"
ADDRESS_FILE = "monitor.address"
_KINDS = ("run_started", "round_finished", "client_failure", "run_finished")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def write_delimited(stream: Any, message: Any) -> None:
    data = message.SerializeToString()
    stream.write(_varint(len(data)) + data)


def scan_events(path: str | Path) -> tuple[list[pb.Event], str | None]:
    """``_scan``'s events and damage."""
    events, damage, _ = _scan(path)
    return events, damage


def _scan(path: str | Path) -> tuple[list[pb.Event], str | None, bool]:
    """Every readable event of a run record's ``events.pb`` (or an events file itself) and,
    when the file is damaged, what is wrong with it and how much was recovered (None when
    it is whole), and whether the damage is only a torn tail (the writer was killed
    mid-write). Reading stops at the first damage."""
    path = Path(path)
    if path.is_dir():
        path = path / EVENTS
    data = path.read_bytes()
    events, pos = [], 0
    while pos < len(data):
        length, shift, start = 0, 0, pos
        while True:
            if pos >= len(data):
                return events, _damage(path, data, start, "a torn length prefix", events), True
            byte = data[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
            if shift > 63:
                return events, _damage(path, data, start, "a bad length prefix", events), False
        if pos + length > len(data):
            return events, _damage(path, data, start, "a torn last record", events), True
        event = pb.Event()
        try:
            event.ParseFromString(data[pos:pos + length])
        except Exception as err:  # protobuf's DecodeError
            return events, _damage(path, data, start, f"an unreadable event ({err})", events), False
        events.append(event)
        pos += length
    return events, None, False


def _damage(path: Path, data: bytes, offset: int, what: str, events: list[pb.Event]) -> str:
    return (f"{path} is damaged: {what} at byte {offset} of {len(data)}; the {len(events)} events "
            f"before it were recovered, the last {len(data) - offset} bytes were not")


def read_events(path: str | Path) -> list[pb.Event]:
    """The events of ``scan_events``. A torn last record (the process was killed while
    writing it) is left out; damage anywhere else is a ``ValueError`` naming the offset."""
    events, damage, torn = _scan(path)
    if damage and not torn:
        raise ValueError(damage)
    return events


def scalar_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a history row that fit an event's metric map."""
    return {
        k: float(v) for k, v in row.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round"
    }


class EventLog:
    """The run's events in order: appended to ``events.pb`` and handed to live watchers.

    Opening an existing file (a resumed run) continues its numbering.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[pb.Event] = read_events(path) if path.exists() else []
        self._changed = threading.Condition()
        with open(path, "ab") as f:  # drop a torn tail so new records stay readable
            f.truncate(sum(len(_varint(e.ByteSize())) + e.ByteSize() for e in self.events))

    def emit(self, kind: str, **fields: Any) -> pb.Event:
        if kind not in _KINDS:
            raise ValueError(f"unknown event kind {kind!r}; expected one of {_KINDS}")
        with self._changed:
            event = pb.Event(seq=len(self.events), unix_time=time.time())
            getattr(event, kind).CopyFrom(getattr(pb, _camel(kind))(**fields))
            with open(self.path, "ab") as f:
                write_delimited(f, event)
            self.events.append(event)
            self._changed.notify_all()
        return event

    @property
    def finished(self) -> bool:
        return bool(self.events) and self.events[-1].WhichOneof("kind") == "run_finished"

    def follow(self, from_seq: int, alive: Any = lambda: True) -> Iterator[pb.Event]:
        """Events from ``from_seq`` on, waiting for new ones until the run finishes
        (or ``alive()`` turns false, e.g. the watcher hung up)."""
        seq = from_seq
        while alive():
            with self._changed:
                while seq >= len(self.events) and alive():
                    if self.finished:
                        return
                    self._changed.wait(timeout=0.5)
                batch = self.events[seq:]
            for event in batch:
                yield event
                if event.WhichOneof("kind") == "run_finished" and event is self.events[-1]:
                    return
            seq += len(batch)


def _camel(kind: str) -> str:
    return "".join(part.title() for part in kind.split("_"))


class _Monitor(pb_grpc.MonitorServicer):
    def __init__(self, log: EventLog) -> None:
        self.log = log

    def Watch(self, request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[pb.Event]:
        yield from self.log.follow(int(request.from_seq), alive=context.is_active)


def serve(log: EventLog, address: str) -> tuple[grpc.Server, str]:
    """Serve ``log`` as the Monitor service at ``host:port`` (port 0: any free port);
    returns the server and the address it listens on. Plain text: keep it on loopback or
    behind the deployment's own network policy."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"monitor.address {address!r}: expected host:port, e.g. 127.0.0.1:0")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="monitor"))
    pb_grpc.add_MonitorServicer_to_server(_Monitor(log), server)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as err:
        raise ValueError(f"monitor.address {address}: cannot listen there ({err})") from None
    if bound == 0:
        raise ValueError(f"monitor.address {address}: cannot listen there (port taken?)")
    server.start()
    return server, f"{host}:{bound}"


def write_address(run_dir: Path, address: str) -> None:
    """Where the monitor listens, for ``umbel watch RUN_DIR`` (atomic: watchers poll it)."""
    tmp = run_dir / (ADDRESS_FILE + ".tmp")
    tmp.write_text(address + "\n")
    os.replace(tmp, run_dir / ADDRESS_FILE)


def watch(address: str, from_seq: int = 0, timeout: float | None = None) -> Iterator[pb.Event]:
    """Stream a running ServerApp's events (see ``EventLog.follow``); ``timeout`` bounds
    the whole call. Raises ``grpc.RpcError`` when nothing answers at ``address``."""
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        stub = pb_grpc.MonitorStub(channel)
        yield from stub.Watch(pb.WatchRequest(from_seq=from_seq), timeout=timeout)
