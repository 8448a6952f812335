"""The ``serve`` stage kind: an OpenAI-compatible HTTP API for a checkpoint, on Ray Serve.

The engine (continuous batching) is ``workers.serving.engine``, the HTTP app and its Ray Serve
deployment ``workers.serving.app``, the OpenAI shapes ``workers.serving.protocol``. This module
is the stage: its config, :func:`run` (deploy the upstream checkpoint and return once it
answers) and :func:`cleanup` (remove the deployment of an attempt that was cancelled or timed
out).

Back-pressure is per replica: when ``max_queue`` requests already wait for a batch slot, a new
one is answered 503 with ``Retry-After``; Ray Serve's own ``max_queued_requests`` bounds what
waits in front of the replicas.
"""

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from workers.checkpoints import check_checkpoint
from workers.config import StrictConfig
from workers.serving.app import APP_NAME, STREAM_INTERVAL_S, api_key_from, serve_checkpoint, shutdown

DISTRIBUTED = True
CACHEABLE = False  # an endpoint lives only as long as the Ray that serves it


# ============================================================================================
# Stage kind config


class Autoscaling(StrictConfig):
    """Ray Serve autoscaling (replaces ``replicas`` when given)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    min_replicas: int = Field(1, ge=0)
    """Fewest replicas kept up."""
    max_replicas: int = Field(2, ge=1)
    """Most replicas the autoscaler starts."""
    target_ongoing_requests: float = Field(8.0, gt=0)
    """Requests in flight per replica the autoscaler aims for."""

    @model_validator(mode="after")
    def _order(self) -> "Autoscaling":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"autoscaling.max_replicas ({self.max_replicas}) must be >= "
                             f"autoscaling.min_replicas ({self.min_replicas})")
        return self


class Config(StrictConfig):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    input: str | None = None
    """Upstream stage whose ``checkpoint`` output is served, or a checkpoint path/URI (ours or a
    Hugging Face folder); None: the only upstream with a ``checkpoint`` output."""
    replicas: int = Field(1, ge=1)
    """Fixed number of replicas (ignored when ``autoscaling`` is set)."""
    autoscaling: Autoscaling | None = None
    """Ray Serve autoscaling bounds; replaces ``replicas``."""
    host: str = "127.0.0.1"
    """Interface the HTTP proxy binds (127.0.0.1: this machine only)."""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port."""
    max_batch_size: int = Field(8, ge=1)
    """Sequences decoded together per replica (continuous batching)."""
    max_queue: int = Field(64, ge=0)
    """Requests that may wait for a batch slot per replica; more are answered 503 + Retry-After."""
    api_key_env: str | None = None
    """Name of an environment variable holding the API key clients must send (Bearer); the key
    itself never goes in the config."""
    api_key_file: str | None = None
    """A file holding that key instead (first line), e.g. a mounted secret."""
    stream_interval_ms: float = Field(STREAM_INTERVAL_S * 1000, ge=0, le=1000)
    """Least time between two chunks of one stream after the first (tokens in between coalesce)."""
    model_name: str | None = None
    """The ``model`` id clients use; default: the checkpoint folder's name."""
    allow_special_tokens: bool = False
    """Let completion prompts hold the tokenizer's special tokens (``<|endoftext|>`` as the
    end-of-text token). Off: text from a request is always plain text, and in chat only the
    template's own markers are control tokens."""
    pooling: Literal["mean", "cls"] = "mean"
    """Encoder checkpoints (answered at /v1/embeddings): mean of the non-padding tokens' last
    hidden states, or the [CLS] token's; L2-normalised."""
    enabled: bool = True
    """False: validate and pass through without deploying (e.g. on CI)."""

    @model_validator(mode="after")
    def _one_key_source(self) -> "Config":
        if self.api_key_env and self.api_key_file:
            raise ValueError("give api_key_env or api_key_file, not both")
        return self


# ============================================================================================
# The stage kind


def run(ctx, config: Config) -> dict:
    """Deploy the upstream checkpoint and return once it answers; it keeps serving after."""
    checkpoint = ctx.upstream("checkpoint", config.input, field="serve.config.input")
    name = config.model_name or Path(str(checkpoint).rstrip("/")).name
    if not config.enabled:
        return {"endpoint": "", "model": name}
    try:
        api_key = api_key_from(config.api_key_env, config.api_key_file)
    except (OSError, ValueError) as e:
        raise ValueError(f"serve.config.api_key_{'file' if config.api_key_file else 'env'}: {e}") from None
    # A bad checkpoint fails this attempt in one line before anything is deployed (memory: the
    # replicas may run on other nodes, whose memory the loading replica checks).
    check_checkpoint(checkpoint, memory=False, field="serve.config.input")
    url = serve_checkpoint(checkpoint, host=config.host, port=config.port, replicas=config.replicas,
                           max_batch_size=config.max_batch_size, max_queue=config.max_queue, api_key=api_key,
                           model_name=name, autoscaling=config.autoscaling.model_dump() if config.autoscaling else None,
                           blocking=False, num_cpus=ctx.resources.cpus, num_gpus=ctx.resources.gpus or None,
                           app_name=app_name(ctx.stage), stream_interval_s=config.stream_interval_ms / 1000,
                           allow_special_tokens=config.allow_special_tokens, pooling=config.pooling)
    ctx.set_tags({"endpoint": url, "model": name})
    ctx.log_metrics({"replicas": float(config.replicas if config.autoscaling is None
                                       else config.autoscaling.min_replicas)})
    return {"endpoint": url, "model": name}


def app_name(stage: str) -> str:
    """The Ray Serve application a serve stage deploys."""
    return f"{APP_NAME}-{stage}"


def cleanup(stage: str, config: Config) -> None:
    """Remove what an attempt of ``stage`` deployed (its process was killed: cancelled, timed out)."""
    if not config.enabled:
        return
    from ray.serve.exceptions import RayServeException

    try:
        shutdown(app_name(stage))
    except RayServeException:  # Serve is not running: nothing was deployed
        pass


__all__ = ["CACHEABLE", "Config", "Autoscaling", "DISTRIBUTED", "app_name", "cleanup", "run"]
