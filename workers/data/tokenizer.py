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

Two more, for masked-LM encoders, laid out as the real models' so ``AutoTokenizer`` behaves as
for them (its post-processor adds ``[CLS] … [SEP]`` / ``<s> … </s>``; tokenizer_config.json names
the mask, pad, cls and sep tokens):

- ``wordpiece``: BERT's (its normaliser: clean-up, CJK spacing, optional lower-casing and accent
  stripping; its pre-tokenizer: whitespace and punctuation), specials ``[PAD] [UNK] [CLS] [SEP]
  [MASK]``; ``[SEP]`` ends every document in a token dataset;
- ``bpe-roberta``: byte-level BPE with RoBERTa's specials ``<s> <pad> </s> <unk> <mask>``;
  ``</s>`` ends every document.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

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


# Encoder specials, in the real models' order, by role: (pad, unk, cls, sep, mask)
BERT_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                 "mask_token": "[MASK]"}
ROBERTA_SPECIALS = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                    "mask_token": "<mask>"}


def train_wordpiece(texts: Iterable[str], vocab_size: int, *, lowercase: bool = True,
                    min_frequency: int = 2) -> Tokenizer:
    """BERT's WordPiece tokenizer (uncased by default), post-processed as `[CLS] A [SEP] (B [SEP])`."""
    specials = list(BERT_SPECIALS.values())
    tok = Tokenizer(models.WordPiece(unk_token=BERT_SPECIALS["unk_token"], max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=specials, continuing_subword_prefix="##",
                                        show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    cls, sep = (BERT_SPECIALS[k] for k in ("cls_token", "sep_token"))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    return tok


def train_roberta_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE with RoBERTa's specials and post-processor (`<s> A </s></s> B </s>`)."""
    floor = len(pre_tokenizers.ByteLevel.alphabet()) + len(ROBERTA_SPECIALS)
    if vocab_size < floor:
        raise ValueError(f"tokenizer.vocab_size={vocab_size} is too small for byte-level BPE: it needs at least "
                         f"{floor} (256 byte symbols + {len(ROBERTA_SPECIALS)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, lstrip=t == "<mask>") for t in ROBERTA_SPECIALS.values()]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos, eos = ROBERTA_SPECIALS["bos_token"], ROBERTA_SPECIALS["eos_token"]
    tok.post_processor = processors.RobertaProcessing((eos, tok.token_to_id(eos)), (bos, tok.token_to_id(bos)),
                                                      trim_offsets=True, add_prefix_space=False)
    return tok


def encoder_specials(tok: Tokenizer) -> dict[str, str] | None:
    """The role -> token map of a masked-LM tokenizer (BERT's or RoBERTa's), or None for others."""
    for table in (BERT_SPECIALS, ROBERTA_SPECIALS):
        if all(tok.token_to_id(t) is not None for t in table.values()):
            out = dict(table)
            if table is ROBERTA_SPECIALS:
                out.update(cls_token=out["bos_token"], sep_token=out["eos_token"])
            return out
    return None


def document_end_token(tok: Tokenizer) -> str:
    """The token that ends every document in a token dataset: ``[SEP]`` / ``</s>`` for encoders'
    tokenizers, else ``<|endoftext|>``."""
    specials = encoder_specials(tok)
    return specials["sep_token"] if specials else EOS_TOKEN


def word_starts(tok: Tokenizer) -> "list[bool]":
    """For each id: does this token begin a word? (WordPiece: not `##…`; byte-level BPE: `Ġ…`
    or a special). Whole-word masking chooses words, not pieces."""
    vocab = tok.get_vocab(with_added_tokens=True)
    out = [True] * (max(vocab.values()) + 1)
    byte_level = kind_of(tok) == "bpe"
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    for token, i in vocab.items():
        if token in added:
            continue
        out[i] = token.startswith("\u0120") if byte_level else not token.startswith("##")
    return out


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
    specials = encoder_specials(tok)
    if specials:  # an encoder's: no bos/eos of its own beyond RoBERTa's; the roles fill-mask needs
        config = {**{k: v for k, v in config.items() if k not in ("eos_token", "bos_token")}, **specials,
                  "model_input_names": ["input_ids", "attention_mask"] if "bos_token" in specials
                  else ["input_ids", "token_type_ids", "attention_mask"]}
    storage.write_json(str(folder / "tokenizer_config.json"), config)
    return path


__all__ = ["EOS_TOKEN", "UNK_TOKEN", "BERT_SPECIALS", "ROBERTA_SPECIALS", "train_bpe", "train_char",
           "train_wordpiece", "train_roberta_bpe", "encoder_specials", "document_end_token", "word_starts",
           "load", "save", "eos_id", "kind_of"]
