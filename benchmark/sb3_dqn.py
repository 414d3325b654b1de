"""Stable-Baselines3's DQN configured from dqn.py's own flags and defaults, evaluated by dqn.py's Evaluator:
the reference side of `benchmark/run.py --script benchmark/sb3_dqn.py` (CartPole-v1 by default).

It takes dqn.py's command line (so the same flags mean the same run) and maps each hyperparameter onto SB3:
the replay, batch, gamma, train frequency and gradient steps, target sync counted in env steps, the epsilon
schedule, Adam with the learning rate annealed linearly to 0, gradient clipping, the hidden layers, the stop
when solved; rewards are scaled by a wrapper on the training env only. It writes <runs dir>/<run>/eval.csv as
dqn.py does.
"""

import csv
import os
import sys
import time

import gymnasium as gym
import numpy as np
import torch
import tyro
from stable_baselines3 import DQN
from stable_baselines3.common.callbacks import BaseCallback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dqn  # noqa: E402


class EvalCallback(BaseCallback):
    """dqn.py's evaluation protocol, on SB3's online Q-network, every eval_every env steps."""

    def __init__(self, args: dqn.Args, run_dir: str):
        super().__init__()
        self.args = args
        self.evaluate = dqn.Evaluator(args.env_id, args.eval_episodes, args.eval_epsilon, args.seed + 10_000,
                                      torch.device("cpu"))
        self.file = open(os.path.join(run_dir, "eval.csv"), "w", newline="")
        self.csv = csv.writer(self.file)
        self.csv.writerow(["step", "eval_mean", "eval_std", "episodes", "wall_seconds"])
        self.start = time.time()
        self.solved_return = gym.spec(args.env_id).reward_threshold if args.stop_when_solved else None

    def record(self, step: int) -> np.ndarray:
        self.model.q_net.set_training_mode(False)
        returns = self.evaluate(self.model.q_net)
        self.csv.writerow([step, f"{returns.mean():.4f}", f"{returns.std():.4f}", len(returns),
                           f"{time.time() - self.start:.2f}"])
        self.file.flush()
        return returns

    def _on_step(self) -> bool:
        step = self.num_timesteps
        if self.args.eval_every and step % self.args.eval_every == 0 and step < self.args.total_timesteps:
            returns = self.record(step)
            # False ends model.learn, where dqn.py stops
            return self.solved_return is None or not dqn.surely_reaches(returns, self.solved_return)
        return True


def main() -> None:
    args = tyro.cli(dqn.Args, default=dqn.Args(exp_name="sb3_dqn"))
    dqn.check_args(args)
    dqn.seed_everything(args.seed, args.torch_deterministic)
    env = dqn.make_env(args.env_id)
    if args.reward_scale != 1.0:
        env = gym.wrappers.TransformReward(env, lambda reward: reward * args.reward_scale)
    exploration_steps = int(args.exploration_fraction * args.total_timesteps)
    model = DQN(
        "MlpPolicy", env, buffer_size=args.buffer_size, batch_size=args.batch_size, gamma=args.gamma,
        learning_rate=(lambda remaining: args.learning_rate * remaining) if args.anneal_lr else args.learning_rate,
        learning_starts=args.learning_starts, train_freq=args.train_frequency, gradient_steps=args.gradient_steps,
        target_update_interval=args.target_network_frequency,
        exploration_initial_eps=args.start_e, exploration_final_eps=args.end_e,
        exploration_fraction=exploration_steps / args.total_timesteps,
        max_grad_norm=args.max_grad_norm if args.max_grad_norm > 0 else float("inf"),
        policy_kwargs={"net_arch": list(args.hidden_sizes)}, seed=args.seed, device="cpu", verbose=0)
    run_dir = dqn.make_run_dir(args)
    callback = EvalCallback(args, run_dir)
    model.learn(total_timesteps=args.total_timesteps, callback=callback)
    returns = callback.record(model.num_timesteps)
    print(f"final eval over {len(returns)} episodes: {returns.mean():.2f} ± {returns.std():.2f}", flush=True)


if __name__ == "__main__":
    main()
