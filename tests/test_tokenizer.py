"""GPT2Tokenizer against Hugging Face `tokenizers` (Rust) built from the same real GPT-2 files."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")

from gpt2_effnet.tokenizer import GPT2Tokenizer, _default_files  # noqa: E402

FIXED_CORPUS = [
    "",
    "A man riding a wave on top of a surfboard.",
    "Two dogs are playing with a frisbee in the park",
    "Hello world",
    " Hello world",
    "café crème brûlée, naïve façade, Ångström, Øresund, ß",
    "東京タワーの夜景と 猫が二匹 寝ている。",
    "한국어 문장입니다",
    "مرحبا بالعالم، كيف حالك؟",
    "שלום עולם",
    "Привет, мир! Ёжик в тумане.",
    "नमस्ते दुनिया",
    "emoji 🙂😀🎉 and flags 🇫🇷🇯🇵",
    "family 👨‍👩‍👧‍👦 and 👩🏽‍💻 and 🏳️‍🌈 ZWJ",
    "spaces   between    words",
    "tabs\tand\t\ttabs",
    "new\nlines\n\n\nand\r\nwindows",
    "trailing spaces   ",
    "   leading spaces",
    " \t \n mixed whitespace \n\t ",
    "\n",
    "    ",
    "it's they're we've I'm you'll he'd don't",
    "IT'S THEY'RE WE'VE I'M YOU'LL HE'D DON'T",
    "the dog'S bone and John'S car",
    "'s 't 're 've 'm 'll 'd",
    "numbers 0 1 12 123 1234 12345 3.14159 1,000,000 -42 1e10",
    "2024-01-31 12:34:56",
    "punctuation!!! ??? ... --- ;;; ::: (([[{{}}]])) @#$%^&*_+=|\\/<>~`",
    '"quoted" \'single\' «guillemets» „low“ — en–dash … ellipsis',
    "<|endoftext|>",
    "before<|endoftext|>after <|endoftext|> spaced",
    "gazed",
    " gazed at the sky",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "\u00a0non-breaking\u00a0space and\u2003em space and\u3000ideographic",
    "zero\u200bwidth\u200cjoiners\u200d",
    "combining e\u0301 a\u0300 o\u0308",
    "control\x00chars\x07\x1b[0m",
    "odd\x0bwhite\x0c space\x1c\x1d \x1e\x1f x\x85 y\u2028z\u2029 \u180e\ufeff end",
    "mathematical 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and 𝟙𝟚𝟛",
]

_PIECES = [
    "a", "the", "dog", "cat", "man", "woman", "riding", "surfboard", "on", "of", "with", "Giraffe",
    "café", "naïve", "über", "Ελλάδα", "東京", "猫", "한국", "مرحبا", "שלום", "мир",
    "🙂", "🎉", "👨‍👩‍👧", "🏳️‍🌈", "👍🏾", "🇫🇷",
    " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n", "\u00a0", "\u3000",
    "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'LL", "'",
    "0", "7", "42", "1234567", "3.5",
    ".", ",", "!", "?", "...", "-", "(", ")", "\"", ":", ";", "/", "@", "#",
    "<|endoftext|>",
]

# Code-point ranges for random characters: Latin-1, Latin Extended, Greek, Cyrillic, Hebrew, Arabic,
# Devanagari, combining marks, general punctuation (incl. odd spaces), CJK, Hangul, emoji.
_RANGES = [
    (0x20, 0x7E), (0xA0, 0xFF), (0x100, 0x17F), (0x370, 0x3FF), (0x400, 0x4FF), (0x5D0, 0x5EA),
    (0x600, 0x6FF), (0x900, 0x97F), (0x300, 0x36F), (0x2000, 0x206F), (0x4E00, 0x4FFF),
    (0xAC00, 0xAD00), (0x1F300, 0x1F64F), (0x1F900, 0x1F9FF),
]


def _random_corpus(n: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 14)):
            if rng.random() < 0.8:
                parts.append(rng.choice(_PIECES))
            else:
                lo, hi = rng.choice(_RANGES)
                parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 4))))
        out.append("".join(parts))
    return out


CORPUS = FIXED_CORPUS + _random_corpus(400)


@pytest.fixture(scope="module")
def tok() -> GPT2Tokenizer:
    return GPT2Tokenizer.default()


@pytest.fixture(scope="module")
def reference():
    """HF tokenizers configured as GPT-2: byte-level BPE, GPT-2 regex, no prefix space, no dropout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    encoder, merges = _default_files()
    ref = Tokenizer(models.BPE(vocab=dict(encoder), merges=list(merges), dropout=None, ignore_merges=False))
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    ref.decoder = decoders.ByteLevel()
    assert ref.pre_tokenizer.add_prefix_space is False and ref.pre_tokenizer.use_regex is True
    assert ref.model.dropout is None and ref.model.ignore_merges is False
    assert ref.get_vocab_size(with_added_tokens=True) == 50257  # nothing, incl. <|endoftext|>, is special
    # Values from the Hugging Face GPT2Tokenizer documentation, to check the reference is GPT-2's.
    assert ref.encode("Hello world").ids == [15496, 995]
    assert ref.encode(" Hello world").ids == [18435, 995]
    return ref


def test_vocabulary_properties(tok: GPT2Tokenizer) -> None:
    encoder, merges = _default_files()
    assert tok.vocab_size == len(encoder) == 50257
    assert len(merges) == 50000  # the last merge ("Ġg azed") must not be dropped
    assert tok.eos_token_id == encoder["<|endoftext|>"] == 50256
    assert tok.bos_token_id == tok.vocab_size
    assert tok.num_special_tokens == 1


def test_encode_matches_hf_tokenizers(tok: GPT2Tokenizer, reference) -> None:
    expected = [e.ids for e in reference.encode_batch(CORPUS)]
    mismatches = [(text, got, want) for text, got, want in zip(CORPUS, map(tok.encode, CORPUS), expected) if got != want]
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[0]!r}"


def test_decode_round_trips_and_matches_hf(tok: GPT2Tokenizer, reference) -> None:
    for text in CORPUS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode(np.asarray(ids, dtype=np.int32)) == text
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=False)


def test_literal_endoftext_is_plain_text(tok: GPT2Tokenizer) -> None:
    assert tok.eos_token_id not in tok.encode("a <|endoftext|> b")
    assert tok.decode([tok.eos_token_id]) == "<|endoftext|>"


def test_decode_skips_extra_special_ids_and_replaces_bad_utf8() -> None:
    tok = GPT2Tokenizer.default(num_special_tokens=3)
    ids = tok.encode("a cat")
    assert tok.decode([tok.vocab_size, *ids, tok.vocab_size + 1, tok.vocab_size + 2]) == "a cat"
    # A 4-byte emoji split over several tokens: any proper prefix is an incomplete UTF-8 sequence.
    emoji_ids = tok.encode("🦩")
    assert len(emoji_ids) > 1
    assert tok.decode(emoji_ids[:1]).endswith("\ufffd")
    assert tok.decode(emoji_ids) == "🦩"
    with pytest.raises(ValueError, match="negative"):
        tok.decode([-1])


def test_ascii_fast_path_splits_like_the_unicode_rule(tok: GPT2Tokenizer, reference) -> None:
    import regex

    from gpt2_effnet.tokenizer import _ASCII_PRETOKEN_PATTERN, _PRETOKEN_PATTERN

    general = regex.compile(_PRETOKEN_PATTERN)
    fast = re.compile(_ASCII_PRETOKEN_PATTERN)
    rng = random.Random(99)
    alphabet = [chr(i) for i in range(128)] + list(" \t\n'sStTdDmlrve") * 4
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(1500)]
    texts += [chr(a) + chr(b) for a in range(128) for b in (32, 9, 10, 39, 65, 48, 33, 28)]
    for text in texts:
        assert fast.findall(text) == general.findall(text), repr(text)
    sample = texts[:300]
    assert [tok.encode(t) for t in sample] == [e.ids for e in reference.encode_batch(sample)]


def test_cache_does_not_change_results(tok: GPT2Tokenizer) -> None:
    uncached = GPT2Tokenizer.default(cache_size=0)
    tiny = GPT2Tokenizer.default(cache_size=7)  # forces many cache-generation turnovers
    want = [uncached.encode(t) for t in CORPUS]
    assert not uncached._cache and not uncached._old_cache
    for _ in range(2):  # the second pass is served from the caches
        assert [tok.encode(t) for t in CORPUS] == want
        assert [tiny.encode(t) for t in CORPUS] == want
    assert len(tok._cache) > 0
    assert len(tiny._cache) <= 7 and len(tiny._old_cache) <= 7


def test_from_pretrained_both_layouts(tmp_path: Path, tok: GPT2Tokenizer) -> None:
    from tokenizers import ByteLevelBPETokenizer

    encoder, merges = _default_files()
    openai_dir = tmp_path / "openai"
    openai_dir.mkdir()
    (openai_dir / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    (openai_dir / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")

    # Let HF write its own layout, so our reader is checked against files we did not format.
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    ByteLevelBPETokenizer(dict(encoder), list(merges)).save_model(str(hf_dir))
    assert {p.name for p in hf_dir.iterdir()} == {"vocab.json", "merges.txt"}

    from_openai = GPT2Tokenizer.from_pretrained(openai_dir)
    from_hf = GPT2Tokenizer.from_pretrained(str(hf_dir), num_special_tokens=2)
    assert from_hf.num_special_tokens == 2 and from_hf.vocab_size == 50257
    for text in CORPUS[:120]:
        want = tok.encode(text)
        assert from_openai.encode(text) == want
        assert from_hf.encode(text) == want


def test_from_pretrained_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        GPT2Tokenizer.from_pretrained(tmp_path)
    message = str(info.value)
    for name in ("encoder.json", "vocab.bpe", "vocab.json", "merges.txt", str(tmp_path)):
        assert name in message
    # Half a pair is not enough either.
    encoder_src = Path(__file__)  # any file will do: it must not be read
    shutil.copy(encoder_src, tmp_path / "vocab.json")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        GPT2Tokenizer.from_pretrained(tmp_path)


def test_bad_vocabulary_and_inputs_are_rejected(tok: GPT2Tokenizer) -> None:
    encoder, merges = _default_files()
    no_bytes = {k: v for k, v in encoder.items() if k != "Ġ"}
    no_bytes = {k: i for i, k in enumerate(no_bytes)}
    with pytest.raises(ValueError, match="single-byte"):
        GPT2Tokenizer(no_bytes, [])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        GPT2Tokenizer(encoder, [("Ġ", "Ġzzzzqq")])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_length"):
        tok.batch_encode(["a"], 0)
    with pytest.raises(TypeError):
        tok.batch_encode("a single string", 8)


@pytest.mark.parametrize("add_bos", [True, False])
@pytest.mark.parametrize("add_eos", [True, False])
def test_batch_encode(tok: GPT2Tokenizer, add_bos: bool, add_eos: bool) -> None:
    texts = ["", "a dog", "A man riding a wave on top of a surfboard.", "emoji 🙂 café", "x " * 40]
    encoded = [tok.encode(t) for t in texts]
    for max_length in (1, 2, 5, max(map(len, encoded)) + 2, 12):
        ids, mask = tok.batch_encode(texts, max_length, add_bos=add_bos, add_eos=add_eos)
        assert ids.dtype == np.int32 and mask.dtype == np.int32
        assert ids.shape == mask.shape == (len(texts), max_length)
        for r, enc in enumerate(encoded):
            full = [tok.bos_token_id] * add_bos + enc + [tok.eos_token_id] * add_eos
            kept = full[:max_length]
            pad = max_length - len(kept)
            assert ids[r].tolist() == kept + [tok.eos_token_id] * pad
            assert mask[r].tolist() == [1] * len(kept) + [0] * pad
    empty_ids, empty_mask = tok.batch_encode([], 4)
    assert empty_ids.shape == empty_mask.shape == (0, 4)


def test_save_writes_files_hf_tokenizers_reads_the_same(tmp_path: Path, tok: GPT2Tokenizer, reference) -> None:
    """What training keeps in RUN_DIR/tokenizer: read back by us and by HF tokenizers, same ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tok.save(tmp_path / "run" / "tokenizer")
    assert {p.name for p in folder.iterdir()} == {"vocab.json", "merges.txt"}
    assert not list((tmp_path / "run").glob(".*partial"))
    ours = GPT2Tokenizer.for_run(tmp_path / "run", num_special_tokens=1)
    theirs = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    theirs.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    for text in CORPUS[:120]:
        want = reference.encode(text).ids
        assert ours.encode(text) == want
        assert theirs.encode(text).ids == want
    with pytest.raises(FileExistsError):
        tok.save(folder)
    # A run folder without one falls back to GPT-2's own vocabulary.
    assert GPT2Tokenizer.for_run(tmp_path / "elsewhere").encode("a red circle") == tok.encode("a red circle")
