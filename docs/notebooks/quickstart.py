# %% [markdown]
# # Quickstart: a trained run from Python
#
# This notebook trains nothing. It loads the two runs of the README's main job, the digits
# teacher and its 4-step Multistep CD student:
#
#     python -m multistep_cm.main --config=configs/digits_pipeline.py --workdir=/tmp/mcm_digits
#
# Then it samples from both, draws their grids and scores them with the digits metric. Run
# it as a script (`python docs/notebooks/quickstart.py`), or open it as a notebook in
# Jupyter (jupytext) or VS Code: the `# %%` lines split it into cells. `MCM_WORKDIR` names
# another root, and `MCM_NUM_SAMPLES` how many samples each score uses.

# %%
import os

import matplotlib
matplotlib.use("Agg")  # pictures go to files; in a notebook, drop this line to see them inline
import matplotlib.pyplot as plt

from multistep_cm import api

root = os.environ.get("MCM_WORKDIR", "/tmp/mcm_digits")
out = os.environ.get("MCM_OUTPUT", ".")
num = int(os.environ.get("MCM_NUM_SAMPLES", "500"))
teacher = api.load(os.path.join(root, "teacher"))
student = api.load(os.path.join(root, "cd4"))
print(teacher)
print(student)

# %% [markdown]
# ## Samples
# A student samples with its own 4 steps. A teacher takes any sampler and step count.

# %%
few = student.sample(64, seed=0)
print(few.images.shape, few.images.dtype, few.labels[:8])
many = teacher.sample(64, steps=64, sampler="addim", seed=0)
api.save_png(few.grid(), os.path.join(out, "student_4_steps.png"))
api.save_png(many.grid(), os.path.join(out, "teacher_64_steps.png"))

fig, axes = plt.subplots(1, 2, figsize=(8, 4))
for ax, picture, title in ((axes[0], few.grid(), "student, 4 steps"),
                           (axes[1], many.grid(), "teacher, 64 aDDIM steps")):
  ax.imshow(picture.squeeze(), cmap="gray")
  ax.set_title(title)
  ax.axis("off")
fig.savefig(os.path.join(out, "grids.png"), bbox_inches="tight")

# %% [markdown]
# ## Scores
# `evaluate` uses the data's own metric. For the digits this is the Fréchet distance in the
# features of the digits classifier (lower is better), which needs no download.

# %%
scores = {"student, 4 steps": student.evaluate(num, seed=1)}
for steps in (4, 64):
  scores[f"teacher, {steps} aDDIM steps"] = teacher.evaluate(num, steps=steps,
                                                             sampler="addim", seed=1)
for name, score in scores.items():
  print(f"{name:>24}: " + ", ".join(f"{k} {v:.3g}" for k, v in score.items()
                                     if isinstance(v, float)))
