"""ImageNet64 Multistep CD from EDM's ADM teacher (`edm-imagenet-64x64-cond-adm`).

    python -m multistep_cm.main \
        --config=configs/imagenet64_edm_cd.py:steps=4,teacher=gs://BUCKET/edm_in64_adm.safetensors \
        --workdir=gs://BUCKET/mcm/in64_edm_cd4

The teacher is EDM's network in Flax (models/adm.py), its weights converted from EDM's
checkpoint (docs/teachers.md, "Converted teachers"). It is called in its own VE frame
(D(x; sigma), `frame='ve', prediction='x'`) through the adapter. The student is the same
ADM UNet, starting from the teacher's weights as the paper's students do (§7.1). It trains
and samples on EDM's sigma range [0.002, 80] (`schedule.name='edm'`, §17.1), so it never asks
the teacher about a noise level outside the one it was trained on.

Variants: steps=1|2|4|8, teacher=PATH (the converted weights file), guidance=W.
Settings: the paper's ImageNet-64 CD settings (batch 2048, 200k steps, teacher steps
64 -> 1280 over 100k, eta 0.75, pseudo-Huber 1e-4; imagenet_config), with our choices: the
EDM schedule and bfloat16 compute with remat. The student trains with the module's own
dropout, 0.1 as EDM trained it, synchronised between its two calls as the paper's are
(docs/maths.md §3.3).
"""
from multistep_cm.config import base as config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, steps=4, teacher="", guidance=0.0)
  c = config_base.imagenet_config(64, "cd", "small", a.steps, "", a.guidance)
  c.teacher_checkpoint = a.teacher
  c.init_from = ""  # the student is the teacher's module, starting from its weights
  c.teacher.update(dict(kind="module",
                        module="multistep_cm.models.adm:edm_imagenet64_cond_bf16_remat",
                        frame="ve", prediction="x", student="teacher"))
  c.schedule.name = "edm"
  c.schedule.kwargs = {}
  return c
