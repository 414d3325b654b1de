"""DQN (Mnih et al. 2015) for classic-control gymnasium environments, in one file.

Read top to bottom: the arguments, the pieces (environment, replay, network, schedule, update, evaluation),
then the training loop in `train()`; below it, the flags' checks, saved models and the run's files.
`python dqn.py` trains CartPole-v1; see README.md for other envs.
Comments that cite "the article" mean "Learnings from reproducing DQN for Atari games", the account this project
grew from: each mistake it describes has a test that fails if it comes back.
"""

import csv
import hashlib
import math
import os
import random
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

if __name__ == "__main__":  # Ctrl-C while torch and the rest load, or while training: one line, not a traceback
    signal.signal(signal.SIGINT, lambda *_: sys.exit("dqn.py: interrupted (dqn.py writes no checkpoints)"))

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run directory's name)"""
    seed: int = 1
    """seed of python, numpy, torch and the environments; the same seed on CPU gives the same run"""
    torch_deterministic: bool = True
    """make torch use deterministic algorithms"""
    cuda: bool = True
    """train on CUDA when it is available"""
    env_id: str = "CartPole-v1"
    """a gymnasium env with a Discrete action space and a Box or Discrete observation space"""
    total_timesteps: int = 60_000
    """total environment steps of training"""
    learning_rate: float = 2e-3
    """Adam's learning rate"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0 over the run (steadies the final policy)"""
    buffer_size: int = 100_000
    """replay capacity in transitions"""
    gamma: float = 0.99
    """discount factor"""
    target_network_frequency: int = 10
    """env steps between copies of the online network into the target network"""
    batch_size: int = 128
    """transitions per gradient step"""
    start_e: float = 1.0
    """epsilon at the first step"""
    end_e: float = 0.04
    """epsilon after the annealing"""
    exploration_fraction: float = 0.16
    """fraction of total_timesteps over which epsilon falls linearly from start_e to end_e"""
    learning_starts: int = 1000
    """env steps of pure collection before the first gradient step"""
    train_frequency: int = 256
    """env steps between training phases"""
    gradient_steps: int = 128
    """gradient steps in each training phase"""
    reward_scale: float = 0.01
    """multiply rewards by this before they reach the replay (returns are logged unscaled). Unscaled,
    CartPole's Q-values near 1/(1 - gamma) = 100 put the rare failing transitions far outside Huber's
    quadratic zone, where their gradient is capped and the many balanced states drown them out; 0.01 keeps
    Q in [0, 1] (README: why CartPole's defaults look the way they do)"""
    max_grad_norm: float = 10.0
    """clip the gradient's global L2 norm to this (0 disables)"""
    hidden_sizes: tuple[int, ...] = (128, 128)
    """widths of the hidden layers of the Q-network"""
    eval_every: int = 10_000
    """env steps between evaluations (0: only at the end)"""
    eval_episodes: int = 100
    """episodes per evaluation"""
    eval_epsilon: float = 0.0
    """epsilon of the evaluation policy (0: greedy)"""
    stop_when_solved: bool = True
    """end training at the first periodic evaluation whose mean return, less two standard errors, reaches
    the env's registered reward_threshold (gymnasium's mark of solved: 475 on CartPole-v1); the final
    evaluation then plays fresh episodes. Solved CartPole policies can still fall apart later
    (benchmark/results/cartpole-failures)"""
    progress_every: int = 10_000
    """env steps between progress lines (0: none)"""
    runs_dir: str = "runs"
    """where each run's directory (tensorboard events, eval.csv, model) is created"""
    track: bool = False
    """also log the run to Weights & Biases: the tensorboard scalars, the flags and this file (needs
    `pip install wandb`; WANDB_MODE=offline keeps it on this machine)"""
    wandb_project_name: str = "dqn"
    """the Weights & Biases project of --track"""
    wandb_entity: Optional[str] = None
    """the Weights & Biases team or user of --track (None: your default entity)"""
    save_model: bool = False
    """write the trained weights to <run dir>/<exp_name>.pt"""
    eval_model: str = ""
    """path of a saved model: evaluate it for eval_episodes episodes and exit without training"""


LOG_EVERY = 100  # env steps between loss logs, as CleanRL


class ConfigError(Exception):
    """Bad input, or a file that cannot be read or written: one line and a non-zero exit, never a traceback."""


class TrainingDiverged(Exception):
    """Training stopped being finite: the run stops in one line, and writes no model or checkpoint of NaNs."""


# ---- Environment -------------------------------------------------------------------------------------------


class OneHotObservation(gym.ObservationWrapper):
    """Encodes a Discrete observation (FrozenLake's cell index) as a float32 one-hot vector."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.n = int(env.observation_space.n)
        self.observation_space = gym.spaces.Box(0.0, 1.0, (self.n,), np.float32)

    def observation(self, observation):
        one_hot = np.zeros(self.n, dtype=np.float32)
        one_hot[int(observation)] = 1.0
        return one_hot


def make_env(env_id: str) -> gym.Env:
    """Builds the env, refusing (ConfigError) an unknown id or spaces this DQN cannot handle."""
    try:
        env = gym.make(env_id)
    except gym.error.Error as error:
        if env_id.startswith("ALE/") or "NoFrameskip" in env_id:  # ids ale-py registers; this file never imports it
            raise ConfigError(f"{env_id} is an Atari game: train it with dqn_atari.py") from None
        raise ConfigError(f"unknown env id {env_id!r} ({type(error).__name__}: {error})") from None
    if not isinstance(env.action_space, gym.spaces.Discrete):
        env.close()
        raise ConfigError(f"{env_id} has a {type(env.action_space).__name__} action space; DQN needs Discrete")
    if isinstance(env.observation_space, gym.spaces.Discrete):
        return OneHotObservation(env)
    if not isinstance(env.observation_space, gym.spaces.Box):
        env.close()
        raise ConfigError(f"{env_id} observations are {env.observation_space}; dqn.py takes a Discrete "
                          "or a Box observation space")
    if len(env.observation_space.shape) != 1:
        env = gym.wrappers.FlattenObservation(env)  # the MLP takes a vector
    # float32 at the source: a float64 observation would otherwise reach the replay and the network.
    return gym.wrappers.DtypeObservation(env, np.float32)


# ---- Replay ------------------------------------------------------------------------------------------------


class ReplayBuffer:
    """A preallocated ring of float32 transitions, sampled uniformly with replacement by randint.

    Storage is allocated once as contiguous arrays (never a Python list of arrays turned into a tensor per
    batch), in float32 (float64 would double the memory for nothing), and a batch is gathered by fancy
    indexing into those arrays, then moved to the training device as whole tensors.
    """

    def __init__(self, capacity: int, obs_dim: int, device: torch.device, seed):
        self.capacity = capacity
        self.device = device
        self.observations = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.next_observations = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=np.float32)
        self.position = 0
        self.size = 0
        self.rng = np.random.default_rng(seed)

    def add(self, obs, action: int, reward: float, next_obs, terminated: bool) -> None:
        i = self.position
        self.observations[i] = obs
        self.actions[i] = action
        self.rewards[i] = reward
        self.next_observations[i] = next_obs
        self.terminated[i] = terminated
        self.position = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int):
        # randint over the filled part: O(batch) per draw. np.random.choice(size, batch, replace=False)
        # permutes the whole buffer on every call and made the article's loop crawl.
        idx = self.rng.integers(0, self.size, size=batch_size)
        return tuple(torch.from_numpy(array[idx]).to(self.device) for array in
                     (self.observations, self.actions, self.rewards, self.next_observations, self.terminated))


# ---- Network and schedule ----------------------------------------------------------------------------------


class QNetwork(nn.Module):
    def __init__(self, obs_dim: int, n_actions: int, hidden_sizes: tuple[int, ...]):
        super().__init__()
        layers, width = [], obs_dim
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, n_actions))
        self.network = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


def linear_schedule(start_e: float, end_e: float, duration: int, t: int) -> float:
    """Epsilon at env step t: falls linearly from start_e to end_e over `duration` steps, then stays."""
    if duration <= 0:  # a run too short to have an annealing window
        return end_e
    return end_e + (start_e - end_e) * max(0.0, 1.0 - t / duration)


# ---- Update ------------------------------------------------------------------------------------------------


def td_update(q_network, target_network, optimizer, batch, gamma: float, max_grad_norm: float):
    """One gradient step on the Huber TD error of a batch (obs, actions, rewards, next_obs, terminated).
    Returns (loss, mean Q of the taken actions), both detached."""
    obs, actions, rewards, next_obs, terminated = batch
    with torch.no_grad():  # the target is a constant: no graph through the target network, so no gradient reaches it
        next_q = target_network(next_obs).max(dim=1).values
        # (1 - terminated): a terminal state has no future. terminated, not truncated: a time limit is not one.
        target = rewards + gamma * next_q * (1.0 - terminated)
    q_taken = q_network(obs).gather(1, actions.unsqueeze(1)).squeeze(1)
    # smooth_l1 is Huber with delta 1: the paper's TD-error clipping to [-1, 1], at the right scale
    # (the article's hand-written version was off by a factor of 2).
    loss = F.smooth_l1_loss(q_taken, target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm > 0:
        nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], max_grad_norm)
    optimizer.step()
    return loss.detach(), q_taken.detach().mean()


def epsilon_greedy(greedy, obs: torch.Tensor, epsilon: float, n_actions: int, rng: np.random.Generator) -> np.ndarray:
    """Actions for a batch of observations: uniform with probability epsilon, else greedy(obs), the argmax of Q.
    No forward pass when every one explores."""
    explore = rng.random(len(obs)) < epsilon
    actions = np.zeros(len(obs), dtype=np.int64)
    actions[explore] = rng.integers(0, n_actions, size=int(explore.sum()))
    if not explore.all():
        actions[~explore] = greedy(obs).cpu().numpy()[~explore]
    return actions


# ---- Evaluation --------------------------------------------------------------------------------------------


class Evaluator:
    """Plays `episodes` episodes at once on separate env copies, one batched forward pass per step."""

    def __init__(self, env_id: str, episodes: int, epsilon: float, seed: int, device: torch.device):
        self.envs = [make_env(env_id) for _ in range(episodes)]
        self.epsilon, self.device = epsilon, device
        self.n_actions = int(self.envs[0].action_space.n)
        self.rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])  # not the first copy's stream
        # Each copy is seeded once; later evaluations continue its stream and so see fresh episodes.
        self.reset_seeds = [seed + i for i in range(episodes)]

    @torch.no_grad()
    def __call__(self, q_network: nn.Module) -> np.ndarray:
        obs = [env.reset(seed=s)[0] for env, s in zip(self.envs, self.reset_seeds)]
        self.reset_seeds = [None] * len(self.envs)
        returns = np.zeros(len(self.envs))
        active = list(range(len(self.envs)))
        while active:
            batch = torch.as_tensor(np.stack([obs[i] for i in active]), device=self.device)
            actions = epsilon_greedy(lambda obs: q_network(obs).argmax(dim=1), batch, self.epsilon, self.n_actions,
                                     self.rng)
            still_active = []
            for i, action in zip(active, actions):
                obs[i], reward, terminated, truncated, _ = self.envs[i].step(int(action))
                returns[i] += reward
                if not (terminated or truncated):
                    still_active.append(i)
            active = still_active
        return returns


def surely_reaches(returns: np.ndarray, threshold: float) -> bool:
    """Whether an evaluation's mean return, less two standard errors, reaches the threshold. A policy that
    only scraped past it would often fall short on fresh episodes (benchmark/results/cartpole-stop-no-margin)."""
    return returns.mean() - 2 * returns.std() / np.sqrt(len(returns)) >= threshold


# ---- Training ----------------------------------------------------------------------------------------------


def weights_not_finite(network: nn.Module, step: int) -> str:
    """What went non-finite in the network's weights at `step`, if anything (as RunLog.update says of the loss)."""
    if all(torch.isfinite(parameter).all() for parameter in network.parameters()):
        return ""
    return f"at step {step:,} the network's weights are not finite"


def train(args: Args) -> dict:
    """Trains one agent; returns its final eval returns, training episode returns, run dir, replay and steps."""
    check_args(args)
    seed_everything(args.seed, args.torch_deterministic)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    env = make_env(args.env_id)
    obs_dim, n_actions = env.observation_space.shape[0], int(env.action_space.n)
    evaluate = Evaluator(args.env_id, args.eval_episodes, args.eval_epsilon, args.seed + 10_000, device)
    q_network = QNetwork(obs_dim, n_actions, args.hidden_sizes).to(device)
    target_network = QNetwork(obs_dim, n_actions, args.hidden_sizes).to(device)
    target_network.load_state_dict(q_network.state_dict())
    target_network.requires_grad_(False)
    # fused: one kernel for all parameters instead of ~6 small ops per tensor
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, fused=True)
    # seeds of their own: generators seeded with the same number (the env's) draw the same numbers
    replay_seed, action_seed = np.random.SeedSequence(args.seed).spawn(2)
    replay = ReplayBuffer(args.buffer_size, obs_dim, device, replay_seed)

    def act(obs):  # the greedy action: argmax Q
        return q_network(obs).argmax(dim=1)

    action_rng = np.random.default_rng(action_seed)
    log = RunLog(args)

    episode_returns, recent_returns = [], deque(maxlen=100)
    episode_return, episode_length = 0.0, 0
    obs, _ = env.reset(seed=args.seed)
    exploration_steps = int(args.exploration_fraction * args.total_timesteps)
    solved_return = env.spec.reward_threshold if args.stop_when_solved else None
    diverged = ""  # what went non-finite, and when
    log.start_clock()
    for global_step in range(1, args.total_timesteps + 1):
        # act: epsilon-greedy, epsilon falling linearly over the first exploration_fraction of the run
        epsilon = linear_schedule(args.start_e, args.end_e, exploration_steps, global_step)
        with torch.no_grad():  # a batch of one observation
            action = int(epsilon_greedy(act, torch.as_tensor(obs, device=device)[None], epsilon, n_actions,
                                        action_rng)[0])
        # step, then store. At truncation next_obs is the real final observation (no autoreset here), so the
        # bootstrap from it is correct; only `terminated` marks a state with no future.
        next_obs, reward, terminated, truncated, _ = env.step(action)
        replay.add(obs, action, reward * args.reward_scale, next_obs, terminated)
        episode_return += reward
        episode_length += 1
        obs = next_obs
        if terminated or truncated:
            log.episode_over(episode_return, episode_length, global_step)
            recent_returns.append(episode_return)
            episode_returns.append(episode_return)
            episode_return, episode_length = 0.0, 0
            obs, _ = env.reset()

        # learn: gradient_steps updates every train_frequency steps once learning starts
        if global_step > args.learning_starts and global_step % args.train_frequency == 0:
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - global_step / args.total_timesteps)
            for _ in range(args.gradient_steps):
                loss, q_mean = td_update(q_network, target_network, optimizer, replay.sample(args.batch_size),
                                         args.gamma, args.max_grad_norm)
            # about every 100 env steps, whatever the train frequency: logging each phase of a small
            # train frequency costs more than the updates of a small network
            if global_step % LOG_EVERY < args.train_frequency:
                diverged = log.update(global_step, loss, q_mean, epsilon)
                if diverged:
                    break
        # sync the target network; the article's step counter was never incremented, so its target never moved
        if global_step % args.target_network_frequency == 0:
            target_network.load_state_dict(q_network.state_dict())

        # evaluate (and stop once surely solved), report
        if args.eval_every and global_step % args.eval_every == 0 and global_step < args.total_timesteps:
            returns = log.evaluate(evaluate, q_network, global_step)
            if solved_return is not None and surely_reaches(returns, solved_return):
                print(f"step {global_step}: eval {returns.mean():.2f} ± {returns.std():.2f} reached {args.env_id}'s "
                      f"reward threshold {solved_return:g}, training stops (--no-stop-when-solved trains on)",
                      flush=True)
                break
        if args.progress_every and global_step % args.progress_every == 0:
            log.progress(global_step, epsilon, recent_returns, args.learning_starts)

    if not diverged:
        diverged = weights_not_finite(q_network, global_step)  # the last update's: never evaluated or saved
    final_returns = None
    if not diverged:
        if args.save_model:  # first: a Ctrl-C in the final evaluation keeps the trained weights
            model_path = os.path.join(log.run_dir, f"{args.exp_name}.pt")
            save_model(model_path, q_network, args, obs_dim, n_actions)
            print(f"model saved to {model_path}")
        final_returns = log.evaluate(evaluate, q_network, global_step)
        print(f"final eval over {len(final_returns)} episodes: {final_returns.mean():.2f} ± "
              f"{final_returns.std():.2f} (wall {log.wall_seconds():.1f}s)", flush=True)
    log.close(diverged)
    env.close()
    if diverged:
        raise TrainingDiverged(f"training diverged: {diverged}; no model was saved; try a smaller --learning-rate")
    return {"final_returns": final_returns, "episode_returns": episode_returns, "run_dir": log.run_dir,
            "replay": replay, "steps": global_step, "q_network": q_network}


def evaluate_saved(args: Args) -> np.ndarray:
    """Evaluates a model written by --save-model on args.env_id, without training."""
    check_args(args)
    seed_everything(args.seed, args.torch_deterministic)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    env = make_env(args.env_id)
    q_network = load_model(args.eval_model, env.observation_space.shape[0], int(env.action_space.n), device)
    returns = Evaluator(args.env_id, args.eval_episodes, args.eval_epsilon, args.seed + 10_000, device)(q_network)
    print(f"{args.eval_model} on {args.env_id}: {returns.mean():.2f} ± {returns.std():.2f} "
          f"over {len(returns)} episodes")
    return returns


# ---- The flags' checks -------------------------------------------------------------------------------------


def check_args(args: Args) -> None:
    positive = ["total_timesteps", "buffer_size", "batch_size", "train_frequency", "gradient_steps",
                "target_network_frequency", "eval_episodes", "reward_scale", "learning_rate"]
    for name in positive:
        if not getattr(args, name) > 0:  # written so that NaN fails it too
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ["learning_starts", "eval_every", "progress_every", "max_grad_norm"]:
        if not getattr(args, name) >= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ["start_e", "end_e", "eval_epsilon", "gamma"]:
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if not 0.0 < args.exploration_fraction <= 1.0:
        raise ConfigError(f"--exploration-fraction must be in (0, 1], got {args.exploration_fraction}")
    if not args.hidden_sizes or min(args.hidden_sizes) <= 0:
        raise ConfigError(f"--hidden-sizes must be one or more positive widths, got {args.hidden_sizes}")
    if not 0 <= args.seed < 2**32:  # numpy's global seed takes no other
        raise ConfigError(f"--seed must be from 0 to {2**32 - 1}, got {args.seed}")
    if "/" in args.exp_name:  # it names the run directory: a '/' would nest it where no tool looks
        raise ConfigError(f"--exp-name names the run directory and must not contain '/', got {args.exp_name!r}")
    if args.batch_size > args.buffer_size:
        raise ConfigError(f"--batch-size {args.batch_size} is larger than the replay "
                          f"(--buffer-size {args.buffer_size})")
    if args.track:
        try:
            import wandb  # noqa: F401 (here only to stop at once when it is missing)
        except ImportError:
            raise ConfigError("--track logs to Weights & Biases, which is not installed: pip install wandb") from None


# ---- Saved models ------------------------------------------------------------------------------------------


def checksum(payload) -> str:
    """sha256 over everything a checkpoint or saved model holds, tensors as their bytes: a flipped bit shows."""
    digest = hashlib.sha256()

    def visit(value):
        if isinstance(value, torch.Tensor):
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, (dict, list, tuple)):
            digest.update(f"{type(value).__name__}{len(value)}".encode())
            for key, item in value.items() if isinstance(value, dict) else enumerate(value):
                digest.update(repr(key).encode())
                visit(item)
        else:
            digest.update(repr(value).encode())

    visit(payload)
    return digest.hexdigest()


def save_atomically(payload: dict, path: str) -> None:
    """With its checksum, to a temporary file that is synced, then renamed over `path`: a crash or a power loss
    mid-write leaves the previous file whole, and a failed write (a full disk) leaves no temporary file behind."""
    tmp_path = path + ".tmp"
    try:
        with open(tmp_path, "wb") as file:
            torch.save({**payload, "checksum": checksum(payload)}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_path, path)
    except BaseException as error:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        # a full disk inside torch.save: its zip writer's RuntimeError, raised while handling the write's OSError
        failed_write = error if isinstance(error, OSError) else error.__context__
        if isinstance(failed_write, OSError):
            raise ConfigError(f"cannot write {path} ({failed_write.strerror or failed_write}); the file there "
                              "before, if any, is as it was") from None
        raise
    try:  # the rename itself, made durable
        directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as error:  # the new file is in place: a warning, as some file systems cannot sync a directory
        print(f"warning: {path} is written, but its directory could not be synced ({error.strerror or error}), so "
              "a power loss could still undo the write", file=sys.stderr, flush=True)


def verified(loaded: dict, path: str, weights: str) -> dict:
    """A loaded checkpoint or model less its checksum, refused (ConfigError, for the caller to name the file) if its
    contents do not match it or the weights under `weights` are not finite; one older than checksums warns."""
    saved = loaded.pop("checksum", None)
    if saved is None:
        print(f"warning: {path} carries no checksum (an older version wrote it), so it cannot be verified",
              file=sys.stderr, flush=True)
    elif saved != checksum(loaded):
        raise ConfigError("its contents do not match the checksum written with them: the file is corrupt")
    if not all(torch.isfinite(tensor).all() for tensor in loaded[weights].values()):
        raise ConfigError("its weights are not finite (NaN or infinity)")
    return loaded


def save_model(path: str, q_network: QNetwork, args: Args, obs_dim: int, n_actions: int) -> None:
    """Writes weights with what is needed to rebuild the network."""
    save_atomically({"state_dict": q_network.state_dict(), "env_id": args.env_id, "obs_dim": obs_dim,
                     "n_actions": n_actions, "hidden_sizes": list(args.hidden_sizes)}, path)


def load_model(path: str, obs_dim: int, n_actions: int, device: torch.device) -> QNetwork:
    try:
        payload = verified(torch.load(path, map_location=device, weights_only=True), path, "state_dict")
        shape = (payload["obs_dim"], payload["n_actions"])
        q_network = QNetwork(payload["obs_dim"], payload["n_actions"], tuple(payload["hidden_sizes"]))
        q_network.load_state_dict(payload["state_dict"])
    except FileNotFoundError:
        raise ConfigError(f"no saved model at {path}") from None
    except ConfigError as error:  # a corrupt file, or weights that are not finite
        raise ConfigError(f"{path}: {error}") from None
    except Exception as error:  # unpickling, a missing key, mismatched tensors: all mean "not our model"
        raise ConfigError(f"{path} is not a readable dqn.py model ({type(error).__name__}); give a file that "
                          "dqn.py --save-model wrote") from None
    if shape != (obs_dim, n_actions):
        raise ConfigError(f"{path} was trained on {payload['env_id']} (obs {shape[0]}, actions {shape[1]}); "
                          f"this env has obs {obs_dim}, actions {n_actions}: pass --env-id {payload['env_id']}")
    return q_network.to(device)


# ---- The run's files ---------------------------------------------------------------------------------------


def make_run_dir(args: Args) -> str:
    name = args.env_id.replace("/", "-")
    base = os.path.join(args.runs_dir, f"{name}__{args.exp_name}__{args.seed}__{int(time.time())}")
    run_dir, suffix = base, 1
    while True:
        try:
            os.makedirs(run_dir)  # never an existing one, so never an earlier or a concurrent run's files
            return run_dir
        except FileExistsError:
            run_dir, suffix = f"{base}-{suffix}", suffix + 1
        except OSError as error:  # a missing parent we may not create, a file in the way, no permission
            raise ConfigError(f"cannot create the run directory {run_dir} ({error.strerror}); pass a writable "
                              "--runs-dir") from None


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def start_tracking(args: Args, run_dir: str, run_id: Optional[str] = None):
    """--track: a Weights & Biases run that mirrors the tensorboard events (so it starts before the writer opens)
    and keeps the flags and this file; a resumed run passes the id its checkpoint kept, and goes on in that run."""
    import wandb  # only with --track (check_args has seen it is installed)

    try:
        run = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=os.path.basename(run_dir),
                         sync_tensorboard=True, save_code=True, id=run_id, resume="allow" if run_id else None)
    except wandb.errors.Error as error:  # no API key, an unknown entity
        raise ConfigError(f"--track could not start a Weights & Biases run ({str(error).splitlines()[0]}); run "
                          "`wandb login`, or set WANDB_MODE=offline") from None
    run.config.update(vars(args), allow_val_change=True)  # a resumed run's --total-timesteps may have changed
    return run


class RunLog:
    """A run's directory and what goes into it: tensorboard events (CleanRL's charts/ and losses/ names, and
    eval/), eval.csv and, with --track, a W&B run; its clock starts with the first step."""

    def __init__(self, args: Args):
        from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is slow to import

        self.args = args
        self.run_dir = make_run_dir(args)
        self.tracking = start_tracking(args, self.run_dir) if args.track else None
        self.writer = SummaryWriter(self.run_dir)
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                             "\n".join(f"|{key}|{value}|" for key, value in vars(args).items()))
        self.eval_file = open(os.path.join(self.run_dir, "eval.csv"), "w", newline="")
        self.eval_csv = csv.writer(self.eval_file)
        self.eval_csv.writerow(["step", "eval_mean", "eval_std", "episodes", "wall_seconds"])
        self.last_eval = float("nan")

    def start_clock(self) -> None:
        self.start_time = time.time()
        self.last_progress = (self.start_time, 0)  # (time, step): the ETA's rate is from the last line

    def wall_seconds(self) -> float:
        return time.time() - self.start_time

    def steps_per_second(self, step: int, now: float) -> float:
        """This process's env steps per second, up to `step`."""
        return step / (now - self.start_time)

    def episode_over(self, episode_return: float, episode_length: int, step: int) -> None:
        self.writer.add_scalar("charts/episodic_return", episode_return, step)
        self.writer.add_scalar("charts/episodic_length", episode_length, step)

    def update(self, step: int, loss: torch.Tensor, q_mean: torch.Tensor, epsilon: float) -> str:
        """The TD loss, the mean Q-value, epsilon and SPS at `step`; returns what went non-finite, if anything."""
        loss, q_mean = loss.item(), q_mean.item()
        if not (math.isfinite(loss) and math.isfinite(q_mean)):
            return f"at step {step:,} the TD loss is {loss} and the mean Q-value {q_mean}"
        self.writer.add_scalar("losses/td_loss", loss, step)
        self.writer.add_scalar("losses/q_values", q_mean, step)
        self.writer.add_scalar("charts/epsilon", epsilon, step)
        self.writer.add_scalar("charts/SPS", int(self.steps_per_second(step, time.time())), step)
        return ""

    def evaluate(self, evaluate: Evaluator, q_network: nn.Module, step: int) -> np.ndarray:
        """Plays the evaluation episodes and writes their returns."""
        returns = evaluate(q_network)
        self.last_eval = returns.mean()
        self.writer.add_scalar("eval/episodic_return", returns.mean(), step)
        self.eval_csv.writerow([step, f"{returns.mean():.4f}", f"{returns.std():.4f}", len(returns),
                                f"{self.wall_seconds():.2f}"])
        self.eval_file.flush()
        return returns

    def progress(self, step: int, epsilon: float, recent_returns: deque, updates_begin_at: int) -> None:
        now, (then, then_step) = time.time(), self.last_progress
        self.last_progress = (now, step)
        recent = np.mean(recent_returns) if recent_returns else float("nan")
        # the ETA from the steps since the last line, not from the start: collecting alone runs many times faster
        seconds_left = (now - then) * (self.args.total_timesteps - step) / (step - then_step)
        eta = f"ETA {timedelta(seconds=round(seconds_left))}"
        if step <= updates_begin_at:
            eta = f"updates from step {updates_begin_at:,}"
        print(f"step {step:>9}/{self.args.total_timesteps} | SPS {self.steps_per_second(step, now):5.0f} | "
              f"eps {epsilon:.3f} | return(100) {recent:7.2f} | eval {self.last_eval:7.2f} | {eta}", flush=True)

    def close(self, diverged: str) -> None:
        self.eval_file.close()
        self.writer.close()
        if self.tracking is not None:
            self.tracking.finish(exit_code=1 if diverged else 0)


def main() -> None:
    args = tyro.cli(Args)
    try:
        evaluate_saved(args) if args.eval_model else train(args)
    except (ConfigError, TrainingDiverged, OSError) as error:  # OSError: a run's file on a full or read-only disk
        sys.exit(f"dqn.py: error: {error}")


if __name__ == "__main__":
    main()
