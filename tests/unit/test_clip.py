"""CLIP against transformers: both towers of a random-weights `CLIPModel` through the
converter, the tokenizer against `CLIPTokenizer` on the same vocabulary files, the
preprocessing against PyTorch's resize and crop, the score's formula, the refusals."""
import collections
import gzip
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import torch as safetensors_torch

from multistep_cm.evaluation import clip
from multistep_cm.evaluation import clip_tokenizer
from multistep_cm.evaluation import convert_clip

CAPTIONS = ["A photo of a cat.", "a  thick, slanted SEVEN", "it's 2 dogs & 13 cats!!",
            "café au lait", "the the the quick brown fox", "under_score and-dash",
            "   spaces\tand\nnewlines  ", "emoji 🙂 ok"]


def _hf_clip(seed=0):
  torch.manual_seed(seed)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=99, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=16, eos_token_id=2,
                       bos_token_id=0, pad_token_id=1),
      vision_config=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=3, image_size=32, patch_size=8),
      projection_dim=24)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():  # norms off their initial values, so a mix-up of them shows
    for name, p in model.named_parameters():
      if "norm" in name or "layrnorm" in name:
        p.add_(0.3 * torch.randn_like(p))
  return model


def _pooled(out):
  return getattr(out, "pooler_output", out).numpy()


def test_both_towers_match_transformers_through_the_converter(tmp_path):
  model = _hf_clip()
  src, out = str(tmp_path / "model.safetensors"), str(tmp_path / "clip.npz")
  safetensors_torch.save_file(model.state_dict(), src)
  convert_clip.main([f"--src={src}", f"--out={out}", "--vision_heads=3", "--text_heads=4"])
  config, variables = clip.load_clip(out)
  assert (config.patch, config.image_size, config.context, config.projection) == (8, 32, 16, 24)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  # Rows end with the end token (the highest id, 98), then padding of either kind.
  ids = rng.integers(3, 90, (3, 16))
  ids[0, 9], ids[0, 10:] = 98, 0
  ids[1, 15] = 98
  ids[2, 3], ids[2, 4:] = 98, 1
  with torch.no_grad():
    want_image = _pooled(model.get_image_features(pixel_values=torch.from_numpy(
        x.transpose(0, 3, 1, 2))))
    want_text = _pooled(model.get_text_features(input_ids=torch.from_numpy(ids)))
  net = clip.Clip(config)
  got_image = np.asarray(net.apply(variables, x, method=clip.Clip.image_features))
  got_text = np.asarray(net.apply(variables, ids, method=clip.Clip.text_features))
  assert np.abs(got_image - want_image).max() <= 1e-4 * np.abs(want_image).max()
  assert np.abs(got_text - want_text).max() <= 1e-4 * np.abs(want_text).max()


@pytest.mark.parametrize("size", ["ViT-L/14", "ViT-B/16"])
def test_presets_are_openais(size):
  """Parameter counts of a CLIPModel of the published config (openai/clip-vit-large-patch14,
  openai/clip-vit-base-patch16), built without memory."""
  published = {"ViT-L/14": (1024, 24, 16, 14, 768, 12, 12, 768),
               "ViT-B/16": (768, 12, 12, 16, 512, 12, 8, 512)}[size]
  vh, vl, vn, patch, th, tl, tn, proj = published
  config = transformers.CLIPConfig(
      text_config=dict(hidden_size=th, intermediate_size=4 * th, num_hidden_layers=tl,
                       num_attention_heads=tn),
      vision_config=dict(hidden_size=vh, intermediate_size=4 * vh, num_hidden_layers=vl,
                         num_attention_heads=vn, image_size=224, patch_size=patch),
      projection_dim=proj)
  with torch.device("meta"):
    reference = transformers.CLIPModel(config)
  want = sum(int(np.prod(v.shape)) for k, v in reference.state_dict().items()
             if not k.endswith(("logit_scale", "position_ids")))
  preset = clip.PRESETS[size]
  assert sum(int(np.prod(s)) for s in clip.variable_shapes(preset).values()) == want
  assert (preset.vision.heads, preset.text.heads) == (vn, tn)


def _train_merges(texts, count):
  """A tiny BPE training, written here: the most frequent adjacent pair, `count` times."""
  alphabet = clip_tokenizer.byte_alphabet()
  words = collections.Counter()
  for text in texts:
    for word in text.lower().split():
      symbols = [alphabet[b] for b in word.encode("utf-8")]
      words[tuple(symbols[:-1] + [symbols[-1] + "</w>"])] += 1
  merges = []
  for _ in range(count):
    pairs = collections.Counter()
    for word, n in words.items():
      for pair in zip(word, word[1:]):
        pairs[pair] += n
    if not pairs:
      break
    best = max(pairs, key=lambda p: (pairs[p], p))
    merges.append(best)
    merged = collections.Counter()
    for word, n in words.items():
      out, i = [], 0
      while i < len(word):
        if word[i:i + 2] == best:
          out.append(word[i] + word[i + 1])
          i += 2
        else:
          out.append(word[i])
          i += 1
      merged[tuple(out)] += n
    words = merged
  return merges


def test_tokenizer_ids_equal_transformers(tmp_path):
  merges = _train_merges(CAPTIONS * 3 + ["the cat sat on the mat", "dogs and cats"], 60)
  vocab = clip_tokenizer.openai_vocabulary(merges)
  (tmp_path / "vocab.json").write_text(json.dumps(vocab))
  (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))
  with gzip.open(tmp_path / "bpe.txt.gz", "wt", encoding="utf-8") as fh:
    fh.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
  reference = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
  want = reference(CAPTIONS)["input_ids"]
  for ours in (clip_tokenizer.ClipTokenizer.from_files(str(tmp_path / "merges.txt"),
                                                       str(tmp_path / "vocab.json")),
               clip_tokenizer.ClipTokenizer.from_files(str(tmp_path / "bpe.txt.gz"))):
    rows = ours(CAPTIONS)
    for caption, ids, row in zip(CAPTIONS, want, rows):
      assert row[:len(ids)].tolist() == ids, caption
      assert not row[len(ids):].any()
  assert any(len(ids) > len(c.split()) + 2 for c, ids in zip(CAPTIONS, want))  # merges matter


def test_long_captions_keep_the_end_token():
  vocab = clip_tokenizer.openai_vocabulary([])
  rows = clip_tokenizer.ClipTokenizer(vocab, [], context=8)(["abcdefghijkl"])
  assert rows.shape == (1, 8) and rows[0, 0] == vocab["<|startoftext|>"]
  assert rows[0, -1] == vocab["<|endoftext|>"] and rows[0, 1] == vocab["a"]


@pytest.mark.parametrize("shape", [(40, 40), (30, 50), (300, 240)])
def test_preprocessing_resizes_the_short_side_and_crops_the_centre(shape):
  config = clip.ClipConfig(clip.TowerConfig(8, 1, 1, 8), clip.TowerConfig(8, 1, 1, 8), 4,
                           patch=8, image_size=32)
  h, w = shape
  images = np.random.default_rng(h).integers(0, 256, (2, h, w, 3), np.uint8)
  scale = 32 / min(h, w)
  new = (max(32, round(h * scale)), max(32, round(w * scale)))
  x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float64)
  x = F.interpolate(x, size=new, mode="bicubic", antialias=True)
  top, left = (new[0] - 32) // 2, (new[1] - 32) // 2
  x = x[:, :, top:top + 32, left:left + 32] / 255
  mean = torch.tensor(clip.CLIP_MEAN, dtype=torch.float64).reshape(1, -1, 1, 1)
  std = torch.tensor(clip.CLIP_STD, dtype=torch.float64).reshape(1, -1, 1, 1)
  want = ((x - mean) / std).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(clip.preprocess(images, config)), want, atol=1e-5)


def test_clip_score_is_100_times_the_clipped_cosine():
  image = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
  text = np.array([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
  # cosines 1, 1/sqrt(2), -1 (clipped to 0)
  assert clip.clip_score(image, text) == pytest.approx(100 * (1 + 2 ** -0.5 + 0) / 3)


def test_converter_refuses_bad_input_in_one_line(tmp_path, capsys):
  out = f"--out={tmp_path / 'out.npz'}"
  state_dict = _hf_clip().state_dict()
  short = {k: v for k, v in state_dict.items() if "layers.1.layer_norm2" not in k}
  for name, sd, fragment in (("dinov2", {"cls_token": torch.zeros(1, 1, 4)}, "not a CLIPModel"),
                             ("short", short, "text_model.encoder.layers.1.layer_norm2")):
    src = str(tmp_path / f"{name}.safetensors")
    safetensors_torch.save_file(sd, src)
    with pytest.raises(SystemExit) as info:
      convert_clip.main([f"--src={src}", out, "--vision_heads=3", "--text_heads=4"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("convert_clip: error: ") and fragment in lines[0], lines
  assert not (tmp_path / "out.npz").exists()


def test_the_clip_score_metric_equals_transformers_end_to_end(tmp_path):
  """`make_metric(kind='clip')` on uint8-exact images and captions against the same score
  computed with transformers' CLIPModel and CLIPTokenizer on the same files."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from multistep_cm.evaluation import sample_metrics  # pylint: disable=g-import-not-at-top
  merges = _train_merges(CAPTIONS * 3, 40)
  vocab = clip_tokenizer.openai_vocabulary(merges)
  (tmp_path / "vocab.json").write_text(json.dumps(vocab))
  (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))
  torch.manual_seed(1)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=96,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32,
                       eos_token_id=2, bos_token_id=0, pad_token_id=1),
      vision_config=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=3, image_size=32, patch_size=8),
      projection_dim=24)
  model = transformers.CLIPModel(config).eval()
  src, weights = str(tmp_path / "model.safetensors"), str(tmp_path / "clip.npz")
  safetensors_torch.save_file(model.state_dict(), src)
  convert_clip.main([f"--src={src}", f"--out={weights}", "--vision_heads=3", "--text_heads=4"])
  pixels = np.random.default_rng(2).integers(0, 256, (len(CAPTIONS), 32, 32, 3))
  samples = (pixels / 127.5 - 1.0).astype(np.float32)  # rounds back to `pixels` exactly
  metric = sample_metrics.make_metric(
      ml_collections.ConfigDict({"data": {"dataset": "captioned_digits"}}), "clip",
      clip_weights=weights,
      clip_tokenizer=f"{tmp_path / 'merges.txt'},{tmp_path / 'vocab.json'}")
  got = metric(samples, np.asarray(CAPTIONS))["clip_score"]
  tokens = transformers.CLIPTokenizer(vocab=vocab, merges=merges)(
      CAPTIONS, padding="max_length", max_length=32, return_tensors="pt")
  x = (torch.from_numpy(pixels / 255.0).permute(0, 3, 1, 2)
       - torch.tensor(clip.CLIP_MEAN).reshape(1, -1, 1, 1)) / torch.tensor(
           clip.CLIP_STD).reshape(1, -1, 1, 1)
  with torch.no_grad():
    image = _pooled(model.get_image_features(pixel_values=x.float()))
    text = _pooled(model.get_text_features(input_ids=tokens["input_ids"]))
  cos = (image * text).sum(-1) / (np.linalg.norm(image, axis=-1) * np.linalg.norm(text, axis=-1))
  want = float(np.mean(100 * np.maximum(cos, 0)))
  assert 0 < np.sum(cos > 0) < len(cos), cos  # both sides of the clip at 0 are exercised
  assert got == pytest.approx(want, rel=1e-4)
  assert metric.primary == "clip_score"
  with pytest.raises(ValueError, match="captions"):
    metric(samples, None)
