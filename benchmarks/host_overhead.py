"""Host overhead: the share of step time the training loop spends outside device compute.

    python -m benchmarks.host_overhead --out benchmarks/results/host_overhead_DATE_TAG.json

Runs the trainer's loop shape (`train.train_and_evaluate`, step 5: input pipeline
-> `to_global` -> the compiled, donated step, metrics kept on the device and
fetched at log steps, the progress hook) on the config's real data source, and,
alternating with it, the same compiled step alone on a batch already on the
device. Reported per step:

  * `host_seconds`: CPU time of the loop's thread in its host work (next batch,
    `to_global`, dispatch, bookkeeping), and `host_fraction` = that / the
    device-only step. Dispatch is asynchronous, so this work overlaps the
    previous step's compute: the device idles only when it exceeds the step, or
    after a log step's fetch drains the queue (one host iteration per log
    interval). It is an upper bound on the idle time an accelerator would see
    with an input pipeline that keeps up. Thread CPU time, not wall time, because
    on a CPU the host thread shares its cores with the computation: its wall time
    there (`host_wall_seconds`, which also counts waiting for a batch whose
    decoding threads were starved of cores) measures contention an accelerator
    host does not have.
  * `loop_overhead_fraction` = 1 - device-only step / loop step, in wall time and
    in process CPU time: everything the loop adds end to end (decoding threads
    included). On a CPU that is CPU taken from the computation; the CPU-time
    figure is the one other jobs on a shared machine barely move.
"""
import argparse
import statistics
import sys
import time
from typing import Any

from clu import periodic_actions
import jax

from benchmarks import common
from benchmarks import train_step
from multistep_cm.data import pipeline as pipeline_lib
from multistep_cm.models import summary
from multistep_cm.training import loop as train
from multistep_cm.training import step as train_step_lib

TARGET = 0.02


def loop(compiled, state, teacher, builder, data, start: int, num_steps: int,
         log_every: int):
  """The trainer's loop for `num_steps` steps; returns the state and the per-step timings."""
  config = builder.config
  hook = periodic_actions.ReportProgress(num_train_steps=start + num_steps, every_steps=log_every)
  parts = {"next_batch": [], "to_global": [], "dispatch": [], "host": [], "host_cpu": []}
  pending = []
  batches = data.iterate(start)
  begin, begin_cpu = time.perf_counter(), time.process_time()
  for step in range(start + 1, start + num_steps + 1):
    t0, c0 = time.perf_counter(), time.thread_time()
    local = next(batches)
    t1 = time.perf_counter()
    batch = pipeline_lib.to_global({k: local[k] for k in builder.abstract_batch},
                                   builder.batch_sharding, config.batch_size)
    t2 = time.perf_counter()
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      state, metrics = compiled(state, batch, teacher)
    t3 = time.perf_counter()
    pending.append(metrics)
    hook(step)
    parts["host_cpu"].append(time.thread_time() - c0)
    parts["host"].append(time.perf_counter() - t0)
    parts["next_batch"].append(t1 - t0)
    parts["to_global"].append(t2 - t1)
    parts["dispatch"].append(t3 - t2)
    if step % log_every == 0:
      train.fetch_metrics(pending)  # the trainer's fetch
      pending = []
  jax.block_until_ready(state)
  per_step = ((time.perf_counter() - begin) / num_steps,
              (time.process_time() - begin_cpu) / num_steps)
  batches.close()
  return state, per_step, parts


def device_only(compiled, state, batch, teacher, num_steps: int):
  """The compiled step back to back on a device-resident batch; (wall, CPU) s per step."""
  begin, begin_cpu = time.perf_counter(), time.process_time()
  for _ in range(num_steps):
    state, metrics = compiled(state, batch, teacher)
  jax.block_until_ready((state, metrics))
  return state, ((time.perf_counter() - begin) / num_steps,
                 (time.process_time() - begin_cpu) / num_steps)


def run(args) -> dict[str, Any]:
  config = summary.load_config(args.config)
  config = train_step.mode_config(config, config.loss.mode, args.batch or config.batch_size,
                                  {})
  builder = train_step_lib.StepBuilder.from_config(config)
  compiled = builder.compile()
  state, device_batch, teacher = train_step.random_inputs(builder)
  shard_index, shard_count = pipeline_lib.batch_shard(builder.batch_sharding, config.batch_size)
  data = pipeline_lib.Pipeline(
      train.open_source(builder.plan), config.batch_size, config.seed, shard_index, shard_count,
      random_flip=bool(config.data.random_flip), num_threads=config.data.num_threads or None,
      prefetch=config.data.prefetch)
  log_every = args.log_every
  loop_steps, device_steps, parts = [], [], {}
  start = 0
  with data:
    state, _, _ = loop(compiled, state, teacher, builder, data, start, 2, log_every)  # warm-up
    state, _ = device_only(compiled, state, device_batch, teacher, 2)
    start = 2
    for _ in range(args.rounds):
      state, per_step, round_parts = loop(compiled, state, teacher, builder, data, start,
                                          args.steps, log_every)
      start += args.steps
      loop_steps.append(per_step)
      for key, values in round_parts.items():
        parts.setdefault(key, []).extend(values)
      state, per_step = device_only(compiled, state, device_batch, teacher, args.steps)
      device_steps.append(per_step)
  median = lambda rows, i: statistics.median(r[i] for r in rows)
  step_s, loop_s = median(device_steps, 0), median(loop_steps, 0)
  step_cpu, loop_cpu = median(device_steps, 1), median(loop_steps, 1)
  host = {key: statistics.median(values) for key, values in parts.items()}
  return {
      "benchmark": "host_overhead", "date": common.today(), "machine": common.machine(),
      "command": " ".join(["python -m benchmarks.host_overhead"] + sys.argv[1:]),
      "config": args.config, "mode": config.loss.mode, "model": config.model.to_dict(),
      "batch": config.batch_size, "steps_per_round": args.steps, "rounds": args.rounds,
      "log_every_steps": log_every, "decode_threads": data.num_threads,
      "step_seconds": step_s, "loop_step_seconds": loop_s,
      "step_cpu_seconds": step_cpu, "loop_step_cpu_seconds": loop_cpu,
      "host_seconds": host["host_cpu"], "host_wall_seconds": host["host"],
      "host_wall_seconds_by_part": {k: host[k] for k in ("next_batch", "to_global", "dispatch")},
      "host_fraction": host["host_cpu"] / step_s,
      "host_wall_fraction": host["host"] / step_s,
      "loop_overhead_fraction": 1.0 - step_s / loop_s,
      "loop_overhead_fraction_cpu": 1.0 - step_cpu / loop_cpu,
      "target": TARGET, "within_target": host["host_cpu"] / step_s < TARGET,
  }


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/digits_diffusion.py",
                      help="config file[:arg]; its data source feeds the loop")
  parser.add_argument("--batch", type=int, default=None, help="default: the config's")
  parser.add_argument("--steps", type=int, default=20, help="steps per round")
  parser.add_argument("--rounds", type=int, default=3, help="loop / device-only alternations")
  parser.add_argument("--log_every", type=int, default=10,
                      help="metrics fetch interval (the configs log every 100 or more)")
  parser.add_argument("--out", default=None, help="also write the JSON here")
  return parser.parse_args(argv)


main = common.main_for(parse_args, run)


if __name__ == "__main__":
  main()
