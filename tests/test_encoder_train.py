"""`pretrain` with `objective: mlm`: BERT's masking recipe as a pure function of (seed, step, row),
masked-token accuracy beside the loss, and a killed-and-resumed stage that ends bit-identical to
an uninterrupted one (CPU fp32), on real Ray Train.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from workers.data.mlm import MLMBatches, MLMSpecials, mask_tokens
from workers.data.tokens import TokenDataset
from workers.kinds import pretrain
from workers.stage import Resources, local_context
from workers.training.loop import FaultInjection
from tests.test_pretrain import collector_sink, metric_steps, write_token_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
N_WORDS = 40
VOCAB = len(SPECIALS) + N_WORDS + N_WORDS  # words t0..t39, and a "##x" continuation piece per word
SEP = 3


def encoder_tokenizer():
    """A WordPiece tokenizer with BERT's specials over the words `t0`..`t39` and pieces `##c0`..."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({f"t{i}": len(SPECIALS) + i for i in range(N_WORDS)})
    vocab.update({f"##c{i}": len(SPECIALS) + N_WORDS + i for i in range(N_WORDS)})
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    return tok


def mlm_docs(rng: np.random.Generator, n_docs: int) -> list[list[int]]:
    """Each document on one of 10 topics, its words drawn from the topic's 4, each word followed
    by its own `##` piece: the unigrams are uniform (ln 80 nats), but a masked token is nearly
    determined by its context (its piece, or the topic)."""
    docs = []
    for _ in range(n_docs):
        topic, doc = int(rng.integers(0, N_WORDS // 4)), []
        for w in 4 * topic + rng.integers(0, 4, int(rng.integers(30, 60))):
            doc += [len(SPECIALS) + int(w), len(SPECIALS) + N_WORDS + int(w)]
        docs.append(doc)
    return docs


def make_mlm_dataset(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    write_token_dataset(folder, {"train": [mlm_docs(rng, 20) for _ in range(2)], "val": [mlm_docs(rng, 8)]},
                        vocab_size=VOCAB, eos_id=SEP)
    encoder_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


MODEL = {"size": "bert-tiny", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}
STEPS, FAIL_AT, CKPT_EVERY = 60, 30, 20


def mlm_config(**overrides) -> pretrain.Config:
    cfg = dict(model=MODEL, objective="mlm", batch_size=8, grad_accum=1, max_steps=STEPS, lr=1e-2, min_lr=1e-3,
               warmup_steps=3, weight_decay=0.0, eval_every=CKPT_EVERY, eval_steps=2,
               checkpoint_every=CKPT_EVERY, seed=3)
    cfg.update(overrides)
    return pretrain.Config(**cfg)


# ----------------------------------------------------------------------------- masking, no Ray


def specials(whole_word=False) -> MLMSpecials:
    return MLMSpecials.from_tokenizer(encoder_tokenizer(), VOCAB, whole_word)


def test_bert_recipe_rates_and_specials_never_chosen():
    sp = specials()
    assert (sp.cls_id, sp.mask_id, sp.pad_id, sp.special_ids) == (2, 4, 0, (0, 1, 2, 3, 4))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, 200_000)
    ids[::7] = SEP  # plenty of specials among them
    inputs, targets = mask_tokens(ids, np.random.default_rng(1), sp)
    chosen = targets != -100
    special = np.isin(ids, sp.special_ids)
    assert not (chosen & special).any() and (inputs[special] == ids[special]).all()
    assert (targets[chosen] == ids[chosen]).all()
    assert (inputs[~chosen] == ids[~chosen]).all()
    n = chosen.sum()
    assert n / (~special).sum() == pytest.approx(0.15, abs=0.003)
    masked = (inputs[chosen] == sp.mask_id).mean()
    kept = (inputs[chosen] == ids[chosen]).mean()  # includes random draws that hit the same id (~0.1/VOCAB)
    assert masked == pytest.approx(0.8, abs=0.01) and kept == pytest.approx(0.1, abs=0.01)
    assert 1 - masked - kept == pytest.approx(0.1, abs=0.01)


def test_whole_word_masking_chooses_every_piece_of_a_word():
    sp = specials(whole_word=True)
    ids = np.array(mlm_docs(np.random.default_rng(0), 50)[0] * 40)
    _, targets = mask_tokens(ids, np.random.default_rng(2), sp)
    chosen = targets != -100
    assert chosen[0::2].tolist() == chosen[1::2].tolist()  # a word and its ## piece together
    assert 0.1 < chosen.mean() < 0.2


def test_masks_are_a_pure_function_of_the_step_and_row(tmp_path):
    ds = TokenDataset.open(str(make_mlm_dataset(tmp_path / "ds")))
    kw = dict(specials=specials(), block_size=32, batch_size=2, eval_steps=1, seed=5)
    one = MLMBatches(ds, grad_accum=2, rank=0, world=1, **kw)
    ranks = [MLMBatches(ds, grad_accum=1, rank=r, world=2, **kw) for r in range(2)]
    for step in (0, 7):
        a = one.train(step)
        rows = torch.cat([b["idx"] for b in a]), torch.cat([b["targets"] for b in a])
        # rank r holds global rows r, r + 2, ...: the same masks as in the one-worker batch
        for r, part in enumerate(ranks):
            b = part.train(step)[0]
            assert torch.equal(b["idx"], rows[0][r::2]) and torch.equal(b["targets"], rows[1][r::2])
        assert torch.equal(MLMBatches(ds, grad_accum=2, rank=0, world=1, **kw).train(step)[0]["idx"], a[0]["idx"])
        assert (rows[0][:, 0] == 2).all()  # every row starts with [CLS]
        assert ((rows[1] != -100).sum() > 0)
    assert not torch.equal(one.train(0)[0]["targets"], one.train(1)[0]["targets"])


def test_objective_and_model_must_agree(tmp_path):
    ds = make_mlm_dataset(tmp_path / "ds")
    ctx = local_context(tmp_path, "pretrain", inputs={"tok": {"dataset": str(ds)}})
    with pytest.raises(ValueError, match=r"objective: mlm needs an encoder; model 'tiny' is a decoder"):
        pretrain.build_job(ctx, mlm_config(model="tiny"))
    with pytest.raises(ValueError, match=r"objective: clm \(next-token prediction\) needs a decoder"):
        pretrain.build_job(ctx, mlm_config(objective="clm"))


# ----------------------------------------------------------------------------- on Ray Train


@pytest.fixture(scope="module")
def fits(ray_session, tmp_path_factory):
    """Two 1-worker mlm fits on the same data and seed: uninterrupted, and killed at the start of
    step FAIL_AT (resumed by Ray Train from the step-CKPT_EVERY checkpoint)."""
    tmp = tmp_path_factory.mktemp("mlm")
    ds = make_mlm_dataset(tmp / "ds")
    out = {"dataset": ds}
    for name in ("straight", "killed"):
        ctx = local_context(tmp / name, "pretrain", inputs={"tok": {"dataset": str(ds)}},
                            resources=Resources(cpus=1, workers=1))
        ctx = replace(ctx, sink=collector_sink(ray_session))
        fault = FaultInjection(rank=0, step=FAIL_AT, marker=str(tmp / "marker")) if name == "killed" else None
        outputs = pretrain.run(ctx, mlm_config(), fault=fault)
        out[name] = (outputs, ctx.sink.events())
    out["fired"] = (tmp / "marker").exists()
    return out


@pytest.mark.slow
def test_killed_and_resumed_mlm_stage_ends_bit_identical(fits):
    from safetensors.torch import load_file

    assert fits["fired"], "the fault hook never fired"
    (a, _), (b, events) = fits["straight"], fits["killed"]
    assert [v for _, v in metric_steps(events, "resumed_from_step")] == [CKPT_EVERY]
    wa = load_file(str(Path(a["checkpoint"]) / "model.safetensors"))
    wb = load_file(str(Path(b["checkpoint"]) / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert a["final_val_loss"] == b["final_val_loss"]


@pytest.mark.slow
def test_mlm_learns_logs_accuracy_and_writes_bert(fits):
    from transformers import AutoModelForMaskedLM

    from workers.data.tokens import unigram_entropy

    outputs, events = fits["straight"]
    acc = [v for _, v in metric_steps(events, "val_masked_accuracy")]
    loss = [v for _, v in metric_steps(events, "val_loss")]
    assert len(acc) == len(loss) == STEPS // CKPT_EVERY
    entropy = unigram_entropy(TokenDataset.open(str(fits["dataset"])))
    # (BERT leaves its unigram plateau slowly: transformers' own BertForMaskedLM reaches the
    # same range in these 60 steps; pipelines/encoder.yaml trains far longer)
    assert outputs["final_val_loss"] < entropy - 0.4, (loss, entropy)
    assert loss[-1] < loss[0], loss
    folder = Path(outputs["checkpoint"])
    hf = AutoModelForMaskedLM.from_pretrained(folder).eval()
    assert type(hf).__name__ == "BertForMaskedLM"
    # transformers' model on our validation batch: the same masked-token accuracy the stage logged
    from workers.data.mlm import masked_accuracy

    ds = TokenDataset.open(str(fits["dataset"]))
    val = MLMBatches(ds, specials=specials(), block_size=32, batch_size=8, grad_accum=1, rank=0, world=1, seed=3,
                     eval_steps=2).val()
    num = den = 0
    with torch.no_grad():
        for b in val:
            c, n = masked_accuracy(hf(b["idx"]).logits, b["targets"])
            num, den = num + int(c), den + int(n)
    assert num / den == pytest.approx(acc[-1], abs=1e-6)
