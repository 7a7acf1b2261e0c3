"""The user's images as a dataset: `prepare --images` reads a folder of class subfolders, a
flat folder or an EDM `dataset_tool` zip, and the pipeline reads back the pixels Pillow
decodes from those files with the labels their layout gives; bad files, interrupted
preparation and a config that disagrees with the data are refused in one line."""
import io
import json
import os
import zipfile

import numpy as np
from PIL import Image
import pytest

from multistep_cm.config import base as config_base
from multistep_cm.config import build as config_build
from multistep_cm.config import checks as config_checks
from multistep_cm.data import image_folder
from multistep_cm.data import pipeline
from multistep_cm.data import prepare
from multistep_cm.data import sources
from multistep_cm.data import tfds_source
from multistep_cm.sampling import images as images_lib

from helpers import data_config

SIZE = 8
CLASSES = ("circle", "square")  # sorted: ids 0 and 1
PER_CLASS = 5


def _random_pixels(rng, shape):
  return rng.integers(0, 256, shape, dtype=np.uint8)


def _class_folder(root):
  """Two class subfolders of SIZE x SIZE RGB PNGs, a note that is not an image, and one
  corrupt .png. Returns {relative name: (pixels, class id)} of the good images."""
  rng = np.random.default_rng(1)
  expected = {}
  for label, name in enumerate(CLASSES):
    os.makedirs(os.path.join(root, name))
    for i in range(PER_CLASS):
      pixels = _random_pixels(rng, (SIZE, SIZE, 3))
      Image.fromarray(pixels).save(os.path.join(root, name, f"{i}.png"))
      expected[f"{name}/{i}.png"] = (pixels, label)
  with open(os.path.join(root, "square", "broken.png"), "wb") as fh:
    fh.write(b"\x89PNG but not really")
  with open(os.path.join(root, "README.txt"), "w") as fh:
    fh.write("not an image")
  return expected


def _scaled(pixels):
  """uint8 pixels as the pipeline gives them: float32 x / 127.5 - 1."""
  return pixels.astype(np.float32) / 127.5 - 1


def _errors(capsys):
  return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def _matched(source, expected):
  """{file: (image, label)} of every example of `source`, each matched to the one file whose
  pixels it has (the pixels are random, so at most one matches)."""
  by_pixels = {pixels.tobytes(): name for name, (pixels, _) in expected.items()}
  found = {}
  for i in range(len(source)):
    example = source[i]
    pixels = np.round((example["image"] + 1) * 127.5).astype(np.uint8)
    name = by_pixels.get(pixels.tobytes())
    assert name is not None, f"example {i} matches no input image"
    assert name not in found, f"{name} read twice"
    # Exactly x / 127.5 - 1 of the file's own pixels.
    np.testing.assert_array_equal(example["image"], _scaled(expected[name][0]))
    found[name] = (i, int(example["label"]))
  return found


@pytest.fixture(scope="module")
def classes(tmp_path_factory):
  """The class folder, prepared with --skip_bad and 3 held out, through the command."""
  root = tmp_path_factory.mktemp("classes")
  expected = _class_folder(str(root / "in"))
  data_dir = str(root / "tfds")
  argv = [f"--images={root / 'in'}", "--name=shapes", f"--data_dir={data_dir}", "--skip_bad",
          "--holdout=3"]
  assert prepare.main(argv) == 0
  return {"root": root, "expected": expected, "data_dir": data_dir, "argv": argv}


def test_a_corrupt_file_is_refused_without_skip_bad(tmp_path, capsys):
  _class_folder(str(tmp_path / "in"))
  data_dir = tmp_path / "tfds"
  assert prepare.main([f"--images={tmp_path / 'in'}", "--name=shapes",
                       f"--data_dir={data_dir}"]) == 2
  (line,) = _errors(capsys)
  assert "square/broken.png is not an image Pillow can read" in line and "--skip_bad" in line
  # Nothing written, not even a hidden folder.
  assert not os.path.exists(data_dir) or os.listdir(data_dir) == []


@pytest.mark.parametrize("source", ["--images", "--text_images"])
def test_a_data_dir_that_cannot_be_written_exits_6_before_any_image_is_read(
    tmp_path, capsys, source):
  # The folder holds an unreadable image (and no captions): reading it would exit 2, so a 6
  # shows the data_dir was checked first.
  _class_folder(str(tmp_path / "in"))
  (tmp_path / "file").write_text("")
  data_dir = tmp_path / "file" / "tfds"
  extra = [f"--embeddings={tmp_path / 'none.npz'}"] if source == "--text_images" else []
  assert prepare.main([f"{source}={tmp_path / 'in'}", "--name=shapes",
                       f"--data_dir={data_dir}", *extra]) == 6
  (line,) = _errors(capsys)
  assert line.startswith("error: --data_dir: cannot write to") and str(data_dir) in line


def test_class_folder_reads_back_the_files_pixels_and_folder_labels(classes):
  expected, data_dir = classes["expected"], classes["data_dir"]
  record = image_folder.read_record("shapes", data_dir)
  assert (record["image_size"], record["channels"], record["num_classes"]) == (SIZE, 3, 2)
  assert record["class_names"] == list(CLASSES) and record["layout"] == "classes"
  assert record["splits"] == {"train": 2 * PER_CLASS - 3, "validation": 3}
  assert [s["file"] for s in record["skipped"]] == ["square/broken.png"]
  assert record["ignored_files"] == 1  # README.txt
  assert record["class_counts"] == [PER_CLASS, PER_CLASS]
  train = tfds_source.TfdsSource("image_folders/shapes", "train", data_dir)
  held_out = tfds_source.TfdsSource("image_folders/shapes", "validation", data_dir)
  assert train.num_classes == 2 and train.class_names == CLASSES
  found_train, found_held = _matched(train, expected), _matched(held_out, expected)
  # Every good image once, in one split or the other, labelled by its folder.
  assert sorted({**found_train, **found_held}) == sorted(expected)
  assert not set(found_train) & set(found_held)
  for name, (_, label) in {**found_train, **found_held}.items():
    assert label == expected[name][1], name
  # Each split keeps the folder's sorted order.
  for found in (found_train, found_held):
    assert sorted(found, key=lambda n: found[n][0]) == sorted(found)
  # Through the pipeline: the batches hold the same pixels with the same labels.
  by_pixels = {p.tobytes(): label for p, label in expected.values()}
  feed = pipeline.Pipeline(train, global_batch_size=4, seed=0, process_index=0,
                           process_count=1, num_threads=0)
  for batch in feed.iterate(0, 3):
    for image, label in zip(batch["image"], batch["label"]):
      pixels = np.round((image + 1) * 127.5).astype(np.uint8)
      assert by_pixels[pixels.tobytes()] == label
  feed.close()


def _png_bytes(pixels):
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="PNG")
  return out.getvalue()


@pytest.mark.parametrize("as_zip", [True, False])
def test_edm_dataset_json_labels(tmp_path, as_zip):
  """EDM's layout: images in numbered subfolders (not classes), labels from dataset.json;
  class 1 unused, so there are max + 1 = 3 classes named by their ids."""
  rng = np.random.default_rng(2)
  expected, files, labels = {}, {}, []
  for i in range(6):
    name = f"{i // 4:05d}/img{i:08d}.png"
    pixels = _random_pixels(rng, (SIZE, SIZE, 3))
    files[name] = _png_bytes(pixels)
    expected[name] = (pixels, (0, 2)[i % 2])
    labels.append([name, expected[name][1]])
  files[image_folder.EDM_LABELS] = json.dumps({"labels": labels}).encode()
  if as_zip:
    source_path = str(tmp_path / "edm.zip")
    with zipfile.ZipFile(source_path, "w") as z:
      for name, data in files.items():
        z.writestr(name, data)
  else:
    source_path = str(tmp_path / "edm")
    for name, data in files.items():
      os.makedirs(os.path.dirname(os.path.join(source_path, name)), exist_ok=True)
      with open(os.path.join(source_path, name), "wb") as fh:
        fh.write(data)
  data_dir = str(tmp_path / "tfds")
  _, record = image_folder.build(source_path, "edm", data_dir, progress=False)
  assert record["layout"] == "edm" and record["class_names"] == ["0", "1", "2"]
  source = tfds_source.TfdsSource("image_folders/edm", "train", data_dir)
  assert source.num_classes == 3
  found = _matched(source, expected)
  assert sorted(found) == sorted(expected)
  for name, (index, label) in found.items():
    assert label == expected[name][1] and index == sorted(expected).index(name)


def test_unlabelled_edm_zip_and_grey_flat_folder(tmp_path):
  """`"labels": null` and a flat folder are unlabelled (the null class 0); grey files make a
  one-channel dataset; a non-square image is cut to its central square."""
  rng = np.random.default_rng(3)
  pixels = _random_pixels(rng, (SIZE, SIZE, 3))
  with zipfile.ZipFile(tmp_path / "edm.zip", "w") as z:
    z.writestr("00000/img00000000.png", _png_bytes(pixels))
    z.writestr(image_folder.EDM_LABELS, json.dumps({"labels": None}))
  data_dir = str(tmp_path / "tfds")
  _, record = image_folder.build(str(tmp_path / "edm.zip"), "nolabels", data_dir,
                                 progress=False)
  assert record["num_classes"] == 0 and record["class_names"] == []
  source = tfds_source.TfdsSource("image_folders/nolabels", "train", data_dir)
  assert source.num_classes == 0 and source.class_names is None
  assert source[0]["label"] == 0
  np.testing.assert_array_equal(source[0]["image"], _scaled(pixels))

  flat = tmp_path / "grey"
  flat.mkdir()
  wide = _random_pixels(rng, (SIZE, SIZE + 3))  # 8 x 11: the central columns 1..8
  square = _random_pixels(rng, (SIZE, SIZE))
  Image.fromarray(wide).save(flat / "a.png")
  Image.fromarray(square).save(flat / "b.png")
  _, record = image_folder.build(str(flat), "grey", data_dir, progress=False)
  assert (record["channels"], record["image_size"], record["layout"]) == (1, SIZE, "flat")
  source = tfds_source.TfdsSource("image_folders/grey", "train", data_dir)
  assert source.channels == 1
  np.testing.assert_array_equal(source[0]["image"][..., 0], _scaled(wide[:, 1:1 + SIZE]))
  np.testing.assert_array_equal(source[1]["image"][..., 0], _scaled(square))


def test_resized_jpeg_and_webp_match_pillow(tmp_path):
  """--image_size: the central square resized with Pillow's bicubic, from Pillow's decode of
  each file itself (a JPEG, a lossless WebP); --channels=1 makes colour files grey."""
  rng = np.random.default_rng(4)
  folder = tmp_path / "mixed"
  folder.mkdir()
  Image.fromarray(_random_pixels(rng, (20, 30, 3))).save(folder / "x.jpg", quality=90)
  Image.fromarray(_random_pixels(rng, (16, 16, 3))).save(folder / "y.webp", lossless=True)
  data_dir = str(tmp_path / "tfds")
  for channels, mode in ((None, "RGB"), (1, "L")):
    name = f"formats{channels or 3}"
    image_folder.build(str(folder), name, data_dir, image_size=SIZE, channels=channels,
                       progress=False)
    source = tfds_source.TfdsSource(f"image_folders/{name}", "train", data_dir)
    for i, (file, box) in enumerate((("x.jpg", (5, 0, 25, 20)), ("y.webp", (0, 0, 16, 16)))):
      with Image.open(folder / file) as im:
        want = np.asarray(im.convert(mode).resize((SIZE, SIZE), Image.Resampling.BICUBIC,
                                                  box=box))
      np.testing.assert_array_equal(source[i]["image"],
                                    _scaled(want.reshape(SIZE, SIZE, -1)))


def test_truncated_and_mismatched_inputs_are_refused_in_one_line(tmp_path, capsys):
  rng = np.random.default_rng(5)
  data = _png_bytes(_random_pixels(rng, (SIZE, SIZE, 3)))
  folder = tmp_path / "in"
  folder.mkdir()
  (folder / "good.png").write_bytes(data)
  (folder / "cut.png").write_bytes(data[:len(data) // 2])  # a header Pillow reads, half the data
  data_dir = tmp_path / "tfds"
  base = [f"--name=t", f"--data_dir={data_dir}"]
  assert prepare.main([f"--images={folder}", *base]) == 2
  (line,) = _errors(capsys)
  assert "cut.png is not an image Pillow can read" in line
  assert not data_dir.exists() or os.listdir(data_dir) == []
  assert prepare.main([f"--images={folder}", "--skip_bad", *base]) == 0
  record = image_folder.read_record("t", str(data_dir))
  assert record["splits"] == {"train": 1} and record["skipped"][0]["file"] == "cut.png"

  Image.fromarray(_random_pixels(rng, (SIZE * 2, SIZE * 3, 3))).save(folder / "big.png")
  (folder / "cut.png").unlink()
  cases = {
      "big.png is 24x16, not square; prepare with --crop=center": ["--crop=none"],
      "good.png is 8 px and big.png is 16 px": [],
      "--holdout=1.5 must be a fraction in (0, 1) or a whole number": ["--holdout=1.5"],
      "--holdout=2 holds out 2 of the 2 images": ["--holdout=2", "--image_size=8"],
      "image_folders/t is already prepared at": ["--image_size=8", "--name=t"],
      "--name='T!' must be lower-case": ["--name=T!"],
  }
  for expected, extra in cases.items():
    argv = [f"--images={folder}", "--name=other", f"--data_dir={data_dir}", *extra]
    assert prepare.main(argv) == 2, expected
    (line,) = _errors(capsys)
    assert expected in line, (expected, line)
  for expected, setup in {
      "holds images both at its top (top.png) and in subfolders (sub/)": "mixed",
      "dataset.json has no label for b.png (1 of 2 images unlabelled)": "unlabelled",
      "no such folder or zip file": "missing"}.items():
    where = tmp_path / setup
    if setup != "missing":
      (where / "sub").mkdir(parents=True)
    if setup == "mixed":
      (where / "top.png").write_bytes(data)
      (where / "sub" / "x.png").write_bytes(data)
    elif setup == "unlabelled":
      (where / "a.png").write_bytes(data)
      (where / "b.png").write_bytes(data)
      (where / "dataset.json").write_text(json.dumps({"labels": [["a.png", 0]]}))
    assert prepare.main([f"--images={where}", "--name=other", f"--data_dir={data_dir}"]) == 2
    (line,) = _errors(capsys)
    assert expected in line, (expected, line)
  assert sorted(os.listdir(data_dir)) == ["image_folders"]  # no hidden leftovers
  assert os.listdir(data_dir / "image_folders") == ["t"]


def test_an_interrupted_prepare_leaves_nothing_read_as_complete(tmp_path, monkeypatch, capsys):
  expected = _class_folder(str(tmp_path / "in"))
  os.remove(tmp_path / "in" / "square" / "broken.png")
  data_dir = str(tmp_path / "tfds")
  written = []
  real_png = image_folder._png

  def png_then_stop(pixels):
    if len(written) == 4:
      raise KeyboardInterrupt  # a Ctrl-C in the middle of the writing
    written.append(1)
    return real_png(pixels)

  def not_prepared():
    assert not os.path.exists(image_folder.dataset_path("shapes", data_dir))
    with pytest.raises(sources.DatasetError, match="not prepared"):
      tfds_source.TfdsSource("image_folders/shapes", "train", data_dir)
    with pytest.raises(sources.DatasetError, match="--images=DIR_OR_ZIP --name=shapes"):
      image_folder.read_record("shapes", data_dir)

  monkeypatch.setattr(image_folder, "_png", png_then_stop)
  assert prepare.main([f"--images={tmp_path / 'in'}", "--name=shapes",
                       f"--data_dir={data_dir}"]) == 130
  assert _errors(capsys) == ["error: interrupted; nothing of image_folders/shapes was written"]
  not_prepared()
  assert os.listdir(data_dir) == []  # the hidden folder was removed
  # Killed outright (no clean-up ran): the hidden folder stays, and still nothing reads it.
  written.clear()
  monkeypatch.setattr(image_folder, "_remove_incomplete", lambda path: None)
  with pytest.raises(KeyboardInterrupt):
    image_folder.build(str(tmp_path / "in"), "shapes", data_dir, progress=False)
  assert [n for n in os.listdir(data_dir) if n.startswith(".incomplete.")]
  not_prepared()
  # A later prepare writes the whole dataset.
  monkeypatch.setattr(image_folder, "_png", real_png)
  image_folder.build(str(tmp_path / "in"), "shapes", data_dir, progress=False)
  source = tfds_source.TfdsSource("image_folders/shapes", "train", data_dir)
  assert sorted(_matched(source, expected)) == sorted(expected)


def test_grid_rows_show_class_names():
  # Class 2 is the null class: no name, so its number.
  layout = images_lib.grid_layout(4, SIZE, SIZE, np.array([1, 0, 1, 2]), class_names=CLASSES)
  assert [text for text, _ in layout.rows] == ["circle", "square", "2"]
  assert [idx for _, idx in layout.rows] == [(1,), (0, 2), (3,)]
  samples = np.zeros((4, SIZE, SIZE, 3), np.float32)
  named = images_lib.image_grid(samples, np.array([1, 0, 1, 2]), class_names=CLASSES)
  numbered = images_lib.image_grid(samples, np.array([1, 0, 1, 2]))
  # Same tiles; the label column differs (its width is the longest name's).
  assert named.shape[0] == numbered.shape[0] and named.shape[1] > numbered.shape[1]


# --- the config names the prepared images -----------------------------------------------------


def _folder_config(data_dir, **data):
  return data_config(**{"dataset": "folder:shapes", "data_dir": data_dir,
                        "image_size": SIZE, "num_channels": 3, "num_classes": 2, **data})


def _config(data_dir, **keys):
  c = config_base.digits_config("diffusion")
  c.data.dataset, c.data.data_dir = "folder:shapes", data_dir
  c.data.image_size, c.data.num_channels, c.data.num_classes = SIZE, 3, 2
  c.model.update(dict(channels=(8,), num_blocks=(1,), mid_channels=16, mid_blocks=1,
                      dropout=(0.0, 0.0), emb_dim=16, head_dim=8, num_groups=4))
  c.batch_size = 8
  for key, value in keys.items():
    section, leaf = key.split(".")
    c[section][leaf] = value
  return c


def test_a_config_that_disagrees_with_the_data_is_refused(classes):
  data_dir = classes["data_dir"]
  config_checks.validate(_config(data_dir), num_devices=1, num_processes=1)
  record_path = os.path.join(image_folder.dataset_path("shapes", data_dir),
                             image_folder.RECORD)
  for key, value, holds, fix in (
      ("data.num_classes", 10, "2 classes (circle, square)", "--config.data.num_classes=2"),
      ("model.num_classes", 10, "2 classes", "--config.model.num_classes=2"),
      ("data.image_size", 16, "8x8 images", "--config.data.image_size=8"),
      ("data.num_channels", 1, "3 channel(s)", "--config.data.num_channels=3")):
    with pytest.raises(config_checks.ConfigError) as e:
      config_checks.validate(_config(data_dir, **{key: value}), num_devices=1,
                             num_processes=1)
    message = str(e.value)
    assert "\n" not in message
    for part in (f"config.{key}={value}, but it holds {holds}", fix, record_path):
      assert part in message, (part, message)
  # All at once in the one line, each with its fix.
  with pytest.raises(config_checks.ConfigError) as e:
    config_checks.validate(_config(data_dir, **{"data.image_size": 16, "data.num_classes": 3}),
                           num_devices=1, num_processes=1)
  assert ("config.data.image_size=16, but it holds 8x8 images; config.data.num_classes=3, "
          "but it holds 2 classes") in str(e.value)
  assert "set --config.data.image_size=8 --config.data.num_classes=2," in str(e.value)
  # Not prepared: the check leaves it to the source, which names the command.
  missing = _config(data_dir)
  missing.data.dataset = "folder:absent"
  config_checks.validate(missing, num_devices=1, num_processes=1)
  with pytest.raises(sources.DatasetError, match="--images=DIR_OR_ZIP --name=absent"):
    config_build.make_source(missing)
  with pytest.raises(config_checks.ConfigError, match="'folder:<name>'"):
    config_checks.validate(_config(data_dir, **{"data.dataset": "folder:"}), num_devices=1,
                           num_processes=1)


def test_folder_config_reads_the_dataset_and_its_class_names(classes):
  config = _folder_config(classes["data_dir"])
  source = config_build.make_source(config)
  assert len(source) == 2 * PER_CLASS - 3 and source.class_names == CLASSES
  assert len(config_build.make_source(_folder_config(classes["data_dir"],
                                                     split="validation"))) == 3
  assert config_build.class_names(config) == CLASSES
  assert config_build.class_names(data_config(dataset="digits", image_size=8)) is None
