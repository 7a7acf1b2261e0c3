"""TFDS sources: ImageNet preprocessing, mocked and real array_record reads, clear errors."""
import io
import shlex

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from multistep_cm.config import build as config_build
from multistep_cm.data import pipeline
from multistep_cm.data import prepare
from multistep_cm.data import sources
from multistep_cm.data import synthetic
from multistep_cm.data import tfds_source

from helpers import data_config

CORRUPT_INDEX = 5


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
  """A real array_record dataset: 24 variable-size JPEGs, example 5 not an image."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  synthetic.build(data_dir, num_examples=24, size_range=(20, 60), corrupt=[CORRUPT_INDEX])
  return data_dir


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, "PNG")
  return buffer.getvalue()


@pytest.mark.parametrize("shape", [(30, 60), (60, 30)])
def test_preprocessing_keeps_exactly_the_central_square(shape):
  # Thirds of the longer side: red | green | blue; the central square is the green
  # part exactly, so at its own size the output is pure green.
  height, width = shape
  image = np.zeros((height, width, 3), np.uint8)
  long_axis = 1 if width > height else 0
  thirds = np.arange(max(shape)) * 4 // max(shape)  # 0 | 1, 2 | 3 (quarter, half, quarter)
  colours = np.array([[255, 0, 0], [0, 255, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
  image[:] = np.expand_dims(colours[thirds], 1 - long_axis)
  out = tfds_source.preprocess_image(_png(image), 30)
  assert out.shape == (30, 30, 3) and out.dtype == np.float32
  np.testing.assert_array_equal(out, np.broadcast_to([-1.0, 1.0, -1.0], out.shape))


def test_resize_is_antialiased():
  # A 1-pixel checkerboard reduced 4x averages to mid-grey; an aliasing resize
  # (nearest, or bicubic without widened support) would keep black/white pixels.
  board = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
  out = tfds_source.preprocess_image(_png(np.stack([board] * 3, -1)), 16)
  assert out.shape == (16, 16, 3)
  assert np.abs(out).max() < 0.05  # within ~6/255 of grey


def test_fast_decode_matches_exact_decode_closely():
  data = synthetic.synthetic_jpeg(0, 512, 384)
  exact = tfds_source.preprocess_image(data, 64)
  fast = tfds_source.preprocess_image(data, 64, fast_decode=True)
  assert fast.shape == exact.shape == (64, 64, 3)
  assert np.abs(fast - exact).mean() * 127.5 < 2  # mean difference under 2 grey levels


def test_tfds_source_reads_real_array_record(synthetic_dir):
  source = tfds_source.TfdsSource(synthetic.NAME, "train", synthetic_dir, image_size=16)
  assert len(source) == 24 and source.num_classes == 10
  for i in (0, 7, 23):
    example = source[i]
    assert example["image"].shape == (16, 16, 3) and example["image"].dtype == np.float32
    assert -1 <= example["image"].min() < example["image"].max() <= 1
    assert example["label"] == i % 10  # written unshuffled: record i is generated example i
  validation = config_build.make_source(data_config(
      dataset="tfds:synthetic_jpeg", split="validation", data_dir=synthetic_dir, image_size=8))
  assert len(validation) == 6 and validation[0]["image"].shape == (8, 8, 3)


def test_corrupted_record_names_dataset_split_and_index(synthetic_dir):
  source = tfds_source.TfdsSource(synthetic.NAME, "train", synthetic_dir, image_size=16)
  with pytest.raises(sources.DatasetError, match=r"'synthetic_jpeg'.*'train'.*index 5\b"):
    source[CORRUPT_INDEX]
  # Through the pipeline the error comes out of the decoding thread unchanged.
  data = pipeline.Pipeline(source, 24, seed=0, process_index=0, process_count=1, num_threads=2)
  with pytest.raises(sources.DatasetError, match=r"index 5\b"):
    data.get_batch(0)
  data.close()


def test_pipeline_over_mocked_imagenet2012():
  with tfds.testing.mock_data(num_examples=8):
    source = config_build.make_source(data_config(dataset="imagenet2012", image_size=64))
    assert len(source) == 8 and source.num_classes == 1000
    shards = [pipeline.Pipeline(source, 4, seed=0, process_index=p, process_count=2,
                                random_flip=True, num_threads=1) for p in range(2)]
    batch = {k: np.concatenate([s.get_batch(1)[k] for s in shards]) for k in ("image", "label")}
    whole = pipeline.Pipeline(source, 4, seed=0, process_index=0, process_count=1,
                              random_flip=True, num_threads=0).get_batch(1)
  assert batch["image"].shape == (4, 64, 64, 3)
  assert -1 <= batch["image"].min() < batch["image"].max() <= 1
  assert np.all((0 <= batch["label"]) & (batch["label"] < 1000))
  np.testing.assert_array_equal(batch["image"], whole["image"])
  for shard in shards:
    shard.close()


@pytest.mark.parametrize("name,labelled", [("downsampled_imagenet/64x64", False),
                                           ("imagenet_resized/64x64", True)])
def test_downsampled_variants_keep_their_native_size(name, labelled):
  with tfds.testing.mock_data(num_examples=3):
    source = config_build.make_source(data_config(dataset=name, split="validation"))
    example = source[2]
  assert source.image_size == 64 and example["image"].shape == (64, 64, 3)
  assert (source.num_classes == 1000) if labelled else (source.num_classes == example["label"] == 0)


def test_unprepared_imagenet_names_the_command_and_the_manual_download(tmp_path):
  with pytest.raises(sources.DatasetError) as error:
    config_build.make_source(data_config(dataset="imagenet2012", data_dir=str(tmp_path)))
  message = str(error.value)
  assert "not prepared" in message
  assert (f"python -m multistep_cm.data.prepare --dataset=imagenet2012 --data_dir={tmp_path} "
          "--manual_dir=MANUAL_DIR") in message
  assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
  assert "--file_format=array_record" in message


def test_the_command_in_the_error_prepares_the_dataset(tmp_path):
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(sources.DatasetError, match="not prepared") as error:
    tfds_source.TfdsSource(synthetic.NAME, "train", data_dir, image_size=8)
  command = next(line for line in str(error.value).splitlines() if "multistep_cm" in line)
  argv = shlex.split(command)
  assert argv[:3] == ["python", "-m", "multistep_cm.data.prepare"]
  assert prepare.main(argv[3:]) == 0
  assert len(tfds_source.TfdsSource(synthetic.NAME, "train", data_dir, image_size=8)) == 64


def test_tfrecord_dataset_asks_for_array_record(tmp_path):
  synthetic.build(str(tmp_path), file_format="tfrecord", num_examples=2)
  with pytest.raises(sources.DatasetError, match="tfrecord.*array_record"):
    tfds_source.TfdsSource(synthetic.NAME, "train", str(tmp_path), image_size=8)


def test_unknown_split_and_dataset(synthetic_dir):
  with pytest.raises(sources.DatasetError, match=r"no split 'test'.*'train', 'validation'"):
    tfds_source.TfdsSource(synthetic.NAME, "test", synthetic_dir, image_size=8)
  with pytest.raises(sources.DatasetError, match="no dataset named 'imagenet2013'"):
    config_build.make_source(data_config(dataset="tfds:imagenet2013"))
