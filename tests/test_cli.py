"""`orchestrator generate` on a real (tiny) checkpoint, and its argument errors (exit code 2)."""

from __future__ import annotations

import os

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


RAY_CHATTER = ("(raylet)", "(autoscaler)", "pid=", "INFO worker.py", "Started a local Ray instance",
               "Token authentication", "PlacementGroupCleaner", "core_worker", "WARNING", "INFO")


def test_run_terminal_reads_cleanly_and_a_print_reaches_the_stage_run(tmp_path):
    """`orchestrator run` as a user runs it, output to a pipe (non-TTY): our lines only, no
    control codes; Ray's chatter is in the run's ray.log; a `python` stage's print is in its
    MLflow run's logs/output.log."""
    import subprocess
    import sys
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    (tmp_path / "talk.py").write_text(
        "import sys\n\ndef speak(ctx):\n    print('hello from the stage')\n"
        "    print('and from its stderr', file=sys.stderr)\n    return {'said': 2}\n")
    (tmp_path / "talk.yaml").write_text(
        "name: talk\nray: {num_cpus: 1}\nstages:\n  speak:\n    kind: python\n    config: {entrypoint: talk:speak}\n")
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    p = subprocess.run([sys.executable, "-m", "orchestrator", "run", "talk.yaml"], cwd=tmp_path, env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    terminal = p.stdout + p.stderr
    assert p.returncode == 0, terminal
    assert "\x1b[" not in terminal  # no colours or cursor moves in a pipe
    lines = [l for l in terminal.splitlines() if l.strip()]
    chatter = [l for l in lines if any(c in l for c in RAY_CHATTER)]
    assert not chatter, terminal
    assert "speak            SUCCEEDED" in terminal and "hello from the stage" not in terminal
    folder = Path(next(l for l in lines if l.startswith("Logs: ")).split()[1])
    assert "Started a local Ray instance" in (folder / "ray.log").read_text()

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run_id = next(l for l in lines if l.startswith("MLflow run id: ")).split()[-1]
    [child] = client.search_runs([client.get_run(run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    text = Path(client.download_artifacts(child.info.run_id, "logs/output.log", str(tmp_path))).read_text()
    assert "hello from the stage" in text and "and from its stderr" in text
    assert ":orchestrator_stage:" not in text
