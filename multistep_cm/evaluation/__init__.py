"""Sample quality: the metrics, the reports, and evaluation during training.

`sample_metrics` picks a dataset's metric; `digits_metric` (the digits classifier's
Fréchet distance and accuracy), `folder_metric` (the same for any image folder: a CNN trained
on its own training split, measured against its held-out split), `prompt_metric` (whether digit samples follow their captions:
the named digit, the named properties, FD), `energy` (energy distance, for the mixture),
`fid` (the streaming statistics, FID and IS), `inception` (the FID InceptionV3), `convert_inception`
and `reference_stats` (the commands that make its weights and reference statistics),
`dinov2` (the DINOv2 ViT of FD-DINOv2) and `convert_dinov2` (the command that makes its weights),
`clip` (CLIP's image and text towers, the CLIP score), `clip_tokenizer` (its BPE tokenizer) and
`convert_clip` (the command that makes its weights),
`tree_io` (arrays trees as .npz), `prdc` (precision, recall, density and coverage of
samples in any feature space); `report` (the `evaluate` command's quality-vs-steps
tables), `checkpoint_curve` (its `--checkpoints` mode: the metric of every selected
checkpoint against training step, resumable), `learning_curves` (the command that plots
the in-training metric of staged comparison runs against optimizer steps, over seeds: the
Table 3 and 4 curves), `t2i_report` (the `t2i_demo` command's
prompt-following table and grid) and `in_training` (sample grids and evaluations while training).
"""
