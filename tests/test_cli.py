"""`orchestrator generate` on a real (tiny) checkpoint, and its argument errors (exit code 2)."""

from __future__ import annotations

import torch

from orchestrator.cli import main
from workers.data import tokenizer as toks
from workers.model.transformer import GPT, config_for, save_pretrained
from workers.model.sampling import SamplingParams, generate


def _checkpoint(tmp_path):
    tok = toks.train_char(["def add(a, b):\n    return a + b\n", "hello world"])
    torch.manual_seed(0)
    model = GPT(config_for("tiny", tok.get_vocab_size())).eval()
    save_pretrained(model, tmp_path, extra={"eos_token_id": tok.token_to_id(toks.EOS_TOKEN)})
    toks.save(tok, tmp_path)
    return model, tok


def test_generate_prints_the_greedy_completion(tmp_path, capsys):
    model, tok = _checkpoint(tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "def add", "--temperature", "0", "--max-tokens", "6",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    ids = tok.encode("def add").ids
    want = generate(model, [ids], SamplingParams(max_tokens=6, temperature=0.0), device="cpu",
                    decode=lambda t: tok.decode(t, skip_special_tokens=False))[0][0]
    assert ("def add" + want.text) in out.splitlines()
    assert f"({want.finish_reason}, {len(want.token_ids)} tokens" in out


def test_generate_beams_and_samples(tmp_path, capsys):
    _checkpoint(tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "he", "--num-beams", "3", "--n", "2", "--max-tokens", "4",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- prompt 'he'") == 2 and "score=" in out


def test_generate_bad_arguments_exit_2(tmp_path, capsys):
    _checkpoint(tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top-p" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "x", "--tracking-uri",
                 f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    assert main(["generate", str(tmp_path), "--prompt", "x" * 200, "--max-tokens", "10"]) == 2
    assert "context" in capsys.readouterr().err
