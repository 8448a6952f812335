"""Spec and plan: bad input gets one clear message naming the YAML path, exit code 2, nothing
started. No Ray here: validation must not need a cluster."""

from __future__ import annotations

import textwrap

import pytest

from orchestrator import plan as plan_mod
from orchestrator.cli import main
from orchestrator.errors import SpecError
from orchestrator.graph import find_cycle, topological_order
from orchestrator.runs import prepare
from orchestrator.spec import apply_overrides, parse_pipeline

FUNCS = '''
def ok(ctx, **params):
    return {"params": params}
'''

GOOD = """
name: demo
storage: {storage}
stages:
  a:
    kind: python
    config: {entrypoint: "demo_funcs:ok", params: {x: 1}}
  b:
    kind: python
    needs: [a]
    config: {entrypoint: "demo_funcs:ok"}
  c:
    kind: python
    needs: [b]
    config: {entrypoint: "demo_funcs:ok"}
"""


@pytest.fixture
def write(tmp_path):
    (tmp_path / "demo_funcs.py").write_text(FUNCS)

    def _write(text: str) -> str:
        p = tmp_path / "p.yaml"
        p.write_text(textwrap.dedent(text).replace("{storage}", str(tmp_path / "art")))
        return str(p)

    return _write


def test_good_pipeline_plans_in_order(write):
    prep = prepare(write(GOOD))
    assert [s.name for s in prep.plan.stages] == ["a", "b", "c"]
    assert prep.plan["b"].needs == ("a",)
    assert prep.plan["a"].policy.retries == 2 and prep.plan["a"].policy.cache is True


def test_validate_prints_plan(write, capsys):
    assert main(["validate", write(GOOD)]) == 0
    out = capsys.readouterr().out
    assert "a" in out and "python" in out and "miss" in out


BAD_CASES = [
    # (yaml, fragments expected in the message)
    ("name: demo\nstages:\n  a: {kind: python, config: {entrypoint: 'demo_funcs:ok'}\n", ["YAML syntax error", "line"]),
    ("name: demo\nstages:\n  a: {kind: python, config: {entrypoint: 'demo_funcs:ok'}}\n  a: {kind: python, config: {entrypoint: 'demo_funcs:ok'}}\n",
     ["duplicate key 'a'", "line 4"]),
    ("name: demo\nstages:\n  a: {kind: python, retires: 3, config: {entrypoint: 'demo_funcs:ok'}}\n",
     ["stages.a.retires", "unknown field", "did you mean 'retries'"]),
    ("name: demo\nstages:\n  a: {kind: python, needs: [b], config: {entrypoint: 'demo_funcs:ok'}}\n"
     "  b: {kind: python, needs: [a], config: {entrypoint: 'demo_funcs:ok'}}\n", ["cycle", "a -> b -> a"]),
    ("name: demo\nstages:\n  a: {kind: python, needs: [nope], config: {entrypoint: 'demo_funcs:ok'}}\n",
     ["stages.a.needs[0]", "unknown stage 'nope'"]),
    ("name: demo\nstages:\n  a: {kind: pythn, config: {}}\n", ["stages.a.kind", "unknown kind 'pythn'", "did you mean 'python'", "tokenize"]),
    ("name: demo\nstages:\n  a: {kind: python, config: {entrypoint: 'no_such_module:f'}}\n",
     ["stages.a.config.entrypoint", "cannot import", "no_such_module"]),
    ("name: demo\nstages:\n  a: {kind: python, resources: {cpus: -1}, config: {entrypoint: 'demo_funcs:ok'}}\n",
     ["stages.a.resources.cpus", "greater than or equal to 0", "-1"]),
    ("name: Demo!\nstages:\n  a: {kind: python, config: {entrypoint: 'demo_funcs:ok'}}\n", ["name:", "'Demo!'"]),
    ("name: demo\nstages:\n  a: {kind: python, config: {entrypoint: 'demo_funcs:ok', parms: {}}}\n",
     ["stages.a.config.parms", "did you mean 'params'"]),
    ("name: demo\nstages: {}\n", ["stages"]),
]


@pytest.mark.parametrize("text,fragments", BAD_CASES, ids=[
    "syntax", "duplicate-key", "unknown-field", "cycle", "unknown-need", "unknown-kind", "bad-entrypoint",
    "negative-resources", "bad-name", "unknown-config-field", "no-stages"])
def test_bad_input_is_one_clear_message_and_exit_2(write, capsys, text, fragments):
    path = write(text)
    with pytest.raises(SpecError) as err:
        prepare(path)
    for f in fragments:
        assert f in str(err.value), (f, str(err.value))
    assert main(["validate", path]) == 2
    assert main(["run", path]) == 2
    assert "error:" in capsys.readouterr().err


def test_missing_file_is_exit_2(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_overrides_are_validated_like_the_file(write):
    path = write(GOOD)
    prep = prepare(path, ["stages.b.retries=5", "defaults.timeout_s=30"])
    assert prep.plan["b"].policy.retries == 5 and prep.plan["a"].policy.timeout_s == 30
    with pytest.raises(SpecError, match=r"stages.b.retries.*greater than or equal to 0"):
        prepare(path, ["stages.b.retries=-1"])
    with pytest.raises(SpecError, match="expected KEY=VALUE"):
        prepare(path, ["stages.b.retries"])
    assert apply_overrides({"a": {"b": 1}}, ["a.c.d=[1, 2]"]) == {"a": {"b": 1, "c": {"d": [1, 2]}}}


def test_fingerprint_changes_propagate_downstream_only(write):
    path = write(GOOD)
    base = prepare(path).plan
    changed = prepare(path, ["stages.b.config.params={y: 2}"]).plan
    assert base["a"].fingerprint == changed["a"].fingerprint
    assert base["b"].fingerprint != changed["b"].fingerprint
    assert base["c"].fingerprint != changed["c"].fingerprint  # upstream fingerprint is part of it
    # retries do not change outputs, so they do not change the cache key
    assert prepare(path, ["stages.a.retries=7"]).plan["a"].fingerprint == base["a"].fingerprint


def test_graph_helpers():
    needs = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}
    assert topological_order(needs) == ["a", "b", "c", "d"]
    assert find_cycle(needs) is None
    assert find_cycle({"x": ["y"], "y": ["z"], "z": ["x"]}) == ["x", "y", "z", "x"]
    a = plan_mod.Components("k", {"a": 1}, {"f.py": "1"}, {})
    assert a.digest() != plan_mod.Components("k", {"a": 2}, {"f.py": "1"}, {}).digest()
    assert a.digest() != plan_mod.Components("k", {"a": 1}, {"f.py": "2"}, {}).digest()


@pytest.mark.parametrize("kind, needed", [
    ("tokenize", {"workers/data/tokenizer.py", "workers/data/corpus.py"}),
    ("pretrain", {"workers/model/transformer.py", "workers/data/tokens.py", "workers/training/loop.py"}),
    ("finetune", {"workers/model/transformer.py", "workers/model/lora.py", "workers/data/chat.py", "workers/data/records.py"}),
    ("rlhf", {"workers/model/reward_head.py", "workers/data/records.py", "workers/data/chat.py", "workers/training/loop.py"}),
    ("evaluate", {"workers/model/sampling.py", "workers/data/tokens.py", "workers/rl/ranking.py"}),
])
def test_code_digest_follows_function_local_imports(kind, needed):
    """Found statically and transitively, function-local imports included (the old digest, which
    followed module-level names only, missed the model under pretrain and the tokenizer under tokenize)."""
    from orchestrator.fingerprint import code_digests

    assert needed <= set(code_digests([f"workers.kinds.{kind}"], []))


def test_code_digest_follows_relative_and_package_imports(tmp_path):
    from orchestrator.fingerprint import code_digests

    pkg = tmp_path / "mypkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "entry.py").write_text("def f():\n    from . import helper\n    from .sub import deep\n    import mypkg.other\n")
    for name in ("helper.py", "other.py", "sub/deep.py"):
        (pkg / name).write_text("import json\n")
    found = set(code_digests(["mypkg.entry"], [str(tmp_path)]))
    assert {"mypkg/entry.py", "mypkg/helper.py", "mypkg/other.py", "mypkg/sub/deep.py", "mypkg/__init__.py"} <= found
    assert not any("json" in f for f in found)  # the standard library is not ours


@pytest.mark.parametrize("storage", ["S3://b/x", "s3a://b/x", "abfs://c@a.dfs.core.windows.net/x", "http://h/x"])
def test_unsupported_storage_scheme_is_an_error_naming_storage(storage):
    with pytest.raises(SpecError) as e:
        parse_pipeline({"name": "p", "storage": storage, "stages": {"a": {"kind": "python"}}})
    text = str(e.value)
    assert "storage" in text and "s3://" in text and "hdfs://" in text and repr(storage.split("://")[0] + "://") in text


def test_stage_name_with_trailing_newline_is_rejected():
    with pytest.raises(SpecError, match=r"stage name 'a\\n'"):
        parse_pipeline({"name": "p", "stages": {"a\n": {"kind": "python"}}})


def test_credentials_in_a_uri_are_refused_and_redacted():
    from orchestrator.spec import redact

    with pytest.raises(SpecError, match=r"stages.t.config.source: a URI with credentials") as e:
        parse_pipeline({"name": "p", "stages": {"t": {"kind": "tokenize", "config": {"source": "s3://AK:SECRET@b/x"}}}})
    assert "SECRET" not in str(e.value)
    assert redact("see http://bob:pw@host:5000/x and s3://b/k") == "see http://***@host:5000/x and s3://b/k"


def test_every_shipped_pipeline_validates():
    from pathlib import Path

    for path in sorted(Path(__file__).resolve().parent.parent.joinpath("pipelines").glob("*.yaml")):
        prep = prepare(path)
        assert prep.plan.stages, path


def test_readme_yaml_reference_is_generated_from_the_models():
    """The README's YAML reference cannot drift: it must equal what the models generate."""
    from pathlib import Path

    from orchestrator.reference import generate, readme_section

    readme = Path(__file__).resolve().parent.parent.joinpath("README.md").read_text()
    assert readme_section(readme) == generate(), "run: python -m orchestrator.reference --write"
