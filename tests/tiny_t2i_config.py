"""The T2I CD config (configs/t2i512_cd.py) with the 512-px UViT shrunk to a CPU-sized
text UViT, for compiling its step for a small TPU slice in a test:

    python -m multistep_cm.compile_report --config=tests/tiny_t2i_config.py --topology=v5e-4

Everything else is the paper's T2I setting: text inputs in the batch, the CFG teacher,
pseudo-Huber epsilon 1, 256 fixed teacher steps, bf16, remat, the scanned mid stack, FSDP.
"""
from multistep_cm.config import base as config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, steps=4, guidance=0.5, batch=16)
  c = config_base.t2i_config("cd", a.steps, "", a.guidance)
  c.batch_size = a.batch
  c.grad_accum_steps = 2  # accumulation as in the full config, micro-batches of 8
  c.data.image_size = 8
  c.data.text_dim, c.data.text_len = 16, 4
  c.schedule.kwargs.image_d = c.schedule.kwargs.noise_d_high = 8
  c.schedule.kwargs.noise_d_low = 4
  m = c.model
  # One attention level (cross-attention to the text there too) and a mid stack of 2.
  m.block_types, m.channels, m.num_blocks = ("attn",), (16,), (1,)
  m.mid_channels, m.mid_blocks, m.emb_dim, m.head_dim, m.num_groups = 32, 2, 32, 16, 8
  m.dropout = (0.0, 0.1)
  return c
