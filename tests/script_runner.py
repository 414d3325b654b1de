"""Running a training script as users do (a subprocess), and what its bad-input errors must look like."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# What each script says when Ctrl-C stops it where it writes no checkpoint: before or after the Atari
# training loops, anywhere in dqn.py (which has none) and benchmark/eval_checkpoint.py
INTERRUPTED = {script: f"{script}: interrupted outside the training loop, so no checkpoint was written"
               for script in ["dqn_atari.py", "dqn_atari_profiled.py", "dqn_atari_parallel.py"]}
INTERRUPTED["dqn.py"] = "dqn.py: interrupted (dqn.py writes no checkpoints)"
INTERRUPTED["benchmark/eval_checkpoint.py"] = "eval_checkpoint.py: interrupted"


def run_script(script: str, *args, cwd, timeout=300, interpreter_args=(), **popen_kwargs):
    return subprocess.run([sys.executable, *interpreter_args, str(REPO / script), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, **popen_kwargs)


def run_as_main(prelude: str) -> tuple:
    """interpreter_args for run_script that run the Python lines `prelude`, then the script as `python script` would."""
    return ("-c", f"{prelude}\nimport runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def as_if_not_installed(module: str) -> tuple:
    """interpreter_args for run_script that run the script with `module` unimportable, as if it were not installed
    (sys.modules[name] = None is how Python is told so)."""
    return run_as_main(f"import sys; sys.modules[{module!r}] = None")


def interrupted_at_import(module: str) -> tuple:
    """interpreter_args for run_script that send the script SIGINT, as Ctrl-C does, the moment it starts importing
    `module`: a finder ahead of Python's own sees the import begin (and finds nothing itself)."""
    return run_as_main("import os, signal, sys\n"
                       "class Interrupt:\n"
                       "    def find_spec(self, name, path=None, target=None):\n"
                       f"        if name == {module!r}: os.kill(os.getpid(), signal.SIGINT)\n"
                       "sys.meta_path.insert(0, Interrupt())")


def assert_one_line_error(finished, fragment, script="dqn.py"):
    """Bad input: a non-zero exit and exactly one line, `<script>: error: ...`, never a traceback."""
    assert finished.returncode != 0
    assert "Traceback" not in finished.stderr
    lines = lines_without_emulator_banners(finished.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error:"), finished.stderr
    assert fragment in lines[0]


EMULATOR_BANNER = re.compile(r"A\.L\.E: Arcade Learning Environment \(version [^)]*\)|\[Powered by Stella\]")


def lines_without_emulator_banners(stderr: str) -> list:
    """stderr's non-empty lines once the banner ale-py's emulator prints on loading a game is taken out (not ours to
    suppress); removed as fragments, since the banners of several worker processes interleave mid-line."""
    return [line for line in EMULATOR_BANNER.sub("", stderr).splitlines() if line.strip()]


def unique_marker(label: str) -> str:
    """A run's --exp-name that no other process has in its command line: tmp_path names repeat from one pytest
    session to the next, so a marker made from them matched an earlier session's orphans."""
    return f"{label}-{os.getpid()}-{time.monotonic_ns()}"


def training_processes(marker: str) -> list:
    """Command lines of running dqn.py processes whose arguments contain marker (read from /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in text and "dqn.py" in text:
            found.append(text)
    return found


def assert_signal_stops_every_run(launcher, marker: str, message: str) -> str:
    """Waits for the launcher's first training process (--exp-name marker), sends SIGTERM to the launcher,
    and checks that it exits non-zero saying `message` and leaves no training process behind."""
    deadline = time.monotonic() + 60
    while not training_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert training_processes(marker), "the run never started"
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=60)
    assert launcher.returncode != 0 and message in stderr, stderr
    deadline = time.monotonic() + 10
    while training_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not training_processes(marker), "a training process outlived its launcher"
    return stderr
