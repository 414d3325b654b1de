"""What a loader trusts (no file we load may run code) and how a run fails: a diverging loss, a resume on other
hardware, a resume without the replay, a game whose lives counter reaches 0 before it ends."""

import os
import pickle
import re

import numpy as np
import pytest
import torch

import dqn
import dqn_atari as atari
from script_runner import assert_one_line_error, run_script
from conftest import small_args


# ---- no file we load runs code ----


class CreatesAFile:
    """Unpickled, this object creates `path`: a stand-in for any code a crafted file could run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory) -> dict:
    tmp_path = tmp_path_factory.mktemp("real")
    run = atari.train(small_args(tmp_path, total_timesteps=120, checkpoint_every=120, checkpoint_replay=True))
    return torch.load(os.path.join(run["run_dir"], "checkpoint.pt"), weights_only=True)


def crafted_checkpoints(real: dict, marker) -> dict:
    """Checkpoints that each carry a payload creating `marker` when unpickled, by the three ways in."""
    pickled = pickle.dumps(CreatesAFile(marker))
    in_emulator_field = {**real, "game": {**real["game"], "ale": pickled}}
    older_format = {**in_emulator_field, "format": "dqn_atari checkpoint 1"}
    as_an_object = {**real, "args": CreatesAFile(marker)}  # torch.save pickles the object itself
    return {"emulator bytes": (in_emulator_field, "the emulator state is a bytes, not the uint8 tensor"),
            "older format": (older_format, f"of commit {atari.OLDER_FORMATS['dqn_atari checkpoint 1'][1]}"),
            "object": (as_an_object, "is not a readable dqn_atari.py checkpoint (UnpicklingError)")}


def test_load_checkpoint_refuses_every_pickle_payload_without_running_it(real_checkpoint, tmp_path):
    marker = tmp_path / "ran"
    for name, (payload, message) in crafted_checkpoints(real_checkpoint, marker).items():
        path = str(tmp_path / f"{name}.pt")
        torch.save(payload, path)
        with pytest.raises(atari.ConfigError, match=re.escape(message)):
            atari.load_checkpoint(path)
        assert not marker.exists(), f"{name}: loading ran the payload"
    pickle.loads(pickle.dumps(CreatesAFile(marker)))
    assert marker.exists(), "the payload does run when unpickled: the check above can fail"


def test_every_loader_on_the_command_line_refuses_a_crafted_file_in_one_line(real_checkpoint, tmp_path):
    marker = tmp_path / "ran"
    path = str(tmp_path / "crafted.pt")
    torch.save(crafted_checkpoints(real_checkpoint, marker)["emulator bytes"][0], path)
    assert_one_line_error(run_script("dqn_atari.py", "--resume", path, cwd=tmp_path), "emulator state", "dqn_atari.py")
    # the benchmark scripts answer as argparse does: their usage line, then the error line
    for script, arguments in {"benchmark/eval_checkpoint.py": [path, "--games", "1"],
                              "benchmark/bf16_check.py": [path, "--updates", "1", "--out", str(tmp_path / "out")]}.items():
        finished = run_script(script, *arguments, cwd=tmp_path)
        assert finished.returncode != 0 and "Traceback" not in finished.stderr, finished.stderr
        assert "error:" in finished.stderr.splitlines()[-1] and "emulator state" in finished.stderr.splitlines()[-1]
    assert not marker.exists(), "a loader ran the payload"
    model = str(tmp_path / "model.pt")
    torch.save({"state_dict": CreatesAFile(marker), "env_id": "CartPole-v1"}, model)
    assert_one_line_error(run_script("dqn.py", "--eval-model", model, cwd=tmp_path), "is not a readable dqn.py model")
    assert not marker.exists(), "dqn.py ran the payload"


def test_emulator_state_is_kept_as_ale_py_bytes_and_restores_the_game(tmp_path):
    game = atari.AtariGame("BreakoutNoFrameskip-v4", seed=3)
    game.reset()
    saved = game.state()
    assert saved["ale"].dtype == torch.uint8 and saved["ale"].dim() == 1
    later = [game.step(1)[0].copy() for _ in range(20)]
    game.load_state(saved)
    assert all(np.array_equal(game.step(1)[0], frames) for frames in later)
    for unreadable in (torch.zeros(64, dtype=torch.uint8), torch.full((100,), 255, dtype=torch.uint8)):
        with pytest.raises(atari.ConfigError, match="not one ale-py can read"):  # refused when parsed or restored
            game.load_state({**saved, "ale": unreadable})


# ---- a diverging run ----


def poison_weights_after(module, calls: int, monkeypatch):
    """td_update that fills the network's weights with NaN after `calls` updates, as a divergence ends."""
    real_update, count = module.td_update, [0]

    def update(q_network, *rest, **kwargs):
        count[0] += 1
        if count[0] == calls:
            with torch.no_grad():
                for parameter in q_network.parameters():
                    parameter.fill_(float("nan"))
        return real_update(q_network, *rest, **kwargs)

    monkeypatch.setattr(module, "td_update", update)


@pytest.mark.parametrize("checkpoint_every, what", [
    (100, "at step 200 the TD loss is nan and the mean Q-value nan"),  # where the loss is read, every 100 steps
    (50, "at step 150 the network's weights are not finite"),  # a checkpoint between two loss reads
])
def test_a_diverging_run_stops_and_leaves_its_last_good_checkpoint(tmp_path, monkeypatch, checkpoint_every, what):
    poison_weights_after(atari, calls=7, monkeypatch=monkeypatch)  # updates every 4 steps from 104: NaN from 128
    with pytest.raises(atari.TrainingDiverged) as failure:
        atari.train(small_args(tmp_path, total_timesteps=300, checkpoint_every=checkpoint_every))
    [run_dir] = os.listdir(tmp_path / "runs")
    checkpoint_path = str(tmp_path / "runs" / run_dir / "checkpoint.pt")
    assert str(failure.value) == (f"training diverged: {what}; the last good checkpoint, {checkpoint_path} "
                                  "(step 100), is untouched; try a smaller --learning-rate")
    kept = atari.load_checkpoint(checkpoint_path)
    assert kept["global_step"] == 100
    assert all(torch.isfinite(tensor).all() for tensor in kept["q_network"].values())


def test_a_diverging_dqn_run_stops_in_one_line_and_saves_no_model(tmp_path):
    # Adam's steps are about the learning rate in size: at 1e38 the weights overflow within a few updates
    finished = run_script("dqn.py", "--learning-rate", "1e38", "--total-timesteps", "1500", "--learning-starts", "500",
                          "--save-model", "--runs-dir", str(tmp_path / "runs"), "--no-cuda", cwd=tmp_path)
    assert_one_line_error(finished, "training diverged: at step ")
    assert "no model was saved" in finished.stderr
    assert not list((tmp_path / "runs").glob("*/*.pt"))


def test_dqn_in_process_divergence_is_caught_at_the_next_loss_read(tmp_path, monkeypatch):
    poison_weights_after(dqn, calls=8, monkeypatch=monkeypatch)  # the first train step's 8th gradient step
    args = dqn.Args(total_timesteps=1000, learning_starts=500, train_frequency=64, gradient_steps=8, buffer_size=1000,
                    hidden_sizes=(32,), eval_every=0, progress_every=0, runs_dir=str(tmp_path / "runs"), cuda=False)
    with pytest.raises(dqn.TrainingDiverged, match="at step 512 the TD loss is nan"):
        dqn.train(args)


# ---- a CPU checkpoint resumed where CUDA graphs record the optimizer step ----


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to record CUDA graphs")
def test_a_cpu_checkpoint_resumes_on_the_gpu_with_cuda_graphs(tmp_path):
    first = atari.train(small_args(tmp_path, total_timesteps=150, checkpoint_every=150, checkpoint_replay=True))
    path = os.path.join(first["run_dir"], "checkpoint.pt")
    resumed = atari.train(atari.Args(resume=path, total_timesteps=300, cuda=True),
                          ["--resume", path, "--total-timesteps", "300", "--cuda"])
    assert resumed["global_step"] == 300


# ---- a resume without the replay ----


def test_a_resume_without_the_replay_stores_the_stacks_the_agent_saw(tmp_path):
    first = atari.train(small_args(tmp_path, total_timesteps=130, checkpoint_every=130))
    path = os.path.join(first["run_dir"], "checkpoint.pt")
    saw = atari.load_checkpoint(path)["obs"][0]
    assert len({frame.numpy().tobytes() for frame in saw}) == atari.STACK, "mid-episode: four different frames"
    resumed = atari.train(atari.Args(resume=path, total_timesteps=140), ["--resume", path, "--total-timesteps", "140"])
    replay = resumed["replay"]
    first_transition = np.flatnonzero(replay.starts_transition[:replay.size])[:1]
    stored, *_ = replay.batch(first_transition)
    assert torch.equal(stored[0], saw)


# ---- lives ----


class LivesScript:
    """A stand-in emulator: lives per frame as given, game over from `over_at` on; every frame rewards 0."""

    def __init__(self, lives_by_frame: dict, over_at: int):
        self.frame, self.lives_by_frame, self.over_at = 0, lives_by_frame, over_at

    def act(self, action):
        self.frame += 1
        return 0.0

    def lives(self):
        return [lives for frame, lives in sorted(self.lives_by_frame.items()) if frame <= self.frame][-1]

    def game_over(self, with_truncation=False):
        return self.frame >= self.over_at

    def game_truncated(self):
        return False

    def getScreenGrayscale(self, buffer):
        buffer[:] = self.frame % 256

    def reset_game(self):
        self.frame = 0


def test_a_lives_counter_that_reaches_0_before_the_game_ends_ends_one_episode_not_two():
    """As SB3's EpisodicLifeEnv: a life lost ends an episode while lives remain; reaching 0 is the game's end,
    which this game reports 8 frames later."""
    game = atari.AtariGame("BreakoutNoFrameskip-v4", seed=0, noop_max=0)
    game.ale = LivesScript({0: 2, 20: 1, 40: 0}, over_at=48)
    game.reset()
    ends = []
    while not game.game_over:
        _, _, terminated, truncated, game_over = game.step(0)
        if terminated:
            ends.append((game.ale.frame, game_over))
            if not game_over:
                game.reset()
    assert ends == [(20, False), (48, True)]
