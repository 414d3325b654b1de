"""What the test files of dqn_atari.py and dqn_atari_parallel.py share: small runs, frames that carry their own
id, and the checks that both scripts must pass alike (the replay against a naive one, an exact resume, a signal
that leaves a checkpoint). Imported by name: `from conftest import small_args`."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import dqn_atari
from script_runner import REPO, run_script


def small_args(tmp_path, script=dqn_atari, **overrides):
    """A few hundred Breakout steps with a tiny replay: every branch of the loop in seconds."""
    settings = dict(env_id="BreakoutNoFrameskip-v4", total_timesteps=300, learning_starts=100, buffer_size=600,
                    target_network_frequency=50, eval_every=0, eval_episodes=1, progress_every=0,
                    runs_dir=str(tmp_path / "runs"), cuda=False)
    settings.update(overrides)
    return script.Args(**settings)


def rewrite(payload: dict, path, script=dqn_atari) -> str:
    """Writes an edited checkpoint or model with a checksum of its new contents, as another version would."""
    script.save_atomically({key: value for key, value in payload.items() if key != "checksum"}, str(path))
    return str(path)


def progress_lines(output: str) -> dict:
    """A run's progress lines by step, less the fields that depend on timing (SPS, ETA)."""
    lines = {}
    for line in output.splitlines():
        if line.startswith("step "):
            step, *fields = [field.strip() for field in line.split("|")]
            steps_done = int(step.split()[1].split("/")[0])
            lines[steps_done] = [field for field in fields if not field.startswith(("SPS", "ETA"))]
    return lines


def count_calls(monkeypatch, owner, name: str) -> list:
    """Wraps owner.name so that each call appends 1 to the list returned, then does what it did."""
    calls, real = [], getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    return calls


def frame_with_id(frame_id: int) -> torch.Tensor:
    frame = torch.zeros(dqn_atari.FRAME_SIZE, dqn_atari.FRAME_SIZE, dtype=torch.uint8)
    frame[0, 0], frame[0, 1] = frame_id // 256, frame_id % 256
    return frame


def frame_ids(stacks: torch.Tensor) -> np.ndarray:
    return (stacks[..., 0, 0].long() * 256 + stacks[..., 0, 1].long()).numpy()


def check_replay_against_a_naive_one(replay, games: int, add) -> None:
    """Random episodes of random lengths, ending terminated or truncated, through many wrap-arounds. Naive:
    every transition with its full (s, a, r, s', terminated) stacks, as the loop built them. Every slot the
    replay calls valid must give exactly the naive transition, and every transition whose frames are all
    still in its ring (s' included) must be valid. With several games, their steps interleave at random, as
    the games' do, and each game keeps to a ring of its own. add(frame, action, reward, terminated, episode_end,
    next_frame, game) stores one transition."""
    ring = replay.capacity // games
    rng = np.random.default_rng(0)
    naive, slot_of = [], {}
    written = [0] * games  # frames written per game; a frame's id is its write number * games + game
    episode = [None] * games  # per game: (stack, steps taken, length, ends terminated)
    episodes_done, valid = 0, set()
    while episodes_done < 120 * games:
        k = int(rng.integers(games))
        if episode[k] is None:
            episode[k] = ([written[k]] * dqn_atari.STACK, 0, int(rng.integers(1, 12)), bool(rng.integers(2)))
        stack, t, length, terminated_end = episode[k]
        action, reward = int(rng.integers(6)), float(rng.choice([-1.0, 0.0, 1.0]))
        end = t == length - 1
        terminated = end and terminated_end
        next_stack = stack[1:] + [written[k] + 1]
        slot = add(frame_with_id(stack[-1] * games + k), action, reward, terminated, end,
                   frame_with_id(next_stack[-1] * games + k), k)
        written[k] += 2 if end else 1
        naive.append((k, stack, action, reward, next_stack, terminated))
        slot_of[slot] = len(naive) - 1
        episode[k] = None if end else (next_stack, t + 1, length, terminated_end)
        episodes_done += end
        if end and episodes_done % 10 == 0:
            all_slots = np.arange(replay.capacity)
            valid = set(all_slots[replay.valid(all_slots)].tolist())
            intact = {slot for slot, n in slot_of.items()
                      if min(naive[n][1]) >= written[naive[n][0]] - ring and naive[n][4][-1] < written[naive[n][0]]}
            assert valid == intact
            idx = np.array(sorted(valid))
            obs, actions, rewards, next_obs, terminated = replay.batch(idx)
            expected = [naive[slot_of[i]] for i in idx]
            assert frame_ids(obs).tolist() == [[n * games + e[0] for n in e[1]] for e in expected]
            assert frame_ids(next_obs).tolist() == [[n * games + e[0] for n in e[4]] for e in expected]
            assert actions.tolist() == [e[2] for e in expected]
            assert rewards.tolist() == [e[3] for e in expected]
            assert terminated.tolist() == [float(e[5]) for e in expected]
    assert all(slot // ring == naive[n][0] for slot, n in slot_of.items()), "each game in its own ring"
    sampled = replay.sample_indices(5000)
    assert replay.valid(sampled).all() and set(sampled.tolist()) == valid, "randint reaches every valid slot"


def check_a_resumed_run_ends_identical(script, tmp_path, capsys, **settings) -> None:
    """2N steps in one go, and the same again from a checkpoint at step N (with the replay) of a run that went on
    past it, as one stopped by a signal does: identical parameters.
    Epsilon is held constant, as the schedule's length depends on --total-timesteps of each run. The progress
    line at step 2N is the same too: its window of recent games and its last evaluation (at step N) come back
    with the checkpoint."""
    settings = dict(start_e=0.5, end_e=0.5, learning_starts=60, progress_every=120, eval_every=120, **settings)
    threads_before = torch.get_num_threads()
    whole = script.train(small_args(tmp_path, script, total_timesteps=240, **settings))
    whole_progress = progress_lines(capsys.readouterr().out)
    assert torch.get_num_threads() == threads_before, "the run's thread count is restored"
    again = script.train(small_args(tmp_path, script, total_timesteps=240, **settings))
    first_half = script.train(small_args(tmp_path, script, total_timesteps=180, checkpoint_every=120,
                                         checkpoint_replay=True, **settings))
    checkpoint = os.path.join(first_half["run_dir"], "checkpoint.pt")
    capsys.readouterr()
    resumed = script.train(script.Args(resume=checkpoint, total_timesteps=240), ["--resume", checkpoint,
                                                                              "--total-timesteps", "240"])
    assert resumed["run_dir"] == first_half["run_dir"] and resumed["global_step"] == 240
    assert progress_lines(capsys.readouterr().out)[240] == whole_progress[240]
    assert "eval     nan" not in " ".join(whole_progress[240]), "the last evaluation must show"
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("learner")], "left running"
    for run in (again, resumed):
        for name, parameter in whole["q_network"].state_dict().items():
            assert torch.equal(parameter, run["q_network"].state_dict()[name]), name
    eval_rows = open(os.path.join(resumed["run_dir"], "eval.csv")).read().splitlines()
    assert [row.split(",")[0] for row in eval_rows[1:]] == ["120", "240"]


def check_a_resume_at_the_last_step_plays_the_final_evaluation_again(script, tmp_path, last_step: int,
                                                                     **settings) -> None:
    """A run stopped in its final evaluation, past the loop's last checkpoint (at `last_step`), is resumed as it
    was: that evaluation is played again (the same games, the same network), and eval.csv keeps one row for it."""
    finished = script.train(small_args(tmp_path, script, **settings))
    path = os.path.join(finished["run_dir"], "checkpoint.pt")
    resumed = script.train(script.Args(resume=path), ["--resume", path])
    assert finished["global_step"] == resumed["global_step"] == last_step
    assert np.array_equal(resumed["final_returns"], finished["final_returns"])
    rows = open(os.path.join(finished["run_dir"], "eval.csv")).read().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == [str(last_step)]


def check_a_signal_writes_a_checkpoint_that_resumes(script: str, tmp_path, sig, whole_group: bool, *flags) -> dict:
    """Stops a run with `sig` once training is under way (to the whole process group if whole_group, as Ctrl-C
    in a terminal does), then resumes its checkpoint for 50 more steps; returns the checkpoint."""
    command = [sys.executable, str(REPO / script), "--buffer-size", "2000", "--learning-starts", "100",
               "--total-timesteps", "100000", "--progress-every", "100", "--no-cuda", "--runs-dir", "runs", *flags]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=whole_group)
    for line in process.stdout:
        if line.startswith("step"):  # training is under way
            break
    if whole_group:
        os.killpg(process.pid, sig)
    else:
        process.send_signal(sig)
    output, errors = process.communicate(timeout=120)
    assert process.returncode == 0, errors
    assert f"stopped by signal {int(sig)}" in output
    (checkpoint,) = (tmp_path / "runs").glob("*/checkpoint.pt")
    saved = torch.load(checkpoint, weights_only=True)
    resumed = run_script(script, "--resume", str(checkpoint), "--total-timesteps", str(saved["global_step"] + 50),
                         "--eval-episodes", "1", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "final eval over 1 games" in resumed.stdout
    assert "the checkpoint has no replay: collecting 100 steps" in resumed.stdout
    return saved


@pytest.fixture
def one_torch_thread():
    """One torch thread: the same kernels in the same order, so the same numbers bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
