"""The static train step: state, loss and update, built from the run's plan alone.

Everything here is traced and compiled; nothing touches data, checkpoints or the host
loop (training/loop.py), so the same step serves the trainer, the TPU compile report
(compile_report.py), the toy experiment (toy.py) and the benchmarks:
  * `TrainState`, `create_state`: what an exact resume restores besides the input
    position (= the step);
  * `state_layout`: the abstract state and the shardings of every part of it, from the
    models' logical axis rules;
  * `make_loss_fn`: the loss of the plan's objective (diffusion, the MCM objective or
    Progressive Distillation of diffusion/losses.py) on one batch;
  * `make_train_step`: one optimiser update with EMA and the non-finite guard;
  * `StepBuilder`: the jitted step with explicit shardings and the state donated,
    traced, lowered and compiled on demand, and its FLOPs (runtime/flops.py).
"""
import contextlib
import dataclasses
from typing import Any

import flax
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from multistep_cm.config import build as config_build
from multistep_cm.config import plan as plan_lib
from multistep_cm.data import latents
from multistep_cm.diffusion import losses
from multistep_cm import models
from multistep_cm.models import conditioning
from multistep_cm.models import denoiser
from multistep_cm.models import partitioning
from multistep_cm.runtime import flops as flops_lib
from multistep_cm.runtime import sharding as sharding_lib
from multistep_cm.training import optim

# fold_in index of the per-example guidance scale draws (loss.guidance_range).
_GUIDANCE_STREAM = 0x6775
# The stream of a latent dataset's posterior draws (data/latents.py): runs in pixels draw as
# before.
_LATENT_STREAM = 0x6C61


# --- the train state ---------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """Step, rng, parameters, optimiser state, EMA copies and non-finite-update counters.

  The teacher is not here: teachers are inputs, never optimised or checkpointed
  with the student.
  """
  step: jax.Array  # int32: the number of updates applied (also the next data step)
  rng: jax.Array  # uint32[2]: per-step keys are folded from it with the step number
  params: Any
  opt_state: Any
  ema: dict[str, Any]  # {"ema0": params-like, ...}, one per config.ema_decays
  num_skipped: jax.Array  # int32: updates skipped because the loss or gradient was non-finite
  first_nonfinite_step: jax.Array  # int32: the first such step (as logged, 1-based), -1 if none

  def counters(self) -> dict[str, jax.Array]:
    return {"step": self.step, "rng": self.rng, "num_skipped": self.num_skipped,
            "first_nonfinite_step": self.first_nonfinite_step}


def create_state(params, tx, rng, num_ema: int) -> TrainState:
  """A fresh state at step 0: every EMA starts at `params`."""
  return TrainState(step=jnp.int32(0), rng=rng, params=params, opt_state=tx.init(params),
                    ema={f"ema{i}": params for i in range(num_ema)},
                    num_skipped=jnp.int32(0), first_nonfinite_step=jnp.int32(-1))


def init_params(model, rng):
  """Fresh (boxed) parameters of `model`."""
  return model.init({"params": rng}, *models.dummy_inputs(model, 1), train=False,
                    **models.init_kwargs(model, 1))["params"]


def abstract_params(model):
  """Boxed abstract parameters (with logical axis names): nothing allocated."""
  return models.abstract_variables(model)["params"]


def merge_params(fresh, loaded):
  """`fresh` with every array that `loaded` has replaced by `loaded`'s (same paths)."""
  flat = traverse_util.flatten_dict(fresh)
  flat.update(traverse_util.flatten_dict(loaded))
  return traverse_util.unflatten_dict(flat)


def sharded_abstract_params(model, mesh):
  """Abstract (unboxed) parameters of `model` carrying the shardings of the models' rules."""
  boxed = abstract_params(model)
  return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                      partitioning.unbox(boxed), partitioning.param_shardings(boxed, mesh))


@dataclasses.dataclass
class StateLayout:
  """The abstract train state and the shardings of every part of it."""
  abstract: TrainState  # ShapeDtypeStructs carrying their shardings
  shardings: TrainState
  param_shardings: Any


def state_layout(model, tx, mesh, num_ema: int) -> StateLayout:
  boxed = abstract_params(model)
  param_shardings = partitioning.param_shardings(boxed, mesh)
  params = partitioning.unbox(boxed)
  abstract = jax.eval_shape(
      lambda p: create_state(p, tx, jax.random.PRNGKey(0), num_ema), params)
  rep = sharding_lib.replicated(mesh)
  shardings = TrainState(
      step=rep, rng=rep, params=param_shardings,
      opt_state=sharding_lib.optimizer_state_shardings(tx, abstract.opt_state,
                                                       param_shardings, mesh),
      ema={k: param_shardings for k in abstract.ema}, num_skipped=rep, first_nonfinite_step=rep)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return StateLayout(abstract=abstract, shardings=shardings, param_shardings=param_shardings)


# --- the loss and the update -------------------------------------------------------------------


def segment_grid_fn(config, schedule):
  """`grid_fn(n_teacher, key, batch) -> (grid, step-count index per example or None)`.

  The boundaries are static: computed here, once, outside the traced step.
  """
  lc = config.loss
  if lc.anystep_counts:
    counts = tuple(lc.anystep_counts)
    bounds = [config_build.segment_boundaries(config, schedule, s) for s in counts]
    probs = tuple(float(p) for p in lc.anystep_probs)

    def anystep(n_teacher, key, batch):
      if probs:  # each count's share of the batch (a larger one-step share, say)
        choice = jax.random.categorical(key, jnp.log(jnp.asarray(probs)), shape=(batch,))
        choice = choice.astype(jnp.int32)
      else:  # equal shares, drawn as before
        choice = jax.random.randint(key, (batch,), 0, len(counts), jnp.int32)
      return losses.make_anystep_grid(n_teacher, counts, bounds, choice), choice

    return anystep
  bounds = (None if lc.boundaries == "uniform"
            else config_build.segment_boundaries(config, schedule, lc.student_steps))
  return lambda n_teacher, key, batch: (losses.make_grid(n_teacher, lc.student_steps, bounds),
                                        None)


def make_loss_fn(plan: plan_lib.RunPlan, model, schedule, teacher_model=None,
                 teacher_fn_factory=None):
  """`loss_fn(params, teacher_params, batch, step, rng) -> (loss, metrics)` of the plan's
  objective.

  The teacher is `teacher_model` with `teacher_params`, or, when given,
  `teacher_fn_factory(teacher_params, labels) -> teacher_fn` (the toy experiment's exact
  denoiser).
  """
  config, objective = plan.config, plan.objective
  lc = config.loss
  grid_fn = segment_grid_fn(config, schedule) if objective.is_mcm else None
  data_key = plan.data_key
  w_range = plan.guidance_range

  def loss_fn(params, teacher_params, batch, step, rng):
    x = batch[data_key]
    if latents.STD in batch:  # VAE latents: a fresh draw from each example's posterior
      x = x + batch[latents.STD] * jax.random.normal(jax.random.fold_in(rng, _LATENT_STREAM),
                                                     x.shape, x.dtype)
    # Class labels, or a text model's embeddings and mask (models/conditioning.py).
    labels = conditioning.from_batch(model, batch)
    k_eps, k_time, k_drop, k_label = jax.random.split(rng, 4)
    eps = jax.random.normal(k_eps, x.shape, x.dtype)
    metrics = {}
    if objective is plan_lib.Objective.DIFFUSION:
      labels = conditioning.drop(k_label, model, labels, lc.label_dropout)
      t = losses.sample_diffusion_times(k_time, x.shape[0])
      student = lambda z, t: denoiser.apply_x(model, params, z, t, schedule, labels, k_drop)
      per_example = losses.diffusion_loss(student, x, eps, t, schedule, lc.prediction,
                                          lc.diffusion_weighting)
    elif objective is plan_lib.Objective.PD:
      per_example, metrics = _pd_loss(config, model, schedule, params, teacher_model,
                                      teacher_params, teacher_fn_factory, x, labels, eps,
                                      k_time, k_drop)
    else:
      n_teacher = losses.teacher_steps(step, lc.teacher_steps_start, lc.teacher_steps_end,
                                       lc.anneal_steps)
      k_time, k_count = jax.random.split(k_time)
      grid, count_index = grid_fn(n_teacher, k_count, x.shape[0])
      segment, n_rel = losses.sample_segments(k_time, x.shape[0], grid)
      w = None
      if w_range is not None:
        # One w per example, from its own stream: runs without a range draw
        # exactly as before. The student is told the w its teacher is guided at.
        w = jax.random.uniform(jax.random.fold_in(rng, _GUIDANCE_STREAM), (x.shape[0],),
                               minval=w_range[0], maxval=w_range[1])
      teacher_fn = None
      if objective.needs_teacher:
        teacher_fn = _teacher_fn(config, schedule, teacher_model, teacher_params,
                                 teacher_fn_factory, labels, w)
      # Any-step students are told their segment layout; both student calls share it.
      t_step = losses.segment_times(segment, n_rel, grid)[0]
      seg_input = denoiser.segment_input(model, schedule, t_step, count_index)
      student = lambda z, t, r: denoiser.apply_x(model, params, z, t, schedule, labels, r,
                                                 segment=seg_input, guidance=w)
      per_example, aux = losses.mcm_loss(
          student, x, eps, segment, n_rel, k_drop, schedule=schedule, mode=objective.value,
          grid=grid, teacher_fn=teacher_fn,
          eta=lc.eta, teacher_solver=lc.teacher_solver, huber_epsilon=lc.huber_epsilon,
          huber_reduction=lc.huber_reduction, weighting=lc.weighting,
          direct_x_var=lc.direct_x_var)
      # Loss per segment; for any-step runs, per step count instead.
      groups, num_groups, name = aux["segment"], lc.student_steps, "loss_per_segment"
      if lc.anystep_counts:
        groups, num_groups, name = count_index, len(lc.anystep_counts), "loss_per_step_count"
      metrics[name] = _group_mean(per_example, groups, num_groups)
      metrics["teacher_steps"] = n_teacher
    loss = jnp.mean(per_example)
    metrics["loss"] = loss
    return loss, metrics

  return loss_fn


def _pd_loss(config, model, schedule, params, teacher_model, teacher_params, teacher_fn_factory,
             x, labels, eps, k_time, k_drop):
  """Progressive Distillation's per-example loss and metrics (diffusion/losses.py)."""
  lc = config.loss
  n = int(lc.student_steps)
  teacher_fn = _teacher_fn(config, schedule, teacher_model, teacher_params, teacher_fn_factory,
                           labels)
  i = losses.sample_pd_steps(k_time, x.shape[0], n)
  student = lambda z, t, r: denoiser.apply_x(model, params, z, t, schedule, labels, r)
  per_example, _ = losses.pd_loss(
      student, x, eps, i, k_drop, schedule=schedule, student_steps=n, teacher_fn=teacher_fn,
      teacher_solver=lc.teacher_solver, eta=lc.eta, midpoint_x_var=lc.pd_midpoint_x_var,
      weighting=lc.pd_weighting)
  metrics = {"teacher_steps": jnp.float32(2 * n)}
  if n <= 16:  # one scalar per student step: only for the few-step halvings
    metrics["loss_per_segment"] = _group_mean(per_example, i, n)
  return per_example, metrics


def _teacher_fn(config, schedule, teacher_model, teacher_params, teacher_fn_factory, labels,
                guidance=None):
  """The teacher as the losses call it: `teacher_fn_factory(teacher_params, labels)` when
  given, else the teacher network with the config's guidance (or `guidance`, one w per
  example), returning `(x̂_guided, x̂_conditional)` (x_var uses the conditional output,
  §5.5)."""
  if teacher_fn_factory is not None:
    return teacher_fn_factory(teacher_params, labels)
  return denoiser.make_denoise_fn(
      teacher_model, teacher_params, schedule, labels,
      guidance_scale=config.loss.guidance_scale if guidance is None else guidance,
      return_conditional=True)


def _group_mean(per_example, groups, num_groups: int):
  """The mean of `per_example` over each of `num_groups` groups (0 for an empty group)."""
  total = jax.ops.segment_sum(per_example, groups, num_groups)
  count = jax.ops.segment_sum(jnp.ones_like(per_example), groups, num_groups)
  return total / jnp.maximum(count, 1.0)


def accumulated_grads(loss_fn, num_micro: int):
  """`grads(params, teacher_params, batch, step, rng) -> ((loss, metrics), grads)` of
  `loss_fn` over the whole batch, computed on `num_micro` micro-batches in a `lax.scan`
  (gradient accumulation: activations of one micro-batch at a time).

  Micro-batch j holds rows j, j + num_micro, ...: with the batch sharded in contiguous
  blocks over devices, each device keeps its own rows (the split is a local reshape), and
  each micro-batch spreads over every device. Loss, gradients and metrics are the means of
  the micro-batches' (equal sizes: the batch mean); micro-batch j draws its noise from
  `fold_in(rng, j)`. Per-group metrics (loss per segment) become means of group means.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_micro == 1:
    return grad_fn

  def grads(params, teacher_params, batch, step, rng):
    def split(a):
      return jnp.moveaxis(a.reshape((a.shape[0] // num_micro, num_micro) + a.shape[1:]), 1, 0)

    micro = jax.tree.map(split, batch)

    def body(total, inputs):
      j, part = inputs
      out = grad_fn(params, teacher_params, part, step, jax.random.fold_in(rng, j))
      return jax.tree.map(lambda a, b: (a + b / num_micro).astype(a.dtype), total, out), None

    first = jax.tree.map(lambda a: a[0], micro)
    shapes = jax.eval_shape(grad_fn, params, teacher_params, first, step, rng)
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(num_micro), micro))
    return total

  return grads


def make_train_step(config, loss_fn, tx, lr_schedule):
  """`train_step(state, batch, teacher_params) -> (state, metrics)`, pure and jit-able;
  with `config.grad_accum_steps` > 1 the gradient is accumulated over that many
  micro-batches (`accumulated_grads`)."""
  decays = tuple(config.ema_decays)
  grad_fn = accumulated_grads(loss_fn, int(config.grad_accum_steps))

  def train_step(state: TrainState, batch, teacher_params):
    rng = jax.random.fold_in(state.rng, state.step)  # a resumed run draws the same numbers
    (loss, metrics), grads = grad_fn(state.params, teacher_params, batch, state.step, rng)
    grad_norm = optax.global_norm(grads)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # A non-finite loss, gradient or updated parameter never reaches the state: the
    # update is skipped (counted), and with nonfinite='stop' the host stops at the next
    # log step or checkpoint, whichever comes first.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(new_params)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_params = keep(new_params, state.params)
    new_opt_state = keep(new_opt_state, state.opt_state)
    new_ema = optim.update_ema(state.ema, new_params, decays, state.step, config.ema_warmup)
    new_ema = keep(new_ema, state.ema)
    # Counted like the logs count steps: the update that would make state.step + 1.
    first_bad = jnp.where((state.first_nonfinite_step < 0) & ~finite, state.step + 1,
                          state.first_nonfinite_step)
    new_state = state.replace(
        step=state.step + 1, params=new_params, opt_state=new_opt_state, ema=new_ema,
        num_skipped=state.num_skipped + (~finite).astype(jnp.int32),
        first_nonfinite_step=first_bad)
    metrics.update(grad_norm=grad_norm, learning_rate=lr_schedule(state.step),
                   nonfinite=(~finite).astype(jnp.float32))
    return new_state, metrics

  return train_step


def _without_remat(module: nn.Module) -> nn.Module | None:
  """`module` with every submodule attribute that has `remat=True` (at any depth of its
  dataclass fields) cloned with `remat=False`; None if none has."""
  changes = {}
  for field in dataclasses.fields(module):
    value = getattr(module, field.name, None)
    if isinstance(value, nn.Module):
      plain = _without_remat(value)
      if plain is not None:
        changes[field.name] = plain
  if getattr(module, "remat", False) is True:
    changes["remat"] = False
  return module.clone(**changes) if changes else None


def all_finite(tree) -> jax.Array:
  """A boolean scalar: every element of every array in `tree` is finite."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


# --- the compiled step -------------------------------------------------------------------------


@dataclasses.dataclass
class StepBuilder:
  """Everything static about a run's train step, built from its plan alone.

  No data, no checkpoint and no parameter is touched, so the same object serves
  the trainer, the TPU compile report (compile for a topology this host does not
  have) and the benchmarks. `mesh` defaults to the config's mesh over `devices`.
  """
  plan: plan_lib.RunPlan
  devices: Any = None

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, devices=None) -> "StepBuilder":
    """The builder of a config's plan (config/plan.py)."""
    return cls(plan_lib.RunPlan.from_config(config), devices)

  @property
  def config(self):
    """The plan's hyperparameters (read-only, every default filled)."""
    return self.plan.config

  def __post_init__(self):
    plan, config = self.plan, self.plan.config
    self.mesh = sharding_lib.make_mesh(config.mesh, self.devices)
    self.model = plan.model
    self.teacher_model = plan.teacher_model
    self.schedule = plan.schedule
    self.tx, self.lr_schedule = optim.make_optimizer(config.optimizer, config.num_train_steps)
    self.layout = state_layout(self.model, self.tx, self.mesh, len(config.ema_decays))
    # One leading-axis sharding serves every key (images, vectors, labels).
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh, 1)
    self.data_key = plan.data_key
    self.abstract_batch = {
        self.data_key: jax.ShapeDtypeStruct(
            (config.batch_size,) + plan.example_shape, jnp.float32,
            sharding=self.batch_sharding),
        **conditioning.batch_specs(self.model, config.batch_size, self.batch_sharding)}
    if latents.latent_name(config.data.dataset) is not None:  # each posterior's std by its mean
      self.abstract_batch[latents.STD] = self.abstract_batch[self.data_key]
    self.teacher_abstract = (self.sharded_teacher_params()
                             if plan.objective.needs_teacher else None)
    teacher_shardings = (None if self.teacher_abstract is None
                         else jax.tree.map(lambda a: a.sharding, self.teacher_abstract))
    self._teacher_shardings = teacher_shardings
    self.step_fn = self._jit_step(self.model)

  def _jit_step(self, model):
    """The jitted train step of the plan with `model` as the network trained."""
    loss_fn = make_loss_fn(self.plan, model, self.schedule, self.teacher_model)
    return jax.jit(
        make_train_step(self.config, loss_fn, self.tx, self.lr_schedule),
        in_shardings=(self.layout.shardings, {k: self.batch_sharding
                                              for k in self.abstract_batch},
                      self._teacher_shardings),
        out_shardings=(self.layout.shardings, sharding_lib.replicated(self.mesh)),
        donate_argnums=(0,))

  def sharded_teacher_params(self):
    """Abstract teacher parameters carrying the shardings of the models' rules."""
    return sharded_abstract_params(self.teacher_model, self.mesh)

  @contextlib.contextmanager
  def _rules(self):
    """The mesh and the logical rules, so the models' batch-axis activation constraints
    take effect."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(partitioning.LOGICAL_AXIS_RULES):
      yield

  def trace(self):
    """The traced step (its jaxpr is what runtime/flops.py counts)."""
    with self._rules():
      return self.step_fn.trace(self.layout.abstract, self.abstract_batch,
                                self.teacher_abstract)

  def lower(self, traced=None):
    """The lowered step (of `traced`, a `trace()` result, to save tracing again)."""
    with self._rules():
      return (self.trace() if traced is None else traced).lower()

  def compile(self, traced=None):
    """The compiled step: `compiled(state, batch, teacher_params) -> (state, metrics)`."""
    return self.lower(traced).compile()

  def flops(self, traced=None) -> tuple[flops_lib.FlopCount, flops_lib.FlopCount]:
    """`(model FLOPs, hardware FLOPs)` of one step over all devices (runtime/flops.py).

    Model FLOPs are the step's maths, traced with `remat` off: the numerator of the MFU
    the trainer logs and the compile report prints. Hardware FLOPs are the step as
    configured, recomputed forwards included. They differ only under remat.
    """
    hardware = flops_lib.count_flops((self.trace() if traced is None else traced).jaxpr)
    if getattr(self.model, "remat", False):
      no_remat = ml_collections.ConfigDict(self.config.to_dict())
      no_remat.model.remat = False
      return (flops_lib.count_flops(
          StepBuilder.from_config(no_remat, self.devices).trace().jaxpr), hardware)
    # A module trained as its own student (teacher.student='teacher', teachers/module.py)
    # with a remat switch of its own (our ADM UNet and DiT): the same step with it off.
    plain = _without_remat(self.model)
    if plain is None:
      return hardware, hardware
    step_fn = self._jit_step(plain)
    with self._rules():
      traced = step_fn.trace(self.layout.abstract, self.abstract_batch, self.teacher_abstract)
    return flops_lib.count_flops(traced.jaxpr), hardware

