"""dqn_atari_parallel.py: dqn_atari.py plus several games at once (worker processes, rings in the replay, the
replay in GPU memory) and the overlapped CPU learner. The diff is confined to those parts; the rest of the
algorithm is tested once, on dqn_atari.py, and the variant's numerics by its fingerprints."""

import ast
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.utils import parameters_to_vector

import dqn_atari
import dqn_atari_parallel as parallel
from conftest import (check_a_resume_at_the_last_step_plays_the_final_evaluation_again,
                      check_a_resumed_run_ends_identical, check_a_signal_writes_a_checkpoint_that_resumes,
                      check_replay_against_a_naive_one, count_calls, frame_with_id, rewrite, small_args)
from script_runner import INTERRUPTED, REPO, assert_one_line_error, lines_without_emulator_banners, run_script

CPU = torch.device("cpu")

# The definitions of dqn_atari.py the variant rewrites to carry its parts (every other one it keeps verbatim),
# and those it adds; its module-level lines beyond them differ only in the docstring, the imports it needs,
# the resumable flags and the checkpoint format.
CHANGED = {"Args", "check_args", "FrameReplay", "td_update", "make_checkpoint", "restore_checkpoint",
           "load_checkpoint", "read_resume", "train", "main"}
ADDED = {"td_target", "td_gradients", "OverlappedUpdates", "Outcome", "step_game", "game_worker", "GameWorkerFailed",
         "WORKER_ANSWER_TIMEOUT_S", "WORKER_BYTES", "Games", "last_step", "passes_multiple_of"}
OTHER_LINES = {"import atexit", "import torch.multiprocessing", "from concurrent.futures import ThreadPoolExecutor",
               "from typing import Literal, NamedTuple, Optional, Union, get_args, get_origin",
               "from typing import Literal, Optional, Union, get_args, get_origin"}


def module_parts(script: str) -> tuple[dict, set]:
    """(name -> source of each top-level definition or assignment, the other top-level statements)."""
    source = (REPO / script).read_text()
    named, other = {}, set()
    for node in ast.parse(source).body[1:]:  # [0]: the module docstring, which says what each file is
        segment = ast.get_source_segment(source, node)
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            named[node.name] = segment
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            named[node.targets[0].id] = segment
        else:
            other.add(segment)
    return named, other


def test_the_diff_with_dqn_atari_is_only_the_parallel_parts():
    """Both ways: every definition of dqn_atari.py is in the variant verbatim but those that carry its parts,
    and the variant adds only its parts. An algorithm change made in one of the two files alone fails here."""
    plain, plain_other = module_parts("dqn_atari.py")
    variant, variant_other = module_parts("dqn_atari_parallel.py")
    differing = {name for name in plain if plain[name] != variant.get(name)}
    assert differing <= CHANGED | {"RESUMABLE", "CHECKPOINT_FORMAT"}, f"changed beyond its parts: {differing - CHANGED}"
    assert set(variant) - set(plain) == ADDED, "the variant's additions"
    assert {line for line in plain_other ^ variant_other if not line.startswith(("import", "from", "gym."))} == set()
    assert (plain_other ^ variant_other) <= OTHER_LINES


# ---- several games: rings in the replay, worker processes ----


@pytest.mark.parametrize("games", [1, 3])
def test_frame_replay_rings_match_a_naive_replay_of_full_stacks(games):
    replay = parallel.FrameReplay(37 * games, CPU, seed=0, games=games)
    check_replay_against_a_naive_one(replay, games, lambda *transition: replay.add(*transition[:-1],
                                                                                   game=transition[-1]))


def test_a_replay_on_the_gpu_is_checked_against_free_gpu_memory(monkeypatch):
    """--replay-on-gpu: the check reads the GPU's free memory, before anything is allocated there (so no GPU is
    needed to see the refusal)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1_000_000_000, 80_000_000_000))
    with pytest.raises(parallel.ConfigError, match=r"needs 7\.07 GB but only 1\.00 GB is available on the GPU; "
                                                   r"pass a smaller --buffer-size"):
        parallel.FrameReplay(1_000_000, torch.device("cuda"), seed=0, on_device=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to keep the replay in GPU memory")
def test_a_replay_in_gpu_memory_gives_the_pinned_replays_batches(tmp_path):
    """--replay-on-gpu moves where the frames live, not what a batch holds; a run with it and two games works."""
    cuda = torch.device("cuda")
    replays = [parallel.FrameReplay(64, cuda, seed=0, games=2, on_device=on_gpu) for on_gpu in (False, True)]
    assert replays[0].frames.is_pinned() and replays[1].frames.device.type == "cuda" and not replays[1].pinned
    for t in range(100):
        for replay in replays:
            replay.add(frame_with_id(t).to(cuda), t % 4, float(t % 3 - 1), t % 16 == 15, t % 16 == 15,
                       frame_with_id(t + 1).to(cuda), game=t % 2)
    for pinned_part, gpu_part in zip(replays[0].sample(32), replays[1].sample(32)):
        assert pinned_part.device.type == gpu_part.device.type == "cuda" and torch.equal(pinned_part, gpu_part)
    result = parallel.train(small_args(tmp_path, parallel, cuda=True, replay_on_gpu=True, num_envs=2))
    assert result["replay"].frames.device.type == "cuda" and result["global_step"] == 300


def test_several_games_count_steps_updates_and_syncs_as_one_game_and_leave_no_worker(tmp_path, monkeypatch):
    """Three games: 300 env steps are 100 passes of the loop, yet the updates (one per 4 env steps after
    learning_starts) and target syncs (every 50 env steps) are those of one game, each game's transitions fill a
    ring of its own, and the worker processes are gone when training ends."""
    updates = count_calls(monkeypatch, parallel, "td_update")
    loads = count_calls(monkeypatch, parallel.QNetwork, "load_state_dict")
    threads_before = torch.get_num_threads()
    result = parallel.train(small_args(tmp_path, parallel, num_envs=3, end_e=1.0))
    assert result["global_step"] == 300 and len(updates) == (300 - 100) // 4 and len(loads) == 1 + 300 // 50
    replay = result["replay"]
    transitions = replay.starts_transition.reshape(3, replay.ring).sum(axis=1)
    assert transitions.tolist() == [100, 100, 100]
    assert not torch.multiprocessing.active_children()
    assert torch.get_num_threads() == threads_before, "the trainer's thread count is restored"


def test_a_run_that_stops_on_an_error_after_its_workers_start_lets_the_interpreter_exit(tmp_path):
    """An error past the workers' start never reaches Games.close(); a caller that keeps the error (pytest, a
    notebook) keeps their pipes open too. The interpreter must still exit, not wait on workers deaf to SIGTERM."""
    program = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
import dqn_atari_parallel as parallel
if __name__ == "__main__":
    def refuse(*_):
        raise parallel.ConfigError("refused after the workers started")
    parallel.RunLog = refuse
    try:
        parallel.train(parallel.Args(num_envs=2, total_timesteps=10, buffer_size=600, runs_dir={str(tmp_path)!r},
                                     cuda=False))
    except parallel.ConfigError as error:
        kept = error
        print(kept)
"""
    finished = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0 and "refused after the workers started" in finished.stdout, finished.stderr


def test_worker_processes_that_would_not_fit_in_memory_are_refused_before_any_starts(monkeypatch):
    monkeypatch.setattr(parallel, "available_memory_bytes", lambda: 3 * 10**8)  # 0.3 GB left after the replay
    parallel.Games(2, "BreakoutNoFrameskip-v4", 1, 4, 30, None).close()  # one worker of 0.2 GB fits
    with pytest.raises(parallel.ConfigError, match=r"--num-envs 3 starts 2 worker processes of about 0.2 GB each, but "
                                                   r"only 0.30 GB is available; pass a smaller --num-envs"):
        parallel.Games(3, "BreakoutNoFrameskip-v4", 1, 4, 30, None)


def test_a_worker_process_that_dies_is_reported_not_waited_for():
    games = parallel.Games(2, "BreakoutNoFrameskip-v4", seed=0, frame_skip=4, noop_max=0,
                           repeat_action_probability=None)
    games.reset()
    games.workers[0].kill()
    games.workers[0].join()
    with pytest.raises(RuntimeError, match="the worker process of training game 1 exited"):
        games.step(np.zeros(2, dtype=np.int64))


def test_a_worker_process_that_stops_answering_stops_the_run_and_leaves_the_checkpoint(tmp_path, monkeypatch):
    real_step, passes = parallel.Games.step, [0]

    def step(games, actions):
        passes[0] += 1
        if passes[0] == 60:  # step 120 of two games, past the checkpoint at 100
            # short only now: a worker's start (importing torch) on a loaded machine can take longer than 3 s
            monkeypatch.setattr(parallel, "WORKER_ANSWER_TIMEOUT_S", 3.0)
            os.kill(games.workers[0].pid, signal.SIGSTOP)
        return real_step(games, actions)

    monkeypatch.setattr(parallel.Games, "step", step)
    with pytest.raises(parallel.GameWorkerFailed, match="training game 1 has not answered for 3 s"):
        parallel.train(small_args(tmp_path, parallel, num_envs=2, total_timesteps=300, checkpoint_every=100))
    assert not torch.multiprocessing.active_children(), "the silent worker was stopped"
    [run_dir] = os.listdir(tmp_path / "runs")
    assert parallel.load_checkpoint(str(tmp_path / "runs" / run_dir / "checkpoint.pt"))["global_step"] == 100


def test_a_checkpoint_whose_ring_counters_were_edited_out_of_range_is_refused_naming_the_field(tmp_path):
    run = parallel.train(small_args(tmp_path, parallel, num_envs=2, total_timesteps=40, learning_starts=20,
                                    checkpoint_every=40, checkpoint_replay=True))
    saved = torch.load(os.path.join(run["run_dir"], "checkpoint.pt"), weights_only=True)
    for key, value, message in [
            ("positions", torch.tensor([0, 300]), "'replay.positions' holds a value outside [0, 299]"),
            ("sizes", torch.tensor([-1, 20]), "'replay.sizes' holds a value outside [0, 300]")]:
        path = rewrite({**saved, "replay": {**saved["replay"], key: value}}, tmp_path / f"{key}.pt", parallel)
        with pytest.raises(parallel.ConfigError, match=re.escape(message)):
            parallel.train(parallel.Args(resume=path), ["--resume", path])


@pytest.mark.parametrize("writer", ["dqn_atari", "dqn_atari_parallel"])
def test_a_checkpoint_of_the_other_atari_script_is_refused_with_which_script_resumes_it(tmp_path, writer):
    """Both scripts write checkpoint.pt, each in its own layout: one given to the other gets told so, not that
    the file is unreadable."""
    reader = parallel if writer == "dqn_atari" else dqn_atari
    written = (dqn_atari if writer == "dqn_atari" else parallel).CHECKPOINT_FORMAT
    path = rewrite({"format": written}, tmp_path / "checkpoint.pt", reader)
    with pytest.raises(reader.ConfigError, match=re.escape(f"its format is {written!r}, another script's (this one "
                                                           f"reads {reader.CHECKPOINT_FORMAT!r}): resume it with")):
        reader.load_checkpoint(path)


def test_a_checkpoint_at_a_last_step_past_total_timesteps_resumes_with_the_runs_own_flags(tmp_path):
    """With 3 games, a run of 100 steps ends at step 102, and a checkpoint every 51 steps falls there too."""
    check_a_resume_at_the_last_step_plays_the_final_evaluation_again(
        parallel, tmp_path, 102, num_envs=3, total_timesteps=100, learning_starts=50, checkpoint_every=51)


def test_updates_due_before_every_game_has_stored_a_transition_are_refused(tmp_path):
    finished = run_script("dqn_atari_parallel.py", "--num-envs", "8", "--learning-starts", "4", "--train-frequency",
                          "4", "--no-cuda", "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path, timeout=120)
    assert_one_line_error(finished, "--learning-starts must be at least --num-envs (8), got 4", "dqn_atari_parallel.py")
    run = parallel.train(small_args(tmp_path, parallel, num_envs=2, learning_starts=2, train_frequency=2,
                                    total_timesteps=20))
    assert run["global_step"] == 20  # the smallest learning start allowed runs to its end


@pytest.mark.parametrize("args, fragment", [
    (["--num-envs", "0"], "--num-envs must be positive, got 0"),
    (["--num-envs", "3", "--buffer-size", "20"], "at least 8 frames per game (24 for 3), got 20"),
])
def test_bad_input_gets_one_line_and_nonzero_exit(tmp_path, args, fragment):
    assert_one_line_error(run_script("dqn_atari_parallel.py", *args, cwd=tmp_path), fragment,
                          script="dqn_atari_parallel.py")


# ---- the overlapped learner ----


@pytest.mark.parametrize("bf16", [False, True])
def test_overlapped_updates_are_plain_updates_on_the_batch_drawn_one_update_step_earlier(one_torch_thread, bf16):
    """--overlap-updates: the k-th call applies the gradient of the batch given at call k-1, taken at the weights
    the loop acted with in between, and those weights do not move until the call. A target sync between two calls
    takes the gradient in flight again with the new target network, as a plain update after the sync would see
    it. Checked bit for bit against td_update, clipping on, over 6 batches with a sync after the third."""
    torch.manual_seed(0)
    frames = torch.randint(0, 256, (6, 32, 4, 84, 84), dtype=torch.uint8)
    batches = [(frames[k], torch.randint(0, 6, (32,)), torch.randn(32), frames[k].flip(0),
                (torch.rand(32) < 0.1).float()) for k in range(6)]
    start = parallel.QNetwork(6).state_dict()

    def networks():
        online, target = parallel.QNetwork(6), parallel.QNetwork(6)
        online.load_state_dict(start)
        target.load_state_dict(start)
        target.requires_grad_(False)
        forward = (parallel.bf16_forward(online), parallel.bf16_forward(target)) if bf16 else (online, target)
        return online, target, forward, parallel.make_optimizer(parallel.Args(), online)

    online, target, (online_forward, target_forward), optimizer = networks()
    plain_losses, plain_weights = [], []
    for k, batch in enumerate(batches[:-1]):  # the last batch's gradient is still in flight at the end
        plain_losses.append(parallel.td_update(online_forward, target_forward, optimizer, batch, 0.99, 10.0)[0])
        plain_weights.append(parameters_to_vector(online.parameters()).detach().clone())
        if k == 2:
            target.load_state_dict(online.state_dict())

    online, target, (online_forward, target_forward), optimizer = networks()
    learner = parallel.OverlappedUpdates(
        lambda batch, targets: parallel.td_gradients(online_forward, optimizer, batch[0], batch[1], targets, 10.0),
        lambda batch: parallel.td_target(target_forward, *batch[2:], 0.99), optimizer)
    try:
        assert learner(*batches[0]) is None, "the first call only starts a gradient"
        for k, batch in enumerate(batches[1:]):
            applied = learner(*batch)
            after_step = parameters_to_vector(online.parameters()).detach().clone()
            learner.in_flight.result()  # the next gradient, computed while the loop would act on these weights
            assert torch.equal(parameters_to_vector(online.parameters()).detach(), after_step)
            assert torch.equal(applied[0], plain_losses[k]) and torch.equal(after_step, plain_weights[k]), k
            if k == 2:  # a target sync, as the loop makes it
                target.load_state_dict(online.state_dict())
                learner.retarget()
    finally:
        learner.close()
    assert len(set(torch.stack(plain_losses).tolist())) == 5  # each call's loss is its own batch's


def test_overlapped_updates_pass_on_an_error_in_the_targets_and_still_close():
    """An exception while the loop's thread computes the targets reaches the loop before any gradient is handed
    to the learner, and the learner thread still closes rather than blocking the process's exit."""
    def targets(batch):
        raise ValueError("no targets")

    learner = parallel.OverlappedUpdates(lambda batch, targets: targets, targets, optimizer=None)
    with pytest.raises(ValueError, match="no targets"):
        learner(torch.zeros(1))
    assert learner.in_flight is None
    learner.close()


def test_flush_denormals_holds_in_both_threads_while_training_and_is_undone_after(tmp_path, monkeypatch):
    """--flush-denormals: the loop's thread (the TD targets) and the learner thread (the gradients) both flush
    a value below 1.2e-38 to zero, as the learner thread takes the mode of the thread that starts it; after the
    run, this thread keeps such values again."""
    tiny = torch.tensor(1e-39)
    seen = {"targets": set(), "gradients": set()}

    def watched(name, function):
        def call(*args):
            seen[name].add((tiny * 1.0).item())
            return function(*args)
        return call

    monkeypatch.setattr(parallel, "td_target", watched("targets", parallel.td_target))
    monkeypatch.setattr(parallel, "td_gradients", watched("gradients", parallel.td_gradients))
    parallel.train(small_args(tmp_path, parallel, overlap_updates=True, flush_denormals=True))
    assert seen == {"targets": {0.0}, "gradients": {0.0}}
    assert (tiny * 1.0).item() > 0


# ---- resume and signals, with several games and with the learner ----


@pytest.mark.parametrize("num_envs, overlap_updates, channels_last", [(2, False, False), (1, True, False),
                                                                     (1, False, True)])
def test_a_resumed_run_ends_identical(tmp_path, capsys, num_envs, overlap_updates, channels_last):
    """With two games, the worker process's game is saved and restored as well; with --overlap-updates, the
    gradient in flight at the checkpoint (its batch is saved; target syncs every 50 steps fall between update
    steps); with --channels-last, weights and optimizer state saved and restored in that order."""
    check_a_resumed_run_ends_identical(parallel, tmp_path, capsys, num_envs=num_envs, overlap_updates=overlap_updates,
                                       channels_last=channels_last)


def test_channels_last_keeps_every_convolution_weight_in_that_order(tmp_path):
    run = parallel.train(small_args(tmp_path, parallel, total_timesteps=120, learning_starts=60, channels_last=True))
    convolutions = [layer for layer in run["q_network"].network if isinstance(layer, torch.nn.Conv2d)]
    assert len(convolutions) == 3
    for layer in convolutions:
        assert layer.weight.is_contiguous(memory_format=torch.channels_last)
        assert not layer.weight.is_contiguous()  # so the check above is not met by any 4-d tensor


def test_ctrl_c_to_the_whole_group_writes_a_checkpoint_that_resumes(tmp_path):
    """Ctrl-C reaches every process of the terminal's group, worker processes included: they must outlive it, so
    the trainer can save their games."""
    saved = check_a_signal_writes_a_checkpoint_that_resumes("dqn_atari_parallel.py", tmp_path, signal.SIGINT, True,
                                                            "--num-envs", "2")
    assert len(saved["games"]) == 2


def test_ctrl_c_to_the_whole_group_while_the_workers_start_ends_in_one_line(tmp_path):
    """The workers ignore Ctrl-C from their first instant, as they import torch too: only the trainer answers."""
    trainer = subprocess.Popen([sys.executable, str(REPO / "dqn_atari_parallel.py"), "--num-envs", "3",
                                "--buffer-size", "1000", "--no-cuda", "--runs-dir", "runs"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(worker_pids(trainer.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    workers = worker_pids(trainer.pid)
    assert len(workers) == 2, "the workers never started"
    time.sleep(0.2)  # the trainer is past starting them; they are still importing (seconds)
    os.killpg(trainer.pid, signal.SIGINT)
    _, errors = trainer.communicate(timeout=120)
    assert trainer.returncode != 0 and "Traceback" not in errors, errors
    assert lines_without_emulator_banners(errors) == [
        INTERRUPTED["dqn_atari_parallel.py"]]
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers), "a worker outlived the trainer"


def worker_pids(trainer_pid: int) -> list:
    """The trainer's game workers (multiprocessing's spawned children; not its resource tracker)."""
    try:
        children = Path(f"/proc/{trainer_pid}/task/{trainer_pid}/children").read_text().split()
    except OSError:
        return []
    found = []
    for pid in children:
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found
