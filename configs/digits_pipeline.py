"""The embedded pipeline, end to end on a CPU: digits teacher -> MCM student -> sample grids.

    python -m multistep_cm.main --config=configs/digits_pipeline.py --workdir=/tmp/mcm_digits

Stage `teacher` trains the diffusion model in <workdir>/teacher; stage `cd4` then
initialises a 4-step Multistep CD student from it and distils it, in <workdir>/cd4.
Sized to run in about 10 minutes on 2 CPU cores (batch 64, 4000 + 2000 steps); the
digits study (configs/digits_study.py) trains longer for the README's results table.
Both write TensorBoard logs and sample grids (also as PNG files) into their
directories: `tensorboard --logdir /tmp/mcm_digits`. Re-running resumes (finished
stages are skipped).

Variants: size=8|16, steps=S, mode=cd|ct, frame=vp|flow, arch=uvit|adm|dit,
latents=NAME,data_dir=DIR. `frame=flow`
makes both stages flow-matching networks (loss.prediction='velocity' on the flow_matching
schedule, docs/maths.md §17.5): a rectified-flow teacher, distilled through the adapter into
a student of the same parameterisation (the comparison with the VP pipeline:
docs/results.md). `arch=adm` and `arch=dit` train the field's standard networks instead of
our UViT, each in its own frame through the adapter (docs/teachers.md): EDM's ADM UNet
(`models/adm.py: edm_digits_8px`, x-prediction in the VE frame, EDM's schedule) or a DiT
(`models/dit.py: dit_digits_8px`, ε-prediction on DDPM's linear schedule, t in 0..999); the
student is the teacher's own module, starting from its weights (size 8, mode cd, frame vp).
`latents=NAME` trains both stages on the latent dataset `latent:NAME` instead (prepared in
`data_dir`; its latents 8x8, as a VAE of `python -m multistep_cm.data.train_vae` makes them
of the 16x16 digits), decoding their samples for the digits metric: latent diffusion end to
end on the CPU (docs/teachers.md).
"""
import ml_collections

from multistep_cm.config import base as config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, size=8, steps=4, mode="cd", frame="vp", arch="uvit",
                            latents="", data_dir="")
  if a.frame not in ("vp", "flow"):
    raise ValueError(f"frame must be 'vp' or 'flow', got {a.frame!r}")
  if a.arch not in ("uvit", *ARCHES):
    raise ValueError(f"arch must be one of {('uvit', *ARCHES)}, got {a.arch!r}")
  if a.arch != "uvit" and (a.size, a.mode, a.frame) != (8, "cd", "vp"):
    raise ValueError(f"arch={a.arch} is made for size=8, mode=cd, frame=vp")
  if a.latents and (a.size, a.frame, a.arch) != (8, "vp", "uvit"):
    raise ValueError("latents= is made for size=8, frame=vp, arch=uvit")
  student = f"{a.mode}{a.steps}"
  c = ml_collections.ConfigDict()
  c.stage_order = ("teacher", student)
  c.stages = ml_collections.ConfigDict()
  c.stages.teacher = config_base.digits_config("diffusion", image_size=a.size)
  c.stages[student] = config_base.digits_config(a.mode, a.steps, a.size, teacher="stage:teacher")
  for stage, steps in ((c.stages.teacher, 4000), (c.stages[student], 2000)):
    stage.batch_size = 64
    stage.num_train_steps = steps
    stage.checkpoint_every_steps = 1000
  c.stages[student].loss.anneal_steps = 1000
  if a.frame == "flow":
    for stage in (c.stages.teacher, c.stages[student]):
      stage.loss.prediction = "velocity"
      stage.schedule.name = "flow_matching"  # shift 1: rectified flow's uniform times
  # A quality curve in TensorBoard (eval/fd, and the student's eval/ode_error) at under 10%
  # of each stage's time (docs/sampling_and_evaluation.md, evaluation during training):
  # 500 samples every 500 teacher steps (8
  # points; 8 aDDIM steps, FD 22 against 17 at 64 steps in the digits study) and every 400
  # student steps (5 points; its ODE error against a 32-step DDIM solve, computed once).
  for stage, every in ((c.stages.teacher, 500), (c.stages[student], 400)):
    stage.evals.every_steps = every
    stage.evals.num_samples = 500
  c.stages.teacher.evals.sample_steps = 8
  c.stages[student].evals.ode_steps = 32
  if a.latents:
    _on_latents(c, a.latents, a.data_dir or None)
  if a.arch != "uvit":
    schedule, teacher = ARCHES[a.arch]
    for stage in (c.stages.teacher, c.stages[student]):
      stage.teacher.update({"kind": "module", "student": "teacher", **teacher})
      stage.schedule.name = schedule
    c.stages.teacher.teacher_checkpoint = ""  # trained from a fresh start
    if teacher["prediction"] == "eps":
      # DiT's own loss (L_simple): the v-loss weighs an eps-predictor's errors by 1/alpha^2
      # (~24,000 at DDPM's last time) and the DiT did not learn with it (docs/teachers.md).
      c.stages.teacher.loss.diffusion_weighting = "snr"
    c.stages[student].init_from = ""  # it starts from the teacher's weights
  return c


def _on_latents(c, latent, data_dir):
  """Every stage on `latent:<latent>` (its record's latent shape), no flips (data/latents.py)."""
  from multistep_cm.data import latents  # pylint: disable=g-import-not-at-top
  try:
    record = latents.read_record(latent, data_dir)
  except latents.DatasetError as e:
    raise ValueError(" ".join(str(e).split())) from None
  if record["latent_size"] != 8:
    raise ValueError(f"latents={latent} holds {record['latent_size']}x{record['latent_size']} "
                     "latents; the digits8 UViT takes 8x8 (a VAE of two levels on the 16x16 "
                     "digits)")
  for stage in c.stage_order:
    data = c.stages[stage].data
    data.dataset, data.data_dir = record["dataset"], data_dir
    data.image_size, data.num_channels = 8, int(record["latent_channels"])
    data.num_classes, data.random_flip = int(record["num_classes"]), False


# The network and the teacher.* keys of each outside architecture, and the schedule its
# stages train and sample on (one whose logSNR range the network's time input covers).
ARCHES = {
    "adm": ("edm", {"module": "multistep_cm.models.adm:edm_digits_8px", "frame": "ve",
                    "prediction": "x"}),
    "dit": ("ddpm_linear", {"module": "multistep_cm.models.dit:dit_digits_8px", "frame": "vp",
                            "prediction": "eps", "schedule": "ddpm_linear",
                            "time_scale": 999.0}),
}
