"""The diffusion maths, pure functions of arrays: schedules, the forward process, solvers,
samplers, segment boundaries and losses."""
from multistep_cm.diffusion import losses
from multistep_cm.diffusion import process
from multistep_cm.diffusion import sampling
from multistep_cm.diffusion import schedules
from multistep_cm.diffusion import segments
from multistep_cm.diffusion import solvers
