"""Teachers trained elsewhere, in other frames and with other targets, as our denoisers.

`adapter` (the public adapter, stable for outside code): `adapt(apply_fn, frame=...,
prediction=...)` turns a teacher's own call `apply_fn(z_teacher, time_teacher, labels)` of a
VP, VE (EDM) or flow-matching model predicting x, eps, v or a flow velocity into our
`denoise(z, logsnr, labels) -> x̂` (docs/maths.md §17); `adapt_x_eps` returns `(x̂, epŝ)`;
`on_schedule` makes either the `f(z, t)` the samplers and losses take. The maths of the
frames is `multistep_cm.diffusion.frames`; their schedules are in
`multistep_cm.diffusion.schedules` (`edm`, `ddpm_linear`, `flow_matching`).
"""
from multistep_cm.teachers.adapter import adapt
from multistep_cm.teachers.adapter import adapt_x_eps
from multistep_cm.teachers.adapter import CARRIES
from multistep_cm.teachers.adapter import FRAMES
from multistep_cm.teachers.adapter import on_schedule
from multistep_cm.teachers.adapter import PREDICTIONS
from multistep_cm.teachers.adapter import teacher_inputs
