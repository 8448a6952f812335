"""Encoders through generate and serve, against transformers: `orchestrator generate` fills a
mask with the top-5 of transformers' fill-mask pipeline; `orchestrator serve`'s /v1/embeddings,
called by the openai client, returns transformers' mean-pooled, normalised hidden states.

The checkpoints are random BertForMaskedLM / RobertaForMaskedLM written by transformers, with
tokenizers our tokenize kind trains (WordPiece, RoBERTa's byte-level BPE) saved beside them.
"""

from __future__ import annotations

import glob
import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from workers.data import tokenizer as tk

pytestmark = pytest.mark.usefixtures("one_thread")


def _texts() -> list[str]:
    files = sorted(glob.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "json" / "*.py")))
    return [Path(f).read_text() for f in files]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """name -> (folder, transformers model): a random encoder and our trained tokenizer."""
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    out = {}
    for name, train, cfg_cls, model_cls in (
            ("bert", lambda t: tk.train_wordpiece(t, 400), "BertConfig", "BertForMaskedLM"),
            ("roberta", lambda t: tk.train_roberta_bpe(t, 400), "RobertaConfig", "RobertaForMaskedLM")):
        folder = tmp_path_factory.mktemp(name)
        tok = train(_texts())
        tk.save(tok, folder, tk.document_end_token(tok))
        specials = tk.encoder_specials(tok)
        pad = tok.token_to_id(specials["pad_token"])
        kw = dict(type_vocab_size=1, max_position_embeddings=64 + pad + 1) if name == "roberta" else \
            dict(max_position_embeddings=64)
        config = getattr(transformers, cfg_cls)(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=64, pad_token_id=pad,
                                                initializer_range=0.5, **kw)
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(config).eval()
        model.save_pretrained(folder)
        out[name] = (folder, model)
    return out


def _mask(folder) -> str:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder).mask_token


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_generate_fills_the_mask_with_fill_mask_pipelines_top5(encoders, name, capsys):
    from transformers import AutoTokenizer, pipeline

    from orchestrator.cli import main

    folder, model = encoders[name]
    tok = AutoTokenizer.from_pretrained(folder)
    prompt = f"the decoder {tok.mask_token} a json object"
    want = pipeline("fill-mask", model=model, tokenizer=tok, device="cpu", top_k=5)(prompt)
    assert main(["generate", str(folder), "--prompt", prompt]) == 0
    lines = re.findall(r"mask 0 #(\d): .* id=(\d+) p=([0-9.]+)", capsys.readouterr().out)
    assert [int(i) for _, i, _ in lines] == [w["token"] for w in want]
    np.testing.assert_allclose([float(p) for _, _, p in lines], [w["score"] for w in want], atol=2e-6)
    assert main(["generate", str(folder), "--prompt", "no mask here"]) == 2
    assert f"holds no {tok.mask_token} token" in capsys.readouterr().err


def hf_embeddings(model, tok, texts: list[str]) -> np.ndarray:
    """sentence-transformers' recipe with transformers: mean over non-padding tokens, L2-normalised."""
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = getattr(model, model.base_model_prefix)(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    vec = (hidden * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(vec, dim=-1).numpy()


TEXTS = ["json encoder", "a much longer sentence about decoding json objects into python dicts", "x"]


def test_embedder_batches_and_pools_like_transformers_roberta(encoders):
    """In process (no server): a padded batch of RoBERTa texts (positions offset by padding_idx + 1)."""
    from transformers import AutoTokenizer

    from workers.checkpoints import open_checkpoint
    from workers.serving.embeddings import embedder_for

    folder, model = encoders["roberta"]
    emb = embedder_for(open_checkpoint(folder, device="cpu"), max_batch_size=4)
    got = emb.embed([emb.encode(t) for t in TEXTS])
    want = hf_embeddings(model, AutoTokenizer.from_pretrained(folder), TEXTS)
    assert (np.sum(got * want, axis=1) >= 0.9999).all(), np.sum(got * want, axis=1)
    np.testing.assert_allclose(got, want, atol=1e-5)
    cls = embedder_for(open_checkpoint(folder, device="cpu"), pooling="cls").embed([emb.encode(TEXTS[1])])
    with torch.no_grad():
        enc = AutoTokenizer.from_pretrained(folder)(TEXTS[1], return_tensors="pt")
        first = model.roberta(**enc).last_hidden_state[0, 0]
    np.testing.assert_allclose(cls[0], torch.nn.functional.normalize(first, dim=-1).numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def server(ray_session, encoders):
    from tests.conftest import free_port
    from workers.serving.app import serve_checkpoint, shutdown

    port = free_port()
    url = serve_checkpoint(str(encoders["bert"][0]), port=port, blocking=False, max_batch_size=4, max_queue=8,
                           api_key="sk-test", model_name="bert-enc", app_name="encoder-test")
    yield url
    shutdown()  # Serve altogether: its HTTP proxy keeps this port, and later modules serve on their own


@pytest.mark.slow
def test_openai_client_embeddings_equal_transformers(server, encoders):
    import base64

    import httpx
    from openai import BadRequestError, OpenAI, AuthenticationError
    from transformers import AutoTokenizer

    folder, model = encoders["bert"]
    tok = AutoTokenizer.from_pretrained(folder)
    client = OpenAI(base_url=f"{server}/v1", api_key="sk-test")
    res = client.embeddings.create(model="bert-enc", input=TEXTS)  # the client asks for base64
    got = np.array([d.embedding for d in res.data])
    want = hf_embeddings(model, tok, TEXTS)
    assert (np.sum(got * want, axis=1) >= 0.9999).all()
    n_tokens = sum(len(tok(t)["input_ids"]) for t in TEXTS)
    assert res.usage.prompt_tokens == res.usage.total_tokens == n_tokens
    # float format, one string, token ids (used as given)
    one = client.embeddings.create(model="bert-enc", input=TEXTS[0], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, want[0], atol=1e-5)
    ids = tok(TEXTS[1])["input_ids"]
    by_ids = client.embeddings.create(model="bert-enc", input=[ids, ids[:3]], encoding_format="float")
    np.testing.assert_allclose(by_ids.data[0].embedding, want[1], atol=1e-5)
    raw = httpx.post(f"{server}/v1/embeddings", json={"input": "json", "encoding_format": "base64"},
                     headers={"Authorization": "Bearer sk-test"}).json()
    vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert vec.shape == (32,) and abs(np.linalg.norm(vec) - 1) < 1e-5
    assert client.embeddings.create(model="bert-enc", input="x", dimensions=32).data[0].embedding
    with pytest.raises(BadRequestError) as e:
        client.embeddings.create(model="bert-enc", input="x", dimensions=16)
    assert e.value.body["param"] == "dimensions" and "have 32" in e.value.body["message"]
    with pytest.raises(BadRequestError) as e:
        client.completions.create(model="bert-enc", prompt="hello", max_tokens=3)
    assert "is an encoder" in e.value.body["message"] and e.value.status_code == 400
    with pytest.raises(BadRequestError) as e:
        client.embeddings.create(model="bert-enc", input=[[10**6]])
    assert e.value.body["param"] == "input"
    with pytest.raises(BadRequestError) as e:
        client.embeddings.create(model="bert-enc", input="x " * 200)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{server}/v1", api_key="wrong").embeddings.create(model="bert-enc", input="x")
