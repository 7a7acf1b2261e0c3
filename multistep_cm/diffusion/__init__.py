"""The diffusion maths: schedules, solvers, samplers and losses (pure functions of arrays)."""
from multistep_cm.diffusion import losses
from multistep_cm.diffusion import process
from multistep_cm.diffusion import sampling
from multistep_cm.diffusion import schedules
from multistep_cm.diffusion import solvers
