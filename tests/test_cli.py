"""`orchestrator generate` on a real (tiny) checkpoint, and its argument errors (exit code 2)."""

from __future__ import annotations

import os
import sys

import torch

from orchestrator.cli import main
from workers.data import tokenizer as toks
from workers.model.transformer import GPT, config_for
from workers.model.hf import save_pretrained
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


def test_live_table_on_a_copy_of_the_terminal_leaves_stdout_where_it_goes(capsys):
    """Quiet runs point fds 1/2 at ray.log and draw the live table on a copy of the terminal:
    what Ray's driver threads print to sys.stdout/sys.stderr meanwhile (the raylet's worker-pool
    warning) must go on to ray.log, not be pulled onto the table's terminal by rich's Live."""
    import io

    from orchestrator.console import StageDisplay
    from orchestrator.state import RunRecord, RunState, StageRecord, StageState

    train = StageRecord("train", "python", "f1", state=StageState.RUNNING, attempts=1)
    record = RunRecord("r1", "demo", RunState.RUNNING, {}, "demo.yaml", "/tmp", "sqlite://", "demo", {"train": train})
    class Terminal(io.StringIO):
        def isatty(self) -> bool:  # rich redirects stdio only while drawing on a terminal
            return True

    terminal = Terminal()
    warning = "(raylet) WARNING: 5 PYTHON worker processes have been started on node ..."
    with StageDisplay(record, ["train"], stream=terminal, live=True) as display:
        print(warning)
        print(warning, file=sys.stderr)
        display.update()
    assert warning not in terminal.getvalue() and "train" in terminal.getvalue()
    captured = capsys.readouterr()
    assert warning in captured.out and warning in captured.err


def test_display_shows_a_failed_stages_traceback_tail_and_the_verdict():
    """No Ray: the transition lines a pipe gets, a failure's last traceback lines, and the
    summary's side-by-side comparison with the judge named and the reward-hacking warning."""
    import io

    from orchestrator.console import StageDisplay
    from orchestrator.state import RunRecord, RunState, StageRecord, StageState

    train = StageRecord("train", "python", "f1", state=StageState.RUNNING, attempts=1)
    ev = StageRecord("evaluate", "evaluate", "f2", state=StageState.SUCCEEDED, attempts=1, outputs={
        "win_rate": 0.97, "win_rate_judge": "the reward the model was trained against", "kl": 3.2,
        "comparison": {"pretrain": {"mean_reward": -1.0, "check_python_syntax": 0.1},
                       "finetune (baseline)": {"mean_reward": 0.1, "check_python_syntax": 0.6,
                                               "check_python_syntax_se": 0.05},
                       "rlhf (evaluated)": {"mean_reward": 0.9, "check_python_syntax": 0.2}},
        "warnings": ["possible reward hacking: the reward rose (0.1 -> 0.9) but ..."],
        "samples_per_model": 24, "prompts_per_model": 12})
    record = RunRecord("r1", "demo", RunState.RUNNING, {}, "demo.yaml", "/tmp", "sqlite://", "demo",
                       {"train": train, "evaluate": ev})
    out = io.StringIO()
    display = StageDisplay(record, ["train", "evaluate"], stream=out)
    display.update()
    train.state, train.error = StageState.FAILED, "ValueError: bad batch"
    train.traceback = "Traceback (most recent call last):\n" + "".join(f'  File "x.py", line {i}\n' for i in range(20)) \
        + "ValueError: bad batch\n"
    display.update()
    display.summary("MLflow: ...")
    text = out.getvalue()
    assert "train            RUNNING attempt 1" in text and "train            FAILED: ValueError: bad batch" in text
    assert '    File "x.py", line 19' in text and 'line 3\n' not in text  # the tail, not the whole traceback
    assert "judged by the reward the model was trained against" in text
    assert "python_syntax (check)" in text and "0.6 ± 0.05" in text and "warning: evaluate: possible reward hacking" in text
    assert "24 completions a model (12 prompts); ± is the standard error over prompts" in text
    assert "_se" not in text
    assert "\x1b[" not in text
