"""Stable-Baselines3's DQN on an Atari game with the hyperparameters benchmark/speed.py gives it, timing its
learning phase. Runs in the reference's own environment (`python benchmark/speed.py --setup` makes it); our
scripts never import SB3. Prints one JSON line: learning-phase SPS and the replay's bytes.

SB3's standard Atari stack (make_atari_env: no-op reset, max-and-skip 4, episodic life, fire reset, 84x84
warp, reward clipping; VecFrameStack 4) with the replay in its memory-saving mode, as CleanRL uses it.
"""

import argparse
import json
import time

import ale_py
import gymnasium as gym
from stable_baselines3 import DQN
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_atari_env
from stable_baselines3.common.vec_env import VecFrameStack

gym.register_envs(ale_py)


class LearningPhaseClock(BaseCallback):
    """Wall time from the step where learning starts to the last step."""

    def __init__(self, learning_starts: int):
        super().__init__()
        self.learning_starts, self.started_at, self.started_step = learning_starts, None, 0

    def _on_step(self) -> bool:
        if self.started_at is None and self.num_timesteps > self.learning_starts:
            self.started_at, self.started_step = time.perf_counter(), self.num_timesteps
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env-id", default="BreakoutNoFrameskip-v4")
    parser.add_argument("--total-timesteps", type=int, required=True)
    parser.add_argument("--learning-starts", type=int, required=True)
    parser.add_argument("--buffer-size", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-frequency", type=int, default=4)
    parser.add_argument("--target-network-frequency", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cuda", action="store_true")
    args = parser.parse_args()

    env = VecFrameStack(make_atari_env(args.env_id, n_envs=1, seed=args.seed), n_stack=4)
    model = DQN("CnnPolicy", env, learning_rate=1e-4, buffer_size=args.buffer_size,
                learning_starts=args.learning_starts, batch_size=args.batch_size, gamma=0.99,
                train_freq=args.train_frequency, gradient_steps=1, target_update_interval=args.target_network_frequency,
                exploration_fraction=0.1, exploration_final_eps=0.01, max_grad_norm=10.0,
                optimize_memory_usage=True, replay_buffer_kwargs={"handle_timeout_termination": False},
                seed=args.seed, device="cuda" if args.cuda else "cpu", verbose=0)
    clock = LearningPhaseClock(args.learning_starts)
    model.learn(total_timesteps=args.total_timesteps, callback=clock)
    seconds = time.perf_counter() - clock.started_at
    buffer = model.replay_buffer
    replay_bytes = sum(getattr(buffer, name).nbytes for name in ("observations", "actions", "rewards", "dones"))
    print(json.dumps({"learning_sps": (model.num_timesteps - clock.started_step) / seconds,
                      "replay_bytes": replay_bytes}))


if __name__ == "__main__":
    main()
