"""The input pipeline's order: determinism, resumption, process sharding, epochs, flips."""
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np
import pytest

from multistep_cm.config import base as config_base
from multistep_cm.config import build as config_build
from multistep_cm.data import digits
from multistep_cm.data import mixture
from multistep_cm.data import pipeline
from multistep_cm.data import sources

from helpers import data_config


def _images(n, size=6):
  """n distinct images whose rows are not palindromes, so a flip always shows."""
  rng = np.random.default_rng(0)
  return rng.uniform(-1, 1, (n, size, size, 2)).astype(np.float32)


def _source(n=50):
  return sources.ArraySource({"image": _images(n), "label": np.arange(n) % 7})


def _equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 64, 1437])
def test_permute_is_a_keyed_bijection(n):
  perms = [pipeline.permute(np.arange(n), n, key) for key in (0, 1, 2**63 + 7)]
  for perm in perms:
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))
  if n >= 10:
    assert not np.array_equal(perms[0], perms[1]) and not np.array_equal(perms[1], perms[2])
  # Each offset maps independently: a subset gives the same values as the full array.
  np.testing.assert_array_equal(pipeline.permute(np.arange(n)[::-2], n, 1), perms[1][::-2])


def test_permutation_looks_uniform():
  # Over many keys, where offset 0 lands is uniform over [0, 10): a chi-square test
  # with 9 degrees of freedom; 40 is far beyond its 99.99th percentile (about 33).
  landing = [pipeline.permute(np.array([0]), 10, key)[0] for key in range(3000)]
  counts = np.bincount(landing, minlength=10)
  assert ((counts - 300) ** 2 / 300).sum() < 40


def test_get_batch_is_a_function_of_seed_and_step():
  a = pipeline.Pipeline(_source(), 8, seed=3, process_index=0, process_count=1, random_flip=True)
  b = pipeline.Pipeline(_source(), 8, seed=3, process_index=0, process_count=1, random_flip=True,
                        num_threads=0)
  for step in (0, 5, 17):
    _equal(a.get_batch(step), b.get_batch(step))
  other_seed = pipeline.Pipeline(_source(), 8, seed=4, process_index=0, process_count=1)
  assert not np.array_equal(a.get_batch(0)["index"], other_seed.get_batch(0)["index"])
  a.close()


def test_resumed_iteration_equals_uninterrupted():
  kwargs = dict(global_batch_size=12, seed=0, process_index=0, process_count=1, random_flip=True,
                num_threads=2, prefetch=3, chunk_size=5)
  with pipeline.Pipeline(_source(), **kwargs) as data:
    uninterrupted = list(data.iterate(0, 14))
  with pipeline.Pipeline(_source(), **kwargs) as data:  # a new "job", started at step 9
    resumed = list(data.iterate(9, 5))
  assert len(resumed) == 5
  for got, want in zip(resumed, uninterrupted[9:]):
    np.testing.assert_array_equal(got["index"], want["index"])
    _equal(got, want)


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_process_local_batches_concatenate_to_the_global_batch(process_count):
  single = pipeline.Pipeline(_source(), 16, seed=1, process_index=0, process_count=1,
                             random_flip=True, num_threads=0)
  shards = [pipeline.Pipeline(_source(), 16, seed=1, process_index=p, process_count=process_count,
                              random_flip=True, num_threads=0) for p in range(process_count)]
  for step in (0, 3, 7):  # step 3 straddles the first epoch boundary (50 examples)
    local = [shard.get_batch(step) for shard in shards]
    assert all(len(b["index"]) == 16 // process_count for b in local)
    _equal({k: np.concatenate([b[k] for b in local]) for k in local[0]}, single.get_batch(step))


def test_every_epoch_visits_every_example_once_in_its_own_order():
  n, batch = 50, 12  # batches straddle epochs
  data = pipeline.Pipeline(_source(n), batch, seed=0, process_index=0, process_count=1,
                           num_threads=0)
  stream = np.concatenate([data.get_batch(step)["index"] for step in range(3 * n // batch + 1)])
  epochs = [stream[e * n:(e + 1) * n] for e in range(3)]
  for ids in epochs:
    np.testing.assert_array_equal(np.sort(ids), np.arange(n))
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  in_order = pipeline.Pipeline(_source(n), batch, seed=0, process_index=0, process_count=1,
                               shuffle=False, num_threads=0)
  np.testing.assert_array_equal(in_order.get_batch(5)["index"], np.arange(60, 72) % n)


def test_digits_source_matches_load_digits():
  images, labels = digits.load_digits("test", 16)
  source = digits.DigitsSource("test", 16)
  assert len(source) == len(labels) and source.num_classes == 10
  data = pipeline.Pipeline(source, 32, seed=0, process_index=0, process_count=1, num_threads=0)
  batch = data.get_batch(2)
  np.testing.assert_array_equal(batch["image"], images[batch["index"]])
  np.testing.assert_array_equal(batch["label"], labels[batch["index"]])
  assert batch["image"].shape == (32, 16, 16, 1) and batch["label"].dtype == np.int32
  assert batch["index"].dtype == np.int64


def test_flip_mirrors_the_width_axis_of_about_half_the_examples():
  images = _images(400)
  source = sources.ArraySource({"image": images})
  kwargs = dict(global_batch_size=400, seed=5, process_index=0, process_count=1, num_threads=0)
  flipped = pipeline.Pipeline(source, random_flip=True, **kwargs).get_batch(0)
  plain = pipeline.Pipeline(source, random_flip=False, **kwargs).get_batch(0)
  np.testing.assert_array_equal(flipped["index"], plain["index"])
  original = images[plain["index"]]
  np.testing.assert_array_equal(plain["image"], original)
  mirrored = np.all(flipped["image"] == original[:, :, ::-1], axis=(1, 2, 3))
  unchanged = np.all(flipped["image"] == original, axis=(1, 2, 3))
  assert np.all(mirrored ^ unchanged)  # each example is either mirrored or untouched
  assert 0.4 < mirrored.mean() < 0.6  # 400 fair coins: 0.5 +- 0.025 (1 sigma)


def test_unlabelled_arrays_get_the_null_class():
  source = sources.ArraySource({"x": np.zeros((10, 2), np.float32)})
  assert source.num_classes == 0
  batch = pipeline.Pipeline(source, 4, 0, 0, 1, num_threads=0).get_batch(0)
  np.testing.assert_array_equal(batch["label"], np.zeros(4, np.int32))
  assert batch["x"].shape == (4, 2)


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="global_batch_size=10.*process_count=4"):
    pipeline.Pipeline(_source(), 10, seed=0, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="process_index"):
    pipeline.Pipeline(_source(), 8, seed=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="random_flip"):
    pipeline.Pipeline(sources.ArraySource({"x": np.zeros((4, 2))}), 2, 0, 0, 1, random_flip=True)
  with pytest.raises(ValueError, match=r"dataset='cifar10'.*imagenet2012"):
    config_build.make_source(data_config(dataset="cifar10"))


def test_make_source_digits():
  source = config_build.make_source(data_config(dataset="digits", split="train", image_size=16))
  assert isinstance(source, digits.DigitsSource) and source[0]["image"].shape == (16, 16, 1)


def test_make_source_mixture_draws_the_configs_points_of_the_configs_mixture():
  """`mixture_size` points of `data_dim` from the toy mixture of the config's seed: fixed by
  the seed, unlabelled, and distributed as that mixture (per-mode frequencies)."""
  config = config_base.mixture_config("diffusion", data_dim=4)
  config.seed, config.data.mixture_size = 3, 4000
  source = config_build.make_source(config)
  assert isinstance(source, sources.ArraySource) and len(source) == 4000
  assert source.num_classes == 0
  x = source.get(np.arange(4000))["x"]
  assert x.shape == (4000, 4) and x.dtype == np.float32
  np.testing.assert_array_equal(config_build.make_source(config).get(np.arange(4000))["x"], x)
  config.seed = 4
  assert not np.allclose(config_build.make_source(config).get(np.arange(10))["x"], x[:10])
  # Each point near its nearest mode of the seed-3 mixture, the modes as frequent as weighted.
  mix = mixture.default_mixture(dim=4, seed=3)
  dist = np.linalg.norm(x[:, None, :] - mix.means[None], axis=-1)  # [N, K]
  nearest = dist.argmin(1)
  assert np.all(dist.min(1) < 6 * mix.stds.max() * np.sqrt(4))
  # 4000 draws: each frequency within 0.04 of its weight is > 5 standard deviations.
  np.testing.assert_allclose(np.bincount(nearest, minlength=5) / 4000, mix.weights, atol=0.04)


def test_to_global_shards_the_batch_over_8_devices():
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  assert pipeline.batch_shard(sharding, 16) == (0, 1)
  data = pipeline.Pipeline(_source(), 16, seed=0, process_index=0, process_count=1,
                           random_flip=True, num_threads=0)
  local = data.get_batch(1)
  global_batch = pipeline.to_global(local, sharding)
  for key, array in global_batch.items():
    assert array.shape == local[key].shape and array.sharding == sharding
    assert len(array.addressable_shards) == 8
    assert all(shard.data.shape[0] == 2 for shard in array.addressable_shards)
    np.testing.assert_array_equal(np.asarray(array), local[key])


def test_batch_shard_of_multi_process_layouts():
  rows = lambda *pairs: [slice(a, b) for a, b in pairs]  # noqa: E731
  assert pipeline._shard_of_rows(rows((0, 4), (4, 8)), 16) == (0, 2)
  assert pipeline._shard_of_rows(rows((12, 16), (8, 12)), 16) == (1, 2)
  assert pipeline._shard_of_rows(rows((4, 8)), 16) == (1, 4)
  assert pipeline._shard_of_rows([slice(None)], 16) == (0, 1)  # every process holds it all
  with pytest.raises(ValueError, match="contiguous"):
    pipeline._shard_of_rows(rows((0, 4), (8, 12)), 16)


def test_measure_throughput_reports_rates():
  data = pipeline.Pipeline(_source(), 8, seed=0, process_index=0, process_count=1, num_threads=1)
  rates = pipeline.measure_throughput(data, num_steps=3)
  data.close()
  assert rates["num_images"] == 24 and rates["images_per_s"] > 0
  assert rates["images_per_s_per_core"] > 0 and rates["images_per_cpu_s"] > 0


def test_cached_epoch_order_equals_the_per_index_permutation():
  source = sources.ArraySource({"x": np.arange(1000)[:, None]})
  pipe = pipeline.Pipeline(source, 96, seed=3, process_index=0, process_count=1, num_threads=0)
  positions = np.arange(0, 5000, 7)  # several epochs, crossing their boundaries
  epochs, offsets = np.divmod(positions, 1000)
  direct = np.array([pipeline.permute(np.array([o]), 1000, pipe._epoch_key(int(e)))[0]
                     for e, o in zip(epochs, offsets)])
  np.testing.assert_array_equal(pipe.example_indices(positions), direct)
