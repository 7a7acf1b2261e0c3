"""Trains a small VAE (models/vae.py's `AutoencoderKL`) on an image dataset, for latent diffusion
on data that no published VAE fits: the embedded digits, or your own small images.

  python -m multistep_cm.data.train_vae --dataset=digits --image_size=16 --channels=32,64 \
      --steps=3000 --out=/tmp/digits_vae.safetensors

writes what `python -m multistep_cm.convert --from=sd-vae` writes for the published SD VAE:
the weights (.safetensors or .npz) and the settings JSON beside them, so that
`python -m multistep_cm.data.prepare --latents=digits --vae=FILE --name=NAME` encodes the
dataset with it and every command decodes with it. The network is the SD VAE's with your
widths: one level per `--channels` entry, the resolution halved between levels.

The loss, per example: the mean squared error of the reconstruction of the image (in
[-1, 1]) from a draw of the posterior, plus `--kl_weight` times the KL divergence of the
posterior from N(0, I) averaged over the latent's elements. (The SD VAE adds a perceptual
and an adversarial loss, with a KL weight of 1e-6; for small images the squared error alone
does.) Adam with a cosine learning rate and 100 steps of warm-up (a tenth of a shorter
run), one device.

At the end the scaling factor is set, as the SD VAE's 0.18215 was: one over the standard
deviation of the posterior means of the training images, so that a diffusion model sees
latents of unit variance. The command prints the held-out split's reconstruction error (the
digits' 'test', a folder's 'validation'; none for other datasets) beside that of the data's
mean image, the error a VAE that learnt nothing would have.

Exit codes as the other commands (docs/operations.md): 2 for an input it refuses (one line),
6 for an --out it cannot write.
"""
import argparse
import functools
import json
import os
import sys
import time

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from multistep_cm import convert
from multistep_cm.data import latents
from multistep_cm.models import vae as vae_lib
from multistep_cm.sampling import inputs

COMMAND = "train_vae"
HELDOUT = {"digits": "test"}  # a folder's held-out split is 'validation'


def vae_loss(module, params, images, rng, kl_weight):
  """(loss, (squared error, KL)), each the batch mean of its per-example value."""
  mean, logvar = module.apply({"params": params}, images, method=module.moments)
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
  recon = module.apply({"params": params}, z, method=module.decode)
  mse = jnp.mean(jnp.square(recon - images))
  kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return mse + kl_weight * kl, (mse, kl)


def train(source, settings, steps, batch_size, learning_rate, kl_weight, seed,
          log_every=100, progress=True):
  """The trained parameters of `vae_lib.AutoencoderKL(**settings)` on `source`'s images."""
  module = vae_lib.AutoencoderKL(**settings)
  first = source.get([0])["image"]
  params = nn.meta.unbox(module.init(jax.random.PRNGKey(seed), jnp.asarray(first)))["params"]
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(100, steps // 10),
                                                steps, learning_rate * 0.05)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, images, rng):
    grads, (mse, kl) = jax.grad(
        lambda p: vae_loss(module, p, images, rng, kl_weight), has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, mse, kl

  order = np.random.default_rng(seed)
  key, start = jax.random.PRNGKey(seed + 1), time.monotonic()
  for i in range(1, steps + 1):
    images = source.get(np.sort(order.choice(len(source), batch_size, replace=False)))["image"]
    params, opt_state, mse, kl = step(params, opt_state, jnp.asarray(images),
                                      jax.random.fold_in(key, i))
    if progress and (i % log_every == 0 or i == steps):
      print(f"{COMMAND}: step {i}/{steps}: squared error {float(mse):.5f}, KL {float(kl):.4f} "
            f"({time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)
  return module, params


def _batches(source, batch_size):
  for lo in range(0, len(source), batch_size):
    yield source.get(range(lo, min(len(source), lo + batch_size)))["image"]


def scaling_factor(module, params, source, batch_size=256) -> float:
  """One over the standard deviation of the posterior means of `source`'s images."""
  encode = jax.jit(functools.partial(module.apply, method=module.encode))
  means = np.concatenate([np.asarray(encode({"params": params}, jnp.asarray(b)))
                          for b in _batches(source, batch_size)])
  return float(1.0 / means.std())


def reconstruction_rmse(module, params, source, batch_size=256) -> tuple[float, float]:
  """(the VAE's RMS error of decode(encode(x)), that of the data's mean image), in [-1, 1]."""
  apply = jax.jit(lambda x: module.apply({"params": params}, x))
  batches = list(_batches(source, batch_size))
  images = np.concatenate(batches)
  recon = np.concatenate([np.asarray(apply(jnp.asarray(b))) for b in batches])
  mean_image = images.mean(0, keepdims=True)
  return (float(np.sqrt(np.mean(np.square(recon - images)))),
          float(np.sqrt(np.mean(np.square(mean_image - images)))))


def _parser():
  parser = argparse.ArgumentParser(prog=f"python -m multistep_cm.data.{COMMAND}",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--dataset", required=True,
                      help="the images as a config names them: digits, folder:NAME, tfds:NAME")
  parser.add_argument("--data_dir", default=None, help="where the dataset is prepared")
  parser.add_argument("--image_size", default=None, type=int,
                      help="N x N images (default: the dataset's own)")
  parser.add_argument("--out", required=True, help="the weights: FILE.safetensors or FILE.npz")
  parser.add_argument("--channels", default="32,64",
                      help="widths of the levels, comma-separated (the SD VAE: 128,256,512,512)")
  parser.add_argument("--layers_per_block", default=1, type=int)
  parser.add_argument("--latent_channels", default=4, type=int)
  parser.add_argument("--groups", default=8, type=int, help="GroupNorm groups")
  parser.add_argument("--attention", default=True, type=inputs.parse_bool,
                      help="self-attention in the mid blocks (true|false)")
  parser.add_argument("--steps", default=3000, type=int)
  parser.add_argument("--batch_size", default=64, type=int)
  parser.add_argument("--learning_rate", default=1e-3, type=float)
  parser.add_argument("--kl_weight", default=1e-3, type=float)
  parser.add_argument("--seed", default=0, type=int)
  return parser


def _settings(args, channels) -> dict:
  """The VAE's settings from the flags; InputError for one that cannot build."""
  try:
    widths = tuple(int(c) for c in args.channels.split(","))
  except ValueError:
    raise inputs.InputError(f"--channels={args.channels!r} must be comma-separated "
                            "integers") from None
  bad = [w for w in widths if w < 1 or w % args.groups]
  if bad or args.groups < 1:
    raise inputs.InputError(f"--channels={args.channels}: every width must be a positive "
                            f"multiple of --groups={args.groups}")
  for flag, value in (("--steps", args.steps), ("--batch_size", args.batch_size),
                      ("--layers_per_block", args.layers_per_block),
                      ("--latent_channels", args.latent_channels)):
    if value < 1:
      raise inputs.InputError(f"{flag}={value} must be positive")
  if not (args.learning_rate > 0 and np.isfinite(args.learning_rate)):
    raise inputs.InputError(f"--learning_rate={args.learning_rate} must be positive")
  if not (args.kl_weight >= 0 and np.isfinite(args.kl_weight)):
    raise inputs.InputError(f"--kl_weight={args.kl_weight} must be finite and >= 0")
  if not (args.out.endswith(".safetensors") or args.out.endswith(".npz")):
    raise inputs.InputError(f"--out={args.out}: must end in .safetensors or .npz")
  return dict(block_out_channels=widths, layers_per_block=args.layers_per_block,
              latent_channels=args.latent_channels, norm_num_groups=args.groups,
              in_channels=channels, out_channels=channels,
              mid_block_attention=args.attention, scaling_factor=1.0)


def _heldout(args):
  split = HELDOUT.get(args.dataset, "validation" if args.dataset.startswith("folder:")
                      else None)
  if split is None:
    return None
  try:
    return latents.image_source(args.dataset, args.data_dir, args.image_size, split,
                                "--dataset")
  except (latents.InputError, latents.DatasetError):
    return None  # a folder prepared without --holdout


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    source = latents.image_source(args.dataset, args.data_dir, args.image_size, "train",
                                  "--dataset")
    shape = source[0]["image"].shape
    settings = _settings(args, int(shape[-1]))
    levels = len(settings["block_out_channels"]) - 1
    if shape[0] % 2 ** levels or shape[0] < 2 ** levels:
      raise inputs.InputError(f"--channels={args.channels}: {len(settings['block_out_channels'])}"
                              f" levels halve {shape[0]}x{shape[0]} images {levels} times; "
                              f"the size must be a multiple of {2 ** levels}")
    if args.batch_size > len(source):
      raise inputs.InputError(f"--batch_size={args.batch_size} is more than the "
                              f"{len(source)} training images")
    # Last: it makes --out's folder, which a refused flag above leaves unmade.
    inputs.check_writable(os.path.dirname(os.path.abspath(args.out)), "--out")
  except (inputs.InputError, latents.InputError, latents.DatasetError) as e:
    inputs.fail(None, getattr(e, "code", 2), " ".join(str(e).split()))
  print(f"{COMMAND}: {len(source)} images {shape[0]}x{shape[1]}x{shape[2]} of {args.dataset}; "
        f"latents {shape[0] // 2 ** levels}x{shape[0] // 2 ** levels}x{args.latent_channels}",
        file=sys.stderr, flush=True)
  try:
    module, params = train(source, settings, args.steps, args.batch_size, args.learning_rate,
                           args.kl_weight, args.seed)
  except KeyboardInterrupt:
    inputs.fail(None, 130, f"interrupted; nothing was written to {args.out}")
  settings["scaling_factor"] = scaling_factor(module, params, source)
  heldout = _heldout(args)
  errors = reconstruction_rmse(module, params, heldout) if heldout is not None else None
  flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
  record = {"network": "sd-vae", "settings": {k: (list(v) if isinstance(v, tuple) else v)
                                              for k, v in settings.items()},
            "trained": {"dataset": args.dataset, "image_size": int(shape[0]),
                        "steps": args.steps, "batch_size": args.batch_size,
                        "learning_rate": args.learning_rate, "kl_weight": args.kl_weight,
                        "seed": args.seed}}
  if errors is not None:
    record["trained"]["heldout_rmse"], record["trained"]["mean_image_rmse"] = errors
  try:
    convert.write(args.out, flat, record)
  except OSError as e:
    inputs.fail(None, 6, f"cannot write {args.out}: {e}")
  if errors is not None:
    print(f"{COMMAND}: held-out reconstruction RMS error {errors[0]:.4f} (the data's mean image: "
          f"{errors[1]:.4f}; pixels in [-1, 1])", file=sys.stderr)
  print(f"{COMMAND}: scaling factor {settings['scaling_factor']:.4f}; encode the dataset with "
        f"python -m multistep_cm.data.prepare --latents={args.dataset} --vae={args.out} "
        f"--name=NAME" + (f" --image_size={args.image_size}" if args.image_size else "")
        + (f" --data_dir={args.data_dir}" if args.data_dir else ""), file=sys.stderr)
  print(json.dumps(record["trained"]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
