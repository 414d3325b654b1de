"""Unit tests for dqn.py's pieces, and a regression test for each bug the seed hit (named in each docstring)."""

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn as nn

import dqn


def small_args(tmp_path, **overrides) -> dqn.Args:
    """A run of a few thousand CartPole steps: enough to exercise every branch of the loop in seconds."""
    settings = dict(total_timesteps=3000, learning_starts=500, train_frequency=64, gradient_steps=8,
                    buffer_size=2000, hidden_sizes=(32,), eval_every=1000, eval_episodes=3,
                    progress_every=0, runs_dir=str(tmp_path / "runs"), cuda=False)
    settings.update(overrides)
    return dqn.Args(**settings)


# ---- replay ----


def filled_replay(capacity=8, obs_dim=3, count=5, seed=0):
    replay = dqn.ReplayBuffer(capacity, obs_dim, torch.device("cpu"), seed)
    for i in range(count):
        replay.add(np.full(obs_dim, i, np.float64), i % 2, float(i), np.full(obs_dim, i + 1), i % 3 == 0)
    return replay


def test_replay_stores_transitions_and_wraps_around():
    replay = filled_replay(capacity=4, count=6)
    assert replay.size == 4 and replay.position == 2
    # slots 0 and 1 were overwritten by transitions 4 and 5; slots 2 and 3 still hold 2 and 3
    assert replay.observations[:, 0].tolist() == [4, 5, 2, 3]
    assert replay.next_observations[:, 0].tolist() == [5, 6, 3, 4]
    assert replay.actions.tolist() == [0, 1, 0, 1]
    assert replay.rewards.tolist() == [4, 5, 2, 3]
    assert replay.terminated.tolist() == [0, 0, 0, 1]


def test_replay_samples_only_filled_slots_and_reaches_all_of_them():
    replay = filled_replay(capacity=100, count=7)
    obs, actions, rewards, next_obs, terminated = replay.sample(5000)
    seen = set(obs[:, 0].tolist())
    assert seen == set(range(7)), "sampling must cover the filled part [0, size) and nothing past it"
    assert torch.equal(next_obs[:, 0], obs[:, 0] + 1)  # rows stay aligned across arrays
    assert torch.equal(rewards, obs[:, 0])


def test_replay_sampling_uses_randint_not_choice(monkeypatch):
    """Seed bug: np.random.choice(size, batch, replace=False) permutes the whole buffer on every draw."""
    def forbidden(*args, **kwargs):
        raise AssertionError("replay sampling must not use choice")

    class IntegersOnly:
        def __init__(self, rng):
            self.integers = rng.integers

    replay = filled_replay(capacity=1000, count=1000)
    monkeypatch.setattr(np.random, "choice", forbidden)
    replay.rng = IntegersOnly(replay.rng)
    batch = replay.sample(32)
    assert batch[0].shape == (32, 3)


def test_replay_is_float32_never_float64():
    """Seed bug: a float64 replay took several times the memory of the data it held."""
    replay = filled_replay(capacity=10, obs_dim=4)
    assert replay.observations.dtype == np.float32 and replay.next_observations.dtype == np.float32
    assert replay.rewards.dtype == np.float32 and replay.terminated.dtype == np.float32
    obs, actions, rewards, next_obs, terminated = replay.sample(4)
    assert {obs.dtype, rewards.dtype, next_obs.dtype, terminated.dtype} == {torch.float32}
    assert actions.dtype == torch.int64
    total = sum(a.nbytes for a in (replay.observations, replay.next_observations, replay.actions,
                                   replay.rewards, replay.terminated))
    assert total == 10 * (2 * 4 * 4 + 8 + 4 + 4)


def test_replay_batch_is_not_built_from_a_list_of_arrays(monkeypatch):
    """Seed bug: torch.tensor([array, array, ...]) per batch, a slow element-by-element conversion."""
    original = torch.tensor

    def tensor_without_lists(data, *args, **kwargs):
        assert not isinstance(data, (list, tuple)), "batch built from a Python list"
        return original(data, *args, **kwargs)

    monkeypatch.setattr(torch, "tensor", tensor_without_lists)
    replay = filled_replay(capacity=64, count=64)
    assert all(isinstance(part, torch.Tensor) for part in replay.sample(16))
    assert replay.observations.flags.c_contiguous and replay.observations.shape == (64, 3)


# ---- network, one-hot, environments ----


def test_q_network_shapes():
    network = dqn.QNetwork(6, 3, (32, 16))
    linears = [m for m in network.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(6, 32), (32, 16), (16, 3)]
    assert network(torch.zeros(5, 6)).shape == (5, 3)
    assert network(torch.zeros(6)).shape == (3,)


def test_discrete_observations_are_one_hot():
    env = dqn.make_env("FrozenLake-v1")
    assert env.observation_space.shape == (16,)
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.sum() == 1.0 and obs[0] == 1.0  # FrozenLake starts in cell 0
    for _ in range(50):
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        assert obs.sum() == 1.0 and set(np.unique(obs)) <= {0.0, 1.0}
        if terminated or truncated:
            obs, _ = env.reset()


class GridEnv(gym.Env):
    """A 2x3 float64 Box observation: dqn.py must flatten it (not refuse it) and cast it to float32."""

    observation_space = gym.spaces.Box(0.0, 1.0, (2, 3), np.float64)
    action_space = gym.spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        return np.arange(6, dtype=np.float64).reshape(2, 3) / 10, {}

    def step(self, action):
        return np.ones((2, 3)), 1.0, True, False, {}


@pytest.mark.filterwarnings("ignore:.*precision lowered by casting to float32:UserWarning")  # the cast is the point
def test_multidimensional_box_observations_are_flattened():
    gym.register(id="DQNTestGrid-v0", entry_point=GridEnv)
    try:
        env = dqn.make_env("DQNTestGrid-v0")
        obs, _ = env.reset(seed=0)
    finally:
        del gym.registry["DQNTestGrid-v0"]
    assert env.observation_space.shape == (6,)
    assert obs.dtype == np.float32 and obs.tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])


def test_box_observations_arrive_as_float32():
    env = dqn.make_env("MountainCar-v0")
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.shape == (2,)


@pytest.mark.parametrize("env_id, message", [
    ("NoSuchEnv-v0", "unknown env id"),
    ("Pendulum-v1", "action space; DQN needs Discrete"),
    ("Blackjack-v1", "observations are"),
])
def test_make_env_refuses_what_dqn_cannot_train(env_id, message):
    with pytest.raises(dqn.ConfigError, match=message):
        dqn.make_env(env_id)


# ---- the loop ----


class CounterEnv(gym.Env):
    """Observation = steps taken this episode. Odd episodes terminate at step 3; even ones run into the
    time limit (5 steps, registered below), so both kinds of episode end reach the replay."""

    observation_space = gym.spaces.Box(0, 100, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self):
        self.episodes, self.t = 0, 0

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.episodes += 1
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        terminated = self.episodes % 2 == 1 and self.t == 3
        return np.array([self.t], np.float32), 1.0, terminated, False, {}


@pytest.fixture
def counter_env_id():
    env_id = "DQNTestCounter-v0"
    gym.register(id=env_id, entry_point=CounterEnv, max_episode_steps=5)
    yield env_id
    del gym.registry[env_id]


def test_loop_stores_terminated_and_truncated_correctly(tmp_path, counter_env_id):
    """terminated cuts the bootstrap; at a time limit the real final observation is stored, not the reset."""
    result = dqn.train(small_args(tmp_path, env_id=counter_env_id, total_timesteps=40, learning_starts=1000,
                                  eval_every=0, eval_episodes=1))
    replay = result["replay"]
    obs, next_obs, terminated = (replay.observations[:40, 0], replay.next_observations[:40, 0],
                                 replay.terminated[:40])
    assert np.array_equal(next_obs, obs + 1)  # never a reset observation in next_obs
    ends = np.flatnonzero((next_obs == 3) & (terminated == 1))
    truncations = np.flatnonzero(next_obs == 5)
    assert len(ends) > 0 and len(truncations) > 0
    assert not terminated[truncations].any(), "a time limit must not be stored as terminal"
    assert set(next_obs[terminated == 1]) == {3.0}
    assert result["episode_returns"][:4] == [3.0, 5.0, 3.0, 5.0]


def test_reward_scale_reaches_the_replay_but_not_the_reported_returns(tmp_path, counter_env_id):
    result = dqn.train(small_args(tmp_path, env_id=counter_env_id, total_timesteps=20, learning_starts=1000,
                                  eval_every=0, eval_episodes=1, reward_scale=0.25))
    assert set(result["replay"].rewards[:20]) == {0.25}
    assert result["episode_returns"][:2] == [3.0, 5.0]


def test_training_stops_at_the_first_eval_that_reaches_the_reward_threshold(tmp_path, counter_env_id):
    """The stopping eval is kept, then the final eval plays fresh episodes: on each counter copy the first
    episode terminates at 3 and the second runs to 5, so the two rows show 3 and 5."""
    gym.registry[counter_env_id].reward_threshold = 3.0
    stopped = dqn.train(small_args(tmp_path, env_id=counter_env_id, total_timesteps=200, learning_starts=1000,
                                   eval_every=40, eval_episodes=2))
    lines = (tmp_path / "runs").glob("*/eval.csv")
    rows = [line.split(",")[:2] for line in next(lines).read_text().splitlines()[1:]]
    assert rows == [["40", "3.0000"], ["40", "5.0000"]]
    assert stopped["steps"] == 40 and stopped["replay"].size == 40 and stopped["final_returns"].tolist() == [5, 5]

    trained_on = dqn.train(small_args(tmp_path / "on", env_id=counter_env_id, total_timesteps=200,
                                      learning_starts=1000, eval_every=40, eval_episodes=2,
                                      stop_when_solved=False))
    assert trained_on["steps"] == 200 and trained_on["replay"].size == 200


def test_an_eval_that_only_scrapes_past_the_threshold_does_not_count_as_solved():
    scraped = np.array([500.0] * 95 + [25.0] * 5)  # mean 476.25, standard error 10.6
    assert scraped.mean() >= 475 and not dqn.surely_reaches(scraped, 475)
    assert dqn.surely_reaches(np.full(100, 500.0), 475)
    assert dqn.surely_reaches(np.array([480.0, 490.0] * 50), 475)  # mean 485, standard error 0.5


def test_same_seed_same_run(tmp_path):
    first = dqn.train(small_args(tmp_path, seed=7))
    second = dqn.train(small_args(tmp_path, seed=7))
    other = dqn.train(small_args(tmp_path, seed=8))
    assert first["episode_returns"] == second["episode_returns"]
    assert np.array_equal(first["final_returns"], second["final_returns"])
    assert first["episode_returns"] != other["episode_returns"]
    assert first["run_dir"] != second["run_dir"], "a second run must not reuse the first run's directory"


def test_each_random_stream_of_a_run_is_its_own(tmp_path, monkeypatch):
    """Generators seeded with one number draw the same numbers: the replay's indices would follow the exploration
    coin flips and the env's starts. Gymnasium seeds an env's generator as default_rng(seed) does."""
    real_default_rng, starts = np.random.default_rng, []

    def recorded(seed=None):
        generator = real_default_rng(seed)
        starts.append(generator.bit_generator.state["state"]["state"])
        return generator

    monkeypatch.setattr(dqn.np.random, "default_rng", recorded)
    args = small_args(tmp_path, total_timesteps=600, eval_every=0, eval_episodes=2)
    dqn.train(args)
    envs = [real_default_rng(seed).bit_generator.state["state"]["state"]
            for seed in (args.seed, args.seed + 10_000, args.seed + 10_001)]  # training env, evaluation's copies
    assert len(starts) >= 3  # the replay's, the actions', the evaluation's
    assert len(set(starts + envs)) == len(starts + envs)


def test_run_writes_eval_curve_and_tensorboard_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = dqn.train(small_args(tmp_path))
    rows = (tmp_path / "runs").glob("*/eval.csv")
    lines = next(rows).read_text().splitlines()
    assert lines[0] == "step,eval_mean,eval_std,episodes,wall_seconds"
    assert [int(line.split(",")[0]) for line in lines[1:]] == [1000, 2000, 3000]
    events = EventAccumulator(result["run_dir"]).Reload()
    expected = {"charts/episodic_return", "charts/episodic_length", "charts/epsilon", "charts/SPS",
                "losses/td_loss", "losses/q_values", "eval/episodic_return"}
    assert expected <= set(events.Tags()["scalars"])


def test_replay_batches_land_on_the_training_device():
    """Seed bug: tensors left on the CPU. Checked without a GPU on torch's `meta` device: a batch that skips
    the move to the device stays on the CPU."""
    replay = dqn.ReplayBuffer(16, 3, torch.device("meta"), seed=0)
    replay.add(np.zeros(3), 1, 1.0, np.ones(3), False)
    assert all(part.device.type == "meta" for part in replay.sample(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to check device placement")
def test_everything_runs_on_the_gpu_when_there_is_one(tmp_path):
    """Seed bug: tensors left on the CPU while the network was on the GPU."""
    result = dqn.train(small_args(tmp_path, cuda=True))
    batch = result["replay"].sample(8)
    assert all(part.device.type == "cuda" for part in batch)


def test_cartpole_learns_quickly(tmp_path):
    """Smoke test of learning: the defaults on half their budget, far above a random policy's ~22."""
    result = dqn.train(dqn.Args(total_timesteps=30_000, eval_every=0, eval_episodes=20, progress_every=0,
                                runs_dir=str(tmp_path / "runs"), cuda=False))
    assert result["final_returns"].mean() >= 150
