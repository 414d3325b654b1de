"""dqn_atari.py's Atari pieces (the game wrappers, device-side preprocessing, the frame replay, checkpoints),
the loop, and the command line. Seed bugs are named in the docstrings of the tests that catch them; the
learner pieces shared with dqn.py are tested in test_learner.py."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.nn.utils import parameters_to_vector

import dqn_atari as atari
import dqn_atari_parallel
from conftest import (rewrite, check_a_resume_at_the_last_step_plays_the_final_evaluation_again,
                      check_a_resumed_run_ends_identical, check_a_signal_writes_a_checkpoint_that_resumes,
                      check_replay_against_a_naive_one, frame_with_id, small_args)
from script_runner import REPO, as_if_not_installed, assert_one_line_error, run_script

CPU = torch.device("cpu")
NOOP = 0


# ---- the game and its wrappers ----


@pytest.mark.parametrize("env_id, frame_skip", [("PongNoFrameskip-v4", 4), ("BreakoutNoFrameskip-v4", 4),
                                                ("BreakoutNoFrameskip-v4", 1)])
def test_preprocessing_matches_gymnasium_atari_preprocessing(env_id, frame_skip):
    """Same emulator states, same actions: our torch max + area resize against gymnasium's AtariPreprocessing
    (OpenCV's INTER_AREA). Tolerance: 1 gray level on at most 0.1% of pixels, since the same averages
    computed in float32 matmuls instead of OpenCV's arithmetic may round a .5 the other way. At frame skip 1
    there is no second frame to take the max with (the max with a stale one showed ghosts of the first frame)."""
    reference = gym.wrappers.AtariPreprocessing(gym.make(env_id), noop_max=0, frame_skip=frame_skip, screen_size=84)
    reference.reset(seed=3)
    game = atari.AtariGame(env_id, seed=3, frame_skip=frame_skip, noop_max=0)
    preprocess = atari.FramePreprocessor(game.raw.shape[1:], CPU)
    ours = [preprocess(game.reset())]
    theirs = [reference.step(game.fire_action)[0]]  # our reset serves with FIRE; the reference is told to
    rng = np.random.default_rng(0)
    for _ in range(1500):
        action = int(rng.integers(game.n_actions))
        frame, reward, terminated, truncated, _ = reference.step(action)
        raw, our_reward, _, _, game_over = game.step(action)
        assert our_reward == reward
        if terminated or truncated or game_over:
            break
        ours.append(preprocess(raw))
        theirs.append(frame)
    difference = np.abs(torch.stack(ours).numpy().astype(int) - np.stack(theirs).astype(int))
    assert len(difference) > 100
    assert difference.max() <= 1 and (difference > 0).mean() <= 1e-3


def test_area_weights_average_each_output_cell():
    weights = atari.area_weights(210, 84)
    assert weights.shape == (84, 210)
    assert torch.allclose(weights.sum(dim=1), torch.ones(84))
    assert torch.allclose(weights.sum(dim=0), torch.full((210,), 84 / 210))  # every pixel counts equally


def test_a_lost_life_ends_the_training_episode_but_not_the_game():
    """Seed bug: training on whole games; a lost life must end the episode, and reset() continue the game."""
    game = atari.AtariGame("BreakoutNoFrameskip-v4", seed=0)
    game.reset()
    assert game.lives == 5
    for step in range(1, 500):
        _, _, terminated, truncated, game_over = game.step(NOOP)
        if terminated:
            break
    assert terminated and not game_over and not truncated
    frames_played = game.ale.getEpisodeFrameNumber()
    game.reset()
    assert game.lives == 4
    assert game.ale.getEpisodeFrameNumber() > frames_played, "reset() after a lost life restarted the game"


def test_breakout_is_served_after_reset_and_after_each_lost_life():
    """Seed bug: Breakout idling without FIRE. Standing still, a served ball is missed and lives are lost;
    with the serve removed, no ball ever comes and the game idles to the end of the test."""
    def lives_lost_standing_still(game):
        game.reset()
        start = game.lives
        for _ in range(400):
            _, _, terminated, _, game_over = game.step(NOOP)
            if game_over:
                break
            if terminated:
                game.reset()
        return start - game.ale.lives()

    assert lives_lost_standing_still(atari.AtariGame("BreakoutNoFrameskip-v4", seed=0)) >= 3
    idle = atari.AtariGame("BreakoutNoFrameskip-v4", seed=0)
    idle.fire_action = None
    assert lives_lost_standing_still(idle) == 0
    assert atari.AtariGame("FreewayNoFrameskip-v4", seed=0).fire_action is None  # no FIRE, no serve


def test_evaluation_games_play_through_lost_lives_with_full_unclipped_returns():
    game = atari.AtariGame("SpaceInvadersNoFrameskip-v4", seed=1, end_on_life_loss=False)
    game.reset()
    rewards, rng = [], np.random.default_rng(1)
    for _ in range(5000):
        _, reward, terminated, truncated, game_over = game.step(int(rng.integers(game.n_actions)))
        rewards.append(reward)
        assert terminated == game_over, "an evaluation game ends only when the game does"
        if game_over:
            break
    assert game_over and game.ale.lives() == 0
    assert max(rewards) > 1, "Space Invaders pays 5 to 30 per invader: rewards must arrive unclipped"
    assert game.game_return == sum(rewards) and game.game_length == len(rewards)


def test_no_op_starts_vary_with_the_seed_and_stay_within_noop_max():
    starts = set()
    for seed in range(8):
        game = atari.AtariGame("PongNoFrameskip-v4", seed=seed, noop_max=30)
        game.fire_action = None  # count the no-ops alone
        game.reset()
        starts.add(game.ale.getEpisodeFrameNumber())
    assert len(starts) > 3 and min(starts) >= 1 and max(starts) <= 30


@pytest.mark.parametrize("env_id, message", [
    ("NoSuchGame-v4", "unknown env id"),
    ("CartPole-v1", "is not an Atari game"),
])
def test_make_ale_env_refuses_what_is_not_an_atari_game(env_id, message):
    with pytest.raises(atari.ConfigError, match=message):
        atari.make_ale_env(env_id, None)


def test_sticky_actions_follow_the_env_default_unless_given():
    def sticky(env_id, given):
        return atari.make_ale_env(env_id, given).unwrapped.ale.getFloat("repeat_action_probability")
    assert sticky("PongNoFrameskip-v4", None) == 0.0
    assert sticky("ALE/Pong-v5", None) == pytest.approx(0.25)
    assert sticky("ALE/Pong-v5", 0.0) == 0.0


# ---- the frame replay ----


def test_frame_replay_matches_a_naive_replay_of_full_stacks():
    replay = atari.FrameReplay(37, CPU, seed=0)
    check_replay_against_a_naive_one(
        replay, 1, lambda frame, action, reward, terminated, end, next_frame, game: replay.add(
            frame, action, reward, terminated, end, next_frame))


def test_frame_replay_samples_with_randint_not_choice(monkeypatch):
    """Seed bug: np.random.choice(size, batch, replace=False) permutes the whole buffer on every draw."""
    replay = atari.FrameReplay(64, CPU, seed=0)
    for t in range(64):
        replay.add(frame_with_id(t), 0, 0.0, False, t % 16 == 15, frame_with_id(t + 1))
    monkeypatch.setattr(np.random, "choice", lambda *a, **k: pytest.fail("replay sampling must not use choice"))
    replay.rng = type("IntegersOnly", (), {"integers": replay.rng.integers})()
    assert replay.sample(32)[0].shape == (32, atari.STACK, atari.FRAME_SIZE, atari.FRAME_SIZE)


def test_frame_replay_batch_is_gathered_not_built_from_a_list(monkeypatch):
    """Seed bug: a batch built as torch.tensor([array, array, ...]), element by element."""
    def no_lists(original):
        def checked(data, *args, **kwargs):
            assert not isinstance(data, (list, tuple)), "batch built from a Python list"
            return original(data, *args, **kwargs)
        return checked

    replay = atari.FrameReplay(64, CPU, seed=0)
    for t in range(64):
        replay.add(frame_with_id(t), 0, 0.0, False, False, frame_with_id(t + 1))
    for name in ("tensor", "as_tensor", "stack"):
        monkeypatch.setattr(torch, name, no_lists(getattr(torch, name)))
    monkeypatch.setattr(np, "array", no_lists(np.array))
    assert replay.sample(16)[0].shape == (16, atari.STACK, atari.FRAME_SIZE, atari.FRAME_SIZE)


def test_frame_replay_stores_uint8_frames_once_and_1m_fits_in_7_1_gb():
    """Seed bug: a float64 replay (8x the bytes of uint8 frames, and stacks stored twice over)."""
    replay = atari.FrameReplay(1000, CPU, seed=0)
    assert replay.frames.dtype == torch.uint8 and replay.frames.shape == (1000, 84, 84)
    assert replay.rewards.dtype == np.float32
    assert replay.nbytes / 1000 * 1_000_000 <= 7.1e9
    replay.add(frame_with_id(1), 2, 1.0, False, False, frame_with_id(2))
    replay.add(frame_with_id(2), 0, 0.0, True, True, frame_with_id(3))
    obs, actions, rewards, next_obs, terminated = replay.sample(4)
    assert obs.dtype == next_obs.dtype == torch.uint8
    assert {rewards.dtype, terminated.dtype} == {torch.float32} and actions.dtype == torch.int64


def test_frame_replay_refuses_a_buffer_larger_than_available_memory(monkeypatch):
    monkeypatch.setattr(atari, "available_memory_bytes", lambda: 2_000_000_000)
    with pytest.raises(atari.ConfigError, match=r"1,000,000 frames needs 7\.07 GB but only 2\.00 GB is available"):
        atari.FrameReplay(1_000_000, CPU, seed=0)


# ---- network and optimizer ----


def test_nature_network_shapes_and_uint8_input():
    network = atari.QNetwork(n_actions=6)
    frames = torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8)
    assert network(frames).shape == (5, 6)
    assert network.network[7].in_features == 3136  # 64 x 7 x 7 after the three convolutions
    assert torch.allclose(network(frames), network.network(frames.float() / 255))


def test_bf16_update_keeps_float32_weights_head_and_targets_and_steps_like_float32():
    torch.manual_seed(0)
    frames = torch.randint(0, 256, (32, 4, 84, 84), dtype=torch.uint8)
    network = atari.QNetwork(6)
    q_autocast = atari.bf16_forward(network)(frames)
    q_plain = network(frames)
    assert q_autocast.dtype == torch.float32 and torch.allclose(q_autocast, q_plain, rtol=0.05, atol=2e-3)
    assert not torch.equal(q_autocast, q_plain), "the layers below the head must run in bf16 under autocast"
    # a bfloat16 head would leave every Q-value on bfloat16's coarse grid
    assert (q_autocast.to(torch.bfloat16).float() != q_autocast).float().mean() > 0.9

    batch = (frames, torch.randint(0, 6, (32,)), torch.randn(32), frames.flip(0), torch.zeros(32))
    before = parameters_to_vector(network.parameters()).detach()
    losses, steps = [], []
    for bf16 in (False, True):
        online, target = atari.QNetwork(6), atari.QNetwork(6)
        online.load_state_dict(network.state_dict())
        target.load_state_dict(network.state_dict())
        optimizer = torch.optim.Adam(online.parameters(), lr=1e-4)
        forward = (atari.bf16_forward(online), atari.bf16_forward(target)) if bf16 else (online, target)
        losses.append(atari.td_update(*forward, optimizer, batch, 0.99, 0.0)[0])
        assert all(p.dtype == torch.float32 for p in online.parameters())
        assert all(state["exp_avg"].dtype == torch.float32 for state in optimizer.state.values())
        steps.append(parameters_to_vector(online.parameters()).detach() - before)
    assert losses[1].dtype == torch.float32 and losses[0] != losses[1], "bf16=True must change the arithmetic"
    assert torch.allclose(losses[0], losses[1], rtol=0.02)
    # Adam's first step moves each weight by about lr against its gradient's sign: the signs must agree
    assert (steps[0] != 0).float().mean() > 0.5  # (weights behind ReLUs dead on this batch do not move)
    assert (steps[0].sign() == steps[1].sign()).float().mean() > 0.95


def test_bf16_target_network_is_cast_once_a_load_and_gives_the_bits_of_casting_at_every_call():
    """The target network's bfloat16 copy is refreshed by each load (a sync, a resume); a stale copy would leave
    the targets of the old weights. The frames' cast must give the bits of obs.float() / 255 cast to bfloat16."""
    torch.manual_seed(0)
    frames = torch.randint(0, 256, (8, 4, 84, 84), dtype=torch.uint8)
    values = torch.arange(256, dtype=torch.uint8)
    assert torch.equal((values.to(torch.bfloat16) / 255.0).view(torch.int16),
                       (values.float() / 255.0).to(torch.bfloat16).view(torch.int16))

    def cast_at_every_call(network):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            features = network.network[:-1](frames.float() / 255.0)
        return network.network[-1](features.float())

    target, online = atari.QNetwork(6).requires_grad_(False), atari.QNetwork(6)
    forward = atari.bf16_forward(target)
    with torch.no_grad():
        assert torch.equal(forward(frames), cast_at_every_call(target))
        target.load_state_dict(online.state_dict())  # a target sync
        assert torch.equal(forward(frames), cast_at_every_call(online))


@pytest.mark.parametrize("bf16, kernels, warned", [(True, False, True), (True, True, False), (False, False, False)])
def test_bf16_on_a_cpu_that_emulates_it_warns_once_at_the_start(tmp_path, capsys, monkeypatch, bf16, kernels, warned):
    """Without AVX-512 an update under --bf16 took 12 times as long as in float32: a silent trap."""
    monkeypatch.setattr(atari, "cpu_has_bf16_kernels", lambda: kernels)
    atari.train(small_args(tmp_path, bf16=bf16, total_timesteps=10, learning_starts=20))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "--bf16" in line]
    assert len(warnings) == int(warned), warnings


# 20 updates in each precision after keep_freed_memory(), in a fresh process (the suite's earlier tests leave a
# fragmented heap and threads of their own), printing each update's minor page faults
PAGE_FAULTS_OF_UPDATES = """
import json, resource, torch
import dqn_atari as atari
atari.keep_freed_memory()
torch.manual_seed(0)
online, target = atari.QNetwork(4), atari.QNetwork(4)
optimizer = torch.optim.Adam(online.parameters(), lr=1e-4, fused=True)
frames = torch.randint(0, 256, (32, 4, 84, 84), dtype=torch.uint8)
batch = (frames, torch.randint(0, 4, (32,)), torch.randn(32), frames.flip(0), torch.zeros(32))
faults = {}
for bf16 in (False, True):
    forward = (atari.bf16_forward(online), atari.bf16_forward(target)) if bf16 else (online, target)
    faults[bf16] = []
    for _ in range(20):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        atari.td_update(*forward, optimizer, batch, 0.99, 10.0)
        faults[bf16].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def test_updates_reuse_freed_memory_instead_of_page_faulting_it_back():
    """Without keep_freed_memory(), glibc handed the update's big blocks back to the kernel after each update, and
    the next one faulted them in again: 800 to 4,000 minor page faults an update on the development machine, in
    most updates. With it, only the first updates fault, while the heap grows to the update's working set (in CI
    this took up to 10 updates in bf16, so the last 10 of 20 are judged)."""
    if not atari.keep_freed_memory():
        pytest.skip("no glibc malloc on this platform: nothing to tune")
    child = subprocess.run([sys.executable, "-c", PAGE_FAULTS_OF_UPDATES], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    for precision, faults in json.loads(child.stdout.splitlines()[-1]).items():
        assert np.median(faults[10:]) < 50, f"bf16={precision}: page faults of each update {faults}"


def test_deepmind_rmsprop_takes_the_step_their_code_defines():
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = atari.DeepMindRMSprop([weight], lr=0.1, grad_scale=2.0)
    gradients = [torch.tensor([0.5, -1.0]), torch.tensor([0.2, 0.3])]
    w, g, g2 = np.array([1.0, -2.0]), np.zeros(2), np.zeros(2)
    for grad in gradients:
        weight.grad = grad.clone()
        optimizer.step()
        dw = 2.0 * grad.numpy()
        g, g2 = 0.95 * g + 0.05 * dw, 0.95 * g2 + 0.05 * dw ** 2
        w = w - 0.1 * dw / np.sqrt(g2 - g ** 2 + 0.01)
    assert weight.detach().numpy() == pytest.approx(w, rel=1e-6)


# ---- the loop, evaluation and checkpoints ----


def test_loop_stores_truncation_and_logs_whole_games(tmp_path, monkeypatch):
    """Games capped at 400 frames (100 steps) truncate: the final frame gets its own slot, the transition into
    it is not terminal, and a whole game is logged once, however many lives it lost."""
    monkeypatch.setattr(atari, "MAX_GAME_FRAMES", 400)
    result = atari.train(small_args(tmp_path, env_id="PongNoFrameskip-v4", total_timesteps=350,
                                    learning_starts=1000))
    replay = result["replay"]
    finals = np.flatnonzero(~replay.starts_transition[:replay.size])
    assert len(finals) == 3 and len(result["game_returns"]) == 3
    assert not replay.terminated[finals - 1].any(), "a time limit must not be stored as terminal"


def test_loop_clips_rewards_to_their_sign(tmp_path):
    result = atari.train(small_args(tmp_path, env_id="SpaceInvadersNoFrameskip-v4", total_timesteps=300, end_e=1.0,
                                    learning_starts=1000))
    stored = set(np.unique(result["replay"].rewards[:result["replay"].size]))
    assert 1.0 in stored and stored <= {-1.0, 0.0, 1.0}, "Space Invaders pays 5 to 30: clipped, it must be 1"


def test_loop_ends_training_episodes_at_lost_lives(tmp_path):
    result = atari.train(small_args(tmp_path, total_timesteps=250, learning_starts=1000))
    replay = result["replay"]
    terminal_slots = np.flatnonzero(replay.terminated[:replay.size])
    assert len(terminal_slots) >= 2 and len(terminal_slots) > len(result["game_returns"]), "lives end episodes"
    assert (~replay.starts_transition[terminal_slots + 1]).all()  # each lost life's final frame is kept


def test_same_seed_same_run_and_a_resumed_run_ends_identical(tmp_path, capsys):
    """The same seed gives the same run, and a run resumed from its checkpoint (with the replay) ends as the one
    that ran in one go. One game ends in the first 120 steps: the progress line's window has one to keep."""
    check_a_resumed_run_ends_identical(atari, tmp_path, capsys)


def test_a_resume_at_the_last_step_plays_the_final_evaluation_again_in_place_of_its_row(tmp_path):
    check_a_resume_at_the_last_step_plays_the_final_evaluation_again(
        atari, tmp_path, 40, total_timesteps=40, learning_starts=20, checkpoint_every=40)


def test_checkpoint_refuses_other_env_other_network_and_corrupt_files(tmp_path):
    run = atari.train(small_args(tmp_path, total_timesteps=30, checkpoint_every=30))
    path = os.path.join(run["run_dir"], "checkpoint.pt")
    original = open(path, "rb").read()

    with pytest.raises(atari.ConfigError, match="trained with --env-id BreakoutNoFrameskip-v4, not PongNoFrameskip"):
        atari.train(atari.Args(resume=path, env_id="PongNoFrameskip-v4"),
                    ["--resume", path, "--env-id", "PongNoFrameskip-v4"])

    other_shape = torch.load(path, weights_only=True)
    other_shape["q_network"]["network.9.weight"] = torch.zeros(18, 512)
    reshaped = str(tmp_path / "reshaped.pt")
    rewrite(other_shape, reshaped)
    with pytest.raises(atari.ConfigError, match="does not fit this network"):
        atari.train(atari.Args(resume=reshaped), ["--resume", reshaped])

    older = torch.load(path, weights_only=True)
    del older["args"]["bf16"]  # a checkpoint from before the flag existed trained without it
    older_path = str(tmp_path / "older.pt")
    rewrite(older, older_path)
    with pytest.raises(atari.ConfigError, match="trained with --bf16 False, not True"):
        atari.train(atari.Args(resume=older_path, bf16=True), ["--resume", older_path, "--bf16"])

    newer = torch.load(path, weights_only=True)
    newer["args"]["num_envs"] = 2  # a flag of another script (dqn_atari_parallel.py) or a later version
    newer_path = str(tmp_path / "newer.pt")
    rewrite(newer, newer_path)
    with pytest.raises(atari.ConfigError, match=r"holds a flag this version lacks \(.*num_envs.*\); continue it with "
                                                r"the dqn_atari.py that wrote it"):
        atari.train(atari.Args(resume=newer_path), ["--resume", newer_path])

    earlier_layout = {**torch.load(path, weights_only=True), "format": "dqn_atari checkpoint 2"}
    rewrite(earlier_layout, older_path)
    with pytest.raises(atari.ConfigError,
                       match="an older checkpoint .*; continue it with dqn_atari.py of commit 3d1869b"):
        atari.train(atari.Args(resume=older_path), ["--resume", older_path])

    eval_rows = open(os.path.join(run["run_dir"], "eval.csv")).read()
    with pytest.raises(atari.ConfigError, match="the checkpoint is at step 30, past --total-timesteps 10; give one "
                                                "of at least 30"):
        atari.train(atari.Args(resume=path, total_timesteps=10), ["--resume", path, "--total-timesteps", "10"])
    assert open(os.path.join(run["run_dir"], "eval.csv")).read() == eval_rows

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(original[: len(original) // 2])
    with pytest.raises(atari.ConfigError, match="is not a readable dqn_atari.py checkpoint"):
        atari.train(atari.Args(resume=str(corrupt)), ["--resume", str(corrupt)])
    assert open(path, "rb").read() == original and len(corrupt.read_bytes()) == len(original) // 2


def test_eval_checkpoint_plays_the_same_games_at_each_epsilon(tmp_path, capsys):
    """benchmark/eval_checkpoint.py: a checkpoint's network (either Atari script's), evaluated at several epsilons."""
    sys.path.insert(0, str(REPO / "benchmark"))
    import eval_checkpoint

    run = atari.train(small_args(tmp_path, total_timesteps=30, checkpoint_every=30))
    path = os.path.join(run["run_dir"], "checkpoint.pt")
    capsys.readouterr()  # the training run's own output
    eval_checkpoint.main([path, "--epsilons", "0", "0", "1", "--games", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert "BreakoutNoFrameskip-v4, step 30, 2 games per epsilon" in lines[0]
    assert lines[1] == lines[2] and lines[1].startswith("epsilon 0: mean")  # same games, same greedy play
    parallel_run = dqn_atari_parallel.train(small_args(tmp_path, dqn_atari_parallel, num_envs=2, total_timesteps=30,
                                                       checkpoint_every=30))
    capsys.readouterr()
    eval_checkpoint.main([os.path.join(parallel_run["run_dir"], "checkpoint.pt"), "--epsilons", "0", "--games", "2"])
    parallel_lines = capsys.readouterr().out.splitlines()
    assert "BreakoutNoFrameskip-v4, step 30, 2 games per epsilon" in parallel_lines[0]
    assert parallel_lines[1].startswith("epsilon 0: mean")
    for bad, message in [([str(tmp_path / "missing.pt")], "no checkpoint at"),
                         ([path, "--games", "0"], "give --games of at least 1 (got 0)"),
                         ([path, "--seed", "-5"], "a --seed from 0 to 4294967295 (got -5)"),
                         ([path, "--epsilons", "0.05", "2"], "--epsilons in [0, 1] (got 0.05 2)")]:
        with pytest.raises(SystemExit) as stop:
            eval_checkpoint.main(bad)
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_agent_gif_plays_one_whole_game_from_saved_weights(tmp_path, capsys):
    """benchmark/agent_gif.py: a saved model's game as a GIF; anything but a saved model is refused in one line."""
    sys.path.insert(0, str(REPO / "benchmark"))
    import agent_gif

    run = atari.train(small_args(tmp_path, total_timesteps=30, save_model=True))
    model = os.path.join(run["run_dir"], "dqn_atari.pt")
    agent_gif.main([model, "--out", str(tmp_path / "agent.gif"), "--every", "4"])
    printed = capsys.readouterr().out.splitlines()[-1]
    assert printed.startswith("BreakoutNoFrameskip-v4: score ")
    assert (tmp_path / "agent.gif").read_bytes()[:6] == b"GIF89a"
    steps, frames = int(printed.split(" in ")[1].split()[0]), int(printed.split(", ")[-1].split()[0])
    assert frames == -(-steps // 4)
    with pytest.raises(SystemExit) as stop:
        agent_gif.main([os.path.join(run["run_dir"], "eval.csv"), "--out", str(tmp_path / "no.gif")])
    assert stop.value.code == 2 and "is not a model dqn_atari.py --save-model wrote" in capsys.readouterr().err


def test_bf16_check_trains_five_ways_from_a_checkpoint_and_compares_with_float32(tmp_path, capsys, monkeypatch):
    """benchmark/bf16_check.py: float32, bf16 (plain, channels-last, flushing denormals) on the same batches and
    float32 on others, from one checkpoint; denormals are flushed in their variant's updates alone."""
    sys.path.insert(0, str(REPO / "benchmark"))
    import bf16_check

    run = atari.train(small_args(tmp_path, total_timesteps=120, checkpoint_every=120, checkpoint_replay=True))
    tiny, flushed = torch.tensor(1e-39), []
    update = atari.td_update
    monkeypatch.setattr(atari, "td_update", lambda *args: flushed.append((tiny * 1.0).item() == 0) or update(*args))
    out = tmp_path / "check"
    bf16_check.main([os.path.join(run["run_dir"], "checkpoint.pt"), "--updates", "8", "--seeds", "2", "--states",
                     "50", "--games", "1", "--out", str(out)])
    rows = json.loads((out / "bf16_check.json").read_text())["rows"]
    assert [(row["seed"], row["variant"]) for row in rows] == [(s, v) for s in (1, 2) for v in bf16_check.VARIANTS]
    assert all(row["greedy_agreement_with_float32"] == 1.0 for row in rows if row["variant"] == "float32")
    losses = {row["variant"]: row["td_loss_last_quarter"] for row in rows if row["seed"] == 1}
    # so does the flush: this young agent's TD errors are tiny, and Adam's second moments of their squared
    # gradients fall below 1.2e-38
    assert len(set(losses.values())) == 5, "bf16, its channels-last order, the flush and the other batches"
    assert flushed == ([False] * 8 * 3 + [True] * 8 + [False] * 8) * 2  # 8 updates per variant, in VARIANTS' order
    assert (tiny * 1.0).item() > 0
    assert "| bf16, same batches |" in (out / "summary.md").read_text()
    # the parallel variant's checkpoint: its replay keeps a ring per training game
    parallel_run = dqn_atari_parallel.train(small_args(tmp_path, dqn_atari_parallel, num_envs=2, total_timesteps=120,
                                                       checkpoint_every=120, checkpoint_replay=True))
    bf16_check.main([os.path.join(parallel_run["run_dir"], "checkpoint.pt"), "--updates", "2", "--seeds", "1",
                     "--states", "20", "--games", "1", "--out", str(tmp_path / "parallel-check")])
    parallel_rows = json.loads((tmp_path / "parallel-check" / "bf16_check.json").read_text())["rows"]
    assert [row["variant"] for row in parallel_rows] == list(bf16_check.VARIANTS)

    no_replay = atari.train(small_args(tmp_path, total_timesteps=30, checkpoint_every=30))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        bf16_check.main([os.path.join(no_replay["run_dir"], "checkpoint.pt"), "--out", str(out)])
    assert stop.value.code == 2 and "holds no replay: write it with --checkpoint-replay" in capsys.readouterr().err


def test_evaluation_is_reproducible_per_step_and_plays_whole_games():
    args = atari.Args(env_id="BreakoutNoFrameskip-v4", eval_episodes=3)
    evaluate = atari.Evaluator(args, atari.FramePreprocessor((210, 160), CPU), seed=5)
    torch.manual_seed(0)
    network = atari.QNetwork(4)
    first, again = evaluate(network, step=100), evaluate(network, step=100)
    assert len(first) == 3 and np.array_equal(first, again)
    assert all(game.game_over for game in evaluate.games)


def test_run_writes_eval_curve_videos_and_tensorboard_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = atari.train(small_args(tmp_path, total_timesteps=600, eval_every=300, capture_video=True))
    lines = open(os.path.join(result["run_dir"], "eval.csv")).read().splitlines()
    assert [int(line.split(",")[0]) for line in lines[1:]] == [300, 600]
    for step in (300, 600):
        with open(os.path.join(result["run_dir"], "videos", f"eval_step{step}.gif"), "rb") as video:
            assert video.read(6) == b"GIF89a"
    events = EventAccumulator(result["run_dir"]).Reload()
    expected = {"charts/episodic_return", "charts/episodic_length", "charts/epsilon", "charts/SPS",
                "losses/td_loss", "losses/q_values", "eval/episodic_return"}
    assert expected <= set(events.Tags()["scalars"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to check the GPU paths")
def test_gpu_runs_keep_frames_and_batches_on_the_gpu_and_the_replay_pinned(tmp_path):
    """Seed bugs: tensors left on the CPU, and preprocessing on the CPU when the GPU is there."""
    result = atari.train(small_args(tmp_path, cuda=True))
    replay = result["replay"]
    assert replay.pinned and replay.frames.is_pinned()
    assert all(part.device.type == "cuda" for part in replay.sample(8))
    preprocess = atari.FramePreprocessor((210, 160), torch.device("cuda"))
    assert preprocess(np.zeros((2, 210, 160), np.uint8)).device.type == "cuda"


# ---- the command line ----


@pytest.mark.parametrize("args, fragment", [
    (["--env-id", "NoSuchGame-v4"], "unknown env id 'NoSuchGame-v4'"),
    (["--env-id", "CartPole-v1"], "is not an Atari game"),
    (["--buffer-size", "4"], "--buffer-size must be at least 8 frames"),
    (["--learning-rate", "nan"], "--learning-rate must be positive, got nan"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be >= 0, got nan"),
    (["--gamma", "2"], "--gamma must be in [0, 1], got 2.0"),
    (["--learning-starts", "0"], "--learning-starts must be positive, got 0"),
    (["--buffer-size", "100000000"], "a replay of 100,000,000 frames needs 707.10 GB"),
    (["--resume", "missing.pt"], "no checkpoint at missing.pt"),
    (["--runs-dir", "/dev/null", "--buffer-size", "1000"], "cannot write in /dev/null (Not a directory); pass a writable"),
    (["--seed", "4294967296"], "--seed must be from 0 to 4294967295, got 4294967296"),
    (["--exp-name", "a/b"], "--exp-name names the run directory and must not contain '/', got 'a/b'"),
    (["--batch-size", "64", "--buffer-size", "32"], "--batch-size 64 is larger than the replay (--buffer-size 32)"),
])
def test_bad_input_gets_one_line_and_nonzero_exit(tmp_path, args, fragment):
    assert_one_line_error(run_script("dqn_atari.py", *args, cwd=tmp_path), fragment, script="dqn_atari.py")


@pytest.mark.parametrize("script", ["dqn_atari.py", "dqn_atari_profiled.py", "dqn_atari_parallel.py"])
def test_capture_video_without_pillow_stops_at_once_not_at_the_first_evaluation(tmp_path, script):
    finished = run_script(script, "--capture-video", "--buffer-size", "1000", "--runs-dir", "runs", cwd=tmp_path,
                          interpreter_args=as_if_not_installed("PIL"))
    assert_one_line_error(finished, "--capture-video writes GIFs with pillow, not installed: pip install pillow", script)
    assert not (tmp_path / "runs").exists()  # nothing started


def test_a_signal_writes_a_checkpoint_that_resumes(tmp_path):
    """SIGTERM to the trainer: it finishes the step, writes a checkpoint and exits 0; the checkpoint resumes."""
    saved = check_a_signal_writes_a_checkpoint_that_resumes("dqn_atari.py", tmp_path, signal.SIGTERM, False)
    assert saved["game"]["ale"].dtype == torch.uint8


def test_batches_and_preprocessed_frames_land_on_the_training_device():
    """Seed bugs: tensors left on the CPU, and preprocessing on the CPU when the GPU is there. Checked
    without a GPU on torch's `meta` device: a tensor that skips the move to the device stays on the CPU."""
    meta = torch.device("meta")
    replay = atari.FrameReplay(64, meta, seed=0)
    for t in range(64):
        replay.add(frame_with_id(t), 0, 0.0, False, False, frame_with_id(t + 1))
    assert all(part.device == meta for part in replay.sample(8))

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class OutputDevices(TorchDispatchMode):
        """Records the device of every tensor each torch operation makes."""
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.seen += [(str(func), t.device.type) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            return out

    preprocess = atari.FramePreprocessor((210, 160), meta)
    with OutputDevices() as ops:
        frame = preprocess(np.zeros((2, 210, 160), np.uint8))
    assert frame.device == meta and frame.shape == (84, 84)
    # only the raw frames' arrival from the emulator (lift_fresh: numpy to tensor) may be on the CPU
    computed = [(op, device) for op, device in ops.seen if "lift_fresh" not in op]
    assert any("amax" in op for op, _ in computed) and any(".mm." in op for op, _ in computed)
    assert all(device == "meta" for _, device in computed), f"work done off the device: {computed}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to record CUDA graphs")
@pytest.mark.parametrize("bf16", [False, True])
def test_cuda_graphed_updates_and_actions_give_the_plain_numbers_bit_for_bit(bf16):
    """The graphs replay the same kernels: 10 updates (a target sync mid-way, clipping on) must leave the same
    losses, greedy actions and weights as plain calls, exactly. A replay that read stale inputs, old target
    weights or a stale optimizer step count would differ."""
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    frames = torch.randint(0, 256, (10, 32, 4, 84, 84), dtype=torch.uint8, device=cuda)
    batches = [(frames[k], torch.randint(0, 6, (32,), device=cuda), torch.randn(32, device=cuda), frames[k].flip(0),
                (torch.rand(32, device=cuda) < 0.1).float()) for k in range(10)]
    start = atari.QNetwork(6).state_dict()
    runs = []
    for graphs in (False, True):
        online, target = atari.QNetwork(6).to(cuda), atari.QNetwork(6).to(cuda)
        online.load_state_dict(start)
        target.load_state_dict(start)
        optimizer = atari.make_optimizer(atari.Args(), online)
        forward = (atari.bf16_forward(online), atari.bf16_forward(target)) if bf16 else (online, target)
        update = lambda *batch: atari.td_update(*forward, optimizer, batch, 0.99, 10.0)  # noqa: E731
        act = lambda obs: online(obs).argmax(dim=1)  # noqa: E731
        if graphs:  # as train() attaches them
            optimizer.param_groups[0]["capturable"] = True
            update, act = atari.CudaGraphed(update), atari.CudaGraphed(act)
        losses, actions = [], []
        for k, batch in enumerate(batches):
            losses.append(update(*batch)[0].clone())
            if k == 5:
                target.load_state_dict(online.state_dict())
            with torch.no_grad():
                actions.append(act(batch[0][k:k + 1]).clone())
        runs.append((torch.stack(losses), torch.cat(actions), parameters_to_vector(online.parameters()).detach()))
        assert not graphs or (update.graph is not None and act.graph is not None)
    (plain_losses, plain_actions, plain_weights), (graph_losses, graph_actions, graph_weights) = runs
    assert len(set(plain_losses.tolist())) == 10  # ten different batches, so a replay of a stale one would show
    assert torch.equal(plain_losses, graph_losses) and torch.equal(plain_actions, graph_actions)
    assert torch.equal(plain_weights, graph_weights), (plain_weights - graph_weights).abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to record CUDA graphs")
def test_a_training_run_with_cuda_graphs_matches_one_without(tmp_path):
    """The whole loop, not only the update: the same seed with and without --cuda-graphs must give the same games
    and the same final weights (if plain CUDA runs repeat exactly on this machine, which is checked first)."""

    def run(name, cuda_graphs):
        result = atari.train(small_args(tmp_path / name, cuda=True, cuda_graphs=cuda_graphs))
        weights = parameters_to_vector(result["q_network"].parameters()).detach().cpu()
        return result["game_returns"], result["final_returns"].tolist(), weights

    plain, plain_again, graphed = run("plain", False), run("plain-again", False), run("graphed", True)
    if not (plain[:2] == plain_again[:2] and torch.equal(plain[2], plain_again[2])):
        pytest.skip("two plain CUDA runs of one seed differ on this machine: nothing exact to compare the graphs with")
    assert plain[:2] == graphed[:2] and torch.equal(plain[2], graphed[2])


def test_eta_waits_for_updates_then_extrapolates_the_steps_since_the_last_line(tmp_path, capsys, monkeypatch):
    """Collecting runs about ten times faster than learning: an ETA from the whole run promised hours for a day."""
    log = atari.RunLog(small_args(tmp_path, total_timesteps=2_000_000), None)
    clock, real_time, this_thread = iter([0.0, 700.0, 800.0, 900.0]), time.time, threading.get_ident()
    # 80k steps of collecting in 700 s, then 100 steps a second; the event writer's thread keeps the real clock
    monkeypatch.setattr(atari.time, "time",
                        lambda: next(clock) if threading.get_ident() == this_thread else real_time())
    log.start_clock()
    for step in (80_000, 90_000, 100_000):
        log.progress(step, 0.5, [], updates_begin_at=80_000)
    log.close("")
    etas = [line.rsplit("|", 1)[1].strip() for line in capsys.readouterr().out.splitlines()]
    # 1.91M and 1.9M steps left at 100 a second; the whole run's rate would say 4:45:00 at 100k
    assert etas == ["updates from step 80,000", "ETA 5:18:20", "ETA 5:16:40"]


def test_progress_lines_say_when_updates_start_and_time_only_the_learning_phase(tmp_path, capsys, monkeypatch):
    clock = iter(range(10**6))  # one second a reading: the phases' rates come from the steps between readings
    monkeypatch.setattr(atari.time, "time", lambda: float(next(clock)))
    atari.train(small_args(tmp_path, total_timesteps=300, learning_starts=100, progress_every=50))
    lines = {int(line.split()[1].split("/")[0]): line.rsplit("|", 1)[1].strip()
             for line in capsys.readouterr().out.splitlines() if line.startswith("step ")}
    assert lines[50] == lines[100] == "updates from step 100"
    assert all(re.fullmatch(r"ETA \d+:\d\d:\d\d", lines[step]) for step in (150, 200, 250)), lines
