"""Defaults shared by every experiment config (configs/*.py), each key documented once,
and the experiment families the config files call.

An experiment file calls `base_config()` (or a family: `imagenet_config`, ...) and sets
what differs; the command line overrides any key with `--config.key=value`.
`with_defaults` fills the keys a config lacks (a run written before a key existed) from
here, once, where a run's plan is resolved.
"""
import math

import ml_collections

from multistep_cm.diffusion import losses

# The values of the keys whose implementations sit above the config in the layout (the
# optimiser in training/optim.py, the metrics in evaluation/sample_metrics.py), declared
# here so the checks can name them without importing what they configure.
OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "linear")
METRIC_KINDS = ("auto", "digits", "prompts", "energy", "fid", "fd_dinov2", "prdc", "folder",
                "none")
# What metric 'auto' is for each dataset: the folder metric for your own images
# (evaluation/folder_metric.py, needs nothing downloaded), FID for any other.
_AUTO_METRICS = {"digits": "digits", "captioned_digits": "prompts", "mixture": "energy"}


def auto_metric(dataset: str) -> str:
  """The metric `evals.metric='auto'` (and `evaluate --metric=auto`) picks for `dataset`."""
  if isinstance(dataset, str) and dataset.startswith("folder:"):
    return "folder"
  return _AUTO_METRICS.get(dataset, "fid")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # --- data (data/pipeline.py) ---
  c.data = ml_collections.ConfigDict()
  c.data.dataset = "digits"  # 'digits', 'mixture', 'imagenet2012', 'imagenet_resized/64x64', ...
  c.data.split = "train"
  c.data.image_size = 8
  c.data.num_channels = 1
  c.data.num_classes = 10  # 0: unconditional; else index num_classes is the null class
  c.data.text_dim = 0  # text-image data: width D of the stored text embeddings (0: none)
  c.data.text_len = 0  # text-image data: tokens L per caption, padded (0: none)
  c.data.partial_captions = 0.25  # captioned_digits: share of captions naming some properties
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data dir
  c.data.random_flip = False
  c.data.fast_decode = False  # TFDS JPEGs decoded at a reduced DCT scale (data/tfds_source.py)
  c.data.data_dim = 8  # mixture only
  c.data.mixture_size = 65536  # mixture only: points drawn once (fixed seed) for the source
  c.data.num_threads = 0  # decode workers (threads or processes); 0 = the pipeline's default
  c.data.prefetch = 2
  c.data.workers = "threads"  # Grain decodes in 'threads' or worker 'processes' (docs/data.md)

  c.batch_size = 128  # global, over all devices and hosts
  # Gradient accumulation: the batch's gradient as the mean over this many micro-batches,
  # one at a time (activation memory of batch_size / grad_accum_steps; training/step.py).
  c.grad_accum_steps = 1
  c.num_train_steps = 2000

  # --- model (models/presets.py): a preset plus any attribute overrides ---
  c.model = ml_collections.ConfigDict()
  c.model.preset = "digits8"
  c.model.segment_cond = "none"  # any-step students: 'steps' or 'segment_start' (set_anystep)
  c.model.num_step_values = 0
  c.model.guidance_cond = False  # students told the guidance w (with loss.guidance_range)

  # --- noise schedule (diffusion/schedules.py) ---
  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "cosine"
  c.schedule.kwargs = ml_collections.ConfigDict()

  # --- objective (diffusion/losses.py) ---
  c.loss = ml_collections.ConfigDict()
  c.loss.mode = "diffusion"  # 'diffusion', 'ct', 'cd', 'direct', 'pd'
  c.loss.label_dropout = 0.1  # diffusion: labels (or text) replaced by the null one (guidance)
  # What the network predicts: 'v' on logSNR (ours, §1.3), or 'velocity', a flow-matching
  # network called at (z_fm, t_fm) and trained on ||u - û||^2 (§17.5; with schedule
  # 'flow_matching' a diffusion run trains a rectified-flow teacher).
  c.loss.prediction = "v"
  # The diffusion loss's weighting of the squared x-error: 'snr_plus_one' (the v-loss) or
  # 'snr' (the eps-loss of DDPM and DiT, for an eps-predicting module trained here).
  c.loss.diffusion_weighting = "snr_plus_one"
  c.loss.student_steps = 8  # S
  c.loss.teacher_steps_start = 64  # N_teacher anneal (§3.2): 64 -> 1280 over anneal_steps
  c.loss.teacher_steps_end = 1280
  c.loss.anneal_steps = 100_000  # 0: fixed N = teacher_steps_end
  c.loss.eta = 0.75  # xvar_frac of the aDDIM teacher step (§5.5)
  c.loss.teacher_solver = "addim"  # or 'ddim'
  c.loss.guidance_scale = 0.0  # classifier-free guidance of the CD teacher
  # (w_min, w_max): each example's teacher is guided at w ~ U[w_min, w_max] and the student
  # (model.guidance_cond) is told w, so one student samples at any w in the range (guidance
  # as an input); empty: off (the fixed guidance_scale). Sampling without --guidance uses w_min.
  c.loss.guidance_range = ()
  c.loss.huber_epsilon = 1e-4
  c.loss.huber_reduction = "mean"  # 'mean', 'sum', 'elementwise'
  c.loss.weighting = "snr_plus_one"  # or 'v_space' (docs/design.md#losses: why the default)
  c.loss.direct_x_var = "analytic"  # Direct CM with aDDIM: 'analytic' or 'data'
  # Progressive Distillation (mode 'pd'; the reasons: docs/maths.md §14.3): the
  # student's N is loss.student_steps, its teacher takes 2N steps (teacher_steps_* unused).
  c.loss.pd_midpoint_x_var = "data"  # the second aDDIM step's x_var: 'first_step', 'analytic'
  c.loss.pd_weighting = "snr_trunc"  # max(SNR, 1) on the squared x-error, or 'snr_plus_one'
  # Segment boundaries (diffusion/segments.py): 'uniform' (the paper), 'logsnr', 'karras',
  # or S + 1 explicit times from 0 to 1.
  c.loss.boundaries = "uniform"
  # Any-step training: one model for several step counts, S drawn per example from this
  # tuple (empty: the single student_steps). Needs model.segment_cond (set_anystep).
  c.loss.anystep_counts = ()
  # The share of the batch each of those counts draws, in their order (empty: equal
  # shares). For (1, 2, 4, 8), (0.7, 0.1, 0.1, 0.1) is the measured choice: docs/results.md, "Why
  # S = 1 fell behind".
  c.loss.anystep_probs = ()

  # --- teacher and initialisation (checkpoints of a diffusion run) ---
  c.teacher_checkpoint = ""  # workdir or checkpoint dir of the diffusion teacher (cd, direct)
  c.teacher_weights = "ema0"  # 'params' or an EMA name
  c.init_from = ""  # student initialisation (the paper starts from the teacher's weights)
  c.init_weights = "ema0"
  # What the teacher is (multistep_cm/teachers, docs/teachers.md). 'run': teacher_checkpoint
  # is a diffusion run of this framework. 'module': a Flax module of your own, called as
  # module(z, time, labels), in the frame below, its weights in teacher_checkpoint (.npz,
  # .safetensors or an orbax directory of the parameters).
  c.teacher = ml_collections.ConfigDict()
  c.teacher.kind = "run"
  c.teacher.module = ""  # 'package.module:name' or 'path/to/file.py:name' (kind 'module')
  c.teacher.frame = "vp"  # 'vp' (z = alpha x + sigma eps), 've' (EDM), 'flow'
  c.teacher.prediction = "v"  # 'x', 'eps', 'v' (vp) or 'velocity' (flow)
  c.teacher.time_scale = 1.0  # multiplies the time passed (DiT 999, SD3/Flux 1000)
  c.teacher.flow_time = ""  # flow only: 'data_at_0' (SD3, Flux, Wan) or 'noise_at_0' (SiT)
  c.teacher.schedule = ""  # vp only: its own schedule when its time is not logSNR
  c.teacher.schedule_kwargs = ml_collections.ConfigDict()
  # The student's network: 'model' (config.model) or 'teacher' (the teacher's own module,
  # starting from its weights, so it starts as the teacher).
  c.teacher.student = "model"

  # --- optimiser (training/optim.py) ---
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.schedule = "constant"  # 'constant', 'cosine', 'linear'
  c.optimizer.end_lr_fraction = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.99
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip_norm = 1.0
  c.ema_decays = (0.999,)
  c.ema_warmup = True
  c.nonfinite = "skip"  # non-finite loss or gradient: 'skip' the update, or 'stop' the run

  # --- mesh (runtime/sharding.py): data x fsdp = all devices; -1 = the rest ---
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1

  # --- logging, checkpoints, samples ---
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.checkpoint_keep = 3
  c.checkpoint_keep_period = 0  # also keep every k-th step's checkpoint (0: none)
  c.async_checkpoints = True
  c.sample_every_steps = 1000  # sample grids to TensorBoard (0: off)
  c.sample_num = 64
  c.sample_steps = 64  # diffusion models: sampler steps (MCM: student_steps)
  c.sample_sampler = "addim"
  c.profile_steps = 0  # > 0: profile this many steps after the first log step
  # Debug: append each step's example ids to <workdir>/example_ids.<process>.txt
  # (data/pipeline.py: ExampleIdLog), to check a resumed run on the data itself.
  c.record_example_ids = False
  # In-training evaluation (evaluation/in_training.py); every_steps = 0 turns it off.
  c.evals = ml_collections.ConfigDict()
  c.evals.every_steps = 0
  c.evals.num_samples = 1000
  c.evals.batch_size = 500
  c.evals.sample_steps = 0  # diffusion runs: the evaluation sampler's steps (0: sample_steps)
  # 'digits', 'energy', 'folder', 'fid', 'fd_dinov2', 'prdc' (precision/recall in DINOv2's
  # features), 'none'; auto picks by dataset (docs/sampling_and_evaluation.md)
  c.evals.metric = "auto"
  c.evals.ode_error = True  # students with a teacher: distance to the teacher's ODE solve
  c.evals.ode_steps = 256
  c.evals.inception_weights = ""  # FID: converted Inception weights (docs: FID and IS)
  c.evals.reference_stats = ""  # FID, FD-DINOv2, PRDC: reference statistics .npz
  c.evals.dinov2_weights = ""  # FD-DINOv2, PRDC: converted DINOv2 weights (convert_dinov2)
  return c


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with every key of config/base.py it lacks set to its default.

  Keys the config has are kept as they are (also ones the defaults do not know, which
  config/checks.py refuses by name). A staged root config keeps its stages as written:
  each stage is resolved when it runs. The copy holds values (a field reference is
  replaced by its value, a list by a tuple), so a run resolved from its config file and
  from its `config.json` compare equal.
  """
  out = ml_collections.ConfigDict(config.to_dict(preserve_field_references=True))
  if "stages" in out:
    return out

  def fill(target, defaults):
    for key, value in defaults.items():
      if key not in target:
        target[key] = value
      elif isinstance(value, ml_collections.ConfigDict) and isinstance(
          target[key], ml_collections.ConfigDict):
        fill(target[key], value)

  with out.unlocked():
    fill(out, base_config())
  return ml_collections.ConfigDict(_as_tuples(out.to_dict()))


def _as_tuples(tree):
  """Lists (as `config.json` gives them back) as the tuples the config files write."""
  if isinstance(tree, dict):
    return {k: _as_tuples(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return tuple(_as_tuples(v) for v in tree)
  return tree


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a config argument `"key=value,key2=value2"` into the typed `defaults`.

  `get_config("steps=4,size=large")` style variants (big_vision's convention); an
  unknown key or a value of the wrong type raises ValueError naming it.
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    if not item:
      continue
    key, sep, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; allowed: {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      if sep and value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key!r} takes true/false, got {value!r}")
      out[key] = (not sep) or value.lower() in ("true", "1")
    elif isinstance(default, (int, float)):
      try:
        out[key] = type(default)(value)
      except ValueError:
        raise ValueError(f"config argument {key!r} takes a {type(default).__name__}, "
                         f"got {value!r}") from None
    else:
      out[key] = value
  return out


def imagenet_config(resolution: int, mode: str, size: str = "small", student_steps: int = 8,
                    teacher: str = "", guidance: float = 0.0) -> ml_collections.ConfigDict:
  """The paper's ImageNet settings (§7.1, §1.2, §3.2, §5.5); our choices are marked.

  Args:
    resolution: 64 or 128.
    mode: 'diffusion' (the teacher) or 'ct' / 'cd' / 'direct' (students).
    size: 'small' or 'large' (the UViT presets of §7.2).
    student_steps: S (1, 2, 4, 8 or 16 in the paper).
    teacher: the diffusion run (workdir or checkpoint) the student starts from and,
      for cd/direct, distils.
    guidance: classifier-free guidance of the CD teacher (the paper used guidance for
      small IN128 only, scale not stated; 0 = none).
  """
  if resolution not in (64, 128) or size not in ("small", "large"):
    raise ValueError(f"imagenet config: resolution 64|128 and size small|large, got "
                     f"{resolution}, {size!r}")
  c = base_config()
  c.data.dataset = "imagenet2012"
  c.data.image_size = resolution
  c.data.num_channels = 3
  c.data.num_classes = 1000
  c.data.random_flip = True
  _pod_run(c, f"imagenet{resolution}_{size}", resolution, mode)
  c.checkpoint_every_steps = 2000
  c.checkpoint_keep = 3
  c.checkpoint_keep_period = 50_000
  c.sample_every_steps = 10_000
  c.sample_num = 64
  c.sample_steps = 512  # the paper's diffusion baseline: 512-step aDDIM (Table 1)
  if mode == "diffusion":
    # Base diffusion training hyperparameters are NOT FOUND (§7.1); simple-diffusion-like
    # choices. The paper's IN128 teacher also used a 2x2-pooled multiscale loss, not
    # implemented here.
    c.num_train_steps = 500_000
    c.optimizer.learning_rate = 1e-4
    c.loss.label_dropout = 0.1
  else:
    _imagenet_student(c, student_steps, guidance)
    _start_from(c, teacher)
  return c


def _imagenet_student(c: ml_collections.ConfigDict, student_steps: int, guidance: float):
  """The paper's ImageNet student settings (§7.1, §3.2, §5.5, §3.6)."""
  c.num_train_steps = 200_000  # §7.1
  c.loss.student_steps = student_steps
  c.loss.teacher_steps_start, c.loss.teacher_steps_end = 64, 1280  # §3.2
  c.loss.anneal_steps = 100_000
  c.loss.eta = 0.75  # §5.5
  c.loss.huber_epsilon = 1e-4  # §3.6
  c.loss.guidance_scale = guidance
  c.optimizer.learning_rate = 5e-5  # NOT FOUND: our choice for fine-tuning


# The converted ImageNet-256 latent teachers (docs/teachers.md): their module and frame keys,
# and the schedule the student trains and samples on (the teacher's own, §17.3).
LATENT_TEACHERS = {
    "dit": ({"module": "multistep_cm.models.dit:dit_xl_2_bf16_remat", "frame": "vp",
             "prediction": "eps", "schedule": "ddpm_linear", "time_scale": 999.0},
            "ddpm_linear"),
    "sit": ({"module": "multistep_cm.models.dit:sit_xl_2_bf16_remat", "frame": "flow",
             "prediction": "velocity", "flow_time": "noise_at_0"}, "flow_matching"),
}


def imagenet256_latent_cd_config(arch: str, student_steps: int = 4, teacher: str = "",
                                 guidance: float = 0.5,
                                 data: str = "imagenet256_sd") -> ml_collections.ConfigDict:
  """MCM-CD of a converted DiT-XL/2 or SiT-XL/2 on ImageNet-256 SD-VAE latents
  (`latent:<data>`, 32x32x4; docs/data.md). The paper's ImageNet CD settings where they
  carry over (§7.1, §3.2, §5.5: batch 2048, 200k steps, teacher steps 64 -> 1280 over 100k,
  eta 0.75, pseudo-Huber 1e-4); the student is the teacher's module, starting from its
  weights (§7.1). Our choices: the teacher's schedule, guidance w = 0.5 (DiT's and SiT's
  FID-50k setting, cfg scale 1.5 = 1 + w), bfloat16 with remat, FSDP over every chip."""
  if arch not in LATENT_TEACHERS:
    raise ValueError(f"imagenet256 latent CD: arch must be one of {sorted(LATENT_TEACHERS)}, "
                     f"got {arch!r}")
  keys, schedule = LATENT_TEACHERS[arch]
  c = base_config()
  c.data.dataset = f"latent:{data}"
  c.data.image_size, c.data.num_channels, c.data.num_classes = 32, 4, 1000
  c.data.random_flip = False  # refused for latents (data/latents.py)
  c.data.prefetch = 4
  c.batch_size = 2048  # §7.1
  c.mesh.data, c.mesh.fsdp = 1, -1
  c.loss.mode = "cd"
  _imagenet_student(c, student_steps, guidance)
  c.optimizer.warmup_steps = 1000  # NOT FOUND: our choice
  c.ema_decays = (0.9999,)  # NOT FOUND: our choice
  c.ema_warmup = False
  c.teacher_checkpoint = teacher
  c.teacher.update(dict(kind="module", student="teacher", **keys))
  c.schedule.name = schedule
  c.schedule.kwargs = ml_collections.ConfigDict()
  c.checkpoint_every_steps = 2000
  c.checkpoint_keep = 3
  c.checkpoint_keep_period = 50_000
  c.sample_every_steps = 10_000
  c.sample_num = 64
  c.log_every_steps = 100
  return c


_SAVE_DENSE = "dense_and_conv_saveable"
# The remat policy of each pod preset (models/layers.py: `remat_policies`), chosen with the
# compile report (docs/performance.md, "Remat policies"): the ImageNet steps recompute 0.5-3.5% of
# their FLOPs instead of 11-14% with `nothing_saveable`. The small IN128 model recomputes
# its 32 x 32 transformer level (one policy per level, then the mid stack): saving its
# dense outputs too leaves only 16% of the HBM free. The 512-px T2I model keeps
# `nothing_saveable`, the only policy measured to fit it (with 8 micro-batches).
REMAT_POLICY = {
    "imagenet64_small": _SAVE_DENSE,
    "imagenet64_large": _SAVE_DENSE,
    "imagenet128_small": ",".join([_SAVE_DENSE, _SAVE_DENSE, "nothing_saveable", _SAVE_DENSE]),
    "imagenet128_large": _SAVE_DENSE,
    "t2i_512": "nothing_saveable",
}


def _pod_run(c: ml_collections.ConfigDict, preset: str, resolution: int, mode: str):
  """What the paper's ImageNet and T2I runs share (§1.2, §7.1): batch 2048, the
  interpolated cosine schedule from noise resolution 32 to `resolution`, and our TPU
  settings (bf16, remat, FSDP over every chip); our choices are marked."""
  c.data.prefetch = 4
  c.batch_size = 2048  # all runs, §7.1
  c.model.preset = preset
  c.model.dtype = "bfloat16"
  # Activation memory per chip (docs/performance.md, the TPU compile report): without
  # remat the small IN64 CT step needs 16.7 GiB of temporaries on a v5e-64 chip (XLA
  # refuses it). Each
  # preset's policy is the measured one that recomputes least while leaving 20% of a v5e
  # chip's HBM free at the paper's slice (docs/performance.md, "Remat policies"). The mid stack is
  # scanned (compile time flat in depth).
  c.model.remat = True
  c.model.remat_policy = REMAT_POLICY[preset]
  c.model.scan_blocks = True
  # Interpolated cosine from noise resolution 32 to the image resolution (§1.2, App. A.1).
  c.schedule.name = "interpolated_cosine"
  c.schedule.kwargs = ml_collections.ConfigDict(
      {"image_d": resolution, "noise_d_low": 32, "noise_d_high": resolution})
  c.loss.mode = mode
  c.mesh.data, c.mesh.fsdp = 1, -1  # FSDP over every chip (docs/performance.md, the compile report)
  c.ema_decays = (0.9999,)  # NOT FOUND in the paper: our choice
  c.ema_warmup = False
  c.optimizer.warmup_steps = 1000  # NOT FOUND: our choice
  c.log_every_steps = 100


def t2i_config(mode: str, student_steps: int = 8, teacher: str = "",
               guidance: float = 0.5) -> ml_collections.ConfigDict:
  """The paper's 512x512 text-to-image settings (§7.1-7.3, App. A.1/A.2); our
  choices are marked.

  Args:
    mode: 'diffusion' (the teacher) or 'cd' (the paper distils T2I with CD only, §7.1).
    student_steps: S (4, 8 or 16 in Table 6).
    teacher: the diffusion run (workdir or checkpoint) the student starts from and distils.
    guidance: classifier-free guidance w of the CD teacher, x̂_c + w (x̂_c - x̂_u). Table 6
      distils teachers at g = 0.5 and g = 3; the paper does not define its g (§7.1:
      guidance formulation NOT FOUND): our default 0.5, the low-guidance rows, read as
      Ho & Salimans' w.
  """
  if mode not in ("diffusion", "cd"):
    raise ValueError(f"t2i config: mode 'diffusion' or 'cd' (the paper distils T2I with CD "
                     f"only, §7.1), got {mode!r}")
  c = base_config()
  # A text-image dataset the user prepares (docs/data.md, text-image data); the paper's is
  # private (§7.1). Override with --config.data.dataset=tfds:text_images/<name>.
  c.data.dataset = "tfds:text_images/YOUR_DATASET"
  c.data.image_size = 512
  c.data.num_channels = 3
  c.data.num_classes = 0
  # The encoder is NOT FOUND (§7.1): T5-XXL's width 4096 at 128 tokens is our choice
  # (Imagen's encoder, §15.1), as in the t2i_512 preset.
  c.data.text_dim, c.data.text_len = 4096, 128
  c.data.random_flip = False  # our choice: captions may name left and right
  # The 32 -> 512 interpolated cosine (§1.2, App. A.1), FSDP over the 256 chips (§7.3).
  # Measured (docs/performance.md, the TPU compile report): at 8 images of 512^2 per v5e chip this
  # step needs 34.5 GiB of temporaries even with every block rematerialised; as 8
  # accumulated micro-batches of one image per chip the CD step fits (10.9 GiB of 16).
  # The paper does not say how it fit (our choice; §7.2 may have patched the input).
  _pod_run(c, "t2i_512", 512, mode)
  c.grad_accum_steps = 8
  c.checkpoint_every_steps = 1000
  c.checkpoint_keep = 3
  c.checkpoint_keep_period = 10_000
  c.sample_every_steps = 5000
  c.sample_num = 16
  c.sample_steps = 256  # Table 6's teacher rows: 256 steps
  if mode == "diffusion":
    # The T2I teacher's training is NOT FOUND (§7.1): steps, learning rate and
    # conditioning dropout are our choices. The paper's teacher also used a multiscale
    # loss (App. A.1), not implemented here.
    c.num_train_steps = 500_000
    c.optimizer.learning_rate = 1e-4
    c.loss.label_dropout = 0.1  # text replaced by the null (no tokens) for guidance
  else:
    c.num_train_steps = 30_000  # §7.1
    c.loss.student_steps = student_steps
    # Teacher steps fixed at 256, no anneal (§3.2, App. A.1).
    c.loss.teacher_steps_start = c.loss.teacher_steps_end = 256
    c.loss.anneal_steps = 0
    c.loss.eta = 0.75  # on the conditional output, never the guided one (§5.5)
    c.loss.huber_epsilon = 1.0  # §3.6: about mean(a^2)/2 per example
    c.loss.guidance_scale = guidance
    c.optimizer.learning_rate = 5e-5  # NOT FOUND: our choice for fine-tuning
    _start_from(c, teacher)
  return c


def digits_config(mode: str, student_steps: int = 4, image_size: int = 8,
                  teacher: str = "") -> ml_collections.ConfigDict:
  """The embedded digits (8x8 or 16x16, 10 classes): runs on a CPU in minutes."""
  c = base_config()
  c.data.dataset = "digits"
  c.data.image_size = image_size
  c.data.num_channels = 1
  c.data.num_classes = 10
  c.model.preset = f"digits{image_size}"
  c.batch_size = 128
  c.schedule.name = "cosine"
  c.loss.mode = mode
  c.ema_decays = (0.999,)
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.sample_every_steps = 1000
  c.sample_num = 100
  c.sample_steps = 64
  if mode == "diffusion":
    c.num_train_steps = 6000
    c.optimizer.learning_rate = 1e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.end_lr_fraction = 0.05
  else:
    c.num_train_steps = 3000
    c.loss.student_steps = student_steps
    # The paper's anneal shape (64 -> 1280 over half the run, §3.2) on a short run.
    c.loss.teacher_steps_start, c.loss.teacher_steps_end = 64, 1280
    c.loss.anneal_steps = c.num_train_steps // 2
    c.optimizer.learning_rate = 3e-4
    c.optimizer.schedule = "cosine"
    c.optimizer.end_lr_fraction = 0.05
    _start_from(c, teacher)
  return c


def captioned_digits_config(mode: str, student_steps: int = 4, guidance: float = 0.0,
                            teacher: str = "") -> ml_collections.ConfigDict:
  """The embedded text-to-image demo: the 8x8 digits with generated captions ("a thick
  slanted seven", data/captions.py) encoded by the fixed text encoder the project ships
  (64 wide, 8 tokens), and the text-conditioned `digits8_text` UViT. As digits_config
  otherwise; CD students distil the teacher guided at `guidance` (x_var from the
  conditional output, §5.5)."""
  c = digits_config(mode, student_steps, 8, teacher)
  c.data.dataset = "captioned_digits"
  c.data.num_classes = 0
  c.data.text_dim, c.data.text_len = 64, 8  # captions.TEXT_DIM, captions.TEXT_LEN
  c.model.preset = "digits8_text"
  c.evals.metric = "prompts"
  if mode != "diffusion":
    c.loss.guidance_scale = guidance
  return c


def mixture_config(mode: str, student_steps: int = 8, teacher: str = "",
                   data_dim: int = 8) -> ml_collections.ConfigDict:
  """The toy Gaussian mixture (data/mixture.py) through the main trainer, with an MLP."""
  c = base_config()
  c.data.dataset = "mixture"
  c.data.data_dim = data_dim
  c.data.num_classes = 0
  c.data.image_size = 0
  c.model.preset = "mlp_toy"
  c.model.width = 128
  c.model.depth = 3
  c.batch_size = 256
  c.schedule.name = "cosine"
  c.loss.mode = mode
  c.sample_every_steps = 0
  c.log_every_steps = 200
  c.checkpoint_every_steps = 1000
  c.optimizer.schedule = "cosine"
  c.optimizer.end_lr_fraction = 0.05
  if mode == "diffusion":
    c.num_train_steps = 4000
    c.optimizer.learning_rate = 1e-3
  else:
    c.num_train_steps = 3000
    c.loss.student_steps = student_steps
    c.loss.anneal_steps = c.num_train_steps // 2
    c.optimizer.learning_rate = 3e-4
    _start_from(c, teacher)
  return c


# The UViT preset a prepared image folder of each size trains with (`folder_config`).
FOLDER_PRESETS = {8: "digits8", 16: "digits16", 32: "small32", 64: "imagenet64_small",
                  128: "imagenet128_small"}


def folder_config(mode: str, name: str, data_dir: str | None = None, student_steps: int = 4,
                  teacher: str = "") -> ml_collections.ConfigDict:
  """Your own images, prepared once with `python -m multistep_cm.data.prepare --images=...
  --name=NAME` (data/image_folder.py, docs/data.md#your-own-images).

  The image size, channels and number of classes are the prepared dataset's (its record),
  the UViT preset the one for its size (`FOLDER_PRESETS`); the training settings are the
  digits' (`digits_config`), a start to tune from.

  Raises:
    ValueError: the dataset is not prepared in `data_dir` (with the command that prepares
      it), or has a size no preset is made for (then name `model.preset` yourself).
  """
  from multistep_cm.data import image_folder  # pylint: disable=g-import-not-at-top
  from multistep_cm.data import sources  # pylint: disable=g-import-not-at-top
  try:
    record = image_folder.read_record(name, data_dir or None)
  except sources.DatasetError as e:
    raise ValueError(" ".join(str(e).split())) from None
  size = int(record["image_size"])
  if size not in FOLDER_PRESETS:
    raise ValueError(f"image folder {name!r} holds {size}x{size} images; the presets are made "
                     f"for {sorted(FOLDER_PRESETS)} px: prepare it again with --image_size "
                     f"one of them, or set --config.model.preset")
  c = digits_config(mode, student_steps, 8, teacher)
  c.data.dataset = f"folder:{name}"
  c.data.data_dir = data_dir or None
  c.data.image_size = size
  c.data.num_channels = int(record["channels"])
  c.data.num_classes = int(record["num_classes"])
  c.model.preset = FOLDER_PRESETS[size]
  return c


def _start_from(c: ml_collections.ConfigDict, teacher: str):
  """A student starts from the diffusion run `teacher` (§7.1) and, in the modes that call
  a teacher network, distils it."""
  c.init_from = teacher
  c.teacher_checkpoint = teacher if c.loss.mode in losses.TEACHER_MODES else ""


def set_anystep(config: ml_collections.ConfigDict, counts, segment_cond: str = "segment_start",
                probs=()):
  """Makes `config` an any-step run over `counts`, the model told its segment layout by
  `segment_cond` ('steps': which step count; 'segment_start': the segment start's logSNR).
  `probs`, one per count in the same order, are the counts' shares of the batch (empty:
  equal)."""
  counts, probs = tuple(counts), tuple(probs)
  if probs and len(probs) != len(counts):
    raise ValueError(f"set_anystep: one probability per count {counts}, got {probs}")
  pairs = sorted(zip((int(s) for s in counts), probs or [None] * len(counts)))
  counts = tuple(s for s, _ in pairs)
  config.loss.anystep_counts = counts
  config.loss.anystep_probs = tuple(float(p) for _, p in pairs) if probs else ()
  config.loss.student_steps = max(counts)
  config.model.segment_cond = segment_cond
  config.model.num_step_values = len(counts)
  return config


def pd_stages(make_stage, start_steps: int, end_steps: int, teacher: str,
              steps_per_halving: int) -> ml_collections.ConfigDict:
  """Progressive Distillation as a staged run: halvings N = start/2, start/4, ..., end.

  Stage `pd<N>` trains an N-step student against the 2N-step teacher before it: the
  diffusion run `teacher` for the first halving (which also initialises it: the
  official code starts from the teacher's EMA weights), then the previous stage, whose
  weights also initialise it. The official outer loop (§14.2): the
  optimizer reset per halving (a fresh stage), the learning rate annealed linearly to 0
  over each halving, no warm-up, no EMA (decay 0, so 'ema0' is the parameters).

  Args:
    make_stage: `make_stage(N, teacher) -> config` of one PD student (mode 'pd').
    start_steps: the diffusion teacher's step count in the first halving (a power-of-two
      multiple of `end_steps`, at least 2 * end_steps).
    end_steps: the last student's N.
    teacher: the diffusion run (workdir, checkpoint or 'stage:<name>').
    steps_per_halving: training steps of every halving.
  """
  halvings = math.log2(start_steps / end_steps) if start_steps > 0 and end_steps > 0 else 0
  if halvings < 1 or halvings != int(halvings):
    raise ValueError(f"progressive distillation: start={start_steps} must be end={end_steps} "
                     f"times a power of two (at least 2)")
  c = ml_collections.ConfigDict()
  c.stages = ml_collections.ConfigDict()
  order = []
  n, previous = start_steps // 2, teacher
  while n >= end_steps:
    stage = pd_outer_loop(make_stage(n, previous), steps_per_halving)
    c.stages[f"pd{n}"] = stage
    order.append(f"pd{n}")
    n, previous = n // 2, f"stage:pd{n}"
  c.stage_order = tuple(order)
  return c


def pd_outer_loop(config: ml_collections.ConfigDict, steps_per_halving: int):
  """One halving as the official code trains it: `steps_per_halving` steps, the learning rate
  annealed linearly to 0 without warm-up, no EMA (decay 0: 'ema0' is the parameters)."""
  config.num_train_steps = steps_per_halving
  config.optimizer.schedule = "linear"
  config.optimizer.end_lr_fraction = 0.0
  config.optimizer.warmup_steps = 0
  config.ema_decays = (0.0,)
  return config


def pd_halvings(start_steps: int, student_steps: int) -> int:
  """How many halvings a PD chain from a `start_steps`-step teacher takes to reach
  `student_steps`: the equal-compute budget of experiment (b), in units of halvings."""
  return int(round(math.log2(start_steps / student_steps)))


def imagenet_pd_config(resolution: int, size: str = "small", teacher: str = "",
                       start: int = 1024, end: int = 1, halving_steps: int = 50_000,
                       solver: str = "addim", guidance: float = 0.0):
  """Progressive Distillation of an ImageNet diffusion run, the official ImageNet64 outer
  loop (§14.2): from 1024 teacher steps, 50k steps per halving at batch
  2048, Adam at 1e-4; the teacher's steps with aDDIM as the paper re-implemented it."""

  def pd_student(n, previous):
    stage = imagenet_config(resolution, "pd", size, n, previous, guidance)
    stage.loss.teacher_solver = solver
    stage.optimizer.learning_rate = 1e-4  # the official ImageNet64 distillation config
    return stage

  return pd_stages(pd_student, start, end, teacher, halving_steps)
