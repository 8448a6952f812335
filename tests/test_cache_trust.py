"""A cache hit is never wrong: the fingerprint covers every source file a kind can run (found
statically, function-local imports included), the files its config names, and a python stage's
local modules; `validate` says what made a miss; resume re-plans stages whose code changed;
`--no-cache` trains from step 0.

Source edits happen in a COPY of the repository (validated in a subprocess) or in temporary
modules: the real files are never touched."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator import runs
from orchestrator.state import RunState, StageState
from tests.test_faults import _write_corpus

REPO = Path(__file__).resolve().parents[1]

FUNCS = '''
def after(ctx):
    return {"loss": ctx.inputs["pretrain"]["final_train_loss"]}

def helped(ctx):
    from trusthelper import VALUE  # function-local: found statically all the same
    return {"value": VALUE}
'''


def _validate(repo: Path, pipeline: Path) -> dict[str, tuple[str, list[str]]]:
    """`orchestrator validate` run from ``repo`` (its own copy of the code): stage -> (cache, changed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(pipeline.parent)])}
    out = subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(pipeline)], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    table: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in out.stdout.splitlines()[2:]:
        if line.strip().startswith("changed:"):
            table[current][1].append(line.split("changed:", 1)[1].strip())
        elif line.strip():
            cols = line.split()
            current = cols[1]
            table[current] = (cols[-1], [])
    return table


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_session, _empty_mlflow_db):
    """One real run of tokenize -> pretrain -> python, plus an independent python stage."""
    tmp = tmp_path_factory.mktemp("trust")
    shutil.copy(_empty_mlflow_db, tmp / "mlflow.db")
    tracking = f"sqlite:///{tmp / 'mlflow.db'}"
    corpus = _write_corpus(tmp / "corpus", files=3, lines=60)
    (tmp / "trustfuncs.py").write_text(FUNCS)
    (tmp / "trusthelper.py").write_text("VALUE = 1\n")
    path = tmp / "trust.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: trust
        storage: {tmp / 'store'}
        tracking: {{uri: "{tracking}"}}
        defaults: {{retries: 0}}
        stages:
          tok:
            kind: tokenize
            resources: {{cpus: 0, workers: 1}}
            config: {{source: "{corpus}/*.txt", tokenizer: {{type: char}}, val_fraction: 0.2, seed: 3}}
          pretrain:
            kind: pretrain
            needs: [tok]
            resources: {{cpus: 1, workers: 1}}
            config:
              model: {{n_layer: 1, n_head: 2, n_embd: 16, block_size: 16, dropout: 0.0}}
              batch_size: 4
              max_steps: 4
              checkpoint_every: 2
              eval_every: 4
              eval_steps: 1
              warmup_steps: 1
          after: {{kind: python, needs: [pretrain], config: {{entrypoint: "trustfuncs:after"}}}}
          py: {{kind: python, config: {{entrypoint: "trustfuncs:helped"}}}}
    """))
    sys.path.insert(0, str(tmp))
    rec = runs.start_run(runs.prepare(path), stream=io.StringIO(), live=False)
    assert rec.state == RunState.SUCCEEDED, {n: (s.state, s.error) for n, s in rec.stages.items()}
    return type("Trained", (), {"tmp": tmp, "path": path, "tracking": tracking, "corpus": corpus, "record": rec})


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory):
    """The project's code, copied: edits here never touch the real files."""
    dst = tmp_path_factory.mktemp("repo")
    for pkg in ("orchestrator", "workers"):
        shutil.copytree(REPO / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _appended(path: Path, text: str):
    """Context manager: ``text`` appended to ``path`` for the block, then the file restored."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        before = path.read_bytes()
        path.write_bytes(before + text.encode())
        try:
            yield
        finally:
            path.write_bytes(before)
    return cm()


def test_validate_names_what_changed(trained, repo_copy):
    """Two independent edits per `validate` (each one a Python start-up): every miss names all
    that changed for it and nothing else, so each edit's reach shows on its own."""
    hits = {"tok": "hit", "pretrain": "hit", "after": "hit", "py": "hit"}
    assert {n: c for n, (c, _) in _validate(repo_copy, trained.path).items()} == hits  # the copy is the same code

    with _appended(repo_copy / "workers/model/transformer.py", "\n# a comment\n"), \
            _appended(trained.tmp / "trusthelper.py", "# a comment\n"):
        got = _validate(repo_copy, trained.path)
    assert got["tok"][0] == "hit"
    assert got["pretrain"] == ("miss", ["code file workers/model/transformer.py"])
    # the module's imports are the module's: `after` lives beside `helped`, in the same module
    assert got["py"] == ("miss", ["code file trusthelper.py"])
    assert got["after"] == ("miss", ["code file trusthelper.py", "upstream pretrain"])

    corpus_file = trained.corpus / "part-1.txt"
    with _appended(repo_copy / "workers/data/tokenizer.py", "\n# a comment\n"), \
            _appended(corpus_file, "one more line.\n"):
        got = _validate(repo_copy, trained.path)
    assert got["tok"] == ("miss", ["code file workers/data/tokenizer.py", f"input file {corpus_file}"])
    assert got["pretrain"][0] == got["after"][0] == "miss"
    assert got["py"][0] == "hit"


def test_no_cache_trains_a_finished_stage_from_step_0(trained):
    rec = runs.start_run(runs.prepare(trained.path), no_cache=True, stream=io.StringIO(), live=False)
    assert rec.state == RunState.SUCCEEDED
    assert rec.stages["pretrain"].state == StageState.SUCCEEDED
    client = MlflowClient(trained.tracking)
    child = client.get_run(rec.stages["pretrain"].child_run_id)
    steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "train_loss"))
    assert steps == [1, 2, 3, 4], steps  # every step trained again, none resumed from a checkpoint
    assert "resumed_from_step" not in child.data.tags


RESUME_FUNCS = '''
from pathlib import Path

def a(ctx):
    from rhelper import VALUE
    return {"v": VALUE}

def b(ctx):
    return {"v": ctx.inputs["a"]["v"] * 10}

def c(ctx, flag):
    if not Path(flag).exists():
        raise RuntimeError("not yet")
    return {"v": ctx.inputs["b"]["v"] + 1}
'''


def test_resume_after_a_code_change_reruns_the_changed_stage(ray_session, tmp_path, tracking_uri):
    (tmp_path / "rfuncs.py").write_text(RESUME_FUNCS)
    (tmp_path / "rhelper.py").write_text("VALUE = 1\n")
    flag = tmp_path / "flag"
    path = tmp_path / "resume.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: rechange
        storage: {tmp_path / 'store'}
        tracking: {{uri: "{tracking_uri}"}}
        defaults: {{retries: 0}}
        stages:
          a: {{kind: python, config: {{entrypoint: "rfuncs:a"}}}}
          b: {{kind: python, needs: [a], config: {{entrypoint: "rfuncs:b"}}}}
          c: {{kind: python, needs: [b], config: {{entrypoint: "rfuncs:c", params: {{flag: "{flag}"}}}}}}
    """))
    sys.path.insert(0, str(tmp_path))
    first = runs.start_run(runs.prepare(path), stream=io.StringIO(), live=False)
    assert first.state == RunState.FAILED and first.stages["b"].outputs == {"v": 10}

    (tmp_path / "rhelper.py").write_text("VALUE = 2\n")  # a's code changes before the resume
    flag.touch()
    stream = io.StringIO()
    resumed = runs.resume_run(first.run_id, tracking_uri, stream=stream, live=False)
    assert resumed.state == RunState.SUCCEEDED
    assert "stage a: changed since it ran (code file rhelper.py)" in stream.getvalue()
    assert {n: s.outputs["v"] for n, s in resumed.stages.items()} == {"a": 2, "b": 20, "c": 21}

    fresh = runs.start_run(runs.prepare(path), stream=io.StringIO(), live=False)
    assert all(s.state == StageState.CACHED for s in fresh.stages.values())
    clean = runs.start_run(runs.prepare(path), no_cache=True, stream=io.StringIO(), live=False)
    assert {n: s.outputs for n, s in fresh.stages.items()} == {n: s.outputs for n, s in clean.stages.items()}
