"""Parity with Stable-Baselines3 (a test dependency only; the scripts never import it): for the same weights
and the same batch, one update of our learner and of SB3's `DQN.train()` give the same TD targets, loss and
parameters; our epsilon schedules follow SB3's over whole runs."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import dqn
import dqn_atari

sb3 = pytest.importorskip("stable_baselines3", reason="stable-baselines3 is in requirements-dev.txt")
from stable_baselines3.common.logger import configure  # noqa: E402
from stable_baselines3.common.type_aliases import ReplayBufferSamples  # noqa: E402
from stable_baselines3.common.utils import LinearSchedule  # noqa: E402

GAMMA, LEARNING_RATE = 0.99, 1e-3


class FrameStackSpaces(gym.Env):
    """Only the spaces of dqn_atari.py's agent: SB3 builds its CNN policy from them."""

    observation_space = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    action_space = gym.spaces.Discrete(6)


def matched_sb3_dqn(env: gym.Env, policy: str, net_arch: list, max_grad_norm: float):
    model = sb3.DQN(policy, env, learning_rate=LEARNING_RATE, gamma=GAMMA, max_grad_norm=max_grad_norm,
                    buffer_size=64, learning_starts=0, policy_kwargs={"net_arch": net_arch}, device="cpu", seed=0)
    model.set_logger(configure(None, []))  # train() logs its loss; learn() would have set this up
    return model


def sb3_state_dict(ours: dict, script) -> dict:
    """Our parameter names -> SB3's: dqn.py's MLP is SB3's q_net; dqn_atari.py's convolutions and 512-unit
    layer are SB3's NatureCNN feature extractor, its last layer SB3's q_net."""
    if script is dqn:
        return {f"q_net.{name[len('network.'):]}": value for name, value in ours.items()}
    renamed = {"network.0": "features_extractor.cnn.0", "network.2": "features_extractor.cnn.2",
               "network.4": "features_extractor.cnn.4", "network.7": "features_extractor.linear.0",
               "network.9": "q_net.0"}
    return {f"{renamed[name.rsplit('.', 1)[0]]}.{name.rsplit('.', 1)[1]}": value for name, value in ours.items()}


def parity_case(script):
    """(our online and target networks, SB3 model, batch) for the script, with random weights and data."""
    torch.manual_seed(0)
    batch_size = 32
    if script is dqn:
        env = gym.make("CartPole-v1")
        online, target = dqn.QNetwork(4, 2, (64, 64)), dqn.QNetwork(4, 2, (64, 64))
        model = matched_sb3_dqn(env, "MlpPolicy", [64, 64], max_grad_norm=10.0)
        obs, next_obs = torch.randn(batch_size, 4), torch.randn(batch_size, 4)
    else:
        env = FrameStackSpaces()
        online, target = dqn_atari.QNetwork(6), dqn_atari.QNetwork(6)
        # dqn_atari.py's default: no gradient clipping; SB3 always clips, so give it a norm never reached
        model = matched_sb3_dqn(env, "CnnPolicy", [], max_grad_norm=float("inf"))
        obs = torch.randint(0, 256, (batch_size, 4, 84, 84), dtype=torch.uint8)
        next_obs = torch.randint(0, 256, (batch_size, 4, 84, 84), dtype=torch.uint8)
    with torch.no_grad():
        for parameter in target.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))  # a target network that differs from the online one
    n_actions = env.action_space.n
    batch = (obs, torch.randint(0, n_actions, (batch_size,)), torch.randn(batch_size), next_obs,
             (torch.rand(batch_size) < 0.3).float())
    model.q_net.load_state_dict(sb3_state_dict(online.state_dict(), script))
    model.q_net_target.load_state_dict(sb3_state_dict(target.state_dict(), script))
    return online, target, model, batch


@pytest.mark.parametrize("script", [dqn, dqn_atari], ids=["dqn", "dqn_atari"])
def test_one_update_matches_sb3(script, monkeypatch):
    online, target, model, batch = parity_case(script)
    obs, actions, rewards, next_obs, terminated = batch
    max_grad_norm = 10.0 if script is dqn else 0.0

    # SB3 samples this batch and we record what its loss function is given
    samples = ReplayBufferSamples(obs, actions.view(-1, 1), next_obs, terminated.view(-1, 1), rewards.view(-1, 1))
    monkeypatch.setattr(model.replay_buffer, "sample", lambda *args, **kwargs: samples)
    seen = {}
    sb3_loss_function = sb3.dqn.dqn.F.smooth_l1_loss

    def recording_loss(current_q, target_q):
        seen["target"] = target_q.clone()
        seen["loss"] = sb3_loss_function(current_q, target_q)
        return seen["loss"]

    monkeypatch.setattr(sb3.dqn.dqn.F, "smooth_l1_loss", recording_loss)
    model.train(gradient_steps=1, batch_size=len(actions))

    before = {name: value.clone() for name, value in online.state_dict().items()}
    optimizer = torch.optim.Adam(online.parameters(), lr=LEARNING_RATE)  # SB3's Adam: torch's defaults
    ours = {}

    def our_recording_loss(q_taken, target_q):  # the same torch function: patched again, to record ours
        ours["target"] = target_q.clone()
        return sb3_loss_function(q_taken, target_q)

    monkeypatch.setattr(sb3.dqn.dqn.F, "smooth_l1_loss", our_recording_loss)
    loss, _ = script.td_update(online, target, optimizer, batch, GAMMA, max_grad_norm)
    our_targets = ours["target"]

    torch.testing.assert_close(our_targets, seen["target"].view(-1))
    torch.testing.assert_close(loss, seen["loss"].detach())
    assert loss.item() > 0.1, "a batch whose loss is ~0 would compare nothing"
    updated = sb3_state_dict(online.state_dict(), script)
    for name, value in model.q_net.state_dict().items():
        torch.testing.assert_close(updated[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert not any(torch.equal(before[name], value) for name, value in online.state_dict().items()), \
        "every parameter must have moved in the update"


@pytest.mark.parametrize("script", [dqn, dqn_atari], ids=["dqn", "dqn_atari"])
@pytest.mark.parametrize("start, end, fraction, total", [(1.0, 0.05, 0.5, 10_000), (1.0, 0.01, 0.1, 100_000),
                                                         (0.9, 0.2, 1.0, 5000)])
def test_epsilon_schedule_matches_sb3_over_a_whole_run(script, start, end, fraction, total):
    """SB3's DQN sets epsilon = schedule(1 - num_timesteps / total_timesteps) before each step."""
    schedule = LinearSchedule(start, end, fraction)
    duration = int(fraction * total)  # as both scripts' loops compute it
    ours = np.array([script.linear_schedule(start, end, duration, t) for t in range(total + 1)])
    theirs = np.array([schedule(1.0 - t / total) for t in range(total + 1)])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-9)


def test_training_pipeline_matches_sb3_atari_wrapper(monkeypatch):
    """dqn_atari.py's game + preprocessing against SB3's AtariWrapper stack (max-and-skip, episodic life,
    fire reset, warp frame, clip reward), on the same emulator and the same random actions: frames, clipped
    rewards, terminations at lost lives, truncations at the frame cap, lives. Games are capped at 400 frames
    so that truncations come often. Resets differ by design (SB3 adds a no-op step after a lost life and an
    action 2 after FIRE), so after each reset SB3's emulator is set to ours and the comparison goes on.
    Frame tolerance: 1 gray level on 0.01% of pixels, as SB3 converts RGB to gray with OpenCV's weights and
    the emulator with its own palette table."""
    from stable_baselines3.common.atari_wrappers import AtariWrapper, EpisodicLifeEnv

    monkeypatch.setattr(dqn_atari, "MAX_GAME_FRAMES", 400)
    ours = dqn_atari.AtariGame("BreakoutNoFrameskip-v4", seed=0, noop_max=0)
    theirs = AtariWrapper(gym.make("BreakoutNoFrameskip-v4", max_num_frames_per_episode=400), noop_max=0)
    episodic_life = theirs
    while not isinstance(episodic_life, EpisodicLifeEnv):
        episodic_life = episodic_life.env
    preprocess = dqn_atari.FramePreprocessor((210, 160), torch.device("cpu"))

    def reset_both():
        ours.reset()
        theirs.reset(seed=0)
        theirs.unwrapped.ale.restoreState(ours.ale.cloneState(include_rng=True))
        episodic_life.lives = ours.lives

    reset_both()
    rng = np.random.default_rng(0)
    differences, ends = [], {"terminated": 0, "truncated": 0, "rewards": 0}
    for _ in range(3000):
        action = int(rng.integers(ours.n_actions))
        raw, reward, terminated, truncated, game_over = ours.step(action)
        frame, their_reward, their_terminated, their_truncated, _ = theirs.step(action)
        assert (np.sign(reward), terminated, truncated) == (their_reward, their_terminated, their_truncated)
        assert ours.ale.lives() == theirs.unwrapped.ale.lives()
        ends["rewards"] += reward != 0
        if not game_over:  # at a game's end SB3 keeps stale frames from an earlier step; ours shows the last two
            differences.append(np.abs(preprocess(raw).numpy().astype(int) - frame[..., 0].astype(int)))
        if terminated or truncated:
            ends["terminated"] += terminated
            ends["truncated"] += truncated
            reset_both()
    assert min(ends.values()) >= 10, ends  # every kind of event was compared, many times
    differences = np.stack(differences)
    assert differences.max() <= 1 and (differences > 0).mean() <= 1e-4
