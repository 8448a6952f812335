"""Run and stage state: explicit enums with legal transitions, persisted atomically.

The record is written after every transition, so a driver killed at any point leaves a state
that ``orchestrator resume`` can continue from.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Callable

from workers import storage

from .secrets import redact_tree


# Tags on a pipeline's MLflow run: its role, and where its run state is (read without MLflow
# by `status`, see orchestrator.runs.load_record).
TAG_ROLE = "orchestrator.role"
TAG_STATE_URI = "orchestrator.state_uri"


class StageState(str, Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    RETRYING = "RETRYING"  # an attempt failed; waiting out the backoff
    SUCCEEDED = "SUCCEEDED"
    CACHED = "CACHED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def done(self) -> bool:
        """Finished with outputs that downstream stages can use."""
        return self in (StageState.SUCCEEDED, StageState.CACHED)


_TERMINAL = {StageState.SUCCEEDED, StageState.CACHED, StageState.FAILED, StageState.SKIPPED, StageState.CANCELLED}

_LEGAL: dict[StageState, set[StageState]] = {
    StageState.PENDING: {StageState.RUNNING, StageState.CACHED, StageState.SKIPPED, StageState.CANCELLED},
    StageState.RUNNING: {StageState.SUCCEEDED, StageState.FAILED, StageState.RETRYING, StageState.CANCELLED},
    StageState.RETRYING: {StageState.RUNNING, StageState.CANCELLED},
    StageState.SUCCEEDED: set(),
    StageState.CACHED: set(),
    StageState.FAILED: set(),
    StageState.SKIPPED: set(),
    StageState.CANCELLED: set(),
}


class RunState(str, Enum):
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class IllegalTransition(RuntimeError):
    pass


@dataclass
class StageRecord:
    name: str
    kind: str
    fingerprint: str
    state: StageState = StageState.PENDING
    attempts: int = 0
    outputs: dict[str, Any] | None = None
    error: str | None = None
    traceback: str | None = None
    started: float | None = None
    ended: float | None = None
    child_run_id: str | None = None
    cache_source_run: str | None = None
    progress: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def move(self, new: StageState) -> None:
        if new not in _LEGAL[self.state]:
            raise IllegalTransition(f"stage {self.name!r}: {self.state.value} -> {new.value}")
        self.state = new

    @property
    def elapsed(self) -> float | None:
        if self.started is None:
            return None
        return (self.ended or time.time()) - self.started


@dataclass
class RunRecord:
    run_id: str
    pipeline: str
    state: RunState
    raw_spec: dict[str, Any]
    source: str
    storage: str
    tracking_uri: str
    experiment: str
    stages: dict[str, StageRecord]
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    driver: dict[str, Any] = field(default_factory=dict)
    no_cache: bool = False

    # -- persistence -----------------------------------------------------------------------
    @property
    def uri(self) -> str:
        return state_uri(self.storage, self.run_id)

    def save(self) -> None:
        self.updated = time.time()
        # Stages stay in plan order; a credential in a URI (an error message quoting a store's URL) never lands on disk.
        storage.write_json(self.uri, redact_tree(asdict(self)), indent=None, sort_keys=False)

    @classmethod
    def load(cls, uri: str) -> RunRecord:
        data = storage.read_json(uri)
        try:
            stages = {n: StageRecord(**{**s, "state": StageState(s["state"])}) for n, s in data.pop("stages").items()}
            return cls(**{**data, "state": RunState(data.pop("state")), "stages": stages})
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"corrupt run state file {uri}: {e}") from None

    def claim_driver(self) -> None:
        self.driver = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}

    def driver_alive(self) -> bool:
        """Whether the recorded driver process still runs (only knowable on the same host)."""
        pid, host = self.driver.get("pid"), self.driver.get("host")
        if not pid or host != socket.gethostname():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def headline_metrics(metrics: dict[str, float], most: int = 2) -> dict[str, float]:
    """The metrics worth showing as a running stage's latest (losses first, then rewards and
    accuracies, else the first logged), at most ``most`` of them."""
    rank = {k: next((i for i, w in enumerate(_HEADLINE_WORDS) if w in k), None) for k in metrics}
    ranked = sorted((k for k, r in rank.items() if r is not None), key=rank.__getitem__) or list(metrics)[:1]
    return {k: metrics[k] for k in ranked[:most]}


_HEADLINE_WORDS = ("loss", "reward", "accuracy", "kl")


def state_uri(storage_root: str, run_id: str) -> str:
    return storage.join(storage_root, "_runs", run_id, "state.json")


def cancel_uri(storage_root: str, run_id: str) -> str:
    return storage.join(storage_root, "_runs", run_id, "cancel.request")


def spool_dir(storage_root: str, run_id: str) -> str:
    """Where a run's queued MLflow writes are kept until the store takes them: beside the run
    state, or in the user's cache folder when that is an object store (appends need a disk)."""
    if storage.is_local(storage_root):
        return str(storage.resolve(state_uri(storage_root, run_id))[1].rpartition(os.sep)[0] + os.sep + "spool")
    return os.path.join(os.path.expanduser("~/.cache/genai-orchestrator/spool"), run_id)


def cache_uri(storage_root: str, fingerprint: str) -> str:
    return storage.join(storage_root, "_cache", f"{fingerprint}.json")


def stage_record_uri(storage_root: str, pipeline: str, stage: str) -> str:
    """The cache record a stage last wrote (what ``validate`` diffs a miss against)."""
    return storage.join(storage_root, "_cache", "stages", pipeline, f"{stage}.json")


def output_uri(storage_root: str, pipeline: str, stage: str, fingerprint: str, attempt: str | None = None) -> str:
    """A fingerprint's outputs folder, or (``attempt`` given) the one attempt's location in it:
    attempts never write into each other's files."""
    base = storage.join(storage_root, pipeline, stage, fingerprint[:16])
    return storage.join(base, attempt) if attempt else base


def scratch_uri(storage_root: str, pipeline: str, stage: str, fingerprint: str, run_id: str | None = None) -> str:
    """A fingerprint's scratch folder, or (``run_id`` given) the one run's in it: a run's retries
    and its ``resume`` continue from the checkpoints there; another run of the same fingerprint
    (started beside it, or later) never reads, keeps or deletes them."""
    base = storage.join(storage_root, "_scratch", pipeline, stage, fingerprint[:16])
    return storage.join(base, run_id[:12]) if run_id else base


def attempt_name(run_id: str, attempt: int) -> str:
    """An attempt's folder name under a fingerprint's outputs: the run's id first, so the folder
    (and its ``.incoming-*`` staging copy) says which run owns it."""
    return f"{run_id[:_OWNER]}-{attempt}"


_OWNER = 12  # characters of the run id that name a run's folders


def owner_may_be_live(storage_root: str) -> Callable[[str], bool]:
    """A test of folder names (attempts, their staging copies, scratch folders: all start with
    their run's id) telling whether the run that owns one may still be writing it: its state says
    RUNNING and its driver is alive (or on another host, where that cannot be known). A folder
    no run state claims is an orphan. Lists the runs once; reads only the states asked about."""
    runs = storage.join(storage_root, "_runs")
    ids: list[str] | None = None
    known: dict[str, bool] = {}

    def live(name: str) -> bool:
        nonlocal ids
        owner = name[:_OWNER]
        if owner not in known:
            ids = storage.list_names(runs) if ids is None else ids
            known[owner] = any(_may_be_live(storage.join(runs, i, "state.json")) for i in ids if i.startswith(owner))
        return known[owner]

    return live


def _may_be_live(uri: str) -> bool:
    try:
        rec = RunRecord.load(uri)
    except FileNotFoundError:
        return False
    except (OSError, ValueError):  # unreadable: keep its folders
        return True
    return rec.state == RunState.RUNNING and (rec.driver.get("host") != socket.gethostname() or rec.driver_alive())
