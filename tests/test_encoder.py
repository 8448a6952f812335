"""Masked-LM encoders (BERT, RoBERTa) in the one config-driven model, against `transformers`.

Random BertForMaskedLM / RobertaForMaskedLM written by transformers load into our GPT with the
same logits (padding included: RoBERTa's positions start at padding_idx + 1); models we write
load in AutoModelForMaskedLM with the same logits, sharded and in bf16; unsupported options are
named; the conversion module depends on the model and never the other way.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from workers.model.hf import load_model, read_model_config, save_model
from workers.model.transformer import GPT, SIZES, config_for

pytestmark = pytest.mark.usefixtures("one_thread")

V = 61
_ENC = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=40, initializer_range=0.2)
# case -> (config class, model class, kwargs)
CASES = {
    "bert": ("BertConfig", "BertForMaskedLM", dict(_ENC)),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", dict(_ENC, pad_token_id=1, type_vocab_size=1)),
}


def hf_encoder(case: str, seed: int = 0, dtype=torch.float32):
    import transformers

    cfg_cls, model_cls, kwargs = CASES[case]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kwargs)).to(dtype).eval()
    with torch.no_grad():  # LayerNorms away from 1/0 so a misplaced norm shows in the logits
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.uniform_(-0.5, 0.5)
    return model


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    out = {}
    for case in CASES:
        model = hf_encoder(case)
        folder = tmp_path_factory.mktemp(case)
        model.save_pretrained(folder)
        out[case] = (folder, model)
    return out


def _batch(pad_id: int):
    """Two rows, the second right-padded after 8 tokens (as a tokenizer pads for an encoder)."""
    idx = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(idx)
    mask[1, 8:] = 0
    idx[1, 8:] = pad_id
    types = torch.zeros_like(idx)
    types[0, 6:] = 1  # a second segment in row 0
    return idx, mask, types


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_transformers_encoder_loads_with_same_logits(written, case):
    folder, theirs = written[case]
    ours = load_model(folder).eval()
    idx, mask, types = _batch(theirs.config.pad_token_id)
    if theirs.config.type_vocab_size == 1:
        types = torch.zeros_like(types)
    want = theirs(idx, attention_mask=mask, token_type_ids=types).logits
    got, _ = ours(idx, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)
    # the padded row equals the same tokens alone: padding is masked out of attention
    alone, _ = ours(idx[1:, :8], token_type_ids=types[1:, :8])
    torch.testing.assert_close(got[1, :8], alone[0], atol=1e-5, rtol=0)
    # last hidden state = transformers' encoder output (what embeddings pool)
    base = getattr(theirs, theirs.base_model_prefix)
    hidden = base(idx, attention_mask=mask, token_type_ids=types).last_hidden_state
    torch.testing.assert_close(ours.hidden_states(idx, mask, types)[real], hidden[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_we_write_what_auto_model_for_masked_lm_loads(tmp_path, written, case):
    from transformers import AutoModelForMaskedLM

    ours = load_model(written[case][0]).eval()
    torch.manual_seed(2)
    for p in ours.parameters():  # new weights: the outputs are ours, not a copy of what we read
        p.normal_(0.0, 0.2) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    save_model(ours, tmp_path, extra={"pad_token_id": 0})
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == [CASES[case][1]]
    assert cfg["model_type"] == CASES[case][1].removesuffix("ForMaskedLM").lower()
    theirs = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == CASES[case][1]
    idx, mask, _ = _batch(theirs.config.pad_token_id)
    real = mask.bool()
    torch.testing.assert_close(theirs(idx, attention_mask=mask).logits[real],
                               ours(idx, attention_mask=mask)[0][real], atol=1e-4, rtol=0)


@torch.no_grad()
def test_bf16_sharded_roberta_in_and_out(tmp_path):
    from transformers import AutoModelForMaskedLM

    hf_encoder("roberta", dtype=torch.bfloat16).save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ours = load_model(tmp_path / "hf")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    idx, mask, _ = _batch(1)
    up = load_model(tmp_path / "hf", dtype=torch.float32).eval()
    ref = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    real = mask.bool()
    torch.testing.assert_close(up(idx, attention_mask=mask)[0][real],
                               ref(idx, attention_mask=mask).logits[real], atol=1e-4, rtol=0)
    save_model(ours, tmp_path / "ours", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = AutoModelForMaskedLM.from_pretrained(tmp_path / "ours", dtype="auto").eval()
    again = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf", dtype="auto").eval()
    assert back.dtype == torch.bfloat16
    torch.testing.assert_close(back(idx).logits, again(idx).logits, atol=0, rtol=0)  # same bf16 weights


def test_named_sizes_and_encoder_config_errors(tmp_path):
    for name, (layers, width) in {"bert-tiny": (2, 128), "bert-mini": (4, 256), "bert-base": (12, 768)}.items():
        cfg = config_for(name, 30522)
        assert (cfg.n_layer, cfg.n_embd, cfg.causal, cfg.head, cfg.norm_position) == (layers, width, False, "mlm",
                                                                                      "post")
    # bert-base has BERT-base's parameter count (110M with the pooler, which an MLM lacks)
    with torch.device("meta"):
        n = sum(p.numel() for p in GPT(config_for("bert-base", 30522)).parameters())
    assert n == 109_514_298  # BertForMaskedLM(bert-base-uncased config)'s count, transformers' own
    assert set(SIZES) >= {"bert-tiny", "bert-mini", "bert-base"}
    base = dict(CASES["bert"][2], model_type="bert")
    for bad, msg in [({"hidden_act": "relu"}, r"hidden_act 'relu' is not supported; supported: gelu"),
                     ({"position_embedding_type": "relative_key"},
                      r"position_embedding_type 'relative_key' is not supported; supported: absolute"),
                     ({"is_decoder": True}, r"is_decoder=true is not supported"),
                     ({"tie_word_embeddings": False}, r"tie_word_embeddings=false is not supported for an encoder"),
                     ({"add_cross_attention": True}, r"add_cross_attention=true is not supported")]:
        (tmp_path / "config.json").write_text(json.dumps({**base, **bad}))
        with pytest.raises(ValueError, match=msg):
            read_model_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(base, model_type="roberta", pad_token_id=None)))
    with pytest.raises(ValueError, match=r"RoBERTa needs a pad_token_id"):
        read_model_config(tmp_path)
    with pytest.raises(ValueError, match=r"model.norm_position: got 'middle'; allowed: pre, post"):
        config_for({"size": "bert-tiny", "norm_position": "middle"}, V)
    with pytest.raises(ValueError, match=r"save_model: a BERT/RoBERTa layout \(causal=false\) needs"):
        save_model(GPT(config_for({"size": "bert-tiny", "mlp": "gelu"}, V)), tmp_path / "x")
    with pytest.raises(ValueError, match=r"save_model: a decoder \(causal=true\) needs norm_position=pre"):
        save_model(GPT(config_for({"size": "tiny", "head": "mlm"}, V)), tmp_path / "x")
    with pytest.raises(ValueError, match=r"kv_cache: an encoder \(causal=false\) has no incremental decoding"):
        from workers.model.transformer import KVCache
        m = GPT(config_for({"size": "bert-tiny", "block_size": 16}, V))
        m(torch.zeros(1, 2, dtype=torch.long), kv_cache=KVCache.empty(m, 1, 4))


def test_conversion_depends_on_the_model_never_the_other_way():
    code = ("import sys, workers.model.transformer; "
            "assert 'workers.model.hf' not in sys.modules, 'transformer.py imported hf.py'")
    subprocess.run([sys.executable, "-c", code], check=True)
    src = open(sys.modules["workers.model.transformer"].__file__).read()
    assert "import workers.model.hf" not in src and "from workers.model.hf" not in src


def test_encoder_tokenizers_behave_as_the_real_models_in_auto_tokenizer(tmp_path):
    import glob
    import sysconfig
    from pathlib import Path

    from pydantic import ValidationError
    from transformers import AutoTokenizer

    from workers.data import tokenizer as tk
    from workers.kinds import tokenize

    texts = [Path(f).read_text() for f in sorted(glob.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "json" / "*.py")))]
    bert_tok = tk.train_wordpiece(texts, 300)
    tk.save(bert_tok, tmp_path / "bert", tk.document_end_token(bert_tok))
    bert = AutoTokenizer.from_pretrained(tmp_path / "bert")
    enc = bert("JSON Decoder", "encode")
    pieces = bert.convert_ids_to_tokens(enc["input_ids"])
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]" and pieces.count("[SEP]") == 2
    assert enc["token_type_ids"] == [0] * (pieces.index("[SEP]") + 1) + [1] * (len(pieces) - pieces.index("[SEP]") - 1)
    assert "json" in pieces  # BERT's normaliser lower-cases (uncased by default)
    assert bert.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [0, 1, 2, 3, 4]
    assert (bert.mask_token, bert.pad_token, tk.document_end_token(bert_tok)) == ("[MASK]", "[PAD]", "[SEP]")

    rob_tok = tk.train_roberta_bpe(texts, 400)
    tk.save(rob_tok, tmp_path / "roberta", tk.document_end_token(rob_tok))
    rob = AutoTokenizer.from_pretrained(tmp_path / "roberta")
    pieces = rob.convert_ids_to_tokens(rob("a b", "c")["input_ids"])
    assert pieces[0] == "<s>" and pieces[-1] == "</s>" and pieces.count("</s>") == 3  # <s> A </s></s> B </s>
    assert rob.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>", "<mask>"]) == [0, 1, 2, 3, 4]
    assert rob.decode(rob("Hello  world")["input_ids"], skip_special_tokens=True) == "Hello  world"

    assert tokenize.Config(source="x", tokenizer={"type": "wordpiece", "vocab_size": 500}).tokenizer.lowercase
    with pytest.raises(ValidationError, match=r"\{type: wordpiece, vocab_size: N\}, \{type: bpe-roberta"):
        tokenize.Config(source="x", tokenizer={"type": "sentencepiece"})
