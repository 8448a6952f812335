"""Training and loading tokenizers, saved in Hugging Face ``tokenizer.json`` format.

Two kinds are trained here, both loadable by ``tokenizers.Tokenizer.from_file`` and
``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``:

- ``bpe``: byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer and decoder, no normaliser), so
  any text round-trips exactly and no input is ever unknown;
- ``char``: one id per character seen in the training sample (a WordLevel model over single
  characters, with a pre-tokenizer that splits text into characters and a decoder that fuses
  them back). A character never seen in the sample encodes to ``<|unk|>``.

Special tokens come first (ids 0, 1, ...); ``<|endoftext|>`` is always among them and marks the
end of every document in a token dataset.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from workers import storage

EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<|unk|>"


def _specials(special_tokens: Iterable[str], extra: tuple[str, ...] = ()) -> list[str]:
    """EOS first, then the user's tokens, without duplicates (order is part of the id layout)."""
    out: list[str] = []
    for tok in (EOS_TOKEN, *special_tokens, *extra):
        if tok not in out:
            out.append(tok)
    return out


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Iterable[str] = (),
              min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE tokenizer of at most ``vocab_size`` ids (fewer if the sample runs out
    of merges), trained on ``texts``."""
    specials = _specials(special_tokens)
    floor = len(pre_tokenizers.ByteLevel.alphabet()) + len(specials)
    if vocab_size < floor:
        raise ValueError(f"tokenizer.vocab_size={vocab_size} is too small for byte-level BPE: "
                         f"it needs at least {floor} (256 byte symbols + {len(specials)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def train_char(texts: Iterable[str], special_tokens: Iterable[str] = ()) -> Tokenizer:
    """One id per distinct character of ``texts`` (sorted by code point, after the specials)."""
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    specials = _specials(special_tokens, extra=(UNK_TOKEN,))
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(chars):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    # [\s\S] and not "." : the tokenizers regex engine (Oniguruma) has no (?s) flag.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    return tok


def load(path: str | Path) -> Tokenizer:
    """A tokenizer from a ``tokenizer.json`` file (clear error if missing or not one)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer.path={str(path)!r}: no such file (expected a Hugging Face tokenizer.json)")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"tokenizer.path={str(path)!r} is not a valid tokenizer.json: {e}") from None


def kind_of(tok: Tokenizer) -> str:
    """'bpe', 'char' (WordLevel over characters), or the model's own type name, lower-cased."""
    model = json.loads(tok.to_str())["model"]["type"]
    if model == "WordLevel" and isinstance(tok.decoder, decoders.Fuse):
        return "char"
    return model.lower()


def eos_id(tok: Tokenizer, eos_token: str = EOS_TOKEN) -> int:
    """The id of ``eos_token``, or a clear error naming the tokenizer's special tokens."""
    i = tok.token_to_id(eos_token)
    if i is None:
        added = [t.content for t in tok.get_added_tokens_decoder().values()]
        raise ValueError(f"tokenizer has no end-of-text token {eos_token!r} (its special tokens: {added}); "
                         f"set tokenizer.eos_token to one of them")
    return i


def save(tok: Tokenizer, folder: Path, eos_token: str = EOS_TOKEN) -> Path:
    """Write ``tokenizer.json`` plus ``tokenizer_config.json`` into ``folder`` so both
    ``Tokenizer.from_file`` and ``transformers.AutoTokenizer.from_pretrained(folder)`` load it
    with the right EOS token and no clean-up of spaces (exact round trips)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tokenizer.json"
    storage.write_bytes(str(path), tok.to_str(pretty=True).encode())
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos_token,
        "bos_token": eos_token,
        "unk_token": UNK_TOKEN if tok.token_to_id(UNK_TOKEN) is not None else eos_token,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
    }
    storage.write_json(str(folder / "tokenizer_config.json"), config)
    return path


__all__ = ["EOS_TOKEN", "UNK_TOKEN", "train_bpe", "train_char", "load", "save", "eos_id", "kind_of"]
