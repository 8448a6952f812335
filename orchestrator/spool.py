"""A durable FIFO of tracking writes: appended to a file beside the run state before they are
sent, acknowledged once the store took them. A driver killed with writes queued leaves them on
disk; the next driver of the run (``resume``) sends them first. Memory stays bounded: at most
``memory_limit`` entries are held, the rest are read back from the file as the head drains.

Entries are JSON objects. Without a folder the queue lives in memory only (short-lived
trackers such as ``cancel`` that have no run folder at hand).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import deque
from typing import Any

log = logging.getLogger(__name__)

_LOG, _ACKED, _IDS = "writes.jsonl", "acked", "ids.json"


class Spool:
    def __init__(self, directory: str | None = None, memory_limit: int = 10_000):
        self.directory = directory
        self.memory_limit = memory_limit
        self._lock = threading.Lock()
        self._buf: deque[tuple[int, dict[str, Any]]] = deque()  # (file offset after the entry, entry)
        self._count = 0
        self._end = self._read_off = 0
        self._f = None
        self.ids: dict[str, str] = {}
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
            self._open()

    # -- files ---------------------------------------------------------------------------------
    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _open(self) -> None:
        path = self._path(_LOG)
        acked = 0
        try:
            acked = int(open(self._path(_ACKED)).read().strip() or 0)
        except (OSError, ValueError):
            pass
        try:
            self.ids = json.loads(open(self._path(_IDS)).read())
        except (OSError, ValueError):
            self.ids = {}
        data = open(path, "rb").read() if os.path.exists(path) else b""
        whole = data.rfind(b"\n") + 1  # a killed writer may have left half a line: drop it
        if whole < len(data):
            with open(path, "r+b") as f:
                f.truncate(whole)
        self._end = whole
        self._read_off = min(acked, whole)
        self._count = data[self._read_off:whole].count(b"\n")
        self._f = open(path, "ab")

    def _write_small(self, name: str, text: str) -> None:
        tmp = self._path(f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self._path(name))

    # -- queue ---------------------------------------------------------------------------------
    def put(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._count += 1
            if self._f is None:
                self._buf.append((0, entry))
                return
            line = (json.dumps(entry, default=str, separators=(",", ":")) + "\n").encode()
            start = self._end
            self._f.write(line)
            self._f.flush()  # in the OS's hands: survives the process being killed
            self._end += len(line)
            if self._read_off == start and len(self._buf) < self.memory_limit:
                self._buf.append((self._end, entry))
                self._read_off = self._end

    def head(self) -> dict[str, Any] | None:
        with self._lock:
            if not self._buf and self._f is not None and self._read_off < self._end:
                self._refill()
            return self._buf[0][1] if self._buf else None

    def _refill(self) -> None:
        with open(self._path(_LOG), "rb") as f:
            f.seek(self._read_off)
            while len(self._buf) < self.memory_limit and self._read_off < self._end:
                line = f.readline()
                if not line.endswith(b"\n"):
                    break
                self._read_off += len(line)
                try:
                    self._buf.append((self._read_off, json.loads(line)))
                except ValueError:
                    self._count -= 1
                    log.warning("skipping a corrupt tracking write in %s", self._path(_LOG))

    def take(self) -> list[dict[str, Any]]:
        """Every entry of an in-memory spool, removed from it (to move them to one on disk)."""
        with self._lock:
            out = [entry for _, entry in self._buf]
            self._buf.clear()
            self._count = 0
            return out

    def pop(self) -> None:
        """The head was sent (or given up on): never send it again."""
        with self._lock:
            if not self._buf:  # taken meanwhile (see take)
                return
            offset, _ = self._buf.popleft()
            self._count -= 1
            if self._f is None:
                return
            if self._count == 0 and self._read_off == self._end:  # all sent: start the file afresh
                self._f.truncate(0)
                self._end = self._read_off = offset = 0
                self._buf.clear()
            self._write_small(_ACKED, str(offset))

    def __len__(self) -> int:
        return self._count

    def set_id(self, handle: str, real: str) -> None:
        """Remember what a placeholder run id became (later entries and the next driver need it)."""
        with self._lock:
            self.ids[handle] = real
            if self._f is not None:
                self._write_small(_IDS, json.dumps(self.ids))

    def close(self) -> None:
        with self._lock:
            if self._f is not None:
                self._f.close()
                self._f = None
