"""GPT-2's byte-level BPE tokenizer: vocab.json + merges.txt in, int64 ids out, and back.

Encoding a text takes four steps (Radford et al. 2019, section 2.2; the files are Hugging Face's
``GPT2Tokenizer`` files, so a GPT-2 checkpoint's own tokenizer loads as it is):

1. **Special token.** The text is cut at every ``<|endoftext|>`` (when the vocabulary has it);
   each one becomes its single id, and the pieces between are encoded on their own.
2. **Pre-tokenization.** Each piece is split into words by GPT-2's pattern::

       's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

   (contractions; a run of letters, of numbers, or of anything else, each with at most one
   leading space; whitespace, leaving its last space to the next word). Merges never cross a
   word boundary.
3. **Bytes as characters.** A word's UTF-8 bytes become characters by :func:`bytes_to_unicode`:
   the 188 printable bytes stand for themselves and the other 68 for ``chr(256 + k)``, k = 0..67
   in byte order (so the space 0x20 is ``"Ġ"``). Every byte has a symbol: any text encodes.
4. **Merges by rank.** merges.txt lists pairs in the order they were learned; rank(a, b) is the
   line number. Starting from one symbol per byte, repeat::

       (a, b) = argmin over adjacent pairs (x, y) of rank(x, y)     # stop when no pair has one
       replace every occurrence of a, b (left to right, not overlapping) with the symbol ab

   and look up each final symbol's id in vocab.json. Words repeat, so their ids are cached.

Decoding is the inverse: ids -> symbols -> bytes (step 3 backwards) -> UTF-8 text, with
``errors="replace"`` (ids that cut a character in two give U+FFFD).

Pre-tokenization uses the standard ``re`` module: Python's ``re`` has no ``\\p{L}`` or ``\\p{N}``,
so the letter and number classes are built once, on the first encode, from the Unicode
categories in ``unicodedata`` (L* and N*), and ``\\s`` is the Unicode White_Space
set (``re``'s own ``\\s`` would also take the separators U+001C..U+001F, which GPT-2's does not).
The split then equals the one of the ``regex`` package and of Hugging Face ``tokenizers`` on every
character assigned in this Python's Unicode version; characters assigned only in a later version
(unassigned here, Cn) count as "other" here and may be letters there.

The merge loop is the plain one of GPT-2's encoder.py: quadratic in the length of a word, fine
for words, slow for a single pre-token of many thousand characters.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import unicodedata
from collections.abc import Iterable
from typing import Any

import numpy as np

from .errors import CheckpointError, ConfigError, InvalidArgumentError, is_int
from .tensorfile import MAX_JSON_BYTES, read_json

EOT = "<|endoftext|>"
VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"
_CACHE_MAX = 200_000  # words kept in a tokenizer's cache before it is emptied
# Unicode White_Space (what \s means in GPT-2's pattern, as run by the regex package)
_WHITESPACE = [0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
               0x2028, 0x2029, 0x202F, 0x205F, 0x3000]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table byte -> character: printable bytes map to themselves, the other 68 (controls,
    space, 0x7F..0xA0, the soft hyphen 0xAD) to ``chr(256 + k)`` in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # 94 + 12 + 82
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + k) for k, b in enumerate(others)})
    return dict(sorted(table.items()))


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def _char_class(codepoints: Iterable[int]) -> str:
    """The body of a character class, ``\\Uxxxxxxxx-\\Uyyyyyyyy...``, for sorted code points."""
    parts, start, prev = [], None, None
    for cp in codepoints:
        if start is not None and cp == prev + 1:
            prev = cp
            continue
        if start is not None:
            parts.append(f"\\U{start:08x}-\\U{prev:08x}")
        start = prev = cp
    if start is not None:
        parts.append(f"\\U{start:08x}-\\U{prev:08x}")
    return "".join(parts)


@functools.cache
def pretokenizer() -> re.Pattern:
    """GPT-2's pattern (module docstring, step 2) for Python's ``re``; built on the first call."""
    letters, numbers = [], []
    for cp in range(sys.maxunicode + 1):
        kind = unicodedata.category(chr(cp))[0]
        if kind == "L":
            letters.append(cp)
        elif kind == "N":
            numbers.append(cp)
    L, N, S = _char_class(letters), _char_class(numbers), _char_class(_WHITESPACE)
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+"
                      rf"|[{S}]+(?![^{S}])|[{S}]+")


def _check_vocab(vocab: Any, where: str, error: type) -> dict[str, int]:
    """``vocab`` when it maps strings to the ids 0..n-1, each once; else ``error`` naming it."""
    if not isinstance(vocab, dict) or not vocab:
        got = "an empty object" if vocab == {} else type(vocab).__name__
        raise error(f"{where}: the vocabulary must be a non-empty object {{token: id}}, got "
                    f"{got}")
    seen: dict[int, str] = {}
    for tok, i in vocab.items():
        if not isinstance(tok, str) or not tok:
            raise error(f"{where}: vocabulary token {tok!r} must be a non-empty string")
        if not is_int(i):
            raise error(f"{where}: the id of token {tok!r} must be an integer, got {i!r}")
        if not 0 <= i < len(vocab):
            raise error(f"{where}: the id of token {tok!r} is {i}, outside [0, {len(vocab)}) "
                        f"(ids must be 0..n-1 for n = {len(vocab)} tokens)")
        if int(i) in seen:
            raise error(f"{where}: id {i} is given to two tokens, {seen[int(i)]!r} and {tok!r}")
        seen[int(i)] = tok
    return {tok: int(i) for tok, i in vocab.items()}


def _check_merges(merges: Any, vocab: dict[str, int], where: str,
                  error: type) -> list[tuple[str, str]]:
    """``merges`` as a list of pairs when each is two tokens of ``vocab`` (without spaces) whose
    concatenation is in ``vocab`` too; else ``error`` naming the merge (numbered from 1)."""
    if not isinstance(merges, (list, tuple)):
        raise error(f"{where}: merges must be a list of [a, b] pairs, got "
                    f"{type(merges).__name__}")
    out = []
    for k, pair in enumerate(merges, 1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(s, str) and s and " " not in s for s in pair)):
            raise error(f"{where}: merge {k} must be two non-empty tokens without spaces, got "
                        f"{pair!r}")
        a, b = pair
        absent = [t for t in (a, b, a + b) if t not in vocab]
        if absent:
            raise error(f"{where}: merge {k} ({a!r}, {b!r}) uses {absent[0]!r}, which is not in "
                        f"the vocabulary")
        out.append((a, b))
    return out


def _read_merges(path: str, who: str) -> list[list[str]]:
    """The pairs of a merges.txt: one ``a b`` a line after an optional ``#version`` line."""
    try:
        size = os.stat(path).st_size
        if not os.path.isfile(path):
            raise CheckpointError(f"{who}: {path!r} is not a regular file")
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{who}: {path!r} has {size:,} bytes, more than "
                                  f"{MAX_JSON_BYTES:,}: not a merges file")
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise CheckpointError(f"{who}: {path!r} cannot be read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{who}: {path!r} is not UTF-8 text (byte {exc.start}: "
                              f"{exc.reason})") from None
    lines = text.split("\n")
    while lines and lines[-1].strip("\r") == "":
        lines.pop()  # the final newline (and any blank lines after the last merge)
    merges, first = [], 0
    if lines and lines[0].startswith("#version"):
        first = 1
    for n in range(first, len(lines)):
        parts = lines[n].rstrip("\r").split(" ")
        if len(parts) != 2 or not all(parts):
            raise CheckpointError(f"{who}: {path!r} line {n + 1}: expected two tokens separated "
                                  f"by one space, got {lines[n]!r}")
        merges.append(parts)
    return merges


class GPT2BPETokenizer:
    """GPT-2's byte-level BPE (module docstring): ``encoder`` {token: id}, ``merges`` by rank.

    ``encode(text)`` -> int64 ids (n,); ``decode(ids)`` -> text. Every text encodes when the
    vocabulary has the 256 byte symbols (GPT-2's does); ``<|endoftext|>`` in the text is its
    single id when the vocabulary has it (:attr:`eot_id`). ``to_dict`` / ``from_dict`` give a
    self-contained JSON form; ``from_dir`` reads Hugging Face's vocab.json + merges.txt.
    """

    kind = "gpt2_bpe"

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]]) -> None:
        self.encoder = _check_vocab(encoder, "GPT2BPETokenizer", ConfigError)
        self.merges = _check_merges(merges, self.encoder, "GPT2BPETokenizer", ConfigError)
        self._init_tables()

    def _init_tables(self) -> None:
        # a repeated pair keeps its last rank, as Hugging Face's loaders do
        self.ranks = {pair: r for r, pair in enumerate(self.merges)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self._cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def _trusted(cls, encoder: dict[str, int], merges: list[tuple[str, str]]) -> GPT2BPETokenizer:
        self = cls.__new__(cls)
        self.encoder, self.merges = encoder, merges
        self._init_tables()
        return self

    # ---------------------------------------------------------------------------- loading

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> GPT2BPETokenizer:
        """The tokenizer of a folder with vocab.json and merges.txt (Hugging Face GPT-2 files);
        CheckpointError naming the file, and the token, id or line, when one is missing or bad."""
        who = "GPT2BPETokenizer.from_dir"
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise CheckpointError(f"{who}: {directory!r} is not a folder (expected one with "
                                  f"{VOCAB_FILE} and {MERGES_FILE})")
        paths = [os.path.join(directory, n) for n in (VOCAB_FILE, MERGES_FILE)]
        missing = [os.path.basename(p) for p in paths if not os.path.exists(p)]
        if missing:
            raise CheckpointError(f"{who}: {directory!r} lacks {' and '.join(missing)} (the "
                                  f"files of a GPT-2 tokenizer, as Hugging Face saves them)")
        vocab_path, merges_path = paths
        vocab = _check_vocab(read_json(vocab_path, who), f"{who}: {vocab_path!r}",
                             CheckpointError)
        merges = _check_merges(_read_merges(merges_path, who), vocab, f"{who}: {merges_path!r}",
                               CheckpointError)
        return cls._trusted(vocab, merges)

    @classmethod
    def from_dict(cls, d: dict) -> GPT2BPETokenizer:
        """Rebuild from :meth:`to_dict`'s form; ConfigError naming the field when it is bad."""
        where = "GPT2BPETokenizer.from_dict"
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected an object, got {type(d).__name__}")
        if d.get("kind") != cls.kind:
            raise ConfigError(f"{where}: kind must be {cls.kind!r}, got {d.get('kind')!r}")
        for key in ("vocab", "merges"):
            if key not in d:
                raise ConfigError(f"{where}: {key} is missing")
        vocab = _check_vocab(d["vocab"], f"{where}: vocab", ConfigError)
        merges = _check_merges(d["merges"], vocab, f"{where}: merges", ConfigError)
        return cls._trusted(vocab, merges)

    def to_dict(self) -> dict:
        """The JSON form ``{"kind": "gpt2_bpe", "vocab": {token: id}, "merges": [[a, b], ...]}``;
        self-contained (the ranks are the order of the merges)."""
        return {"kind": self.kind, "vocab": dict(self.encoder),
                "merges": [[a, b] for a, b in self.merges]}

    # ---------------------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        """Number of tokens, ``len(encoder)``."""
        return len(self.encoder)

    @property
    def eot_id(self) -> int | None:
        """The id of ``<|endoftext|>``, or None when the vocabulary lacks it."""
        return self.encoder.get(EOT)

    # ---------------------------------------------------------------------------- encoding

    def bpe(self, word: str) -> list[str]:
        """Step 4 on one word, given as its symbols (step 3): the merged symbols, in order."""
        symbols = list(word)
        ranks, inf = self.ranks, float("inf")
        while len(symbols) > 1:
            a, b = min(zip(symbols, symbols[1:]), key=lambda p: ranks.get(p, inf))
            if (a, b) not in ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if symbols[i] == a and i + 1 < len(symbols) and symbols[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _word_ids(self, word: str) -> tuple[int, ...]:
        ids = self._cache.get(word)
        if ids is None:
            try:
                raw = word.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidArgumentError(f"encode: the text holds a lone surrogate "
                                           f"U+{ord(word[exc.start]):04X}, which has no UTF-8; "
                                           f"got {word!r}") from None
            symbols = self.bpe(raw.decode("latin-1").translate(BYTE_TO_CHAR))
            try:
                ids = tuple(self.encoder[s] for s in symbols)
            except KeyError as exc:  # only single bytes can be absent (merges are checked)
                b = CHAR_TO_BYTE.get(exc.args[0])
                raise InvalidArgumentError(
                    f"encode: the vocabulary has no token for byte 0x{b:02x} (symbol "
                    f"{exc.args[0]!r}) in {word!r}") from None
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> np.ndarray:
        """``text`` -> int64 ids (n,) by the four steps of the module docstring."""
        if not isinstance(text, str):
            raise InvalidArgumentError(f"encode: text must be a str, got {type(text).__name__}")
        eot, pattern, ids = self.eot_id, pretokenizer(), []
        pieces = text.split(EOT) if eot is not None else [text]
        for k, piece in enumerate(pieces):
            if k:
                ids.append(eot)
            for word in pattern.findall(piece):
                ids.extend(self._word_ids(word))
        return np.array(ids, dtype=np.int64)

    @functools.cached_property
    def _token_bytes(self) -> list[bytes]:
        # a character outside the byte table (in an added token) stands for its own UTF-8
        return [b"".join(bytes([CHAR_TO_BYTE[c]]) if c in CHAR_TO_BYTE else c.encode("utf-8")
                         for c in self.decoder[i]) for i in range(len(self.decoder))]

    def decode(self, ids: Any) -> str:
        """Ids (any int sequence or array) -> text; bytes that are not UTF-8 become U+FFFD."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise InvalidArgumentError(f"decode: ids must lie in [0, {self.vocab_size}), got "
                                       f"values from {ids.min()} to {ids.max()}")
        table = self._token_bytes
        return b"".join(table[i] for i in ids.tolist()).decode("utf-8", errors="replace")

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, GPT2BPETokenizer) and other.encoder == self.encoder
                and other.merges == self.merges)

    def __repr__(self) -> str:
        return f"GPT2BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)})"


__all__ = ["GPT2BPETokenizer", "bytes_to_unicode", "pretokenizer", "BYTE_TO_CHAR",
           "CHAR_TO_BYTE", "EOT"]
