"""A bad checkpoint is one line naming the file and the field, exit 2, before anything is allocated
(``workers.model.hf_check``): issue 22's cases one by one, then a seeded fuzz of 60 malformed
folders through ``orchestrator generate`` (in-process ``main``, a few through the real command).

Two tiny checkpoints are written once per module by our HF writer with a char tokenizer: a GPT-2
(one model.safetensors) and a Llama sharded into several files with an index.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from orchestrator.cli import main
from workers.checkpoints import check_checkpoint, open_checkpoint
from workers.model.hf_check import LIMITS, CheckpointError

ROOT = Path(__file__).resolve().parents[1]
TEXT = "the quick brown fox jumps over the lazy dog. def add(a, b): return a + b\n"


def _write(folder: Path, size: str, shard_bytes: int | None = None) -> Path:
    from workers.data import tokenizer as toks
    from workers.model.hf import save_model
    from workers.model.transformer import GPT, config_for

    torch.manual_seed(0)
    tok = toks.train_char([TEXT])
    model = GPT(config_for({"size": size, "n_layer": 2, "n_embd": 32, "block_size": 64,
                            **({"intermediate_size": 64} if size.startswith("llama") else {})}, tok.get_vocab_size()))
    save_model(model, folder, **({"max_shard_bytes": shard_bytes} if shard_bytes else {}),
               extra={"eos_token_id": toks.eos_id(tok)})
    toks.save(tok, folder)
    return folder


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("good")
    return {"gpt2": _write(root / "gpt2", "tiny"), "llama": _write(root / "llama", "llama-tiny", shard_bytes=20_000)}


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    out = fn(data)
    path.write_text(json.dumps(data if out is None else out))


def _index(folder: Path) -> dict:
    return json.loads((folder / "model.safetensors.index.json").read_text())


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _one_line_exit_2(folder: Path, *match: str) -> str:
    """``orchestrator generate FOLDER``: exit 2, one line on stderr containing each of ``match``."""
    rc, out, err = _run(["generate", str(folder), "--prompt", "a", "--device", "cpu"])
    assert rc == 2, (rc, out, err)
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for m in match:
        assert m in err, (m, err)
    return err


def test_good_checkpoints_load(good):
    for folder in good.values():
        check_checkpoint(folder)
        assert open_checkpoint(folder, device="cpu").model is not None
    assert len(_index(good["llama"])["weight_map"]) and len(set(_index(good["llama"])["weight_map"].values())) > 1


# -------------------------------------------------------------------------------- config.json


def test_huge_n_layer_is_refused_before_any_allocation(good, tmp_path):
    d = _copy(good["gpt2"], tmp_path / "c")
    _edit_json(d / "config.json", lambda c: c.update(n_layer=10_000_000))
    t0 = time.perf_counter()
    _one_line_exit_2(d, "config.json: n_layer: got 10000000; at most 1024 is supported")
    assert time.perf_counter() - t0 < 10


def test_vocab_size_as_a_float_or_past_the_limit(good, tmp_path):
    d = _copy(good["gpt2"], tmp_path / "c")
    _edit_json(d / "config.json", lambda c: c.update(vocab_size=1e11))
    _one_line_exit_2(d, "config.json: vocab_size: got 100000000000.0; expected an integer")
    _edit_json(d / "config.json", lambda c: c.update(vocab_size=10**11))
    _one_line_exit_2(d, f"config.json: vocab_size: got 100000000000; at most {LIMITS['vocab']} is supported")


def test_parameters_that_cannot_fit_in_free_memory(good, tmp_path):
    """Within every limit, yet ~1e12 parameters: 'needs N GiB, M free', before the shapes."""
    d = _copy(good["llama"], tmp_path / "c")
    _edit_json(d / "config.json", lambda c: c.update(num_hidden_layers=1000, hidden_size=16384, head_dim=128,
                                                      num_attention_heads=128, num_key_value_heads=8,
                                                      intermediate_size=53248))
    err = _one_line_exit_2(d, "config.json: the parameters need ", "free on cpu")
    need = float(err.split("need ")[1].split(" GiB")[0])
    # 1000 blocks x (q,o 16384^2 + k,v 2x16384x1024 + 3x16384x53248 + 2 norms) + embeddings, in fp32
    per_block = 2 * 16384**2 + 2 * 16384 * 1024 + 3 * 16384 * 53248 + 2 * 16384
    vocab = json.loads((d / "config.json").read_text())["vocab_size"]
    expected = (1000 * per_block + 2 * vocab * 16384 + 16384) * 4 / 2**30
    assert need == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.__delitem__("n_head"), "config.json: n_head: required for model_type 'gpt2' but missing"),
    (lambda c: c.update(n_embd="64"), "config.json: n_embd: got '64'; expected an integer"),
    (lambda c: c.update(n_embd=31), "config.json: n_embd: got 31; must be divisible by"),
    (lambda c: c.update(layer_norm_epsilon=float("nan")), "config.json: layer_norm_epsilon: got nan"),
    (lambda c: c.update(tie_word_embeddings="yes"), "config.json: tie_word_embeddings: got 'yes'; expected true"),
    (lambda c: c.update(model_type="gemma"), "config.json: model_type 'gemma' is not supported"),
    (lambda c: c.update(model_type=["gpt2"]), "config.json: model_type ['gpt2'] is not supported"),
    (lambda c: [c], "config.json: expected a JSON object, got list"),
    (lambda c: "x", "config.json: expected a JSON object, got str"),
], ids=["missing", "str", "indivisible", "nan", "bool", "family", "family-list", "list", "string"])
def test_config_json_problems_are_one_line(good, tmp_path, edit, match):
    d = _copy(good["gpt2"], tmp_path / "c")
    _edit_json(d / "config.json", edit)
    _one_line_exit_2(d, match)


def test_corrupt_json_files(good, tmp_path):
    d = _copy(good["gpt2"], tmp_path / "c")
    (d / "config.json").write_text('{"n_layer": 2,')
    _one_line_exit_2(d, "config.json: not valid JSON")
    d = _copy(good["gpt2"], tmp_path / "t")
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    _one_line_exit_2(d, "tokenizer.json: not a tokenizer the `tokenizers` library reads")
    d = _copy(good["gpt2"], tmp_path / "tc")
    (d / "tokenizer_config.json").write_text("[1, 2]")
    _one_line_exit_2(d, "tokenizer_config.json: expected a JSON object, got list")


# -------------------------------------------------------------------------------- weights


def test_an_index_naming_a_file_outside_the_folder(good, tmp_path):
    d = _copy(good["llama"], tmp_path / "c")
    for target in ("../../etc/passwd", "/etc/passwd"):
        def point(ix, target=target):
            ix["weight_map"][next(iter(ix["weight_map"]))] = target
        _edit_json(d / "model.safetensors.index.json", point)
        _one_line_exit_2(d, "model.safetensors.index.json: weight_map.", f"{target!r} is outside the checkpoint folder")


def test_a_key_in_two_shards(good, tmp_path):
    """A tensor stored in two shards (the fused q|k|v would be filled twice, another part never):
    refused by key, naming both files."""
    from safetensors.torch import load_file, save_file

    d = _copy(good["llama"], tmp_path / "c")
    files = sorted(set(_index(d)["weight_map"].values()))
    first, second = load_file(d / files[0]), load_file(d / files[1])
    name = next(iter(first))
    save_file({**second, name: first[name]}, d / files[1], metadata={"format": "pt"})
    _one_line_exit_2(d, f"tensor {name!r} is also in", "each tensor must be in exactly one file")


def test_shapes_that_do_not_match_the_config(good, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(good["gpt2"], tmp_path / "c")
    weights = load_file(d / "model.safetensors")
    weights["transformer.h.0.mlp.c_fc.weight"] = weights["transformer.h.0.mlp.c_fc.weight"][:, :100].contiguous()
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    _one_line_exit_2(d, "model.safetensors: tensor 'transformer.h.0.mlp.c_fc.weight' has shape [32, 100]; "
                        "config.json implies [32, 128]")
    d = _copy(good["gpt2"], tmp_path / "v")  # a config that says more layers than are stored
    _edit_json(d / "config.json", lambda c: c.update(n_layer=3))
    _one_line_exit_2(d, "weights: 12 tensors missing, e.g. 'transformer.h.2.attn.c_attn.bias'")


def test_truncated_weights(good, tmp_path):
    d = _copy(good["gpt2"], tmp_path / "c")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    _one_line_exit_2(d, "model.safetensors: tensor", "(truncated?)")
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    _one_line_exit_2(d, "model.safetensors: header length 1099511627776 exceeds the file")


def test_serve_fails_before_ray_starts(good, tmp_path):
    import ray

    d = _copy(good["gpt2"], tmp_path / "c")
    _edit_json(d / "config.json", lambda c: c.update(n_layer=10_000_000))
    was_up = ray.is_initialized()
    rc, _, err = _run(["serve", str(d), "--port", "8"])
    assert rc == 2 and err.count("\n") == 1 and "config.json: n_layer: got 10000000" in err, err
    assert ray.is_initialized() == was_up  # no Ray started for it


# -------------------------------------------------------------------------------- fuzz


def _corrupt(rng: random.Random, good: dict[str, Path], dest: Path) -> Path:
    """One malformed checkpoint folder, chosen and shaped by ``rng``."""
    from safetensors.torch import load_file, save_file

    family = rng.choice(["gpt2", "llama"])
    d = _copy(good[family], dest)
    cfg = json.loads((d / "config.json").read_text())
    keys = [k for k in cfg if isinstance(cfg[k], int) and not isinstance(cfg[k], bool) and "token" not in k]
    weights = "model.safetensors" if family == "gpt2" else rng.choice(sorted(set(_index(d)["weight_map"].values())))
    kind = rng.randrange(10)
    if kind == 0:  # a number field: huge, negative, zero, a float, a string, null, nan, a list
        k = rng.choice(keys)
        cfg[k] = rng.choice([10**rng.randrange(7, 30), -rng.randrange(1, 100), 0, 1.5, "2", None, float("inf"),
                             [cfg[k]], {"v": 1}])
        if cfg[k] is None and k not in ("n_inner",):
            cfg[k] = float("nan")
        (d / "config.json").write_text(json.dumps(cfg))
    elif kind == 1:  # a required key gone
        cfg.pop(rng.choice(keys))
        (d / "config.json").write_text(json.dumps(cfg))
    elif kind == 2:  # not JSON, or not an object
        (d / rng.choice(["config.json", "tokenizer_config.json"])).write_text(
            rng.choice(["", "{", "[]", "null", "42", '"x"', "\xff", "{" * 100_000]))
    elif kind == 3:  # tokenizer.json cut short or replaced
        text = (d / "tokenizer.json").read_text()
        (d / "tokenizer.json").write_bytes(rng.choice([text[: rng.randrange(len(text))].encode(), b"\x80\x81",
                                                       b"{}", b'{"model": 1}']))
    elif kind == 4:  # weights truncated at a random byte
        data = (d / weights).read_bytes()
        (d / weights).write_bytes(data[: rng.randrange(len(data) - 1)])
    elif kind == 5:  # a byte of the header's length, or its opening brace, changed
        data = bytearray((d / weights).read_bytes())
        i = rng.choice([3, 4, 5, 8])  # the length then exceeds the file (>= 16 MiB more); 8: not JSON
        data[i] = (data[i] + rng.randrange(1, 256)) % 256
        (d / weights).write_bytes(bytes(data))
    elif kind == 6:  # a tensor's shape off by one row
        w = load_file(d / weights)
        name = rng.choice(sorted(w))
        w[name] = torch.cat([w[name], w[name][:1]])
        save_file(w, d / weights, metadata={"format": "pt"})
    elif kind == 7:  # a tensor gone, or a stray one
        w = load_file(d / weights)
        if rng.random() < 0.5 and len(w) > 1:
            w.pop(rng.choice(sorted(w)))
        else:
            w["model.extra.weight"] = torch.zeros(2)
        save_file(w, d / weights, metadata={"format": "pt"})
    elif kind == 8 and family == "llama":  # the index: outside paths, missing files, wrong types
        ix = _index(d)
        name = rng.choice(sorted(ix["weight_map"]))
        ix["weight_map"][name] = rng.choice(["../../etc/passwd", "/etc/passwd", "missing.safetensors", 7, "",
                                             "sub/../../x.safetensors"])
        (d / "model.safetensors.index.json").write_text(json.dumps(ix))
    elif kind == 8:
        (d / "model.safetensors").unlink()
    else:  # a dimension that does not divide, or layers the weights lack
        if family == "gpt2":
            cfg.update(rng.choice([{"n_head": 3}, {"n_layer": 3}, {"n_embd": 48}]))
        else:
            cfg.update(rng.choice([{"num_attention_heads": 3}, {"num_key_value_heads": 3}, {"num_hidden_layers": 5},
                                   {"intermediate_size": 65}]))
        (d / "config.json").write_text(json.dumps(cfg))
    return d


FUZZ_FOLDERS = 60


def test_fuzz_malformed_checkpoints(good, tmp_path):
    """60 seeded malformed folders: each exit 2 with one line of error, no traceback, in < 10 s."""
    rng = random.Random(22)
    seen_kinds = set()
    for i in range(FUZZ_FOLDERS):
        d = _corrupt(rng, good, tmp_path / f"f{i}")
        t0 = time.perf_counter()
        err = _one_line_exit_2(d)
        assert time.perf_counter() - t0 < 10, (d, err)
        seen_kinds.add(err.split(": ")[2] if err.count(": ") > 2 else err)
    assert len(seen_kinds) >= 5  # the errors are not all one kind


@pytest.mark.slow
def test_fuzz_in_process_matches_the_command(good, tmp_path):
    """Fuzzed folders through the real `orchestrator` command: the same exit code and the same
    line as main() in-process (a process costs seconds of imports: two of them)."""
    rng = random.Random(22)
    folders = [_corrupt(rng, good, tmp_path / f"f{i}") for i in range(32)]
    for d in (folders[0], folders[31]):
        rc, _, err = _run(["generate", str(d), "--prompt", "a", "--device", "cpu"])
        proc = subprocess.run([sys.executable, "-m", "orchestrator", "generate", str(d), "--prompt", "a",
                               "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert (proc.returncode, proc.stderr) == (rc, err)
