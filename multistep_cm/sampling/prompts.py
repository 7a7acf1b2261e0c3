"""Prompts for text-conditioned runs: what the sampling commands condition on.

A text model is conditioned on its encoder's outputs (models/conditioning.py), never on strings, so
a prompt reaches it as `text_embedding` [N, L, D] and `text_mask` [N, L]: from the run's
training data, from an .npz the user's encoder wrote, or, for the embedded captioned digits
whose encoder the project ships (data/captions.py), from the strings themselves.
"""
import numpy as np

from multistep_cm.config import build as config_build
from multistep_cm.data import captions


def parse(text: str, num: int, config, seed: int = 0):
  """`--prompts` of a text-conditioned run (sample.py): `(conditioning, captions)`, `num`
  of each (cycled), the conditioning as models/conditioning.py's numpy dict.

  Raises:
    ValueError: a missing key or a shape that does not fit the run (one line).
  """
  length, width = int(config.data.text_len), int(config.data.text_dim)
  if text == "data":
    return config_build.prompts(config, num, seed)
  if text.endswith(".npz"):
    with np.load(text) as f:
      missing = [k for k in ("text_embedding", "text_mask") if k not in f]
      if missing:
        raise ValueError(f"--prompts={text} lacks {missing} (needs text_embedding [N, L, D] "
                         f"and text_mask [N, L])")
      emb, mask = np.asarray(f["text_embedding"], np.float32), np.asarray(f["text_mask"])
      texts = ([str(c) for c in f["captions"]] if "captions" in f
               else [f"prompt {i}" for i in range(len(emb))])
  else:
    if config.data.dataset != "captioned_digits":
      raise ValueError(f"prompt strings need the run's text encoder, which only the embedded "
                       f"captioned digits ship; for data.dataset={config.data.dataset!r} pass "
                       f"--prompts=FILE.npz with your encoder's text_embedding and text_mask")
    texts = [p.strip() for p in text.split(";") if p.strip()]
    emb, mask = captions.encode(texts)
  if emb.ndim != 3 or emb.shape[1:] != (length, width) or mask.shape != emb.shape[:2]:
    raise ValueError(f"--prompts: the run takes text_embedding [N, {length}, {width}] and "
                     f"text_mask [N, {length}], got {emb.shape} and {mask.shape}")
  which = np.arange(num) % len(emb)
  return ({"text_embedding": emb[which], "text_mask": mask[which].astype(np.int32)},
          [texts[i] for i in which])


def held_out_digits(num: int, seed: int, image_size: int = 8):
  """The captioned digits demo's evaluation prompts (t2i_demo.py): `num` captions of the
  held-out test digits naming every property (drawn with replacement past the
  split's size), with their encoding: `(captions, {"text_embedding", "text_mask"})`."""
  source = captions.CaptionedDigitsSource("test", image_size, partial_share=0.0)
  rng = np.random.default_rng(seed)
  idx = rng.choice(len(source), num, replace=num > len(source))
  texts = source.captions(idx)
  emb, mask = captions.encode(texts)
  return texts, {"text_embedding": emb, "text_mask": mask}
