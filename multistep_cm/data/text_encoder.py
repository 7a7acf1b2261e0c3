"""A fixed text encoder shipped as code: word vectors from a seed plus a position code.

The embedded text-to-image demo (`captions`) needs text embeddings that exist on a fresh
machine with nothing downloaded and nothing trained, the same on every machine. Each word of
a small closed vocabulary gets a pseudo-random unit vector drawn once from
`np.random.default_rng(seed)` in vocabulary order; a sinusoidal position code (scaled to unit
norm) is added so that word order is visible to the model ("a thick seven" and "seven thick a"
differ). Padding positions are zero vectors with mask 0: the layout of the token embeddings a
real encoder (T5, precomputed offline: docs/maths.md §15.2) gives the
model, `embeddings [N, L, D]` float32 and `mask [N, L]` int32, so the demo exercises the same
model inputs (§15.4) as a real text-to-image dataset.

Everything here is numpy: input code runs before `jax.distributed.initialize` on multi-host
jobs, so it must not start a JAX backend.
"""
from collections.abc import Sequence

import numpy as np

PAD = "<pad>"


def position_code(length: int, width: int) -> np.ndarray:
  """Sinusoidal code [length, width]: sin/cos pairs at geometric frequencies, unit norm rows."""
  if width % 2:
    raise ValueError(f"the position code needs an even width, got {width}")
  freqs = 1.0 / 10000.0 ** (np.arange(width // 2) * 2.0 / width)
  angles = np.arange(length)[:, None] * freqs[None, :]
  code = np.stack([np.sin(angles), np.cos(angles)], axis=-1).reshape(length, width)
  return code / np.sqrt(width / 2)  # each sin/cos pair has norm 1


class FixedTextEncoder:
  """Maps whitespace-separated captions over a closed vocabulary to `(embeddings, mask)`."""

  def __init__(self, vocabulary: Sequence[str], width: int = 64, length: int = 8, seed: int = 0):
    """Draws the word vectors.

    Args:
      vocabulary: the words, in a fixed order (their vectors are drawn in this order, so
        appending a word leaves the others unchanged).
      width: D, the embedding width.
      length: L, the padded token count every caption is encoded to.
      seed: of the word vectors.
    """
    vocabulary = tuple(vocabulary)
    if len(set(vocabulary)) != len(vocabulary) or PAD in vocabulary:
      raise ValueError(f"the vocabulary must hold distinct words and not {PAD!r}: {vocabulary}")
    self.vocabulary = vocabulary
    self.width, self.length = width, length
    vectors = np.random.default_rng(seed).standard_normal((len(vocabulary), width))
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    # Token id 0 is padding, with a zero vector: padding carries no signal even unmasked.
    self.word_vectors = np.concatenate([np.zeros((1, width)), vectors]).astype(np.float32)
    self.positions = position_code(length, width).astype(np.float32)
    self._ids = {word: i + 1 for i, word in enumerate(vocabulary)}

  def tokenize(self, captions: Sequence[str]) -> np.ndarray:
    """Token ids int32 [N, L] (0 = padding).

    Raises:
      ValueError: a word outside the vocabulary, or a caption longer than L words.
    """
    if isinstance(captions, str):
      raise TypeError("tokenize takes a sequence of captions, not one string")
    ids = np.zeros((len(captions), self.length), np.int32)
    for row, text in enumerate(captions):
      words = text.split()
      if len(words) > self.length:
        raise ValueError(f"caption {text!r} has {len(words)} words; the encoder takes at most "
                         f"{self.length}")
      for col, word in enumerate(words):
        if word not in self._ids:
          raise ValueError(f"unknown word {word!r} in caption {text!r}; the vocabulary is "
                           f"{' '.join(self.vocabulary)}")
        ids[row, col] = self._ids[word]
    return ids

  def encode(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Returns `(embeddings float32 [N, L, D], mask int32 [N, L])`; padding rows are zero."""
    ids = self.tokenize(captions)
    mask = (ids > 0).astype(np.int32)
    embeddings = (self.word_vectors[ids] + self.positions[None]) * mask[..., None]
    return embeddings.astype(np.float32), mask
