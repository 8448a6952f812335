"""pipelines/encoder.yaml end to end, shrunk with --set: `orchestrator run` tokenizes the stdlib
with WordPiece and pretrains a BERT with objective mlm; the checkpoint loads with
AutoModelForMaskedLM and AutoTokenizer, and transformers' masked-LM loss on the stage's own
validation batches is the val_loss the stage logged."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHRINK = {
    "stages.tokenize.config.max_bytes": "600000",
    "stages.tokenize.config.tokenizer.vocab_size": "1000",
    "stages.tokenize.config.tokenizer.sample_bytes": "600000",
    "stages.pretrain.config.model.n_embd": "128",
    "stages.pretrain.config.model.n_head": "2",
    "stages.pretrain.config.model.block_size": "64",
    "stages.pretrain.config.max_steps": "150",
    "stages.pretrain.config.lr": "3.0e-3",
    "stages.pretrain.config.warmup_steps": "10",
    "stages.pretrain.config.eval_every": "75",
    "stages.pretrain.config.checkpoint_every": "75",
    "stages.serve.config.enabled": "false",
}


@pytest.mark.slow
def test_encoder_pipeline_end_to_end(tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from workers.data.mlm import MLMBatches, MLMSpecials
    from workers.data.tokens import TokenDataset, unigram_entropy

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    sets = [a for k, v in SHRINK.items() for a in ("--set", f"{k}={v}")]
    p = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(REPO / "pipelines" / "encoder.yaml"),
                        "--plain", *sets], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    [manifest] = tmp_path.glob("artifacts/**/tokenize/**/manifest.json")
    [config] = tmp_path.glob("artifacts/**/pretrain/**/checkpoint/config.json")
    folder = config.parent
    model = AutoModelForMaskedLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "BertForMaskedLM" and tok.mask_token == "[MASK]"
    assert tok("a b")["input_ids"][0] == tok.cls_token_id and tok("a b")["input_ids"][-1] == tok.sep_token_id

    # transformers' loss on the stage's own validation batches (same seed, rows and masks) is the
    # val_loss the stage logged with val_masked_accuracy beside it
    from mlflow.tracking import MlflowClient

    from workers.kinds import pretrain

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    [child] = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
               if r.data.tags.get("stage") == "pretrain"]
    state = {k: child.data.metrics[k] for k in ("val_loss", "val_masked_accuracy")}
    state["seed"] = pretrain.Config.model_fields["seed"].default
    ds = TokenDataset.open(str(manifest.parent))
    from tokenizers import Tokenizer
    specials = MLMSpecials.from_tokenizer(Tokenizer.from_file(str(folder / "tokenizer.json")), ds.vocab_size)
    val = MLMBatches(ds, specials=specials, block_size=64, batch_size=16, grad_accum=1, rank=0, world=1,
                     seed=state["seed"], eval_steps=4).val()
    with torch.no_grad():
        losses = [float(model(b["idx"], labels=b["targets"]).loss) for b in val]
    assert sum(losses) / len(losses) == pytest.approx(state["val_loss"], rel=1e-4)
    assert 0 < state["val_masked_accuracy"] < 1
    # (this shrunk run, 150 steps, ends near the unigram plateau: 5.53 nats against a unigram
    # entropy of 5.19 when measured; below a uniform guess, log(vocab), by far)
    assert state["val_loss"] < 0.85 * math.log(ds.vocab_size), (state, unigram_entropy(ds, "val"))
