"""Batched generation for `workers.model.transformer.GPT`: sampling, beam search, streaming. Plain PyTorch.

All prompts (and the n samples of each) decode as ONE batch: prompts are left-padded, an
attention mask hides the pads, and a preallocated KV cache (`model.KVCache`) means each step
feeds only the newest token. The prompt is prefilled once per prompt and the cache is then
copied for its n samples.

Logit pipeline per step (each stage a small pure function on (B, V) logits, so tests can hit
it directly): penalties -> temperature -> top-k -> top-p -> min-p -> sample.

Conventions (documented because callers rely on them):
- logprobs / cumulative_logprob are log-probs of the chosen tokens under the *raw* model
  distribution (log_softmax of the logits before penalties/temperature/top-k/p), as vLLM V1
  does by default (`logprobs_mode="raw_logprobs"`). For beam search they are under the
  penalised distribution the beams are scored with (same as raw when no penalties are set).
- A stop token (eos_token_id or one of stop_token_ids) is kept in token_ids/logprobs but not in
  text. A stop string ends the sequence; text is truncated before it (OpenAI), token_ids keep
  the token that completed it.
- Seeded sampling: sample i of a prompt draws from its own torch.Generator seeded with
  seed + i, so the same seed gives the same tokens whatever else is in the batch. Unseeded
  rows share torch's global RNG.
- Finite in effect: a temperature below ``GREEDY_BELOW`` (vLLM's ``_SAMPLING_EPS``) is greedy,
  since dividing float32 logits by it overflows (1e-45 is 0 in float32: 0/0 = NaN); penalties
  are clamped to ``PENALTY_LIMIT`` and penalised or tempered logits saturate at +-``LOGIT_LIMIT``
  instead of reaching infinity; top-p always keeps the most likely token. So every row reaching
  argmax or the sampler holds finite values (masked ones -inf) and a finite maximum, which
  ``check_finite`` asserts.
- Beam search (num_beams > 1) is deterministic (temperature/top-k/p ignored; penalties apply),
  scores a hypothesis as sum_logprobs / generated_len ** length_penalty (HF convention; the
  stop token counts in the length), stops a prompt once num_beams hypotheses have finished
  (HF early_stopping=True, so width 1 is exactly greedy), and applies stop strings to the
  final text only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch.nn import functional as F

from workers.model.transformer import GPT, KVCache, StepDecoder

__all__ = [
    "SamplingParams", "Completion", "StepOutput", "generate", "stream",
    "apply_penalties", "apply_temperature", "apply_top_k", "apply_top_p", "apply_min_p",
    "process_logits", "penalty_counts", "check_finite", "GREEDY_BELOW", "LOGIT_LIMIT", "PENALTY_LIMIT", "prefill", "GenerationCancelled", "sample", "pick", "find_stop", "partial_stop", "StopCheck", "apply_stops",
]


# ----------------------------------------------------------------------------- parameters

GREEDY_BELOW = 1e-5
"""A temperature below this samples greedily (vLLM's ``_SAMPLING_EPS``): the division would
overflow float32 logits, or round to zero (0/0 = NaN), long before it stops meaning argmax."""
LOGIT_LIMIT = 1e30
"""Penalised and tempered logits saturate here (float32 reaches 3.4e38): finite, so softmax's
max subtraction never sees inf - inf, and far above any logit a model produces."""
PENALTY_LIMIT = 1e4
"""repetition_penalty is clamped to [1/PENALTY_LIMIT, PENALTY_LIMIT] and presence/frequency
penalties to [-PENALTY_LIMIT, PENALTY_LIMIT] where they are applied: beyond, a penalty only
overflows (1e-300 is 0 in float32)."""

@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0        # 0 -> greedy
    top_k: int = 0                  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1
    num_beams: int = 1              # >1 -> beam search (deterministic)
    length_penalty: float = 1.0
    stop: tuple[str, ...] = ()      # stop strings (needs decode)
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    logprobs: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the field, the bad value and what is allowed."""
        def bad(name, allowed):
            raise ValueError(f"SamplingParams.{name}: got {getattr(self, name)!r}; {allowed}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if not is_num(self.temperature) or self.temperature < 0:
            bad("temperature", "must be a number >= 0 (0 = greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 = off)")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be a number > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not is_num(v) or not -2 <= v <= 2:
                bad(name, "must be in [-2, 2] (0 = off)")
        if not is_int(self.n) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if not is_int(self.num_beams) or self.num_beams < 1:
            bad("num_beams", "must be an integer >= 1 (1 = no beam search)")
        if self.num_beams > 1 and self.n > self.num_beams:
            bad("n", f"must be <= num_beams ({self.num_beams}) with beam search")
        if not is_num(self.length_penalty):
            bad("length_penalty", "must be a finite number")
        if not isinstance(self.stop, (tuple, list)) or not all(
                isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be a tuple of non-empty strings")
        if not isinstance(self.stop_token_ids, (tuple, list)) or not all(
                is_int(t) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be a tuple of integers >= 0")
        if self.seed is not None and not is_int(self.seed):
            bad("seed", "must be an integer or None")
        if not isinstance(self.logprobs, bool):
            bad("logprobs", "must be true or false")

    @property
    def greedy(self) -> bool:
        """Whether this samples greedily: temperature 0, or below ``GREEDY_BELOW``."""
        return self.temperature < GREEDY_BELOW


@dataclass
class Completion:
    token_ids: list[int]
    text: str                        # "" when no decode fn given
    finish_reason: str               # "stop" | "length"
    logprobs: list[float] | None     # raw-model log-prob of each chosen token (see module doc)
    cumulative_logprob: float
    score: float | None = None       # beam score (length-penalised)


@dataclass
class StepOutput:
    """What one sequence produced in one decode step (stream())."""
    index: int                       # flat sequence index: prompt_index * n + sample_index
    prompt_index: int
    sample_index: int
    token_ids: list[int]             # new token(s) this step
    text: str                        # new text this step ("" while held back or no decode)
    logprobs: list[float] | None
    finish_reason: str | None = None  # set on the sequence's last StepOutput
    cumulative_logprob: float = 0.0


# ----------------------------------------------------------------------------- logit processors

def apply_penalties(logits: torch.Tensor, counts: torch.Tensor | None, seen: torch.Tensor | None,
                    repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                    frequency_penalty: float = 0.0) -> torch.Tensor:
    """logits (B, V). counts (B, V): times each token was generated so far (presence/frequency,
    OpenAI: output tokens only). seen (B, V) bool: token in prompt or output (repetition, HF/vLLM:
    positive logits divided by the penalty, negative ones multiplied).
    Penalties are clamped (``PENALTY_LIMIT``) and the result saturates at +-``LOGIT_LIMIT``."""
    changed = False
    if repetition_penalty != 1.0 and seen is not None:
        r = min(max(repetition_penalty, 1 / PENALTY_LIMIT), PENALTY_LIMIT)
        penalised = torch.where(logits > 0, logits / r, logits * r)
        logits = torch.where(seen, penalised, logits)
        changed = True
    if counts is not None:
        if frequency_penalty:
            logits = logits - _clamp_penalty(frequency_penalty) * counts
            changed = True
        if presence_penalty:
            logits = logits - _clamp_penalty(presence_penalty) * (counts > 0).to(logits.dtype)
            changed = True
    return _saturate(logits) if changed else logits


def _clamp_penalty(v: float) -> float:
    return min(max(v, -PENALTY_LIMIT), PENALTY_LIMIT)


def _saturate(logits: torch.Tensor) -> torch.Tensor:
    """+-inf (an overflow) -> +-LOGIT_LIMIT; finite values above it too."""
    return logits.clamp(-LOGIT_LIMIT, LOGIT_LIMIT)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature. Below ``GREEDY_BELOW`` (where the
    division overflows, or float32 rounds the temperature to 0: x / 0 is inf or NaN) the limit
    as the temperature goes to 0: 0 for the most likely token(s), -inf for the others."""
    if temperature == 1.0:
        return logits
    if temperature < GREEDY_BELOW:
        top = logits.max(-1, keepdim=True).values
        return torch.zeros_like(logits).masked_fill(logits < top, float("-inf"))
    return logits / temperature  # finite: |logits| <= LOGIT_LIMIT, and LOGIT_LIMIT / GREEDY_BELOW < 3.4e38


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (k <= 0 or >= V: unchanged)."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability sums to >= p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
    drop_sorted = before >= p
    drop_sorted[..., 0] = False        # the top token always stays (a p of 1e-300 is 0 in float32)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    threshold = min_p * probs.max(-1, keepdim=True).values  # (B, 1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams, counts=None, seen=None) -> torch.Tensor:
    """The whole pipeline for sampling: penalties -> temperature -> top-k -> top-p -> min-p."""
    logits = apply_penalties(logits, counts, seen, params.repetition_penalty,
                             params.presence_penalty, params.frequency_penalty)
    if params.greedy:
        return logits
    logits = apply_temperature(logits, params.temperature)
    logits = apply_top_k(logits, params.top_k)
    logits = apply_top_p(logits, params.top_p)
    return apply_min_p(logits, params.min_p)


def check_finite(x: torch.Tensor, what: str) -> None:
    """Assert that no NaN reaches argmax or the sampler (the pipeline above keeps values finite;
    a NaN here is a bug, or a model whose logits are NaN). On an accelerator the check runs
    asynchronously, without a device sync."""
    bad = torch.isnan(x).any()
    if x.device.type == "cpu":
        if bool(bad):
            raise AssertionError(f"sampling: NaN in the {what} of {x.size(0)} row(s)")
    else:
        torch._assert_async(~bad, f"sampling: NaN in the {what}")


def pick(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator | None]) -> torch.Tensor:
    """The next token of each row from processed ``logits`` (B, V): argmax when greedy, else a draw."""
    check_finite(logits, "processed logits")
    if params.greedy:
        return logits.argmax(-1)
    return sample(logits.softmax(-1), generators)


def sample(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One draw per row, (B, V) -> (B,), by the exponential race argmax(p / E), E ~ Exp(1):
    equivalent to multinomial, and lets each row use its own generator."""
    check_finite(probs, "probabilities")
    q = torch.empty_like(probs)
    if all(g is None for g in generators):
        q.exponential_()
    else:
        for i, g in enumerate(generators):
            q[i].exponential_(generator=g)
    return (probs / q).argmax(-1)


# ----------------------------------------------------------------------------- helpers

def find_stop(text: str, stops) -> int | None:
    """Where the first of ``stops`` starts in ``text`` (None: none occurs)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def partial_stop(text: str, stops) -> int:
    """Length of the longest suffix of text that could still grow into a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


@dataclass
class StopCheck:
    """A sequence's decoded text after applying stop strings (see :func:`apply_stops`)."""
    text: str                 # the text so far, cut before a stop string
    finish: str | None        # "stop" | "length" | None (still running)
    stop_at: int | None       # where a stop string cut the text
    stable: str               # the prefix that is safe to stream now


def apply_stops(text: str, stops, finish: str | None, last: bool) -> StopCheck:
    """Stop strings and stream hold-back for one sequence after a step. ``text``: its decoded
    output (without a stop token); ``finish``: "stop" when a stop token just ended it; ``last``:
    it reached its length limit. While it runs, what may still grow into a stop string and
    incomplete characters (U+FFFD) are held back."""
    cut = find_stop(text, stops) if stops else None
    if cut is not None:
        text, finish = text[:cut], "stop"
    elif finish is None and last:
        finish = "length"
    if finish is None:
        stable = text.rstrip("\ufffd")
        stable = stable[:len(stable) - partial_stop(stable, stops)]
    else:
        stable = text
    return StopCheck(text, finish, cut, stable)


def _prepare(model: GPT, prompts, params: SamplingParams, decode, device):
    params.validate()
    if params.stop and decode is None:
        raise ValueError("SamplingParams.stop: stop strings need a decode function (decode=...)")
    if not prompts:
        raise ValueError("prompts: got an empty list; give at least one prompt")
    V, block = model.config.vocab_size, model.config.block_size
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompts[{i}]: empty prompt; give at least one token")
        if min(p) < 0 or max(p) >= V:
            raise ValueError(f"prompts[{i}]: token ids must be in [0, {V}); got min {min(p)}, max {max(p)}")
    Tp = max(len(p) for p in prompts)
    # the last sampled token is never fed back, hence the -1
    if Tp + params.max_tokens - 1 > block:
        raise ValueError(f"SamplingParams.max_tokens: got {params.max_tokens}; the longest prompt has "
                         f"{Tp} tokens and the model's block_size is {block}, so at most "
                         f"{block - Tp + 1} new tokens fit")
    device = torch.device(device) if device is not None else model.lm_head.weight.device
    return device, Tp


@torch.inference_mode()
def prefill(model: GPT, prompts, width: int, max_len: int, device, *, mask: bool = False):
    """Run ``prompts`` (lists of ids, at most ``width`` long, left-padded to it) once into a fresh
    KV cache of ``max_len`` columns. Returns (last-position logits (P, V) or None when width is
    0, cache, attention mask (P, max_len) marking each row's real columns, or None when no row
    is padded and ``mask`` is False)."""
    P = len(prompts)
    cache = KVCache.empty(model, P, max_len, device=device)
    padded = mask or any(len(p) != width for p in prompts)
    if width == 0:
        return None, cache, torch.zeros((P, max_len), dtype=torch.bool, device=device) if padded else None
    idx = torch.zeros((P, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            idx[i, width - len(p):] = torch.tensor(p, dtype=torch.long)  # left padding
    idx = idx.to(device)
    if not padded:
        logits, _ = model(idx, kv_cache=cache, logits_to_keep=1)
        return logits[:, -1], cache, None
    attn = torch.zeros((P, max_len), dtype=torch.bool)
    for i, p in enumerate(prompts):
        attn[i, width - len(p):width] = True
    attn = attn.to(device)
    logits, _ = model(idx, attention_mask=attn[:, :width], kv_cache=cache, logits_to_keep=1)
    return logits[:, -1], cache, attn


@torch.inference_mode()
def _prefill(model: GPT, prompts, Tp: int, rows: int, expand: torch.Tensor, max_len: int, device):
    """Run the prompts once, then copy the cache for the samples/beams of each prompt.

    Returns (last-position logits (rows, V), cache, attention mask (rows, max_len) or None,
    next position ids (rows, 1) or None)."""
    logits, cache, mask = prefill(model, prompts, Tp, max_len, device)
    pos = None
    if mask is not None:
        pos = torch.tensor([[len(p)] for p in prompts], dtype=torch.long, device=device)  # (P, 1)
        mask = mask.index_select(0, expand)
        pos = pos.index_select(0, expand)
    if rows != len(prompts):
        cache.reorder(expand)
    return logits.float().index_select(0, expand), cache, mask, pos  # (rows, V)


@torch.inference_mode()
def _forward_step(model: GPT, tokens: torch.Tensor, cache: KVCache, mask, pos, step: StepDecoder | None):
    """Feed one token per row (rows,) -> next logits (rows, V). Rows without padding (mask None)
    go through ``step`` (model.step_decoder()) where the model has one."""
    if mask is not None:
        mask[:, cache.pos] = True
        logits, _ = model(tokens[:, None], attention_mask=mask[:, :cache.pos + 1],
                          position_ids=pos, kv_cache=cache)
        pos += 1
        return logits[:, -1].float()
    if step is not None:
        return step(tokens, cache).float()
    logits, _ = model(tokens[:, None], kv_cache=cache)
    return logits[:, -1].float()


def penalty_counts(seen_ids: list[list[int]], generated: list[list[int]] | None, V: int, device):
    """The state penalties read (see apply_penalties): counts (rows, V) float of each row's
    ``generated`` tokens, seen (rows, V) bool of its ``seen_ids`` (prompt + generated)."""
    rows = len(seen_ids)
    counts = torch.zeros((rows, V), dtype=torch.float32)
    seen = torch.zeros((rows, V), dtype=torch.bool)
    for i, ids in enumerate(seen_ids):
        seen[i, torch.tensor(ids, dtype=torch.long)] = True
        if generated is not None and generated[i]:
            counts[i].index_add_(0, torch.tensor(generated[i], dtype=torch.long), torch.ones(len(generated[i])))
    return counts.to(device), seen.to(device)


class _PenaltyState:
    """counts (rows, V) of generated tokens and seen (rows, V) prompt+generated, on device."""

    def __init__(self, params: SamplingParams, prompts_per_row, V: int, device):
        self.active = (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
                       or params.frequency_penalty != 0.0)
        self.counts = self.seen = None
        if not self.active:
            return
        self.counts, self.seen = penalty_counts(prompts_per_row, None, V, device)

    def add(self, tokens: torch.Tensor) -> None:
        if self.active:
            self.counts.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=torch.float32))
            self.seen.scatter_(1, tokens[:, None], True)

    def reorder(self, index: torch.Tensor) -> None:
        if self.active:
            self.counts = self.counts.index_select(0, index)
            self.seen = self.seen.index_select(0, index)


# ----------------------------------------------------------------------------- sampling engine

class _Seq:
    __slots__ = ("prompt_index", "sample_index", "token_ids", "logprobs", "cum", "finish",
                 "text", "emitted", "stop_at")

    def __init__(self, prompt_index, sample_index):
        self.prompt_index, self.sample_index = prompt_index, sample_index
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.cum = 0.0
        self.finish: str | None = None
        self.text = ""       # final text once finished (when decode is given)
        self.emitted = 0     # characters of text already streamed
        self.stop_at = None  # text cut position when a stop string was found


def _run(model: GPT, prompts, params: SamplingParams, eos_token_id, decode, device,
         stream_text: bool, seeds=None) -> Iterator[tuple[list[_Seq], list[StepOutput]]]:
    """Sampling/greedy decode loop; yields (all sequences, this step's outputs) per step."""
    device, Tp = _prepare(model, prompts, params, decode, device)
    n, P = params.n, len(prompts)
    rows = P * n
    expand = torch.arange(P, device=device).repeat_interleave(n)  # row -> prompt
    seqs = [_Seq(i, j) for i in range(P) for j in range(n)]
    stop_ids = set(params.stop_token_ids) | ({eos_token_id} if eos_token_id is not None else set())
    stops = tuple(params.stop)
    greedy = params.greedy
    generators: list[torch.Generator | None] = [None] * rows
    if params.seed is not None and not greedy:
        for r, s in enumerate(seqs):
            base = params.seed if seeds is None else seeds[s.prompt_index]
            generators[r] = torch.Generator(device=device).manual_seed(base + s.sample_index)
    text_every_step = decode is not None and (stream_text or bool(stops))

    was_training = model.training
    model.eval()
    try:
        logits, cache, mask, pos = _prefill(model, prompts, Tp, rows, expand,
                                            Tp + params.max_tokens - 1, device)
        pen = _PenaltyState(params, [prompts[s.prompt_index] for s in seqs], logits.size(-1), device)
        decoder = model.step_decoder() if mask is None else None
        for step in range(params.max_tokens):
            with torch.inference_mode():
                proc = process_logits(logits, params, pen.counts, pen.seen)
                tokens = pick(proc, params, generators)  # (rows,)
                # raw-model log-prob of the chosen token (vLLM V1 "raw_logprobs"); one fused
                # kernel, where logsumexp is several (measured 6 vs 17 us over 8k logits)
                lp = F.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)
                pen.add(tokens)
                host = torch.stack((tokens.double(), lp.double())).tolist()  # one device sync
            outs: list[StepOutput] = []
            last = step == params.max_tokens - 1
            for r, s in enumerate(seqs):
                if s.finish is not None:
                    continue
                tok, tlp = int(host[0][r]), host[1][r]
                s.token_ids.append(tok)
                s.logprobs.append(tlp)
                s.cum += tlp
                if tok in stop_ids:
                    s.finish = "stop"
                delta = ""
                if text_every_step:
                    body = s.token_ids[:-1] if s.finish else s.token_ids
                    chk = apply_stops(decode(body), stops, s.finish, last)
                    s.finish = chk.finish
                    if chk.stop_at is not None:
                        s.stop_at = chk.stop_at
                    if s.finish is not None:
                        s.text = chk.text
                    delta = chk.stable[s.emitted:]
                    s.emitted = max(s.emitted, len(chk.stable))
                elif s.finish is None and last:
                    s.finish = "length"
                outs.append(StepOutput(
                    index=r, prompt_index=s.prompt_index, sample_index=s.sample_index,
                    token_ids=[tok], text=delta, logprobs=[tlp] if params.logprobs else None,
                    finish_reason=s.finish, cumulative_logprob=s.cum))
            yield seqs, outs
            if last or all(s.finish is not None for s in seqs):
                break
            logits = _forward_step(model, tokens, cache, mask, pos, decoder)
    finally:
        model.train(was_training)


def _final_text(s: _Seq, decode, stop_ids) -> str:
    if decode is None:
        return ""
    if s.stop_at is not None or s.text:
        return s.text
    body = s.token_ids[:-1] if s.token_ids and s.token_ids[-1] in stop_ids and s.finish == "stop" else s.token_ids
    return decode(body)


def generate(model: GPT, prompts: list[list[int]], params: SamplingParams, *,
             eos_token_id: int | None = None, decode: Callable[[list[int]], str] | None = None,
             device=None, should_stop: Callable[[], bool] | None = None,
             seeds: list[int] | None = None) -> list[list[Completion]]:
    """One list of params.n completions per prompt (the n best beams with num_beams > 1).
    ``should_stop`` (beam search) is asked before every step; True raises GenerationCancelled.
    ``seeds`` (with params.seed set): prompt p's sample i draws from seeds[p] + i instead of
    params.seed + i, so that prompts batched together need not share streams."""
    if params.num_beams > 1:
        return _beam_search(model, prompts, params, eos_token_id, decode, device, should_stop)
    seqs: list[_Seq] = []
    for seqs, _ in _run(model, prompts, params, eos_token_id, decode, device, stream_text=False, seeds=seeds):
        pass
    stop_ids = set(params.stop_token_ids) | ({eos_token_id} if eos_token_id is not None else set())
    out: list[list[Completion]] = [[] for _ in prompts]
    for s in seqs:
        out[s.prompt_index].append(Completion(
            token_ids=s.token_ids, text=_final_text(s, decode, stop_ids), finish_reason=s.finish,
            logprobs=s.logprobs if params.logprobs else None, cumulative_logprob=s.cum))
    return out


def stream(model: GPT, prompts: list[list[int]], params: SamplingParams, *,
           eos_token_id: int | None = None, decode: Callable[[list[int]], str] | None = None,
           device=None) -> Iterator[list[StepOutput]]:
    """Yield, after each decode step, one StepOutput per still-running sequence (n samples per
    prompt are separate sequences). Text deltas hold back a possible stop-string prefix and
    incomplete characters; the last StepOutput of a sequence carries finish_reason."""
    if params.num_beams > 1:
        raise ValueError(f"SamplingParams.num_beams: got {params.num_beams}; beam search is not "
                         "streamed, use generate()")
    for _, outs in _run(model, prompts, params, eos_token_id, decode, device, stream_text=True):
        yield outs


# ----------------------------------------------------------------------------- beam search

@dataclass(order=True)
class _Hyp:
    score: float
    cum: float = field(compare=False)
    token_ids: list[int] = field(compare=False)
    logprobs: list[float] = field(compare=False)
    finish: str = field(compare=False)


class GenerationCancelled(Exception):
    """``should_stop`` said stop (e.g. the client of a server went away)."""


def _beam_search(model: GPT, prompts, params: SamplingParams, eos_token_id, decode, device, should_stop=None):
    device, Tp = _prepare(model, prompts, params, decode, device)
    W, P, lp_pow = params.num_beams, len(prompts), params.length_penalty
    rows = P * W
    expand = torch.arange(P, device=device).repeat_interleave(W)
    stop_ids = set(params.stop_token_ids) | ({eos_token_id} if eos_token_id is not None else set())

    def norm(cum, length):
        return cum / (length ** lp_pow)

    was_training = model.training
    model.eval()
    try:
        logits, cache, mask, pos = _prefill(model, prompts, Tp, rows, expand,
                                            Tp + params.max_tokens - 1, device)
        pen = _PenaltyState(params, [prompts[r // W] for r in range(rows)], logits.size(-1), device)
        decoder = model.step_decoder() if mask is None else None
        V = logits.size(-1)
        # only beam 0 is live at first so the first step picks W distinct tokens
        beam_scores = torch.full((P, W), float("-inf"), device=device)
        beam_scores[:, 0] = 0.0
        beam_toks: list[list[list[int]]] = [[[] for _ in range(W)] for _ in range(P)]
        beam_lps: list[list[list[float]]] = [[[] for _ in range(W)] for _ in range(P)]
        hyps: list[list[_Hyp]] = [[] for _ in range(P)]
        done = [False] * P
        for step in range(params.max_tokens):
            if should_stop is not None and should_stop():
                raise GenerationCancelled(f"beam search stopped after {step} steps")
            last = step == params.max_tokens - 1
            with torch.inference_mode():
                logp = F.log_softmax(apply_penalties(
                    logits, pen.counts, pen.seen, params.repetition_penalty,
                    params.presence_penalty, params.frequency_penalty), -1)        # (rows, V)
                cand = (beam_scores[:, :, None] + logp.view(P, W, V)).view(P, W * V)
                top_scores, top_idx = torch.topk(cand, 2 * W, dim=-1)             # (P, 2W)
                parent_w, tok = top_idx // V, top_idx % V
                tok_lp = logp.view(P, W, V)[torch.arange(P, device=device)[:, None], parent_w, tok]
                host_s, host_w, host_t, host_lp = (top_scores.tolist(), parent_w.tolist(),
                                                   tok.tolist(), tok_lp.tolist())
            new_parent, new_tok, new_score = [], [], []
            for p in range(P):
                chosen: list[tuple[int, int, float, float]] = []
                if not done[p]:
                    for rank in range(2 * W):
                        s, w, t, l = host_s[p][rank], host_w[p][rank], host_t[p][rank], host_lp[p][rank]
                        if s == float("-inf"):
                            break
                        if t in stop_ids:
                            if rank < W:  # HF: a stop token only counts from the top W candidates
                                toks = beam_toks[p][w] + [t]
                                hyps[p].append(_Hyp(norm(s, len(toks)), s, toks,
                                                    beam_lps[p][w] + [l], "stop"))
                            continue
                        chosen.append((w, t, s, l))
                        if len(chosen) == W:
                            break
                    hyps[p].sort(reverse=True)
                    del hyps[p][W:]
                    if len(hyps[p]) >= W:
                        done[p] = True
                    elif last:
                        for w, t, s, l in chosen:
                            toks = beam_toks[p][w] + [t]
                            hyps[p].append(_Hyp(norm(s, len(toks)), s, toks, beam_lps[p][w] + [l], "length"))
                        hyps[p].sort(reverse=True)
                        del hyps[p][W:]
                        done[p] = True
                if done[p] or len(chosen) < W:  # pad finished prompts with dead beams
                    chosen += [(0, 0, float("-inf"), 0.0)] * (W - len(chosen))
                beam_toks[p] = [beam_toks[p][w] + [t] for w, t, _, _ in chosen]
                beam_lps[p] = [beam_lps[p][w] + [l] for w, _, _, l in chosen]
                for w, t, s, _ in chosen:
                    new_parent.append(p * W + w)
                    new_tok.append(t)
                    new_score.append(s)
            if all(done):
                break
            index = torch.tensor(new_parent, device=device)
            tokens = torch.tensor(new_tok, device=device)
            beam_scores = torch.tensor(new_score, device=device).view(P, W)
            cache.reorder(index)
            pen.reorder(index)
            pen.add(tokens)
            logits = _forward_step(model, tokens, cache, mask, pos, decoder)
    finally:
        model.train(was_training)

    out: list[list[Completion]] = []
    for p in range(P):
        comps = []
        for h in hyps[p][:params.n]:
            finish, text = h.finish, ""
            if decode is not None:
                body = h.token_ids[:-1] if finish == "stop" else h.token_ids
                text = decode(body)
                cut = find_stop(text, params.stop) if params.stop else None
                if cut is not None:
                    text, finish = text[:cut], "stop"
            comps.append(Completion(token_ids=h.token_ids, text=text, finish_reason=finish,
                                    logprobs=h.logprobs if params.logprobs else None,
                                    cumulative_logprob=h.cum, score=h.score))
        out.append(comps)
    return out
