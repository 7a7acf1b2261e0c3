"""The optimiser (optax) and the EMA of the parameters.

The paper does not state its optimiser (§7.1, NOT FOUND); the configs use Adam
with linear warmup, optional weight decay (AdamW), gradient clipping by global
norm, and a constant or cosine learning-rate schedule.
"""
import jax
import jax.numpy as jnp
import optax

from multistep_cm.config import base as config_base

OPTIMIZERS = config_base.OPTIMIZERS
LR_SCHEDULES = config_base.LR_SCHEDULES


def learning_rate_schedule(opt_config, num_train_steps: int) -> optax.Schedule:
  lr, warmup = float(opt_config.learning_rate), int(opt_config.warmup_steps)
  kind = opt_config.schedule
  if kind not in LR_SCHEDULES:
    raise ValueError(f"config.optimizer.schedule must be one of {LR_SCHEDULES}, got {kind!r}")
  warm = optax.linear_schedule(0.0, lr, max(warmup, 1))
  decay_steps = max(num_train_steps - warmup, 1)
  end = lr * float(opt_config.end_lr_fraction)
  if kind == "constant":
    after = optax.constant_schedule(lr)
  elif kind == "cosine":
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
  else:
    after = optax.linear_schedule(lr, end, decay_steps)
  return optax.join_schedules([warm, after], [warmup]) if warmup > 0 else after


def make_optimizer(opt_config, num_train_steps: int):
  """Returns `(tx, lr_schedule)`."""
  if opt_config.name not in OPTIMIZERS:
    raise ValueError(f"config.optimizer.name must be one of {OPTIMIZERS}, got "
                     f"{opt_config.name!r}")
  schedule = learning_rate_schedule(opt_config, num_train_steps)
  kw = dict(b1=float(opt_config.b1), b2=float(opt_config.b2), eps=float(opt_config.eps))
  if opt_config.name == "adamw":
    opt = optax.adamw(schedule, weight_decay=float(opt_config.weight_decay), **kw)
  else:
    opt = optax.adam(schedule, **kw)
  parts = []
  if opt_config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(float(opt_config.grad_clip_norm)))
  return optax.chain(*parts, opt), schedule


def ema_decay_at(decay: float, step, warmup: bool):
  """The EMA decay at `step`; with warmup `min(decay, (1 + step) / (10 + step))`.

  The warmup keeps the average from being dominated by the initialisation on short
  runs (the digits and toy configs) and has no effect after ~10 / (1 - decay) steps.
  """
  decay = jnp.float32(decay)
  if not warmup:
    return decay
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema, params, decays, step, warmup: bool):
  """`{"ema<i>": decay_i * ema_i + (1 - decay_i) * params}` for each configured decay."""
  new = {}
  for i, decay in enumerate(decays):
    d = ema_decay_at(decay, step, warmup)
    new[f"ema{i}"] = jax.tree.map(lambda e, p, d=d: d * e + (1.0 - d) * p, ema[f"ema{i}"],
                                  params)
  return new
