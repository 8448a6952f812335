"""workers/model/sampling.py: logit processors (property tests), greedy/sampling/beam search, stop
handling, streaming, logprobs, batching invariance, parameter validation."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from workers.model.transformer import GPT, config_for
from workers.model.sampling import (LOGIT_LIMIT, SamplingParams, apply_min_p, apply_penalties,
                                    apply_temperature, apply_top_k, apply_top_p, check_finite, generate,
                                    penalty_counts, pick, process_logits, stream)

V = 53


pytestmark = pytest.mark.usefixtures("one_thread")
SEEDS = [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def model() -> GPT:
    """Tiny random model with large matrix weights, so distributions are peaked and greedy
    outputs varied (a default-init tiny model just repeats one token)."""
    torch.manual_seed(0)
    m = GPT(config_for("tiny", vocab_size=V))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2 and "wte" not in name and "wpe" not in name:
                p.copy_(torch.randn(p.shape) * 0.3)  # by logical index, whatever the strides
    return m.eval()


def decode(ids: list[int]) -> str:
    return "".join(chr(ord("a") + i % 26) for i in ids)


PROMPTS = [[3, 17, 9], [1, 2, 3, 4, 5, 6, 7, 8], [40], [11, 30, 22, 5, 5]]


@torch.no_grad()
def reference_greedy(model, prompt, steps):
    """Greedy by full recompute, no cache: the simplest possible decoder."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    return ids[len(prompt):]


def random_logits(seed, rows=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g) * 3


# ----------------------------------------------------------------------------- processors

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 4, 17])
def test_top_k_keeps_exactly_the_k_most_likely(seed, k):
    logits = random_logits(seed)
    kept = torch.isfinite(apply_top_k(logits, k))
    assert (kept.sum(-1) == k).all()
    top = torch.zeros_like(kept).scatter(1, logits.topk(k, -1).indices, True)
    assert torch.equal(kept, top)
    # draws from the processed distribution land only in the top k
    p = SamplingParams(top_k=k, temperature=0.7)
    probs = process_logits(logits, p).softmax(-1)
    draws = torch.multinomial(probs, 200, replacement=True, generator=torch.Generator().manual_seed(seed))
    assert top.gather(1, draws).all()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_keeps_smallest_set_covering_p(seed, p):
    logits = random_logits(seed)
    probs = logits.softmax(-1)
    kept = torch.isfinite(apply_top_p(logits, p))
    for r in range(logits.size(0)):
        kp, dp = probs[r][kept[r]], probs[r][~kept[r]]
        assert kp.sum() >= p - 1e-6                    # covers p
        assert kp.sum() - kp.min() < p                 # and is the smallest such set
        if dp.numel():
            assert kp.min() >= dp.max()                # made of the most likely tokens
    assert torch.equal(apply_top_p(logits, 1.0), logits)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_min_p_keeps_tokens_above_fraction_of_max(seed, min_p):
    logits = random_logits(seed)
    probs = logits.softmax(-1)
    kept = torch.isfinite(apply_min_p(logits, min_p))
    assert torch.equal(kept, probs >= min_p * probs.max(-1, keepdim=True).values)
    assert kept.gather(1, probs.argmax(-1, keepdim=True)).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_penalties_push_seen_tokens_down(seed):
    logits = random_logits(seed)
    counts = torch.zeros_like(logits)
    counts[:, :5] = torch.arange(1, 6, dtype=torch.float32)  # token j generated j+1 times
    seen = counts > 0
    seen[:, 7] = True  # in the prompt only
    rep = apply_penalties(logits, counts, seen, repetition_penalty=1.5)
    assert (rep[seen] < logits[seen]).all() and torch.equal(rep[~seen], logits[~seen])
    freq = apply_penalties(logits, counts, seen, frequency_penalty=0.5)
    torch.testing.assert_close(logits - freq, 0.5 * counts)
    pres = apply_penalties(logits, counts, seen, presence_penalty=0.5)
    torch.testing.assert_close(logits - pres, 0.5 * (counts > 0).float())
    # a negative penalty encourages repetition
    assert (apply_penalties(logits, counts, seen, presence_penalty=-1.0)[:, :5] > logits[:, :5]).all()


def test_repetition_penalty_reduces_repeats_in_generation(model):
    base = generate(model, PROMPTS, SamplingParams(max_tokens=24, temperature=0))
    pen = generate(model, PROMPTS, SamplingParams(max_tokens=24, temperature=0, repetition_penalty=5.0))

    def repeats(cs):
        return sum(len(c[0].token_ids) - len(set(c[0].token_ids)) for c in cs)
    assert repeats(pen) < repeats(base)


# ----------------------------------------------------------------------------- decoding

def test_greedy_matches_full_recompute_reference(model):
    out = generate(model, PROMPTS, SamplingParams(max_tokens=12, temperature=0))
    for prompt, comps in zip(PROMPTS, out):
        assert len(comps) == 1
        assert comps[0].token_ids == reference_greedy(model, prompt, 12)
        assert comps[0].finish_reason == "length"


TINY_TEMPERATURES = [1e-6, 1e-38, 1e-45, 1e-300, 5e-324]
EXTREME = [  # (field, value): inside or beyond every accepted range
    *[("temperature", t) for t in TINY_TEMPERATURES], ("temperature", 2.0), ("temperature", 1e30),
    ("repetition_penalty", 1e-300), ("repetition_penalty", 5e-324), ("repetition_penalty", 1e300),
    ("presence_penalty", 1e300), ("presence_penalty", -1e300), ("frequency_penalty", 1e300),
    ("frequency_penalty", -1e300), ("top_p", 1e-300), ("top_p", 5e-324), ("min_p", 1.0), ("top_k", 1),
]


@pytest.mark.parametrize("field,value", EXTREME, ids=[f"{f}={v}" for f, v in EXTREME])
def test_extreme_parameters_are_finite_in_effect_through_every_processor(field, value):
    """The finding: temperature 1e-45 .. 5e-324 and repetition_penalty 1e-300 turned logits into
    inf/NaN and the "sample" was token 0. Each processor alone, and the whole pipeline, keeps
    every value finite or -inf with a finite maximum; the pick equals the hand-computed one."""
    logits = random_logits(7, rows=4)
    logits[:, 5] = 0.0  # an exact zero: 0 / 0 = NaN was the failure
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[:, :20] = True
    counts, _ = penalty_counts([[0]] * 4, [[1, 2, 2, 3]] * 4, V, "cpu")
    kw = dict(repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
    outs = []
    if field in kw:
        kw[field] = value
        outs.append(apply_penalties(logits, counts, seen, **kw))
    elif field == "temperature":
        outs.append(apply_temperature(logits, value))
    elif field == "top_p":
        outs.append(apply_top_p(logits, value))
    elif field == "min_p":
        outs.append(apply_min_p(logits, value))
    params = SamplingParams(**{"temperature": 1.0, field: value})
    outs.append(process_logits(logits, params, counts, seen))
    for out in outs:
        assert not torch.isnan(out).any()
        assert not torch.isposinf(out).any()
        top = out.max(-1).values
        assert torch.isfinite(top).all() and (top.abs() <= LOGIT_LIMIT).all()
    proc = outs[-1]
    tokens = pick(proc, params, [torch.Generator().manual_seed(i) for i in range(4)])
    # below 1e-5 the temperature is greedy; top_p of ~0 and top_k 1 keep only the top token
    assert params.greedy == (field == "temperature" and value < 1e-5)
    if params.greedy or field in ("top_p", "top_k"):
        assert tokens.tolist() == logits.argmax(-1).tolist()
    if field == "repetition_penalty" and value < 1:
        # clamped at 1e4: a seen positive logit x becomes x * 1e4, a seen negative one x / 1e4
        x = logits[0, 3].item()
        assert proc[0, 3].item() == pytest.approx(x * 1e4 if x > 0 else x / 1e4, rel=1e-6)


def test_the_sampler_asserts_no_nan_reaches_argmax_or_the_draw():
    nan = torch.zeros(2, V)
    nan[1, 3] = float("nan")
    with pytest.raises(AssertionError, match="NaN in the processed logits of 2 row"):
        pick(nan, SamplingParams(temperature=0), [None, None])
    with pytest.raises(AssertionError, match="NaN in the probabilities"):
        check_finite(nan.softmax(-1), "probabilities")


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
def test_temperatures_that_overflow_generate_greedily(model, temperature):
    greedy = generate(model, PROMPTS, SamplingParams(max_tokens=8, temperature=0))
    cold = generate(model, PROMPTS, SamplingParams(max_tokens=8, temperature=temperature, seed=1))
    assert [c[0].token_ids for c in cold] == [c[0].token_ids for c in greedy]
    penalised = generate(model, PROMPTS, SamplingParams(max_tokens=8, temperature=0.7, seed=1,
                                                        repetition_penalty=1e-300))
    assert all(len(c[0].token_ids) == 8 for c in penalised)


def test_tiny_temperature_and_top_k_1_equal_greedy(model):
    greedy = generate(model, PROMPTS, SamplingParams(max_tokens=10, temperature=0))
    cold = generate(model, PROMPTS, SamplingParams(max_tokens=10, temperature=1e-4, seed=3))
    k1 = generate(model, PROMPTS, SamplingParams(max_tokens=10, temperature=1.0, top_k=1))
    ids = lambda out: [c[0].token_ids for c in out]  # noqa: E731
    assert ids(cold) == ids(greedy) == ids(k1)


def test_batched_equals_one_by_one(model):
    for params in (SamplingParams(max_tokens=10, temperature=0),
                   SamplingParams(max_tokens=10, temperature=1.0, seed=11, n=3, top_p=0.9)):
        batched = generate(model, PROMPTS, params)
        for prompt, comps in zip(PROMPTS, batched):
            alone = generate(model, [prompt], params)[0]
            assert [c.token_ids for c in comps] == [c.token_ids for c in alone]


def test_same_seed_same_output_and_samples_differ(model):
    p = SamplingParams(max_tokens=16, temperature=1.2, seed=7, n=4)
    a, b = generate(model, PROMPTS, p), generate(model, PROMPTS, p)
    assert [[c.token_ids for c in cs] for cs in a] == [[c.token_ids for c in cs] for cs in b]
    assert all(len(cs) == 4 for cs in a)
    assert len({tuple(c.token_ids) for c in a[0]}) > 1  # the n samples are not copies
    other = generate(model, PROMPTS, SamplingParams(max_tokens=16, temperature=1.2, seed=8, n=4))
    assert [[c.token_ids for c in cs] for cs in a] != [[c.token_ids for c in cs] for cs in other]


def test_logprobs_are_raw_model_logprobs_of_chosen_tokens(model):
    p = SamplingParams(max_tokens=8, temperature=0.8, top_k=10, seed=1, logprobs=True)
    for prompt, comps in zip(PROMPTS, generate(model, PROMPTS, p)):
        c = comps[0]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + c.token_ids]))[0][0]
        ref = F.log_softmax(logits, -1)[len(prompt) - 1:-1].gather(1, torch.tensor(c.token_ids)[:, None])
        torch.testing.assert_close(torch.tensor(c.logprobs), ref.squeeze(1), atol=1e-4, rtol=0)
        assert c.cumulative_logprob == pytest.approx(sum(c.logprobs), abs=1e-5)
    assert generate(model, PROMPTS[:1], SamplingParams(max_tokens=3))[0][0].logprobs is None


def test_stop_token_ids_and_eos_end_sequences(model):
    full = generate(model, PROMPTS, SamplingParams(max_tokens=12, temperature=0), decode=decode)
    for prompt, comps in zip(PROMPTS, full):
        ids = comps[0].token_ids
        stop_tok = ids[4]
        cut = ids.index(stop_tok)
        for kw in ({"eos_token_id": stop_tok}, {}):
            p = SamplingParams(max_tokens=12, temperature=0,
                               stop_token_ids=() if kw else (stop_tok,))
            c = generate(model, [prompt], p, decode=decode, **kw)[0][0]
            assert c.token_ids == ids[:cut + 1]   # stop token kept in ids ...
            assert c.text == decode(ids[:cut])    # ... but not in text
            assert c.finish_reason == "stop"


def test_stop_strings_truncate_text(model):
    full = generate(model, PROMPTS, SamplingParams(max_tokens=12, temperature=0), decode=decode)
    for prompt, comps in zip(PROMPTS, full):
        text = comps[0].text
        assert text == decode(comps[0].token_ids)
        stop = text[5:7]
        cut = text.find(stop)
        c = generate(model, [prompt], SamplingParams(max_tokens=12, temperature=0, stop=(stop, "zzzzzz")),
                     decode=decode)[0][0]
        assert c.text == text[:cut] and c.finish_reason == "stop"
        assert c.token_ids == comps[0].token_ids[:cut + len(stop)]  # ends on the completing token


def test_stream_matches_generate(model):
    p = SamplingParams(max_tokens=12, temperature=0.9, seed=5, n=2, stop=("ab", "q"), logprobs=True)
    ref = generate(model, PROMPTS, p, eos_token_id=7, decode=decode)
    got: dict[int, dict] = {}
    for outs in stream(model, PROMPTS, p, eos_token_id=7, decode=decode):
        for o in outs:
            d = got.setdefault(o.index, {"ids": [], "text": "", "finish": None})
            assert d["finish"] is None  # nothing after a sequence finished
            d["ids"] += o.token_ids
            d["text"] += o.text
            d["finish"] = o.finish_reason
    for i, prompt_comps in enumerate(ref):
        for j, c in enumerate(prompt_comps):
            d = got[i * p.n + j]
            assert (d["ids"], d["text"], d["finish"]) == (c.token_ids, c.text, c.finish_reason)


def test_stream_holds_back_partial_stop_string(model):
    full = generate(model, PROMPTS[:1], SamplingParams(max_tokens=12, temperature=0), decode=decode)[0][0]
    stop = full.text[3:5] + "!"  # never completes: its prefix must still be streamed eventually
    deltas = [o.text for outs in stream(model, PROMPTS[:1], SamplingParams(
        max_tokens=12, temperature=0, stop=(stop,)), decode=decode) for o in outs]
    assert "".join(deltas) == full.text
    assert deltas[4] == ""  # the step that produced the stop string's prefix emitted nothing yet


# ----------------------------------------------------------------------------- beam search

def test_beam_width_1_equals_greedy(model):
    greedy = generate(model, PROMPTS, SamplingParams(max_tokens=10, temperature=0), eos_token_id=9)
    beam = generate(model, PROMPTS, SamplingParams(max_tokens=10, num_beams=1, temperature=0),
                    eos_token_id=9)
    # num_beams=1 is greedy by definition; also force the beam code path with width 1 via n
    from workers.model.sampling import _beam_search
    forced = _beam_search(model, PROMPTS, SamplingParams(max_tokens=10, num_beams=1), 9, None, None)
    for g, b, f in zip(greedy, beam, forced):
        assert g[0].token_ids == b[0].token_ids == f[0].token_ids
        assert g[0].finish_reason == f[0].finish_reason
        assert f[0].cumulative_logprob == pytest.approx(g[0].cumulative_logprob, abs=1e-4)


@pytest.mark.parametrize("width", [2, 4])
def test_beam_search_beats_or_ties_greedy(model, width):
    greedy = generate(model, PROMPTS, SamplingParams(max_tokens=8, temperature=0))
    beams = generate(model, PROMPTS, SamplingParams(max_tokens=8, num_beams=width, n=2, logprobs=True))
    for g, b in zip(greedy, beams):
        assert len(b) == 2 and b[0].score >= b[1].score
        assert b[0].cumulative_logprob >= g[0].cumulative_logprob - 1e-5
        assert b[0].score == pytest.approx(b[0].cumulative_logprob / 8, abs=1e-5)
        assert sum(b[0].logprobs) == pytest.approx(b[0].cumulative_logprob, abs=1e-4)


def test_beam_search_scores_with_eos_and_length_penalty(model):
    greedy = generate(model, PROMPTS, SamplingParams(max_tokens=8, temperature=0))
    eos = greedy[0][0].token_ids[2]
    for lp in (0.0, 1.0, 2.0):
        out = generate(model, PROMPTS, SamplingParams(max_tokens=8, num_beams=3, n=3, length_penalty=lp),
                       eos_token_id=eos)
        for comps in out:
            scores = [c.score for c in comps]
            assert scores == sorted(scores, reverse=True)
            for c in comps:
                assert c.score == pytest.approx(c.cumulative_logprob / len(c.token_ids) ** lp, abs=1e-5)
                assert (c.finish_reason == "stop") == (c.token_ids[-1] == eos)
                assert eos not in c.token_ids[:-1]


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("field,value,match", [
    ("max_tokens", 0, "max_tokens: got 0; must be an integer >= 1"),
    ("temperature", -0.5, "temperature: got -0.5"),
    ("top_k", -1, "top_k: got -1; must be an integer >= 0"),
    ("top_p", 0.0, r"top_p: got 0.0; must be in \(0, 1\]"),
    ("top_p", 1.5, "top_p: got 1.5"),
    ("min_p", 2.0, r"min_p: got 2.0; must be in \[0, 1\]"),
    ("repetition_penalty", 0.0, "repetition_penalty: got 0.0"),
    ("presence_penalty", 3.0, r"presence_penalty: got 3.0; must be in \[-2, 2\]"),
    ("frequency_penalty", float("nan"), "frequency_penalty: got nan"),
    ("n", 0, "n: got 0"),
    ("num_beams", 0, "num_beams: got 0"),
    ("stop", ("",), "stop: got"),
    ("stop", "abc", "stop: got 'abc'; must be a tuple"),
    ("stop_token_ids", (-1,), r"stop_token_ids: got \(-1,\)"),
    ("seed", 1.5, "seed: got 1.5"),
    ("logprobs", 1, "logprobs: got 1"),
])
def test_validate_names_field_and_value(field, value, match):
    p = SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=f"SamplingParams.{match}"):
        p.validate()


def test_validate_beam_n_and_generate_argument_errors(model):
    with pytest.raises(ValueError, match=r"SamplingParams.n: got 3; must be <= num_beams \(2\)"):
        SamplingParams(n=3, num_beams=2).validate()
    SamplingParams().validate()
    with pytest.raises(ValueError, match="stop strings need a decode function"):
        generate(model, PROMPTS, SamplingParams(stop=("x",)))
    with pytest.raises(ValueError, match=r"max_tokens: got 200.*at most 121 new tokens"):
        generate(model, PROMPTS, SamplingParams(max_tokens=200))
    with pytest.raises(ValueError, match=r"prompts\[1\]: empty prompt"):
        generate(model, [[1], []], SamplingParams())
    with pytest.raises(ValueError, match=r"prompts\[0\]: token ids must be in \[0, 53\)"):
        generate(model, [[99]], SamplingParams())
    with pytest.raises(ValueError, match="beam search is not streamed"):
        next(stream(model, PROMPTS, SamplingParams(num_beams=2)))


def test_generate_leaves_training_mode_alone(model):
    model.train()
    try:
        generate(model, PROMPTS[:1], SamplingParams(max_tokens=2))
        assert model.training
    finally:
        model.eval()


def test_fixture_model_is_not_degenerate(model):
    """Guards the tests above: equal outputs must not be equal because the model is trivial."""
    out = generate(model, PROMPTS, SamplingParams(max_tokens=12, temperature=0))
    assert len({t for c in out for t in c[0].token_ids}) >= 8
    assert len({tuple(c[0].token_ids) for c in out}) == len(PROMPTS)


def test_orchestrator_generate_samples_an_overflowing_temperature_greedily(serve_checkpoint_dir, capsys):
    """`orchestrator generate` calls the same sampler: temperature 1e-45 and repetition_penalty
    1e-300 printed an empty completion (token 0) before."""
    from orchestrator.cli import main

    def run(*extra):
        assert main(["generate", str(serve_checkpoint_dir), "--prompt", "the lazy", "--max-tokens", "12",
                     "--device", "cpu", *extra]) == 0
        return capsys.readouterr().out

    greedy = run("--temperature", "0")
    assert "(length, 12 tokens" in greedy
    assert run("--temperature", "1e-45") == greedy
    assert run("--temperature", "5e-324", "--seed", "3") == greedy
    penalised = run("--temperature", "0.8", "--repetition-penalty", "1e-300", "--seed", "3")
    assert "(length, 12 tokens" in penalised
