"""dqn_atari.py's Atari pieces (the game wrappers, device-side preprocessing, the frame replay, checkpoints),
the loop, and the command line. Seed bugs are named in the docstrings of the tests that catch them; the
learner pieces shared with dqn.py are tested in test_learner.py."""

import json
import os
import resource
import signal
import subprocess
import sys
import threading

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.nn.utils import parameters_to_vector

import dqn_atari as atari
from script_runner import REPO, assert_one_line_error, run_script

CPU = torch.device("cpu")
NOOP = 0


def small_args(tmp_path, **overrides) -> atari.Args:
    """A few hundred Breakout steps with a tiny replay: every branch of the loop in seconds."""
    settings = dict(env_id="BreakoutNoFrameskip-v4", total_timesteps=300, learning_starts=100, buffer_size=600,
                    target_network_frequency=50, eval_every=0, eval_episodes=1, progress_every=0,
                    runs_dir=str(tmp_path / "runs"), cuda=False)
    settings.update(overrides)
    return atari.Args(**settings)


def progress_lines(output: str) -> dict:
    """A run's progress lines by step, less the fields that depend on timing (SPS, ETA)."""
    lines = {}
    for line in output.splitlines():
        if line.startswith("step "):
            step, *fields = [field.strip() for field in line.split("|")]
            steps_done = int(step.split()[1].split("/")[0])
            lines[steps_done] = [field for field in fields if not field.startswith(("SPS", "ETA"))]
    return lines


# ---- the game and its wrappers ----


@pytest.mark.parametrize("env_id", ["PongNoFrameskip-v4", "BreakoutNoFrameskip-v4"])
def test_preprocessing_matches_gymnasium_atari_preprocessing(env_id):
    """Same emulator states, same actions: our torch max + area resize against gymnasium's AtariPreprocessing
    (OpenCV's INTER_AREA). Tolerance: 1 gray level on at most 0.1% of pixels, since the same averages
    computed in float32 matmuls instead of OpenCV's arithmetic may round a .5 the other way."""
    reference = gym.wrappers.AtariPreprocessing(gym.make(env_id), noop_max=0, frame_skip=4, screen_size=84)
    reference.reset(seed=3)
    game = atari.AtariGame(env_id, seed=3, noop_max=0)
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


def frame_with_id(frame_id: int) -> torch.Tensor:
    frame = torch.zeros(atari.FRAME_SIZE, atari.FRAME_SIZE, dtype=torch.uint8)
    frame[0, 0], frame[0, 1] = frame_id // 256, frame_id % 256
    return frame


def frame_ids(stacks: torch.Tensor) -> np.ndarray:
    return (stacks[..., 0, 0].long() * 256 + stacks[..., 0, 1].long()).numpy()


@pytest.mark.parametrize("games", [1, 3])
def test_frame_replay_matches_a_naive_replay_of_full_stacks(games):
    """Random episodes of random lengths, ending terminated or truncated, through many wrap-arounds. Naive:
    every transition with its full (s, a, r, s', terminated) stacks, as FrameStack built them. Every slot the
    replay calls valid must give exactly the naive transition, and every transition whose frames are all
    still in its ring (s' included) must be valid. With several games (training games), their steps
    interleave at random, as the games' do, and each game keeps to a ring of its own."""
    ring = 37
    replay = atari.FrameReplay(ring * games, CPU, seed=0, games=games)
    rng = np.random.default_rng(0)
    naive, slot_of = [], {}
    written = [0] * games  # frames written per game; a frame's id is its write number * games + game
    episode = [None] * games  # per game: (stack, steps taken, length, ends terminated)
    episodes_done = 0
    while episodes_done < 120 * games:
        k = int(rng.integers(games))
        if episode[k] is None:
            episode[k] = ([written[k]] * atari.STACK, 0, int(rng.integers(1, 12)), bool(rng.integers(2)))
        stack, t, length, terminated_end = episode[k]
        action, reward = int(rng.integers(6)), float(rng.choice([-1.0, 0.0, 1.0]))
        end = t == length - 1
        terminated = end and terminated_end
        next_stack = stack[1:] + [written[k] + 1]
        slot = replay.add(frame_with_id(stack[-1] * games + k), action, reward, terminated, end,
                          frame_with_id(next_stack[-1] * games + k), game=k)
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
            obs, actions, rewards, next_obs, terminated = replay.sample(len(idx), idx=idx)
            expected = [naive[slot_of[i]] for i in idx]
            assert frame_ids(obs).tolist() == [[n * games + e[0] for n in e[1]] for e in expected]
            assert frame_ids(next_obs).tolist() == [[n * games + e[0] for n in e[4]] for e in expected]
            assert actions.tolist() == [e[2] for e in expected]
            assert rewards.tolist() == [e[3] for e in expected]
            assert terminated.tolist() == [float(e[5]) for e in expected]
    assert all(slot // ring == naive[n][0] for slot, n in slot_of.items()), "each game in its own ring"
    sampled = replay.sample_indices(5000)
    assert replay.valid(sampled).all() and set(sampled.tolist()) == valid, "randint reaches every valid slot"


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


def test_a_replay_on_the_gpu_is_checked_against_free_gpu_memory(monkeypatch):
    """--replay-on-gpu: the check reads the GPU's free memory, before anything is allocated there (so no GPU is
    needed to see the refusal)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1_000_000_000, 80_000_000_000))
    with pytest.raises(atari.ConfigError, match=r"needs 7\.07 GB but only 1\.00 GB is available on the GPU; pass a "
                                                r"smaller --buffer-size"):
        atari.FrameReplay(1_000_000, torch.device("cuda"), seed=0, on_device=True)


def test_a_worker_process_that_dies_is_reported_not_waited_for():
    games = atari.Games(2, "BreakoutNoFrameskip-v4", seed=0, frame_skip=4, noop_max=0, repeat_action_probability=None)
    games.reset()
    games.workers[0].kill()
    games.workers[0].join()
    with pytest.raises(RuntimeError, match="the worker process of training game 1 exited"):
        games.step(np.zeros(2, dtype=np.int64))


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
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q_autocast = network(frames)
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
        losses.append(atari.td_update(online, target, optimizer, batch, 0.99, 0.0, bf16)[0])
        assert all(p.dtype == torch.float32 for p in online.parameters())
        assert all(state["exp_avg"].dtype == torch.float32 for state in optimizer.state.values())
        steps.append(parameters_to_vector(online.parameters()).detach() - before)
    assert losses[1].dtype == torch.float32 and losses[0] != losses[1], "bf16=True must change the arithmetic"
    assert torch.allclose(losses[0], losses[1], rtol=0.02)
    # Adam's first step moves each weight by about lr against its gradient's sign: the signs must agree
    assert (steps[0] != 0).float().mean() > 0.5  # (weights behind ReLUs dead on this batch do not move)
    assert (steps[0].sign() == steps[1].sign()).float().mean() > 0.95


@pytest.mark.parametrize("bf16, kernels, warned", [(True, False, True), (True, True, False), (False, False, False)])
def test_bf16_on_a_cpu_that_emulates_it_warns_once_at_the_start(tmp_path, capsys, monkeypatch, bf16, kernels, warned):
    """Without AVX-512 an update under --bf16 took 12 times as long as in float32: a silent trap."""
    monkeypatch.setattr(atari, "cpu_has_bf16_kernels", lambda: kernels)
    atari.build_run(small_args(tmp_path, bf16=bf16)).close()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "--bf16" in line]
    assert len(warnings) == int(warned), warnings


def test_updates_reuse_freed_memory_instead_of_page_faulting_it_back():
    """Without keep_freed_memory(), glibc handed the update's big blocks back to the kernel after each update, and
    the next one faulted them in again: 800 to 4,000 minor page faults an update on the development machine."""
    if not atari.keep_freed_memory():
        pytest.skip("no glibc malloc on this platform: nothing to tune")
    torch.manual_seed(0)
    online, target = atari.QNetwork(4), atari.QNetwork(4)
    optimizer = torch.optim.Adam(online.parameters(), lr=1e-4, fused=True)
    frames = torch.randint(0, 256, (32, 4, 84, 84), dtype=torch.uint8)
    batch = (frames, torch.randint(0, 4, (32,)), torch.randn(32), frames.flip(0), torch.zeros(32))
    for bf16 in (False, True):
        faults = []
        for _ in range(10):  # the first few grow the heap to the update's working set
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            atari.td_update(online, target, optimizer, batch, 0.99, 10.0, bf16)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        assert np.median(faults[3:]) < 50, f"bf16={bf16}: page faults of each update {faults}"


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


@pytest.fixture
def one_torch_thread():
    """Plain and overlapped updates on one torch thread: the same kernels, so the same numbers bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    start = atari.QNetwork(6).state_dict()

    def networks():
        online, target = atari.QNetwork(6), atari.QNetwork(6)
        online.load_state_dict(start)
        target.load_state_dict(start)
        target.requires_grad_(False)
        return online, target, atari.make_optimizer(atari.Args(), online)

    online, target, optimizer = networks()
    plain_losses, plain_weights = [], []
    for k, batch in enumerate(batches[:-1]):  # the last batch's gradient is still in flight at the end
        plain_losses.append(atari.td_update(online, target, optimizer, batch, 0.99, 10.0, bf16)[0])
        plain_weights.append(parameters_to_vector(online.parameters()).detach().clone())
        if k == 2:
            target.load_state_dict(online.state_dict())

    online, target, optimizer = networks()
    sync = atari.TargetSync(online, target, every=1)
    learner = atari.OverlappedUpdates(
        lambda batch, targets: atari.td_gradients(online, optimizer, batch[0], batch[1], targets, 10.0, bf16),
        lambda batch: atari.td_target(target, *batch[2:], 0.99, bf16), optimizer)
    sync.learner = learner
    try:
        assert learner(*batches[0]) is None, "the first call only starts a gradient"
        for k, batch in enumerate(batches[1:]):
            applied = learner(*batch)
            after_step = parameters_to_vector(online.parameters()).detach().clone()
            learner.in_flight.result()  # the next gradient, computed while the loop would act on these weights
            assert torch.equal(parameters_to_vector(online.parameters()).detach(), after_step)
            assert torch.equal(applied[0], plain_losses[k]) and torch.equal(after_step, plain_weights[k]), k
            if k == 2:
                sync.step()
    finally:
        learner.close()
    assert len(set(torch.stack(plain_losses).tolist())) == 5  # each call's loss is its own batch's


def test_overlapped_updates_pass_on_an_error_in_the_targets_and_still_close():
    """An exception while the loop's thread computes the targets reaches the loop, and the learner thread,
    which waits for those targets, is released rather than left blocking the process's exit."""
    def targets(batch):
        raise ValueError("no targets")

    learner = atari.OverlappedUpdates(lambda batch, targets: targets(), targets, optimizer=None)
    with pytest.raises(ValueError, match="no targets"):
        learner(torch.zeros(1))
    with pytest.raises(ValueError, match="no targets"):
        learner.in_flight.result(timeout=10)
    learner.close()


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


@pytest.mark.parametrize("num_envs, overlap_updates", [(1, False), (2, False), (1, True)])
def test_same_seed_same_run_and_a_resumed_run_ends_identical(tmp_path, capsys, num_envs, overlap_updates):
    """2N steps in one go, and N steps then N more from a checkpoint with the replay: identical parameters.
    Epsilon is held constant, as the schedule's length depends on --total-timesteps of each run. With two
    games, the worker process's game is saved and restored as well; with --overlap-updates, the gradient in
    flight at the checkpoint (its batch is saved; target syncs every 50 steps fall between update steps).
    The progress line at step 2N is the same too: its window of recent games comes back with the checkpoint."""
    settings = dict(start_e=0.5, end_e=0.5, learning_starts=60, num_envs=num_envs, overlap_updates=overlap_updates,
                    progress_every=120)
    threads_before = torch.get_num_threads()
    whole = atari.train(small_args(tmp_path, total_timesteps=240, **settings))
    whole_progress = progress_lines(capsys.readouterr().out)
    assert torch.get_num_threads() == threads_before, "the run's thread count is restored"
    again = atari.train(small_args(tmp_path, total_timesteps=240, **settings))
    first_half = atari.train(small_args(tmp_path, total_timesteps=120, checkpoint_every=120, checkpoint_replay=True,
                                        **settings))
    checkpoint = os.path.join(first_half["run_dir"], "checkpoint.pt")
    # one game ends in the first 120 steps (two games play 60 steps each and end none): the window has one to keep
    assert first_half["game_returns"] or num_envs > 1
    capsys.readouterr()
    resumed = atari.train(atari.Args(resume=checkpoint, total_timesteps=240), ["--resume", checkpoint,
                                                                            "--total-timesteps", "240"])
    assert resumed["run_dir"] == first_half["run_dir"] and resumed["global_step"] == 240
    assert progress_lines(capsys.readouterr().out)[240] == whole_progress[240]
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("learner")], "left running"
    for run in (again, resumed):
        for name, parameter in whole["q_network"].state_dict().items():
            assert torch.equal(parameter, run["q_network"].state_dict()[name]), name
    eval_rows = open(os.path.join(resumed["run_dir"], "eval.csv")).read().splitlines()
    assert [row.split(",")[0] for row in eval_rows[1:]] == ["120", "240"]


def test_several_games_count_steps_updates_and_syncs_as_one_game_and_leave_no_worker(tmp_path, monkeypatch):
    """Three games: 300 env steps are 100 passes of the loop, yet the updates (one per 4 env steps after
    learning_starts) and target syncs are those of one game, each game's transitions fill a ring of its
    own, and the worker processes are gone when training ends."""
    updates, syncs = [], []
    real_update, real_sync = atari.td_update, atari.TargetSync.step
    monkeypatch.setattr(atari, "td_update", lambda *a, **k: updates.append(1) or real_update(*a, **k))
    monkeypatch.setattr(atari.TargetSync, "step", lambda self: syncs.append(self.steps + 1) or real_sync(self))
    threads_before = torch.get_num_threads()
    result = atari.train(small_args(tmp_path, num_envs=3, end_e=1.0))
    assert result["global_step"] == 300 and len(updates) == (300 - 100) // 4 and syncs == list(range(1, 301))
    replay = result["replay"]
    transitions = replay.starts_transition.reshape(3, replay.ring).sum(axis=1)
    assert transitions.tolist() == [100, 100, 100]
    assert not torch.multiprocessing.active_children()
    assert torch.get_num_threads() == threads_before, "the trainer's thread count is restored"


def test_checkpoint_refuses_other_env_other_network_and_corrupt_files(tmp_path):
    run = atari.train(small_args(tmp_path, total_timesteps=30, checkpoint_every=30))
    path = os.path.join(run["run_dir"], "checkpoint.pt")
    original = open(path, "rb").read()

    with pytest.raises(atari.ConfigError, match="trained with --env-id BreakoutNoFrameskip-v4, not PongNoFrameskip"):
        atari.train(atari.Args(resume=path, env_id="PongNoFrameskip-v4"), ["--resume", path, "--env-id", "Pong"])

    other_shape = torch.load(path, weights_only=True)
    other_shape["q_network"]["network.9.weight"] = torch.zeros(18, 512)
    reshaped = str(tmp_path / "reshaped.pt")
    torch.save(other_shape, reshaped)
    with pytest.raises(atari.ConfigError, match="does not fit this network"):
        atari.train(atari.Args(resume=reshaped), ["--resume", reshaped])

    older = torch.load(path, weights_only=True)
    del older["args"]["bf16"]  # a checkpoint from before the flag existed trained without it
    older_path = str(tmp_path / "older.pt")
    torch.save(older, older_path)
    with pytest.raises(atari.ConfigError, match="trained with --bf16 False, not True"):
        atari.train(atari.Args(resume=older_path, bf16=True), ["--resume", older_path, "--bf16"])

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
    """benchmark/eval_checkpoint.py: a checkpoint's network, evaluated at several epsilons."""
    sys.path.insert(0, str(REPO / "benchmark"))
    import eval_checkpoint

    run = atari.train(small_args(tmp_path, total_timesteps=30, checkpoint_every=30))
    path = os.path.join(run["run_dir"], "checkpoint.pt")
    capsys.readouterr()  # the training run's own output
    eval_checkpoint.main([path, "--epsilons", "0", "0", "1", "--games", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert "BreakoutNoFrameskip-v4, step 30, 2 games per epsilon" in lines[0]
    assert lines[1] == lines[2] and lines[1].startswith("epsilon 0: mean")  # same games, same greedy play
    for bad, message in [([str(tmp_path / "missing.pt")], "no checkpoint at"),
                         ([path, "--games", "0"], "give --games of at least 1 (got 0)"),
                         ([path, "--seed", "-5"], "a --seed from 0 to 4294967295 (got -5)"),
                         ([path, "--epsilons", "0.05", "2"], "--epsilons in [0, 1] (got 0.05 2)")]:
        with pytest.raises(SystemExit) as stop:
            eval_checkpoint.main(bad)
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_bf16_check_trains_three_ways_from_a_checkpoint_and_compares_with_float32(tmp_path, capsys):
    """benchmark/bf16_check.py: float32, bf16 on the same batches and float32 on others, from one checkpoint."""
    sys.path.insert(0, str(REPO / "benchmark"))
    import bf16_check

    run = atari.train(small_args(tmp_path, total_timesteps=120, checkpoint_every=120, checkpoint_replay=True))
    out = tmp_path / "check"
    bf16_check.main([os.path.join(run["run_dir"], "checkpoint.pt"), "--updates", "8", "--seeds", "2", "--states",
                     "50", "--games", "1", "--out", str(out)])
    rows = json.loads((out / "bf16_check.json").read_text())["rows"]
    assert [(row["seed"], row["variant"]) for row in rows] == [(s, v) for s in (1, 2) for v in bf16_check.VARIANTS]
    assert all(row["greedy_agreement_with_float32"] == 1.0 for row in rows if row["variant"] == "float32")
    losses = {row["variant"]: row["td_loss_last_quarter"] for row in rows if row["seed"] == 1}
    assert len(set(losses.values())) == 3, "bf16 and the other batches must each change the updates"
    assert "| bf16, same batches |" in (out / "summary.md").read_text()

    no_replay = atari.train(small_args(tmp_path, total_timesteps=30, checkpoint_every=30))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        bf16_check.main([os.path.join(no_replay["run_dir"], "checkpoint.pt"), "--out", str(out)])
    assert stop.value.code == 2 and "holds no replay: write it with --checkpoint-replay" in capsys.readouterr().err


def test_flags_given_reads_tyro_spellings():
    assert atari.flags_given(["--env-id", "x", "--total_timesteps=5", "--no-cuda", "--resume", "p"]) == {
        "env_id", "total_timesteps", "cuda", "resume"}


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to keep the replay in GPU memory")
def test_a_replay_in_gpu_memory_gives_the_pinned_replays_batches(tmp_path):
    """--replay-on-gpu moves where the frames live, not what a batch holds; a run with it and two games works."""
    cuda = torch.device("cuda")
    replays = [atari.FrameReplay(64, cuda, seed=0, streams=2, on_device=on_gpu) for on_gpu in (False, True)]
    assert replays[0].frames.is_pinned() and replays[1].frames.device.type == "cuda" and not replays[1].pinned
    for t in range(100):
        for replay in replays:
            replay.add(frame_with_id(t).to(cuda), t % 4, float(t % 3 - 1), t % 16 == 15, t % 16 == 15,
                       frame_with_id(t + 1).to(cuda), stream=t % 2)
    for pinned_part, gpu_part in zip(replays[0].sample(32), replays[1].sample(32)):
        assert pinned_part.device.type == gpu_part.device.type == "cuda" and torch.equal(pinned_part, gpu_part)
    result = atari.train(small_args(tmp_path, cuda=True, replay_on_gpu=True, num_envs=2))
    assert result["replay"].frames.device.type == "cuda" and result["global_step"] == 300


# ---- the command line ----


@pytest.mark.parametrize("args, fragment", [
    (["--env-id", "NoSuchGame-v4"], "unknown env id 'NoSuchGame-v4'"),
    (["--env-id", "CartPole-v1"], "is not an Atari game"),
    (["--buffer-size", "4"], "--buffer-size must be at least 8 frames"),
    (["--num-envs", "0"], "--num-envs must be positive, got 0"),
    (["--num-envs", "3", "--buffer-size", "20"], "at least 8 frames per game (24 for 3), got 20"),
    (["--gamma", "2"], "--gamma must be in [0, 1], got 2.0"),
    (["--learning-starts", "0"], "--learning-starts must be positive, got 0"),
    (["--buffer-size", "100000000"], "a replay of 100,000,000 frames needs 707.10 GB"),
    (["--resume", "missing.pt"], "no checkpoint at missing.pt"),
    (["--runs-dir", "/dev/null", "--buffer-size", "1000"], "cannot create the run directory /dev/null/Breakout"),
    (["--seed", "4294967296"], "--seed must be from 0 to 4294967295, got 4294967296"),
    (["--exp-name", "a/b"], "--exp-name names the run directory and must not contain '/', got 'a/b'"),
    (["--batch-size", "64", "--buffer-size", "32"], "--batch-size 64 is larger than the replay (--buffer-size 32)"),
])
def test_bad_input_gets_one_line_and_nonzero_exit(tmp_path, args, fragment):
    assert_one_line_error(run_script("dqn_atari.py", *args, cwd=tmp_path), fragment, script="dqn_atari.py")


@pytest.mark.parametrize("num_envs, sig, whole_group", [(1, signal.SIGTERM, False), (2, signal.SIGINT, True)])
def test_a_signal_writes_a_checkpoint_that_resumes(tmp_path, num_envs, sig, whole_group):
    """SIGTERM to the trainer; and Ctrl-C, which the terminal sends to every process of the group, worker
    processes included: they must outlive it, so the trainer can save their games."""
    command = [sys.executable, str(REPO / "dqn_atari.py"), "--buffer-size", "2000", "--learning-starts", "100",
               "--total-timesteps", "100000", "--progress-every", "100", "--no-cuda", "--runs-dir", "runs",
               "--num-envs", str(num_envs)]
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
    stopped_at = saved["global_step"]
    assert len(saved["games"]) == num_envs
    resumed = run_script("dqn_atari.py", "--resume", str(checkpoint), "--total-timesteps", str(stopped_at + 50),
                         "--eval-episodes", "1", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "final eval over 1 games" in resumed.stdout
    assert "the checkpoint has no replay: collecting 100 steps" in resumed.stdout


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
        optimizer = atari.make_optimizer(atari.Args(), online, capturable=graphs)
        update = atari.CudaGraphed(lambda *batch: atari.td_update(online, target, optimizer, batch, 0.99, 10.0, bf16),
                                   graphs)
        act = atari.CudaGraphed(lambda obs: online(obs).argmax(dim=1), graphs)
        losses, actions = [], []
        for k, batch in enumerate(batches):
            losses.append(update(*batch)[0].clone())
            if k == 5:
                target.load_state_dict(online.state_dict())
            with torch.no_grad():
                actions.append(act(batch[0][k:k + 1]).clone())
        runs.append((torch.stack(losses), torch.cat(actions), parameters_to_vector(online.parameters()).detach()))
        assert (update.graph is not None) == graphs and (act.graph is not None) == graphs
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


def test_eta_waits_for_updates_then_extrapolates_the_learning_phase_alone():
    """Collecting runs about ten times faster than learning: an ETA drawn from it promised hours for a day."""
    assert atari.time_left(500.0, 70_000, 2_000_000, 80_000, None) == "updates from step 80,000"
    learning_since = (700.0, 90_000)  # 90k steps took 700 s, nearly all of it collecting
    assert atari.time_left(700.0, 90_000, 2_000_000, 80_000, learning_since) == "ETA     ?"
    # then 100 steps a second: 1.9M steps left take 19,000 s (the whole run's rate would say 15,200 s)
    assert atari.time_left(800.0, 100_000, 2_000_000, 80_000, learning_since) == "ETA  5.28h"


def test_progress_lines_say_when_updates_start_and_time_only_the_learning_phase(tmp_path, capsys, monkeypatch):
    clock = iter(range(10**6))  # one second a reading: the phases' rates come from the steps between readings
    monkeypatch.setattr(atari.time, "time", lambda: float(next(clock)))
    atari.train(small_args(tmp_path, total_timesteps=300, learning_starts=100, progress_every=50))
    lines = {int(line.split()[1].split("/")[0]): line.rsplit("|", 1)[1].strip()
             for line in capsys.readouterr().out.splitlines() if line.startswith("step ")}
    assert lines[50] == lines[100] == "updates from step 100"
    assert lines[150] == "ETA     ?"
    assert lines[200].startswith("ETA ") and lines[200] != "ETA     ?"
