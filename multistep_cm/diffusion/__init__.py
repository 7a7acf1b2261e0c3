"""The diffusion maths, pure functions of arrays (docs/maths.md).

`schedules` (logSNR schedules, §1.2), `process` (the forward process and the
v-parameterisation, §1.1, §1.3), `solvers` (DDIM, inverse DDIM, aDDIM and its x_var
rules, §2, §5), `sampling` (one compiled loop for DDIM, aDDIM, Euler and Heun, Algorithm 2,
guidance), `segments` (segment boundaries), `losses` (the v-loss, the Multistep CM
objective, Progressive Distillation), `frames` (other models' frames and prediction targets
mapped onto ours: VE/EDM, flow matching in both time conventions, x / eps / v / velocity,
§17).
"""
from multistep_cm.diffusion import frames
from multistep_cm.diffusion import losses
from multistep_cm.diffusion import process
from multistep_cm.diffusion import sampling
from multistep_cm.diffusion import schedules
from multistep_cm.diffusion import segments
from multistep_cm.diffusion import solvers
