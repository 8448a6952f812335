"""The pipeline spec: the only place untrusted input (YAML, ``--set`` overrides) is parsed.

Every error names the YAML path (``stages.train.config.lr``), quotes the bad value and says
what is allowed; unknown fields get the closest known name suggested.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator

from workers.config import StrictConfig

from .errors import SpecError
# Credentials inside a URI (userinfo, a token in its query): refused in the spec, redacted
# wherever else a URI is shown (``redact``, re-exported here for the modules that show them).
from .secrets import credential_paths, redact  # noqa: F401
from .yamlio import load_yaml_file, load_yaml_text

NAME_PATTERN = r"^[a-z0-9_-]+$"
# Storage roots: a local path or one of these (exact, lowercase: `S3://` or `s3a://` would
# otherwise be taken for a local folder and scatter outputs over each node's disk).
STORAGE_SCHEMES = ("file://", "s3://", "gs://", "gcs://", "hdfs://", "viewfs://")
_SCHEME = re.compile(r"\A([A-Za-z][A-Za-z0-9+.-]*)://")


# Bounds of the policy and resource fields: past them a value is a typo, not a plan (a backoff
# that doubles from an hour over 100 retries would outlive the cluster).
MAX_RETRIES = 100
MAX_BACKOFF_S = 3600.0
MAX_TIMEOUT_S = 30 * 86400.0
MAX_CPUS = 100_000
MAX_GPUS = 10_000
MAX_WORKERS = 100_000


class _Strict(StrictConfig):
    """Unknown fields refused; numbers finite and bounded (``workers.config``)."""


class Resources(_Strict):
    """What a stage asks the cluster for."""

    cpus: float = Field(1.0, ge=0, le=MAX_CPUS, description="CPUs per worker (a python stage has one worker).")
    gpus: float = Field(0.0, ge=0, le=MAX_GPUS, description="GPUs per worker.")
    workers: int | None = Field(None, ge=1, le=MAX_WORKERS, description="Number of workers for kinds that spread their work "
                                "(tokenizer actors, Ray Train workers, replicas); null: the kind's default.")


class Policy(_Strict):
    """How a stage is retried, timed out and cached (``defaults`` and per-stage overrides)."""

    retries: int = Field(2, ge=0, le=MAX_RETRIES, description="Extra attempts after the first.")
    retry_backoff_s: float = Field(1.0, ge=0, le=MAX_BACKOFF_S,
                                   description="Wait before the first retry; doubles on each retry.")
    timeout_s: float | None = Field(None, gt=0, le=MAX_TIMEOUT_S,
                                    description="Stop an attempt after this many seconds (a failed attempt).")
    cache: bool = Field(True, description="Reuse the outputs of an earlier run with the same fingerprint.")


class Stage(_Strict):
    """One node of the DAG."""

    kind: str = Field(description="The stage kind (python, tokenize, pretrain, ...).")
    needs: list[str] = Field(default_factory=list, description="Stages that must finish first; their outputs "
                             "arrive as ctx.inputs.")
    config: dict[str, Any] = Field(default_factory=dict, description="The kind's own configuration, validated by the kind.")
    resources: Resources = Field(default_factory=Resources, description="Resources per worker.")
    enabled: bool = Field(True, description="false: the stage (and what needs it) is skipped.")
    retries: int | None = Field(None, ge=0, le=MAX_RETRIES, description="Overrides defaults.retries.")
    retry_backoff_s: float | None = Field(None, ge=0, le=MAX_BACKOFF_S, description="Overrides defaults.retry_backoff_s.")
    timeout_s: float | None = Field(None, gt=0, le=MAX_TIMEOUT_S, description="Overrides defaults.timeout_s.")
    cache: bool | None = Field(None, description="Overrides defaults.cache.")

    @field_validator("needs")
    @classmethod
    def _unique_needs(cls, v: list[str]) -> list[str]:
        dupes = sorted({n for n in v if v.count(n) > 1})
        if dupes:
            raise ValueError(f"lists {dupes[0]!r} more than once")
        return v


class Tracking(_Strict):
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI; MLFLOW_TRACKING_URI overrides when set.")
    experiment: str | None = Field(None, description="MLflow experiment; default: the pipeline name.")


class RayOptions(_Strict):
    address: str | None = Field(None, description='null: start a local Ray; "auto" or "ray://host:10001": connect.')
    num_cpus: int | None = Field(None, ge=1, le=MAX_CPUS, description="CPUs of the local Ray started when address is null.")


class Pipeline(_Strict):
    """A pipeline file."""

    name: str = Field(pattern=NAME_PATTERN, description="Pipeline name: lowercase letters, digits, _ and -.")
    description: str = Field("", description="Free text, shown in the MLflow UI.")
    storage: str = Field("./artifacts", description="Artifact root: local path or URI (" + ", ".join(STORAGE_SCHEMES) + ").")
    tracking: Tracking = Field(default_factory=Tracking)
    ray: RayOptions = Field(default_factory=RayOptions)
    defaults: Policy = Field(default_factory=Policy, description="Merged under every stage.")
    stages: dict[str, Stage] = Field(description="Stage name -> stage.", min_length=1)

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, v: dict[str, Stage]) -> dict[str, Stage]:
        for name in v:
            if not re.fullmatch(NAME_PATTERN[1:-1], name):  # fullmatch: "$" alone lets a trailing newline pass
                raise ValueError(f"stage name {name!r} must be lowercase letters, digits, _ and - only")
        return v

    @field_validator("storage")
    @classmethod
    def _storage_scheme(cls, v: str) -> str:
        m = _SCHEME.match(v)
        if m and not v.startswith(STORAGE_SCHEMES):
            raise ValueError(f"unsupported storage scheme {m[1] + '://'!r}; use a local path or one of "
                             f"{', '.join(STORAGE_SCHEMES)} (lowercase)")
        return v

    def policy(self, stage: str) -> Policy:
        """The stage's effective retry/timeout/cache policy (stage fields over defaults)."""
        s = self.stages[stage]
        d = self.defaults
        return Policy(
            retries=d.retries if s.retries is None else s.retries,
            retry_backoff_s=d.retry_backoff_s if s.retry_backoff_s is None else s.retry_backoff_s,
            timeout_s=d.timeout_s if s.timeout_s is None else s.timeout_s,
            cache=d.cache if s.cache is None else s.cache,
        )

    def tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or self.tracking.uri

    def experiment(self) -> str:
        return self.tracking.experiment or self.name


# ---------------------------------------------------------------------------------------------
# Turning pydantic errors into messages that name the YAML path


def _step(tp: Any, part: Any) -> Any:
    """The type found at ``part`` inside type ``tp`` (a model field, a dict value, a list item)."""
    import typing

    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(str(part))
        return field.annotation if field else None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is dict and len(args) == 2:
        return args[1]
    if origin in (list, tuple) and args:
        return args[0]
    for a in args:  # Optional[...] / unions: the first branch that knows the part
        found = _step(a, part)
        if found is not None:
            return found
    return None


def _as_model(tp: Any) -> type[BaseModel] | None:
    import typing

    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for a in typing.get_args(tp):
        if (m := _as_model(a)) is not None:
            return m
    return None


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the last part of ``loc`` (for suggesting close names)."""
    current: Any = model
    for part in loc[:-1]:
        current = _step(current, part)
        if current is None:
            return None
    return _as_model(current)


def format_validation_error(err: ValidationError, model: type[BaseModel], prefix: str = "") -> list[str]:
    problems = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = ".".join(str(p) for p in (prefix.split(".") if prefix else []) + list(loc)) or "<top level>"
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            owner = _model_at(model, loc)
            known = sorted(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"{path}: unknown field {str(loc[-1])!r}{hint} (allowed: {', '.join(known)})")
        elif e["type"] == "missing":
            problems.append(f"{path}: required field is missing")
        else:
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            problems.append(f"{path}: {msg} (got {value!r})" if not isinstance(value, dict) else f"{path}: {msg}")
    return problems


# ---------------------------------------------------------------------------------------------
# Overrides: --set stages.train.retries=5


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a copy of ``raw``."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--set {item!r}: expected KEY=VALUE, e.g. stages.train.retries=5")
        try:
            value = load_yaml_text(text, source=f"--set {key}") if text.strip() else ""
        except SpecError as e:
            raise SpecError(f"--set {item!r}: value is not valid YAML ({e.problems[0]})") from None
        node = out
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part) if isinstance(node, dict) else None
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise SpecError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is {nxt!r}, not a mapping")
            node = nxt
        node[parts[-1]] = value
    return out


# ---------------------------------------------------------------------------------------------
# Loading


def parse_pipeline(raw: Any, source: str = "<pipeline>") -> Pipeline:
    """Validate the top level of a pipeline (kinds' configs are checked by ``check_stages``)."""
    if not isinstance(raw, dict):
        raise SpecError(f"the pipeline must be a mapping with name and stages, got {type(raw).__name__}", source)
    if leaks := credential_paths(raw):
        raise SpecError([f"{p}: a URI with credentials (user:password@, TOKEN@ or a token in its query) would be printed, saved in the run state and "
                         f"logged to MLflow; give them through the environment or a credentials file instead"
                         for p in leaks], source)
    try:
        return Pipeline.model_validate(raw)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, Pipeline), source) from None


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> tuple[Pipeline, dict]:
    """(validated pipeline, raw mapping after overrides) from a YAML file."""
    raw = load_yaml_file(path)
    if overrides:
        if not isinstance(raw, dict):
            raise SpecError("the pipeline must be a mapping", str(path))
        raw = apply_overrides(raw, overrides)
    return parse_pipeline(raw, str(path)), raw


# ---------------------------------------------------------------------------------------------
# Stage kinds: each validates its own config


def check_stages(p: Pipeline, source: str = "<pipeline>", roots: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Validate every stage's ``config`` with its kind's model.

    Returns stage name -> {"config": resolved config (JSON-able, defaults filled in),
    "code", "inputs", "env", "versions" (``fingerprint.stage_parts``), "distributed": bool,
    "cacheable": bool}. ``roots``: where project modules and relative inputs are found (the
    pipeline's folder, the working directory).
    """
    from workers import KINDS, load_kind

    from .fingerprint import stage_parts

    roots = roots or [os.getcwd()]

    problems: list[str] = []
    resolved: dict[str, dict[str, Any]] = {}
    for name, stage in p.stages.items():
        path = f"stages.{name}"
        if stage.kind not in KINDS:
            close = difflib.get_close_matches(stage.kind, list(KINDS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"{path}.kind: unknown kind {stage.kind!r}{hint} (known: {', '.join(sorted(KINDS))})")
            continue
        module = load_kind(stage.kind)
        try:
            cfg = module.Config.model_validate(stage.config)
        except ValidationError as e:
            problems.extend(format_validation_error(e, module.Config, prefix=f"{path}.config"))
            continue
        check = getattr(module, "check", None)
        if check is not None:
            try:
                check(cfg)
            except ValueError as e:
                problems.append(f"{path}.config.{e}")
                continue
        resolved[name] = {
            **stage_parts(module, cfg, upstreams=set(stage.needs), roots=roots, storage_root=p.storage),
            "distributed": bool(getattr(module, "DISTRIBUTED", False)),
            # a kind whose output is a live thing (an endpoint) is never taken from the cache
            "cacheable": bool(getattr(module, "CACHEABLE", True)),
        }
    if problems:
        raise SpecError(problems, source)
    return resolved
