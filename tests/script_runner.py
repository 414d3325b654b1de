"""Running a training script as users do (a subprocess), and what its bad-input errors must look like."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_script(script: str, *args, cwd, timeout=300, **popen_kwargs):
    return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, **popen_kwargs)


def assert_one_line_error(finished, fragment, script="dqn.py"):
    """Bad input: a non-zero exit and exactly one line, `<script>: error: ...`, never a traceback."""
    assert finished.returncode != 0
    assert "Traceback" not in finished.stderr
    lines = [line for line in finished.stderr.strip().splitlines() if not is_emulator_banner(line)]
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error:"), finished.stderr
    assert fragment in lines[0]


def is_emulator_banner(line: str) -> bool:
    """The two lines ale-py's emulator prints to stderr whenever it loads a game: not ours to suppress."""
    return line.startswith("A.L.E: Arcade Learning Environment") or line == "[Powered by Stella]"
