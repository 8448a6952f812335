"""The cache key, mutation by mutation: each edit to a finished pipeline turns exactly the stages
it affects into misses, `validate` names why, and every remaining hit returns the outputs a
`--no-cache` run computes.

Inputs are found in the config, not declared (a python stage's params file, a module its params
name for importlib, a pretrain's token-dataset folder), modules are followed wherever they are
found (PYTHONPATH, the project installed without -e into site-packages), declared environment
variables and the versions of Python and the numeric packages join the key."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from orchestrator import runs
from orchestrator.fingerprint import FAKE_VERSIONS_ENV, explain, input_signatures, scan_config
from orchestrator.state import RunState, StageState
from tests.test_faults import _write_corpus
from workers import storage

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cret-value-never-stored"

FUNCS = '''
import importlib
import os
from pathlib import Path


def read(ctx, path):
    return {"text": Path(path).read_text()}


def scale(ctx, factor):
    return {"v": len(ctx.inputs["read"]["text"]) * factor}


def plugin(ctx, module):
    return {"value": importlib.import_module(module).VALUE}


def secret(ctx):
    return {"token_length": len(os.environ.get("MUT_TOKEN", ""))}


def const(ctx, n):
    return {"n": n}
'''

ON_PATH = '''
def run(ctx):
    from mutpphelper import VALUE
    return {"value": VALUE}
'''


@pytest.fixture(scope="module")
def finished(tmp_path_factory, ray_session, _empty_mlflow_db):
    """A finished pipeline of python stages (one reads a file its params name, one loads a module
    by a name in its params, one reads a declared env var, one downstream), plus two planned
    but disabled stages: a python stage whose module is found only on PYTHONPATH (the session's
    Ray workers were started without it) and a pretrain on a token-dataset folder."""
    from workers.kinds import tokenize
    from workers.stage import Resources, local_context

    tmp = tmp_path_factory.mktemp("key")
    pipe, pp = tmp / "pipe", tmp / "pp"
    pipe.mkdir()
    pp.mkdir()
    shutil.copy(_empty_mlflow_db, tmp / "mlflow.db")
    (pipe / "mutfuncs.py").write_text(FUNCS)
    (pipe / "mutplugin.py").write_text("VALUE = 1\n")
    (pipe / "data.txt").write_text("some text\n")
    (pipe / "data_copy.txt").write_text("some text\n")
    (pp / "mutpp.py").write_text(ON_PATH)
    (pp / "mutpphelper.py").write_text("VALUE = 1\n")
    sys.path.insert(0, str(pp))  # the driver's PYTHONPATH

    corpus = _write_corpus(tmp / "corpus", files=2, lines=20)
    tok_ctx = local_context(tmp / "tok", resources=Resources(cpus=1, workers=1))
    tokenize.run(tok_ctx, tokenize.Config(source=f"{corpus}/*.txt", tokenizer={"type": "char"}, val_fraction=0.2, seed=3))
    tokens = tok_ctx.artifact_dir

    path = pipe / "mut.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: mutants
        storage: {tmp / 'store'}
        tracking: {{uri: "sqlite:///{tmp / 'mlflow.db'}"}}
        defaults: {{retries: 0}}
        stages:
          read: {{kind: python, config: {{entrypoint: "mutfuncs:read", params: {{path: "{pipe / 'data.txt'}"}}}}}}
          scale: {{kind: python, needs: [read], config: {{entrypoint: "mutfuncs:scale", params: {{factor: 3}}}}}}
          plugin: {{kind: python, config: {{entrypoint: "mutfuncs:plugin", params: {{module: mutplugin}}}}}}
          secret: {{kind: python, config: {{entrypoint: "mutfuncs:secret", env: [MUT_TOKEN]}}}}
          const: {{kind: python, config: {{entrypoint: "mutfuncs:const", params: {{n: 1}}}}}}
          onpath: {{kind: python, enabled: false, config: {{entrypoint: "mutpp:run"}}}}
          pre:
            kind: pretrain
            enabled: false
            config:
              data: "{tokens}"
              model: {{n_layer: 1, n_head: 2, n_embd: 16, block_size: 16, dropout: 0.0}}
              batch_size: 4
              max_steps: 2
    """))
    os.environ.pop("MUT_TOKEN", None)
    prep = runs.prepare(path)
    rec = runs.start_run(prep, stream=io.StringIO(), live=False)
    assert rec.state == RunState.SUCCEEDED, {n: (s.state, s.error) for n, s in rec.stages.items()}
    base = {s.name: s.components.as_dict() for s in prep.plan.stages}
    enabled = {s.name for s in prep.plan.stages if s.enabled}
    return type("Finished", (), {"tmp": tmp, "pipe": pipe, "pp": pp, "path": path, "tokens": tokens,
                                 "base": base, "enabled": enabled, "record": rec})


@pytest.fixture(scope="module")
def installed(finished, tmp_path_factory):
    """The project installed WITHOUT -e (a wheel's files in a site-packages folder), from a copy."""
    tmp = tmp_path_factory.mktemp("installed")
    src = tmp / "src"
    for pkg in ("orchestrator", "workers"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    site = tmp / "lib" / "site-packages"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(src)], check=True, capture_output=True, timeout=300)
    return site


INSTALLED_PLAN = '''
import json, sys
from pathlib import Path
import orchestrator, workers
site = sys.argv[2]
assert orchestrator.__file__.startswith(site) and workers.__file__.startswith(site), (orchestrator.__file__, workers.__file__)
from orchestrator import runs

def plan():
    return {s.name: s.components.as_dict() for s in runs.prepare(sys.argv[1]).plan.stages}

before = plan()
edited = Path(site, sys.argv[3])
edited.write_text(edited.read_text() + "\\n# edited in the installed copy\\n")
print(json.dumps({"before": before, "after": plan()}))
'''


def _installed_plans(finished, site: Path, rel: str) -> tuple[dict, dict]:
    """(components before, after editing ``rel`` in the installed copy), planned in a process
    that imports the project from ``site`` only."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(finished.pp)])}
    out = subprocess.run([sys.executable, "-c", INSTALLED_PLAN, str(finished.path), str(site), rel],
                         cwd=finished.pipe, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    plans = json.loads(out.stdout.strip().splitlines()[-1])
    return plans["before"], plans["after"]


@contextlib.contextmanager
def _appended(path: Path, text: bytes | str):
    before = path.read_bytes()
    path.write_bytes(before + (text.encode() if isinstance(text, str) else text))
    try:
        yield
    finally:
        path.write_bytes(before)


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@dataclass
class Mutant:
    """An edit of the finished pipeline, the stages it must turn into misses and the reasons
    `validate` must give for each (``{}`` placeholders: the fixture's folders)."""

    edit: Callable[[Any], Any]  # finished -> context manager applying the edit
    misses: dict[str, list[str]]
    overrides: Callable[[Any], list[str]] = lambda f: []
    run: bool = False  # run the mutated pipeline for real, and a --no-cache run beside it
    installed: str | None = None  # edit this file of the installed copy (planned in a subprocess)


def _shard(f) -> Path:
    return next(iter(sorted(Path(f.tokens, "train").glob("*.parquet"))))


MUTANTS = {
    "params-file": Mutant(lambda f: _appended(f.pipe / "data.txt", "more\n"),
                          {"read": ["input file {pipe}/data.txt"], "scale": ["upstream read"]}, run=True),
    "importlib-module": Mutant(lambda f: _appended(f.pipe / "mutplugin.py", "# edited\n"),
                               {"plugin": ["code file mutplugin.py"]}),
    "pythonpath-module": Mutant(lambda f: _appended(f.pp / "mutpphelper.py", "# edited\n"),
                                {"onpath": ["code file mutpphelper.py"]}),
    "declared-env-var": Mutant(lambda f: _env("MUT_TOKEN", SECRET), {"secret": ["env var MUT_TOKEN"]}),
    "pretrain-data-shard": Mutant(lambda f: _appended(_shard(f), b"\0"), {"pre": ["input file {shard}"]}),
    "package-version": Mutant(lambda f: _env(FAKE_VERSIONS_ENV, "tokenizers=0.99.0"),
                              {"pre": [f"environment: tokenizers {importlib.metadata.version('tokenizers')} -> 0.99.0"]}),
    "python-version": Mutant(lambda f: _env(FAKE_VERSIONS_ENV, "python=CPython 3.99.0"),
                             {s: [f"environment: python CPython {sys.version.split()[0]} -> CPython 3.99.0"]
                                 + (["upstream read"] if s == "scale" else [])
                              for s in ["read", "scale", "plugin", "secret", "const", "onpath", "pre"]}),
    "config-key": Mutant(lambda f: contextlib.nullcontext(), {"const": ["config key params.n"]},
                         overrides=lambda f: ["stages.const.config.params.n=2"]),
    "upstream": Mutant(lambda f: contextlib.nullcontext(),
                       {"read": ["config key params.path", "input file {pipe}/data.txt", "input file {pipe}/data_copy.txt"],
                        "scale": ["upstream read"]},
                       overrides=lambda f: [f"stages.read.config.params.path={f.pipe / 'data_copy.txt'}"]),
    "installed-code": Mutant(lambda f: contextlib.nullcontext(), {"pre": ["code file workers/model/transformer.py"]},
                             installed="workers/model/transformer.py"),
}


@pytest.mark.parametrize("name", list(MUTANTS))
def test_each_edit_misses_exactly_the_stages_it_affects(finished, request, name):
    m = MUTANTS[name]
    fmt = {"pipe": finished.pipe, "shard": _shard(finished)}
    want = {s: sorted(r.format(**fmt) for r in reasons) for s, reasons in m.misses.items()}
    if m.installed:
        before, after = _installed_plans(finished, request.getfixturevalue("installed"), m.installed)
        assert before == finished.base  # the installed copy is keyed as the source tree it came from
        got = {s: sorted(explain(before[s], after[s])) for s in after if after[s] != before[s]}
        assert got == want
        return

    snapshot = finished.tmp / "store" / "_cache" / "stages"
    backup = finished.tmp / f"stages-{name}"
    shutil.copytree(snapshot, backup)
    try:
        with m.edit(finished):
            prep = runs.prepare(finished.path, m.overrides(finished))
            new = {s.name: s.components.as_dict() for s in prep.plan.stages}
            got = {s: sorted(explain(finished.base[s], new[s])) for s in new if new[s] != finished.base[s]}
            assert got == want
            # `validate`'s view of the finished stages: the same hits, the same reasons
            shown = runs.explain_cache(prep)
            assert {s: sorted(why) for s, (status, why) in shown.items() if s in finished.enabled and status == "miss"} \
                == {s: r for s, r in want.items() if s in finished.enabled}
            assert {s for s, (status, _) in shown.items() if status == "hit"} == finished.enabled - set(want)
            assert SECRET not in json.dumps(new)
            if m.run:
                _run_and_compare(finished, prep, set(want))
    finally:
        shutil.rmtree(snapshot)
        shutil.move(str(backup), snapshot)


def _run_and_compare(finished, prep, misses: set[str]) -> None:
    """Run the mutated pipeline: the misses run, the rest are hits; every stage's outputs equal
    a --no-cache run's."""
    rec = runs.start_run(prep, stream=io.StringIO(), live=False)
    assert rec.state == RunState.SUCCEEDED
    states = {n: s.state for n, s in rec.stages.items() if n in finished.enabled}
    assert states == {n: StageState.SUCCEEDED if n in misses else StageState.CACHED for n in finished.enabled}
    clean = runs.start_run(prep, no_cache=True, stream=io.StringIO(), live=False)
    assert clean.state == RunState.SUCCEEDED
    assert all(clean.stages[n].state == StageState.SUCCEEDED for n in finished.enabled)
    assert {n: rec.stages[n].outputs for n in finished.enabled} == {n: clean.stages[n].outputs for n in finished.enabled}
    assert rec.stages["read"].outputs["text"] == Path(prep.plan["read"].config["params"]["path"]).read_text()


def test_validate_prints_the_environment_change(finished):
    """The CLI's own words for a package upgrade (the stand-in variable)."""
    env = {**os.environ, FAKE_VERSIONS_ENV: "python=CPython 3.99.0",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(finished.pp)])}
    out = subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(finished.path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(f"changed: environment: python CPython {sys.version.split()[0]} -> CPython 3.99.0") == 5


# ---------------------------------------------------------------------------------------------
# The rules for config strings (no Ray)


def test_which_config_strings_are_inputs_and_modules(tmp_path, monkeypatch):
    pipe, cwd = tmp_path / "pipe", tmp_path / "cwd"
    (pipe / "shards").mkdir(parents=True)
    (pipe / "shards" / "a.bin").write_text("a")
    (pipe / "word").write_text("a plain word that names a file")
    (pipe / "keymod.py").write_text("")
    (pipe / "keypkg").mkdir()
    (pipe / "keypkg" / "__init__.py").write_text("")
    (pipe / "keypkg" / "sub.py").write_text("")
    cwd.mkdir()
    (cwd / "here.txt").write_text("the working directory comes first")
    (pipe / "here.txt").write_text("")
    (cwd / "up").write_text("an upstream's name is the upstream, not this file")
    monkeypatch.chdir(cwd)
    config = {
        "a": "shards", "b": ["word", {"c": "here.txt"}], "d": "up", "e": "builtin:stdlib",
        "f": "keymod:fn", "g": "keypkg.sub", "h": "json", "i": "s3://bucket/key", "j": "missing.txt",
        "k": "shards/*.bin", "l": "line one\nshards", "m": "", "n": "torch:compile",
    }
    inputs, modules = scan_config(config, upstreams={"up"}, roots=[str(pipe), str(cwd)])
    assert inputs == ["shards", "word", "here.txt", "s3://bucket/key", "shards/*.bin"]
    assert modules == ["keymod", "keypkg.sub"]  # json (stdlib) and torch (site-packages) are not followed
    # keys a python stage marks `untracked` (folders it writes to) are left out, nested ones included
    inputs, _ = scan_config(config, upstreams={"up"}, roots=[str(pipe), str(cwd)], untracked=["b", "a"])
    assert inputs == ["s3://bucket/key", "shards/*.bin"]

    # how each is known: the working directory's here.txt first; folders without __pycache__ or
    # the storage root; big files by size and mtime
    (pipe / "shards" / "__pycache__").mkdir()
    (pipe / "shards" / "__pycache__" / "x.pyc").write_text("")
    (pipe / "shards" / "store").mkdir()
    (pipe / "shards" / "store" / "out.bin").write_text("")
    with open(pipe / "shards" / "big.bin", "wb") as f:
        f.truncate((4 << 20) + 1)
    sigs = input_signatures(["here.txt", "shards"], [str(pipe), str(cwd)], exclude=[str(pipe / "shards" / "store")])
    assert sigs["here.txt"] == {str(cwd / "here.txt"): storage.sha256_file(cwd / "here.txt")[:16]}
    big = (pipe / "shards" / "big.bin").stat()
    assert sigs["shards"] == {str(pipe / "shards" / "a.bin"): storage.sha256_file(pipe / "shards" / "a.bin")[:16],
                              str(pipe / "shards" / "big.bin"): f"{big.st_size}:{big.st_mtime_ns}"}


def test_a_declared_input_counts_while_missing_and_env_values_are_digests(tmp_path, monkeypatch):
    from orchestrator.fingerprint import stage_parts
    from workers.kinds import python

    monkeypatch.setenv("KEY_A", SECRET)
    monkeypatch.delenv("KEY_B", raising=False)
    cfg = python.Config(entrypoint="json:dumps", inputs=[str(tmp_path / "later.txt")], env=["KEY_A", "KEY_B"])
    parts = stage_parts(python, cfg, upstreams=set(), roots=[str(tmp_path)])
    assert parts["inputs"] == {str(tmp_path / "later.txt"): {"*": "missing"}}
    assert parts["env"]["KEY_B"] == "unset" and len(parts["env"]["KEY_A"]) == 16
    assert SECRET not in json.dumps(parts)
    monkeypatch.setenv("KEY_A", SECRET + "!")
    assert stage_parts(python, cfg, upstreams=set(), roots=[str(tmp_path)])["env"]["KEY_A"] != parts["env"]["KEY_A"]


def test_env_names_are_checked():
    from orchestrator.errors import SpecError
    from orchestrator.spec import check_stages, parse_pipeline

    p = parse_pipeline({"name": "p", "stages": {"a": {"kind": "python", "config": {
        "entrypoint": "json:dumps", "env": ["OK_1", "A-B"]}}}})
    with pytest.raises(SpecError, match=r"stages.a.config.env: not an environment variable name: 'A-B'"):
        check_stages(p)


def test_a_pooled_worker_forgets_an_edited_module_found_on_pythonpath(tmp_path, monkeypatch):
    """The runner drops loaded user modules when one was edited: those on PYTHONPATH too (outside
    the pipeline's folder and the working directory), as the key follows them."""
    from orchestrator import runner

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "pooledmod.py").write_text("VALUE = 1\n")
    import pooledmod

    roots = [str(tmp_path / "elsewhere")]
    saved = dict(sys.modules)  # this process's project modules are dropped too: put them back after
    try:
        runner._forget_edited_code(roots)  # notes what is loaded
        assert "pooledmod" in sys.modules
        st = (tmp_path / "pooledmod.py").stat()
        (tmp_path / "pooledmod.py").write_text("VALUE = 2\n")
        os.utime(tmp_path / "pooledmod.py", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        runner._forget_edited_code(roots)
        assert "pooledmod" not in sys.modules and "json" in sys.modules  # the stdlib stays
        import pooledmod as again

        assert again.VALUE == 2 and pooledmod.VALUE == 1
    finally:
        sys.modules.pop("pooledmod", None)
        for name, module in saved.items():
            if name != "pooledmod":
                sys.modules[name] = module


def test_explain_names_each_part_and_an_older_record():
    old = {"kind": "python", "config": {"a": 1}, "code": {}, "inputs": {}, "env": {"TOKEN": "x"},
           "versions": {"python": "CPython 3.11.7", "torch": "2.13.0"}}
    new = {**old, "env": {"TOKEN": "y"}, "versions": {"python": "CPython 3.11.7", "torch": "2.14.1", "numpy": "2.4.6"}}
    assert explain(old, new) == ["env var TOKEN", "environment: numpy not used -> 2.4.6",
                                 "environment: torch 2.13.0 -> 2.14.1"]
    before = {k: v for k, v in old.items() if k not in ("env", "versions")}  # a record from before this key
    assert explain(before, new) == ["env var TOKEN", "environment: not recorded (a record from an older orchestrator)"]
