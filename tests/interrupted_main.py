"""`python -m interrupted_main <main's flags>`: the trainer's `main` whose run is interrupted
as a second Ctrl-C interrupts it (the trainer's handler lets the KeyboardInterrupt through),
so the command's answer to it can be tested without racing a signal against a save."""
import runpy

from multistep_cm.training import loop


def _interrupted(*args, **kwargs):
  del args, kwargs
  raise KeyboardInterrupt


if __name__ == "__main__":
  loop.run = _interrupted
  runpy.run_module("multistep_cm.main", run_name="__main__", alter_sys=True)
