"""The serving engine alone (no HTTP): continuous batching gives what ``sampling.generate`` gives,
one request's failure ends that request only, and beam search never stalls the other streams."""

from __future__ import annotations

import threading

import pytest
import torch

from workers.data import tokenizer as toks
from workers.model.sampling import SamplingParams, generate
from workers.model.hf import load_pretrained
from workers.serving.engine import Done, Engine, GenerationRequest, Step


@pytest.fixture(scope="module")
def loaded(serve_checkpoint_dir, one_thread):
    model = load_pretrained(serve_checkpoint_dir).eval()
    tok = toks.load(serve_checkpoint_dir / "tokenizer.json")
    return model, tok


def reference(loaded, prompt: str, **kw):
    model, tok = loaded
    return generate(model, [tok.encode(prompt).ids], SamplingParams(**kw), eos_token_id=toks.eos_id(tok),
                    decode=tok.decode)[0]


class Collector:
    """Events per request tag, and a wait for every request's Done."""

    def __init__(self, count: int):
        self.events: dict[int, list] = {i: [] for i in range(count)}
        self.done: dict[int, Done] = {}
        self._all = threading.Event()
        self._lock = threading.Lock()
        self.count = count

    def emit(self, events) -> None:
        with self._lock:
            for ev in events:
                self.events[ev.request.tag].append(ev)
                if isinstance(ev, Done):
                    assert ev.request.tag not in self.done, "two final events"
                    self.done[ev.request.tag] = ev
            if len(self.done) == self.count:
                self._all.set()

    def wait(self, timeout: float = 120) -> None:
        assert self._all.wait(timeout), f"only {sorted(self.done)} of {self.count} requests finished"


def make(loaded, cases, sink: Collector, **extra):
    _, tok = loaded
    return [GenerationRequest(tok.encode(p).ids, SamplingParams(**kw), tag=i, emit=sink.emit, **extra)
            for i, (p, kw) in enumerate(cases)]


@pytest.fixture
def poisoned_empty():
    """Every uninitialised tensor (torch.empty, new_empty) comes filled with NaN, so a step that
    reads a cache column nobody wrote fails every time, not only when the allocator hands back
    memory that held a NaN or an inf (masked attention still multiplies it: 0 * NaN = NaN)."""
    was, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def test_engine_admitting_mid_batch_matches_one_batch_generate(loaded, poisoned_empty):
    """Continuous batching (requests joining a running batch, each with its own params and seed)
    gives exactly what workers.model.sampling.generate gives for each request on its own."""
    model, tok = loaded
    engine = Engine(model, tok, eos_token_id=toks.eos_id(tok), max_batch_size=6, max_queue=8)
    cases = [("hello", dict(max_tokens=30, temperature=0)),
             ("the quick brown fox", dict(max_tokens=12, temperature=0.8, top_k=10, seed=1, n=2)),
             ("0", dict(max_tokens=25, temperature=1.2, top_p=0.9, seed=2, repetition_penalty=1.3)),
             ("lazy", dict(max_tokens=20, temperature=0.7, seed=3, presence_penalty=1.0, frequency_penalty=0.5,
                           min_p=0.05)),
             ("jumps over the", dict(max_tokens=9, temperature=0, stop=("e",)))]
    sink = Collector(len(cases))
    reqs = make(loaded, cases, sink)
    engine.submit(reqs[:2])
    for step in range(400):  # drive the loop by hand; newcomers arrive while others decode
        if step in (3, 7, 8):
            engine.submit([reqs[{3: 2, 7: 3, 8: 4}[step]]])
        engine.step()
        engine.drain()
        if len(sink.done) == len(reqs):
            break
    assert sorted(sink.done) == list(range(len(reqs)))
    assert all(d.error is None for d in sink.done.values())
    for req, (p, kw) in zip(reqs, cases):
        ref = reference(loaded, p, **kw)
        assert [s.token_ids for s in req.seqs] == [c.token_ids for c in ref], p
        assert [s.text for s in req.seqs] == [c.text for c in ref], p
        assert [s.finish for s in req.seqs] == [c.finish_reason for c in ref], p
        # the streamed deltas add up to the final text; events are typed
        streamed = "".join(d.text for ev in sink.events[req.tag] if isinstance(ev, Step) for d in ev.deltas)
        if len(req.seqs) == 1:
            assert streamed == req.seqs[0].text
    assert engine.stats.max_batch_seen == 6  # 1 + 2 + 1 + 1 + 1 sequences at the peak
    assert engine.stats.in_flight == 0


def test_newcomers_arriving_step_by_step_share_one_prefill(loaded):
    """Requests that arrive one by one while a batch runs (as HTTP spreads a closed loop's
    requests out) wait a few steps and are admitted together, in one prefill; what each
    generates is what it generates alone. One that fills the free slots goes at once."""
    model, tok = loaded
    admitted: list[tuple[int, list[int]]] = []  # (step, tags) of each admission
    now = [0]
    engine = Engine(model, tok, eos_token_id=toks.eos_id(tok), max_batch_size=5, max_queue=8, admit_wait_steps=3,
                    fault_hook=lambda phase, reqs: admitted.append((now[0], [r.tag for r in reqs]))
                    if phase == "admit" else None)
    cases = [("hello", dict(max_tokens=40, temperature=0)),
             ("the quick", dict(max_tokens=12, temperature=0.9, seed=1)),
             ("lazy dog", dict(max_tokens=10, temperature=0)),
             ("fox", dict(max_tokens=8, temperature=1.1, seed=2, n=2))]
    sink = Collector(len(cases))
    reqs = make(loaded, cases, sink, ignore_eos=True)
    engine.submit(reqs[:1])
    for step in range(200):
        now[0] = step
        if step in (2, 3):  # one newcomer per step
            engine.submit([reqs[step - 1]])
        if step == 10:  # two rows for the last two free slots
            engine.submit([reqs[3]])
        engine.step()
        engine.drain()
        if len(sink.done) == len(reqs):
            break
    assert admitted == [(0, [0]), (5, [1, 2]), (10, [3])]  # held for 3 steps; at once
    assert all(sink.done[i].error is None for i in range(len(reqs)))
    for req, (p, kw) in zip(reqs, cases):
        ref = generate(model, [tok.encode(p).ids], SamplingParams(**kw), eos_token_id=None, decode=tok.decode)[0]
        assert [s.token_ids for s in req.seqs] == [c.token_ids for c in ref], p
    assert engine.stats.in_flight == 0


GOOD = [(p, dict(max_tokens=24, temperature=t, seed=s, top_k=k))
        for p, t, s, k in [("hello", 0, None, 0), ("the quick", 0.9, 1, 0), ("fox", 1.0, 2, 10),
                           ("lazy dog", 0, None, 0), ("0123", 0.7, 3, 0), ("world", 1.1, 4, 5),
                           ("user:", 0, None, 0), ("jumps", 0.8, 5, 0)]]


def _texts(reqs):
    return [[s.token_ids for s in r.seqs] for r in reqs]


def test_a_failing_request_ends_alone_and_the_other_streams_finish_as_in_a_quiet_run(loaded, poisoned_empty):
    model, tok = loaded
    quiet_sink = Collector(len(GOOD))
    quiet = make(loaded, GOOD, quiet_sink)
    engine = Engine(model, tok, eos_token_id=toks.eos_id(tok), max_batch_size=12, max_queue=16).start()
    try:
        engine.submit(quiet)
        quiet_sink.wait()
    finally:
        engine.stop()

    # the same 8 streams, among requests that fail in every phase: an exception in one
    # request's forward (after 3 tokens) and sampling (injected), and real faults: a seed
    # torch refuses (admission), a length penalty that divides by zero (beam search)
    def fault(phase, reqs):
        for r in reqs:
            if phase == "forward" and r.tag == 8 and r.seqs and len(r.seqs[0].token_ids) >= 3:
                raise RuntimeError("injected forward fault")
            if phase == "sample" and r.tag == 9:
                raise RuntimeError("injected sampling fault")

    bad = [("hello", dict(max_tokens=24, temperature=0)),
           ("fox", dict(max_tokens=24, temperature=0.9, seed=7)),
           ("lazy", dict(max_tokens=24, temperature=1.0, seed=2 ** 64)),
           ("the lazy", dict(max_tokens=40, num_beams=2, length_penalty=-2000))]
    sink = Collector(len(GOOD) + len(bad))
    cases = GOOD[:4] + bad[:2] + GOOD[4:] + bad[2:]
    order = list(range(4)) + [8, 9] + list(range(4, 8)) + [10, 11]
    reqs = make(loaded, cases, sink)
    for r, tag in zip(reqs, order):
        r.tag = tag
    engine = Engine(model, tok, eos_token_id=toks.eos_id(tok), max_batch_size=12, max_queue=16,
                    fault_hook=fault).start()
    try:
        for r in reqs:  # one by one: they join the running batch
            engine.submit([r])
        sink.wait()
        good = sorted((r for r in reqs if r.tag < 8), key=lambda r: r.tag)
        assert _texts(good) == _texts(quiet)
        assert all(sink.done[i].error is None for i in range(8))
        for tag in (8, 9, 10, 11):
            err = sink.done[tag].error
            assert err is not None and err.status == 500 and err.type == "server_error", tag
            assert err.body()["error"].keys() == {"message", "type", "param", "code"}
        snap = engine.snapshot()
        assert snap["in_flight"] == 0 and snap["failed"] == 4 and snap["alive"]
        # and it keeps serving
        after = Collector(1)
        engine.submit(make(loaded, GOOD[:1], after))
        after.wait()
        assert after.done[0].error is None
    finally:
        engine.stop()


def test_beam_search_runs_beside_the_batch_and_stops_when_aborted(loaded):
    model, tok = loaded
    engine = Engine(model, tok, eos_token_id=toks.eos_id(tok), max_batch_size=4, max_queue=4).start()
    try:
        sink = Collector(2)
        beam, stream = make(loaded, [("the lazy", dict(max_tokens=240, num_beams=4)),
                                     ("hello", dict(max_tokens=16, temperature=0))], sink)
        beam.ignore_eos = True  # no hypothesis ends early: it would run all 240 steps
        engine.submit([beam])
        engine.submit([stream])
        while 1 not in sink.done:
            sink._all.wait(0.01)
        assert 0 not in sink.done, "the stream waited for the beam search"
        assert [s.token_ids for s in stream.seqs] == [c.token_ids for c in reference(loaded, "hello", max_tokens=16,
                                                                                     temperature=0)]
        engine.abort([beam])  # its client went away
        sink.wait(30)
        assert sink.done[0].error is None and beam.beam_results is None
        assert engine.snapshot()["aborted"] == 1 and engine.snapshot()["in_flight"] == 0
    finally:
        engine.stop()


def test_stopping_the_engine_gives_every_request_its_final_event(loaded):
    model, tok = loaded
    engine = Engine(model, tok, eos_token_id=toks.eos_id(tok), max_batch_size=2, max_queue=8).start()
    sink = Collector(5)
    reqs = make(loaded, [("the lazy", dict(max_tokens=240, num_beams=4)), ("fox", dict(max_tokens=240, num_beams=2)),
                         ("hello", dict(max_tokens=240, temperature=1.0)), ("a", dict(max_tokens=240, temperature=0)),
                         ("b", dict(max_tokens=240, temperature=0))], sink)  # the last one waits for a slot
    for r in reqs:
        r.ignore_eos = True
    engine.submit(reqs)
    while not any(r.seqs and r.seqs[0].token_ids for r in reqs):
        sink._all.wait(0.01)
    engine.stop()
    sink.wait(30)
    assert engine.snapshot()["in_flight"] == 0


# A replica's remote checkpoint leaves no temp folder: tests/test_checkpoints.py covers open_checkpoint,
# the one loader a replica uses.


def test_samples_of_one_request_that_end_at_different_steps_all_finish(loaded):
    """n > 1 where one sample stops early (a stop string): its siblings go on to their own end and
    the request gets its final event (dropping the whole request with its first finished sample
    left the client waiting forever)."""
    model, tok = loaded
    engine = Engine(model, tok, eos_token_id=toks.eos_id(tok), max_batch_size=6, max_queue=8)
    cases = [("the quick brown fox", dict(max_tokens=20, temperature=1.0, seed=7, n=4, stop=("e",)))]
    sink = Collector(len(cases))
    reqs = make(loaded, cases, sink)
    engine.submit(reqs)
    for _ in range(200):
        engine.step()
        engine.drain()
        if sink.done:
            break
    assert sorted(sink.done) == [0] and sink.done[0].error is None
    finishes = [s.finish for s in reqs[0].seqs]
    lengths = {len(s.token_ids) for s in reqs[0].seqs}
    assert None not in finishes and len(lengths) > 1, (finishes, lengths)  # they did end apart
    ref = reference(loaded, cases[0][0], **cases[0][1])
    assert [s.token_ids for s in reqs[0].seqs] == [c.token_ids for c in ref]
    assert engine.stats.in_flight == 0



def test_a_newcomer_longer_than_the_cache_leaves_the_running_rows_as_they_were(loaded, poisoned_empty):
    """A prompt longer than the cache's used span widens it on the left; the running rows must
    not see what was in the new columns (they got NaN logits -> token 0 = end of text: the
    one-token answer the isolation test met once in a while)."""
    model, tok = loaded
    engine = Engine(model, tok, eos_token_id=toks.eos_id(tok), max_batch_size=4, max_queue=4)
    cases = [("0", dict(max_tokens=20, temperature=0, seed=None)),
             ("the quick brown fox jumps over", dict(max_tokens=12, temperature=0.8, seed=3))]
    sink = Collector(len(cases))
    reqs = make(loaded, cases, sink)
    engine.submit(reqs[:1])
    for step in range(200):
        if step == 2:
            engine.submit(reqs[1:])
        engine.step()
        engine.drain()
        if len(sink.done) == len(reqs):
            break
    assert all(sink.done[i].error is None for i in range(len(reqs)))
    for req, (p, kw) in zip(reqs, cases):
        assert [s.token_ids for s in req.seqs] == [c.token_ids for c in reference(loaded, p, **kw)], p


def test_back_pressure_counts_beam_searches_and_their_width(loaded):
    """The finding: with max_batch_size=2, max_queue=0, 12 of 12 beam requests were accepted into
    the beam thread's unbounded queue (and ran one after another) while plain requests got 503.
    A beam search takes num_beams batch slots while it runs and waits like any request before."""
    from workers.serving.protocol import APIError

    model, tok = loaded
    engine = Engine(model, tok, eos_token_id=toks.eos_id(tok), max_batch_size=2, max_queue=0).start()
    try:
        sink = Collector(13)
        reqs = make(loaded, [("the lazy", dict(max_tokens=60, num_beams=2))] * 12 +
                    [("hello", dict(max_tokens=4, temperature=0))], sink, ignore_eos=True)
        codes = []
        for r in reqs:
            try:
                engine.submit([r])
                codes.append(200)
            except APIError as e:
                assert e.status == 503 and e.code == "overloaded" and e.headers == {"Retry-After": "1"}
                codes.append(503)
        assert codes == [200] + [503] * 12, codes
        engine.abort(reqs[:1])
        sink.done.clear()
        while engine.snapshot()["in_flight"]:
            sink._all.wait(0.01)
        engine.submit([reqs[12]])  # slots free again
        while 12 not in sink.done:
            sink._all.wait(0.01)
        assert sink.done[12].error is None
        # plain requests: two fit the two slots, the third would wait (max_queue=0)
        sink2 = Collector(3)
        one = make(loaded, [("the lazy", dict(max_tokens=60, num_beams=1, temperature=0))] * 3, sink2,
                   ignore_eos=True)
        engine.submit(one[:2])
        with pytest.raises(APIError, match="overloaded"):
            engine.submit(one[2:])
        engine.abort(one[:2])
    finally:
        engine.stop()
