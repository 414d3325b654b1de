"""dqn_atari_profiled.py: the same algorithm as dqn_atari.py (the diff is only the harness), a phase table
that accounts for the whole loop, and the cProfile, torch.profiler and py-spy outputs."""

import difflib
import os
import shutil
import sys

import pytest

from script_runner import REPO, run_script

# Lines of dqn_atari.py the harness replaces: the docstring's first line, an import it extends, the short
# run's defaults, the resumable flags it adds to, the calls it splits to time them, and main.
REPLACED = {
    '"""Nature DQN (Mnih et al. 2015) on Atari through gymnasium and ale-py, in one file.',
    "from collections import deque",
    "total_timesteps: int = 10_000_000",
    '"""total environment (agent) steps of training; one step is frame_skip emulator frames"""',
    "buffer_size: int = 1_000_000",
    '"""replay capacity in frames (one 84x84 uint8 frame per transition, 7.06 GB for 1M)"""',
    "learning_starts: int = 80_000",
    '"""env steps of pure collection before the first gradient step (Nature: 50,000)"""',
    "eval_every: int = 250_000",
    "eval_episodes: int = 10",
    "progress_every: int = 10_000",
    '"track", "wandb_project_name", "wandb_entity"}',
    "loss, q_mean = update(*replay.sample(args.batch_size))",
    'sys.exit(f"dqn_atari.py: error: {error}")',
}
# Lines the profiled copy adds outside its harness section, beyond those naming a piece of the harness (HARNESS):
# the docstring's first line, the imports the harness needs, the short run's defaults, the update call split to
# time the sampling apart, the start of the learning phase, where the phase table starts, and main's else.
ADDED = {
    '"""Nature DQN (Mnih et al. 2015) on Atari, in one file: dqn_atari.py plus an inline profiling harness.',
    "from collections import defaultdict, deque",
    "import shutil",
    "import subprocess",
    "total_timesteps: int = 20_000",
    '"""total environment (agent) steps of training; one step is frame_skip emulator frames (profiling: short)"""',
    "buffer_size: int = 100_000",
    '"""replay capacity in frames (profiling: 100k, as the size does not change the cost of a step)"""',
    "learning_starts: int = 2_000",
    '"""env steps of pure collection before the first gradient step (profiling: soon, to time the updates)"""',
    "eval_every: int = 0",
    "eval_episodes: int = 2",
    "progress_every: int = 5_000",
    "batch = replay.sample(args.batch_size)",
    "loss, q_mean = update(*batch)",
    """if getattr(update, "graph", None) is not None:  # a replay runs no Python: no td_update laps""",
    "if global_step == updates_begin_at + 1:",
    "else:",
}
HARNESS = ("PHASES", "profile", "py_spy", "py-spy", "recorders", "steps_run", "trace_path", "cProfile", "pstats")
TINY = ["--total-timesteps", "600", "--learning-starts", "300", "--buffer-size", "2000", "--eval-episodes", "1",
        "--no-cuda", "--runs-dir", "runs"]
PHASES = ["action selection", "env step", "preprocessing", "replay add", "sampling and transfer",
          "update: forward", "update: TD targets", "update: backward", "update: optimizer", "logging"]


def phase_rows(table: str) -> dict:
    """phase -> (ms per env step, % of wall, calls) from a printed phase table."""
    rows = {}
    for line in table.splitlines()[1:]:
        parts = line.removesuffix(" env steps").rsplit(None, 3)  # the total's calls: the env steps timed
        if len(parts) == 4 and parts[2].endswith("%"):
            rows[parts[0]] = (float(parts[1]), float(parts[2].rstrip("%")), parts[3])
    return rows


def test_the_diff_with_dqn_atari_is_only_the_harness():
    """Both ways: no line of dqn_atari.py is missing from the profiled copy, and the copy adds only its harness
    (so an algorithm change made in one of the two files alone fails here)."""
    plain = [line.strip() for line in (REPO / "dqn_atari.py").read_text().splitlines()]
    profiled_lines = (REPO / "dqn_atari_profiled.py").read_text().splitlines()
    profiled = [line.strip() for line in profiled_lines]
    diff = list(difflib.ndiff(plain, profiled))
    removed = {line[2:] for line in diff if line.startswith("- ")}
    assert removed <= REPLACED, f"dqn_atari.py lines missing from the profiled copy: {removed - REPLACED}"
    start = profiled_lines.index(next(line for line in profiled_lines if line.startswith("# ---- Profiling harness")))
    end = next(i for i in range(start + 1, len(profiled_lines)) if profiled_lines[i].startswith("# ---- "))
    harness_section = set(profiled[start:end])
    added = {line[2:] for line in diff if line.startswith("+ ")}
    beyond = {line for line in added - harness_section - ADDED
              if line and not line.startswith("#") and not any(name in line for name in HARNESS)}
    assert not beyond, f"lines of the profiled copy that are not its harness: {beyond}"


def test_phase_table_accounts_for_the_whole_learning_phase_and_cprofile_and_torch_profiler_write(tmp_path):
    finished = run_script("dqn_atari_profiled.py", *TINY, "--cprofile", "--torch-profiler", cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    # the 300 collection steps before learning starts are left out: they have no updates
    table = finished.stdout.split("where the time went, over 300 env steps (learning phase, steps 301 to 600) on "
                                  "cpu:")[1]
    rows = phase_rows(table.split("final eval")[0])
    for phase in PHASES:
        assert phase in rows, phase
    assert rows["total"][1] == 100.0
    assert sum(share for name, (_, share, _) in rows.items() if name != "total") == pytest.approx(100.0, abs=0.5)
    assert rows["env step"][2] == "300"  # one lap a step: a game's reset is part of its step
    assert rows["update: backward"][2] == "75"  # one update every 4 steps after step 300
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "cprofile.prof").stat().st_size > 0 and "Ordered by: internal time" in finished.stdout
    assert (run_dir / "torch_trace.json").stat().st_size > 0


def test_a_run_without_updates_is_timed_whole(tmp_path):
    no_updates = ["--total-timesteps", "200", "--learning-starts", "300", *TINY[TINY.index("--buffer-size"):]]
    finished = run_script("dqn_atari_profiled.py", *no_updates, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert "where the time went, over 200 env steps (steps 1 to 200) on cpu:" in finished.stdout
    assert "update: forward" not in finished.stdout


@pytest.mark.skipif(shutil.which("py-spy") is None and
                    shutil.which("py-spy", path=os.path.dirname(sys.executable)) is None,
                    reason="py-spy is not installed (requirements-dev.txt)")
def test_py_spy_records_a_flamegraph_and_a_speedscope_profile(tmp_path):
    finished = run_script("dqn_atari_profiled.py", *TINY, "--py-spy", cwd=tmp_path)
    if "py-spy could not record this process" in finished.stderr:
        pytest.skip(f"py-spy may not attach on this machine: {finished.stderr.strip().splitlines()[-1]}")
    assert finished.returncode == 0, finished.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "py-spy.svg").read_text().lstrip().startswith("<?xml")
    assert (run_dir / "py-spy.speedscope.json").stat().st_size > 0


def test_py_spy_missing_is_one_clear_error(tmp_path, monkeypatch):
    import dqn_atari_profiled

    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    with pytest.raises(dqn_atari_profiled.ConfigError, match=r"--py-spy needs py-spy: pip install py-spy"):
        dqn_atari_profiled.start_py_spy(str(tmp_path))
