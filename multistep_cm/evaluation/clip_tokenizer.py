"""CLIP's byte-level BPE tokenizer, reading the user's vocabulary files.

Captions become ids as OpenAI's CLIP tokenizer (and transformers' `CLIPTokenizer`) makes
them: the text NFC-normalised, runs of whitespace made one space, lower-cased; split into
contractions ('s 't 're 've 'm 'll 'd), runs of letters, single digits and runs of other
non-space characters; each piece's UTF-8 bytes mapped to printable characters (GPT-2's
byte alphabet), its last marked as a word end (`</w>`), and merged by the BPE ranks of the
merges file, lowest rank first. A row is `<|startoftext|>`, the pieces' ids,
`<|endoftext|>`, cut to the context (77) with the end token kept last and padded with 0.
OpenAI's extra clean-up (ftfy and HTML unescaping) is not applied: it changes only text
with mojibake or HTML entities.

Files: HuggingFace's `vocab.json` with its `merges.txt`, or OpenAI's
`bpe_simple_vocab_16e6.txt.gz` (merges only; the vocabulary follows from them, as OpenAI
builds it: the 256 byte characters, the same with `</w>`, one entry per merge, then the
two special tokens). Nothing is downloaded.
"""
import functools
import gzip
import json
import os
import unicodedata

import numpy as np

START, END = "<|startoftext|>", "<|endoftext|>"
CONTEXT = 77
# OpenAI keeps this many merges of its file: 49152 ids less the 256 bytes and 2 specials.
OPENAI_MERGES = 49152 - 256 - 2
_PIECES = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
           r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")


@functools.lru_cache(maxsize=None)
def byte_alphabet() -> dict[int, str]:
  """Each byte value -> one printable character: printable Latin-1 bytes stand for
  themselves, the other 68 (controls, space, ...) for the characters from U+0100 on."""
  printable = [b for b in range(256)
               if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
  others = [b for b in range(256) if b not in printable]
  table = {b: chr(b) for b in printable}
  table.update({b: chr(256 + i) for i, b in enumerate(others)})
  return table


def _splitter():
  try:
    import regex  # pylint: disable=g-import-not-at-top
    return regex.compile(_PIECES)
  except ImportError:  # Python's re has no \p{...}: letters are word characters less digits
    import re  # pylint: disable=g-import-not-at-top
    return re.compile(_PIECES.replace(r"[\p{L}]+", r"[^\W\d_]+").replace(r"[\p{N}]", r"\d")
                      .replace(r"[^\s\p{L}\p{N}]+", r"[^\s\w]+|_+"))


def _read_lines(path: str) -> list[str]:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as fh:
    return fh.read().split("\n")


def _merges(path: str, limit: int | None) -> list[tuple[str, str]]:
  lines = [l for l in _read_lines(path) if l and not l.startswith("#version")]
  pairs = []
  for line in lines[:limit]:
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f"{path}: {line!r} is not a merge (two symbols)")
    pairs.append((parts[0], parts[1]))
  return pairs


def openai_vocabulary(merges: list[tuple[str, str]]) -> dict[str, int]:
  """The vocabulary OpenAI derives from its merges."""
  symbols = list(byte_alphabet().values())
  symbols += [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START, END]
  return {s: i for i, s in enumerate(symbols)}


class ClipTokenizer:
  """`tokenizer(captions) -> int32 [N, context]`; `encode(text) -> list of ids`."""

  def __init__(self, vocabulary: dict[str, int], merges: list[tuple[str, str]],
               context: int = CONTEXT):
    missing = [t for t in (START, END) if t not in vocabulary]
    if missing:
      raise ValueError(f"the vocabulary lacks the special tokens {missing}")
    self.vocabulary, self.context = vocabulary, context
    self.ranks = {pair: i for i, pair in enumerate(merges)}
    self.start, self.end = vocabulary[START], vocabulary[END]
    self._split = _splitter()
    self._cache = {}

  @classmethod
  def from_files(cls, merges: str, vocabulary: str | None = None,
                 context: int = CONTEXT) -> "ClipTokenizer":
    """`merges`: merges.txt or OpenAI's .txt.gz; `vocabulary`: vocab.json (None: derived
    from the merges as OpenAI does, keeping its first OPENAI_MERGES)."""
    for path in (merges, vocabulary):
      if path and not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP tokenizer file not found: {path!r} (never downloaded: "
                                "use the model's vocab.json and merges.txt, or OpenAI's "
                                "bpe_simple_vocab_16e6.txt.gz)")
    if vocabulary is None:
      pairs = _merges(merges, OPENAI_MERGES)
      return cls(openai_vocabulary(pairs), pairs, context)
    with open(vocabulary, encoding="utf-8") as fh:
      vocab = json.load(fh)
    return cls(vocab, _merges(merges, None), context)

  def _bpe(self, piece: str) -> list[str]:
    if piece in self._cache:
      return self._cache[piece]
    word = list(piece[:-1]) + [piece[-1] + "</w>"]
    while len(word) > 1:
      pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
      best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    self._cache[piece] = word
    return word

  def encode(self, text: str) -> list[int]:
    """The ids of `text`'s pieces, without the start and end tokens."""
    text = " ".join(unicodedata.normalize("NFC", text).split()).lower()
    alphabet = byte_alphabet()
    ids = []
    for piece in self._split.findall(text):
      if piece in (START, END):
        ids.append(self.vocabulary[piece])
        continue
      for symbol in self._bpe("".join(alphabet[b] for b in piece.encode("utf-8"))):
        ids.append(self.vocabulary.get(symbol, self.end))
    return ids

  def __call__(self, captions) -> np.ndarray:
    """int32 [N, context]: start, ids, end (kept last when cut), zeros."""
    out = np.zeros((len(captions), self.context), np.int32)
    for row, text in enumerate(captions):
      ids = [self.start] + self.encode(text)[:self.context - 2] + [self.end]
      out[row, :len(ids)] = ids
    return out
