"""Text-image data: `prepare --text_images` writes what the user gave, `TfdsSource` and the
input pipeline read it back unchanged, and every wrong input is refused in one line."""
import json
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from benchmarks import text_data as text_data_benchmark
from multistep_cm.config import build as config_build
from multistep_cm.data import pipeline
from multistep_cm.data import prepare
from multistep_cm.data import sources
from multistep_cm.data import text_image
from multistep_cm.data import tfds_source

from helpers import data_config

N, L, D, SIZE = 12, 6, 5, 8
CAPTIONS = [f"a picture {i}" for i in range(N - 1)] + ["ünïcode, \"quotes\" and a comma"]


def _inputs(folder, n=N):
  """n SIZE x SIZE RGB PNGs with a JSON-lines manifest; embeddings with ragged masks (token
  counts 0..L, so an empty caption and a full one are both there). Returns the manifest,
  the .npz and the arrays."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
  embedding = rng.standard_normal((n, L, D)).astype(np.float32) * 3
  mask = (np.arange(L) < (np.arange(n) % (L + 1))[:, None]).astype(np.int32)
  manifest = os.path.join(folder, "manifest.jsonl")
  with open(manifest, "w", encoding="utf-8") as fh:
    for i in range(n):
      Image.fromarray(pixels[i]).save(os.path.join(folder, f"{i:03d}.png"))
      fh.write(json.dumps({"image": f"{i:03d}.png", "caption": CAPTIONS[i]}) + "\n")
  npz = os.path.join(folder, "embeddings.npz")
  np.savez(npz, text_embedding=embedding, text_mask=mask)
  return manifest, npz, pixels, embedding, mask


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  """`text_images/tiny` prepared through the command's entry point."""
  root = tmp_path_factory.mktemp("text")
  manifest, npz, pixels, embedding, mask = _inputs(str(root / "inputs"))
  data_dir = str(root / "tfds")
  path = text_image.build(manifest, npz, "tiny", data_dir, progress=False)
  return {"data_dir": data_dir, "path": path, "pixels": pixels, "embedding": embedding,
          "mask": mask, "manifest": manifest, "npz": npz}


def _source(written, **kw):
  kw = {"text_len": L, "text_dim": D, **kw}
  return tfds_source.TfdsSource("text_images/tiny", "train", written["data_dir"], SIZE, **kw)


def test_source_reads_back_exactly_what_was_written(written):
  assert written["path"].endswith(os.path.join("text_images", "tiny", "1.0.0"))
  source = config_build.make_source(data_config(
      dataset="tfds:text_images/tiny", data_dir=written["data_dir"], image_size=SIZE,
      text_len=L, text_dim=D))
  assert len(source) == N and source.num_classes == 0
  for i in range(N):
    example = source[i]
    assert example["text_embedding"].dtype == np.float32
    assert example["text_mask"].dtype == np.int32 and example["label"] == 0
    # Bitwise: the float32 the encoder wrote, not values close to it.
    np.testing.assert_array_equal(example["text_embedding"].view(np.uint32),
                                  written["embedding"][i].view(np.uint32))
    np.testing.assert_array_equal(example["text_mask"], written["mask"][i])
    np.testing.assert_array_equal(example["image"],
                                  written["pixels"][i].astype(np.float32) / 127.5 - 1)
  assert source.captions([N - 1, 0, 3]) == [CAPTIONS[N - 1], CAPTIONS[0], CAPTIONS[3]]
  # Opened without text (text_dim = 0) it is an image dataset with the null class.
  assert sorted(_source(written, text_len=0, text_dim=0)[0]) == ["image", "label"]


def test_pipeline_passes_text_through_in_the_image_order(written):
  text = _source(written)
  images = _source(written, text_len=0, text_dim=0)
  plain = sources.ArraySource({"image": np.zeros((N, 2, 2, 1), np.float32)})
  kw = {"global_batch_size": 4, "seed": 3, "random_flip": True}
  whole = pipeline.Pipeline(text, process_index=0, process_count=1, num_threads=2, **kw)
  shards = [pipeline.Pipeline(text, process_index=p, process_count=2, num_threads=0, **kw)
            for p in range(2)]
  image_only = pipeline.Pipeline(images, process_index=0, process_count=1, num_threads=0, **kw)
  array_order = pipeline.Pipeline(plain, process_index=0, process_count=1, num_threads=0, **kw)
  steps = 7  # past two epochs of 12 examples
  for step, batch in zip(range(steps), whole.iterate(0, steps)):
    index = batch["index"]
    assert batch["text_embedding"].dtype == np.float32 and batch["text_mask"].dtype == np.int32
    np.testing.assert_array_equal(batch["text_embedding"].view(np.uint32),
                                  written["embedding"][index].view(np.uint32))
    np.testing.assert_array_equal(batch["text_mask"], written["mask"][index])
    # The same examples, in the same order, with the same flips as an image dataset.
    np.testing.assert_array_equal(index, array_order.get_batch(step)["index"])
    np.testing.assert_array_equal(batch["image"], image_only.get_batch(step)["image"])
    parts = [s.get_batch(step) for s in shards]
    for key in ("text_embedding", "text_mask", "index"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), batch[key])
  # A worker process hands the text back through Grain's shared memory unchanged.
  with pipeline.Pipeline(text, process_index=0, process_count=1, num_threads=1,
                         workers="processes", **kw) as worker:
    for step, batch in zip(range(2), worker.iterate(0, 2)):
      expected = whole.get_batch(step)
      assert sorted(batch) == sorted(expected)
      for key, value in expected.items():
        assert batch[key].dtype == value.dtype, key
        np.testing.assert_array_equal(batch[key], value)
  whole.close()


def test_float16_and_folder_inputs(tmp_path, capsys):
  """A folder of images with .txt captions and a folder of .npy embeddings, stored float16
  through the command line: read back as float16(x) in float32, exactly."""
  manifest, _, _, embedding, mask = _inputs(str(tmp_path / "in"), n=3)
  os.remove(manifest)  # the folder form: 000.png + 000.txt
  for i in range(3):
    (tmp_path / "in" / f"{i:03d}.txt").write_text(CAPTIONS[i] + "\n", encoding="utf-8")
  (tmp_path / "in" / "notes.md").write_text("not an image, not listed")
  npy = tmp_path / "npy"
  npy.mkdir()
  np.save(npy / "text_embedding.npy", embedding)
  np.save(npy / "text_mask.npy", mask)
  data_dir = str(tmp_path / "tfds")
  assert prepare.main([f"--text_images={tmp_path / 'in'}", f"--embeddings={npy}",
                       "--name=half", f"--data_dir={data_dir}",
                       "--embedding_dtype=float16"]) == 0
  assert "text_images/half: 3/3 examples read" in capsys.readouterr().err
  source = tfds_source.TfdsSource("text_images/half", "train", data_dir, SIZE, text_len=L,
                                  text_dim=D)
  assert source.captions([0, 1, 2]) == CAPTIONS[:3]
  got = source.get([0, 1, 2])
  assert got["text_embedding"].dtype == np.float32
  np.testing.assert_array_equal(got["text_embedding"],
                                embedding.astype(np.float16).astype(np.float32))
  np.testing.assert_array_equal(got["text_mask"], mask)


class _Without(text_image.TextImages, skip_registration=True):
  """The text builder writing without the features `drop` names: datasets the reader must
  refuse. Subclasses set `name` to the builder's (tfds names each class after itself)."""
  drop = ()

  def _info(self):
    info = super()._info()
    kept = {k: v for k, v in info.features.items() if k not in self.drop}
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(kept),
                                 disable_shuffling=True)

  def _generate_examples(self):
    for key, example in super()._generate_examples():
      yield key, {k: v for k, v in example.items() if k not in self.drop}


def test_reader_refuses_data_a_text_model_cannot_use(written, tmp_path):
  def refused(name, data_dir=written["data_dir"], **kw):
    with pytest.raises(sources.DatasetError) as error:
      tfds_source.TfdsSource(name, "train", data_dir, SIZE, **{"text_len": L, "text_dim": D, **kw})
    return str(error.value)

  manifest, npz = written["manifest"], written["npz"]
  for name, drop in (("images_only", ("text_embedding", "text_mask")), ("no_mask", ("text_mask",))):
    without = type("Without", (_Without,), {"drop": drop, "name": text_image.BUILDER},
                   skip_registration=True)
    without(name=name, manifest=manifest, embeddings=npz, data_dir=str(tmp_path), progress=False,
            file_format="array_record").download_and_prepare()
  message = refused("text_images/images_only", str(tmp_path))
  assert "\n" not in message
  assert ("'text_images/images_only' has no text_embedding feature" in message and
          "prepare it with python -m multistep_cm.data.prepare --text_images=MANIFEST "
          "--embeddings=EMBEDDINGS --name=images_only" in message)
  assert "has text_embedding but no text_mask" in refused("text_images/no_mask", str(tmp_path))
  message = refused("text_images/tiny", text_dim=D + 1)
  assert "\n" not in message and f"width D={D}, but config.data.text_dim={D + 1}" in message
  message = refused("text_images/tiny", text_len=L - 1)
  assert "\n" not in message and f"length L={L}, but config.data.text_len={L - 1}" in message
  message = refused("text_images/absent")
  assert "not prepared" in message and "--name=absent" in message


def _write(folder, embedding=None, mask=None, **arrays):
  path = os.path.join(folder, "bad.npz")
  if embedding is not None:
    arrays["text_embedding"] = embedding
  if mask is not None:
    arrays["text_mask"] = mask
  np.savez(path, **arrays)
  return path


def test_wrong_inputs_are_refused_in_one_line(written, tmp_path, capsys):
  manifest, embedding, mask = written["manifest"], written["embedding"], written["mask"]
  after_padding = mask.copy()
  after_padding[7] = [1, 0, 1, 0, 0, 0]
  not_binary = mask.copy()
  not_binary[3, 0] = 2
  nonfinite = embedding.copy()
  nonfinite[4, 2, 1] = np.nan
  cases = {
      "has no 'text_embedding' array (it has ['text_mask'])": {"mask": mask},
      "has no 'text_mask' array (it has ['text_embedding'])": {"embedding": embedding},
      f"text_embedding has {N - 1} rows but the manifest has {N} captions":
          {"embedding": embedding[1:], "mask": mask[1:]},
      "text_embedding must have rank 3 [N, L, D], got shape (12, 6)":
          {"embedding": embedding[..., 0], "mask": mask},
      "text_mask must have rank 2 [N, L], got shape (12, 6, 1)":
          {"embedding": embedding, "mask": mask[..., None]},
      "text_mask has shape (12, 7) but text_embedding has [N, L] = (12, 6)":
          {"embedding": embedding, "mask": np.pad(mask, ((0, 0), (0, 1)))},
      "text_mask values must be 0 or 1, got 2 at row 3": {"embedding": embedding,
                                                          "mask": not_binary},
      "text_mask row 7 has tokens after padding (padding at position 1, a token at 2)": {
          "embedding": embedding, "mask": after_padding},
      "text_embedding row 4 has non-finite values": {"embedding": nonfinite, "mask": mask},
      "text_embedding row 0 has values beyond float16's range": {
          "embedding": embedding * 1e5, "mask": mask, "dtype": "float16"},
  }
  for expected, case in cases.items():
    npz = _write(str(tmp_path), case.get("embedding"), case.get("mask"))
    argv = [f"--text_images={manifest}", f"--embeddings={npz}", "--name=bad",
            f"--data_dir={tmp_path / 'tfds'}", f"--embedding_dtype={case.get('dtype', 'float32')}"]
    assert prepare.main(argv) == 2, expected
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], (expected, errors)
  # Images: one missing, one not an image; neither leaves a dataset behind.
  lines = open(manifest, encoding="utf-8").read().splitlines()
  for expected, image in (("missing.png does not exist", "missing.png"),
                          ("manifest.jsonl is not an image Pillow can read", "manifest.jsonl")):
    bad = os.path.join(os.path.dirname(manifest), "bad.jsonl")  # beside the images it names
    with open(bad, "w", encoding="utf-8") as fh:
      fh.write("\n".join(lines[:5] + [json.dumps({"image": image, "caption": "x"})] + lines[6:]))
    with pytest.raises(text_image.InputError, match=f"example 5: .*{expected}"):
      text_image.build(bad, written["npz"], "bad", str(tmp_path / "tfds"), progress=False)
  with pytest.raises(sources.DatasetError, match="not prepared"):
    tfds_source.TfdsSource("text_images/bad", "train", str(tmp_path / "tfds"), SIZE,
                           text_len=L, text_dim=D)
  with pytest.raises(text_image.InputError, match="text_images/tiny is already prepared"):
    text_image.build(manifest, written["npz"], "tiny", written["data_dir"], progress=False)
  with pytest.raises(SystemExit):  # --dataset and --text_images are either-or
    prepare.main(["--dataset=mnist", f"--text_images={manifest}"])


def test_benchmark_report_is_consistent(tmp_path):
  out = tmp_path / "text_data.json"
  report = text_data_benchmark.main(["--num_examples", "3", "--image_size", "8", "--text_len",
                                     "4", "--text_dim", "8", "--rounds", "2", "--out", str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(report))
  for row in report["dtypes"].values():
    assert len(row["examples_per_cpu_s_rounds"]) == 2
    assert row["examples_per_cpu_s"] == pytest.approx(np.median(row["examples_per_cpu_s_rounds"]))
    assert row["bytes_per_example"] > 4 * 8 * 2  # at least the float16 embedding
