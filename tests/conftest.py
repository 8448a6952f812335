"""Shared fixtures: one local Ray per test session, a fresh MLflow store per test."""

from __future__ import annotations

import contextlib
import os
import socket
import time

import pytest

# Keep Ray quiet and small on a 2-core machine.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
# Ray Train's controller polls its workers every 2 s by default: every fit's end, every
# checkpoint registration and every failure waits for the next poll. Workers inherit this
# (Ray started from this process), so each of the suite's many fits ends sooner.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def start_local_ray():
    """The test session's local Ray (also used to restore it after a module that needed its own
    multi-node ``ray.cluster_utils.Cluster``)."""
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh Ray of our own, never one another test started with `ray start`
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}})
    return ray


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray shared by the whole test session (started once: it takes seconds)."""
    yield start_local_ray()
    # Left running for later tests; pytest's exit shuts it down.


@pytest.fixture(scope="session")
def _empty_mlflow_db(tmp_path_factory):
    """An MLflow SQLite store with its schema created once (migrations take seconds)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(tmp_path, _empty_mlflow_db):
    """A real MLflow store (SQLite) in a temp folder, fresh for each test."""
    import shutil

    path = tmp_path / "mlflow.db"
    shutil.copy(_empty_mlflow_db, path)
    return f"sqlite:///{path}"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box OpenMP workers
    waiting for a core make every op several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextlib.contextmanager
def moto_s3(bucket: str):
    """A real S3 HTTP endpoint (moto) on 127.0.0.1 with one bucket, and the AWS_* settings every
    client reads set in this process for its lifetime. Yields (env, boto3 client)."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # Stage tasks get no secret keys (see storage.client_env): they read a credentials file, as
    # cluster nodes would, whose path is not secret.
    import tempfile

    creds = os.path.join(tempfile.mkdtemp(prefix="moto-creds-"), "credentials")
    with open(creds, "w") as f:
        f.write("[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SHARED_CREDENTIALS_FILE": creds,
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    try:
        yield env, client
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def still_alive(pid: int, within: float = 15.0) -> bool:
    """Whether process ``pid`` is still running after waiting up to ``within`` s for it to die."""
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.1)
    return True


SERVE_TEXT = "the quick brown fox jumps over the lazy dog. hello world! user: assistant: 0123456789\n"
SERVE_CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture(scope="session")
def serve_checkpoint_dir(tmp_path_factory):
    """A tiny servable checkpoint (char tokenizer, chat template), trained a few steps so greedy
    text varies with the prompt; shared by the serving tests."""
    import torch

    from workers.data import tokenizer as toks
    from workers.model.transformer import GPT, config_for
    from workers.model.hf import save_pretrained

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ckpt") / "tiny-test"
    tok = toks.train_char([SERVE_TEXT])
    model = GPT(config_for({"size": "tiny", "block_size": 256}, tok.get_vocab_size()))
    ids = torch.tensor([tok.encode(SERVE_TEXT * 2).ids])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(15):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_pretrained(model, d, extra={"eos_token_id": toks.eos_id(tok), "chat_template": SERVE_CHAT_TEMPLATE})
    toks.save(tok, d)
    return d
