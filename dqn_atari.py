"""Nature DQN (Mnih et al. 2015) on Atari through gymnasium and ale-py, in one file.

Top to bottom: the flags, the game behind Nature's wrappers, preprocessing on the training device, the replay,
the network and the TD update, evaluation, the speed-ups attached around the update (--bf16, CUDA graphs),
checkpoints, the run's files, and train(), whose loop reads as the algorithm: act, step, store, learn, sync.
"The article" is "Learnings from reproducing DQN for Atari games": each mistake it describes has a test.
"""

import csv
import ctypes
import math
import os
import random
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal, Optional

import ale_py
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

gym.register_envs(ale_py)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run directory's name)"""
    seed: int = 1
    """seed of python, numpy, torch and the emulators; the same seed on CPU gives the same run"""
    torch_deterministic: bool = True
    """make torch use deterministic algorithms"""
    cuda: bool = True
    """train on CUDA when it is available"""
    env_id: str = "BreakoutNoFrameskip-v4"
    """an ALE game: a *NoFrameskip-v4 id, or an ALE/*-v5 id (action repeat is then ours, not the env's)"""
    repeat_action_probability: Optional[float] = None
    """sticky actions' chance per frame (None: the env's own, 0 for *NoFrameskip-v4 as Nature, 0.25 for ALE/*-v5)"""
    total_timesteps: int = 10_000_000
    """total environment (agent) steps of training; one step is frame_skip emulator frames"""
    optimizer: Literal["adam", "rmsprop"] = "adam"
    """adam (CleanRL's choice) or rmsprop (the centered RMSProp of DeepMind's code; see DeepMindRMSprop)"""
    learning_rate: float = 1e-4
    """the optimizer's learning rate (Nature's RMSProp: 2.5e-4)"""
    buffer_size: int = 1_000_000
    """replay capacity in frames (one 84x84 uint8 frame per transition, 7.06 GB for 1M)"""
    gamma: float = 0.99
    """discount factor"""
    target_network_frequency: int = 1000
    """env steps between copies of the online network into the target network (Nature: 10,000)"""
    batch_size: int = 32
    """transitions per gradient step"""
    start_e: float = 1.0
    """epsilon at the first step"""
    end_e: float = 0.01
    """epsilon after the annealing (Nature: 0.1)"""
    exploration_fraction: float = 0.10
    """fraction of total_timesteps over which epsilon falls linearly (Nature: 1M steps of 50M, 0.02)"""
    learning_starts: int = 80_000
    """env steps of pure collection before the first gradient step (Nature: 50,000)"""
    train_frequency: int = 4
    """env steps between gradient steps"""
    max_grad_norm: float = 0.0
    """clip the gradient's global L2 norm to this (0 disables, as CleanRL; SB3 uses 10)"""
    bf16: bool = False
    """the update's convolutions and 512-unit layer in bfloat16 (fast on GPUs and AVX-512 CPUs; on an AVX2 CPU
    many times slower, and the run warns); weights, Q-value head, targets, loss and acting stay float32"""
    cuda_graphs: bool = True
    """on CUDA, record the update and the greedy action once each as a CUDA graph and replay them (same numbers)"""
    frame_skip: int = 4
    """emulator frames per agent step (the action is repeated; the max over the last two is observed)"""
    noop_max: int = 30
    """at most this many no-op frames at the start of each game, a random number from 1 (0: none)"""
    eval_every: int = 250_000
    """env steps between evaluations (0: only at the end)"""
    eval_episodes: int = 10
    """full games per evaluation"""
    eval_epsilon: float = 0.05
    """epsilon of the evaluation policy (Nature: 0.05)"""
    capture_video: bool = False
    """write a GIF of the first game of each evaluation to <run dir>/videos (needs pillow)"""
    progress_every: int = 10_000
    """env steps between progress lines (0: none)"""
    checkpoint_every: int = 0
    """env steps between checkpoints written to <run dir>/checkpoint.pt (0: only on SIGINT or SIGTERM)"""
    checkpoint_replay: bool = False
    """include the replay in checkpoints (buffer_size x 7 KB), so a resumed run continues exactly"""
    resume: str = ""
    """a checkpoint to continue, in its run directory, with its flags (but those in RESUMABLE, if given)"""
    runs_dir: str = "runs"
    """where each run's directory (tensorboard events, eval.csv, checkpoint, model) is created"""
    track: bool = False
    """also log to Weights & Biases: the scalars, flags, this file and GIFs (pip install wandb; WANDB_MODE=offline)"""
    wandb_project_name: str = "dqn"
    """the Weights & Biases project of --track"""
    wandb_entity: Optional[str] = None
    """the Weights & Biases team or user of --track (None: your default entity)"""
    save_model: bool = False
    """write the trained weights to <run dir>/<exp_name>.pt"""


LOG_EVERY = 100  # env steps between loss logs, as CleanRL
FRAME_SIZE = 84  # Nature's 84x84 input
STACK = 4  # Nature's history of 4 frames
MAX_GAME_FRAMES = 108_000  # 30 minutes of play at 60 Hz: the usual cap on a game (training and evaluation)
# Flags a resumed run may take from its command line; every other one comes from the checkpoint.
RESUMABLE = {"total_timesteps", "eval_every", "eval_episodes", "capture_video", "progress_every",
             "checkpoint_every", "checkpoint_replay", "resume", "cuda", "cuda_graphs", "save_model",
             "track", "wandb_project_name", "wandb_entity"}


class ConfigError(Exception):
    """Bad input from the user: reported as one line and a non-zero exit, never a traceback."""


class TrainingDiverged(Exception):
    """Training stopped being finite: the run stops in one line, and writes no model or checkpoint of NaNs."""


def check_args(args: Args) -> None:
    # learning_starts >= 1: the first update then finds at least one transition whose next frame is stored
    positive = ["total_timesteps", "buffer_size", "batch_size", "train_frequency", "target_network_frequency",
                "eval_episodes", "frame_skip", "learning_rate", "learning_starts"]
    for name in positive:
        if not getattr(args, name) > 0:  # written so that NaN fails it too
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ["eval_every", "progress_every", "max_grad_norm", "noop_max", "checkpoint_every"]:
        if not getattr(args, name) >= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ["start_e", "end_e", "eval_epsilon", "gamma", "repeat_action_probability"]:
        value = getattr(args, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
    if not 0.0 < args.exploration_fraction <= 1.0:
        raise ConfigError(f"--exploration-fraction must be in (0, 1], got {args.exploration_fraction}")
    if args.buffer_size < 2 * STACK:  # the ring must hold two stacks
        raise ConfigError(f"--buffer-size must be at least {2 * STACK} frames, got {args.buffer_size}")
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


# ---- The game, behind Nature's wrappers --------------------------------------------------------------------


def make_ale_env(env_id: str, repeat_action_probability: Optional[float]) -> gym.Env:
    """The raw emulator (one frame per step, grayscale, minimal action set); ConfigError if not an ALE game."""
    try:
        spec = gym.spec(env_id)
    except gym.error.Error as error:
        raise ConfigError(f"unknown env id {env_id!r} ({type(error).__name__}: {error})") from None
    if "ale_py" not in str(spec.entry_point):
        raise ConfigError(f"{env_id} is not an Atari game: dqn_atari.py takes ALE ids such as "
                          "BreakoutNoFrameskip-v4 or ALE/Breakout-v5 (dqn.py takes the others)")
    if repeat_action_probability is None:
        repeat_action_probability = spec.kwargs.get("repeat_action_probability", 0.0)
    # frameskip=1: action repeat and the max over frames are ours, so v4 and v5 ids behave the same
    return gym.make(env_id, obs_type="grayscale", frameskip=1, full_action_space=False,
                    repeat_action_probability=repeat_action_probability,
                    max_num_frames_per_episode=MAX_GAME_FRAMES)


class AtariGame:
    """One ALE game behind Nature's wrappers; its frames stay raw for the preprocessing on the device.

    step() repeats the action frame_skip times and returns the last two 210x160 grayscale frames (their max
    hides sprites drawn every other frame). A game starts with 1..noop_max no-ops. With end_on_life_loss
    (training), a lost life ends the episode but not the game (the article trained on whole games). FIRE serves
    at every start and after every lost life where a game waits for it (the article's Breakout idled).
    game_return and game_length count whole games with unclipped rewards."""

    def __init__(self, env_id: str, seed: int, frame_skip: int = 4, noop_max: int = 30,
                 end_on_life_loss: bool = True, repeat_action_probability: Optional[float] = None):
        self.env = make_ale_env(env_id, repeat_action_probability)
        self.ale = self.env.unwrapped.ale
        self.action_set = self.env.unwrapped._action_set
        self.n_actions = len(self.action_set)
        meanings = self.env.unwrapped.get_action_meanings()
        self.fire_action = 1 if len(meanings) >= 3 and meanings[1] == "FIRE" else None
        self.frame_skip, self.noop_max, self.end_on_life_loss = frame_skip, noop_max, end_on_life_loss
        self.raw = np.zeros((2, *self.ale.getScreenDims()), dtype=np.uint8)
        self.seed(seed)

    def seed(self, seed: int) -> None:
        self.env.reset(seed=seed)  # seeds the emulator's own generator (sticky actions)
        self.rng = np.random.default_rng(seed)  # no-op counts
        self.game_over = True
        self.lives = 0
        self.game_return, self.game_length = 0.0, 0

    def _act(self, action: int, frames: int):
        """Emulates `frames` frames into raw[k % 2], so raw holds the last two; returns (reward, game over,
        truncated). After a single frame both hold it: no max (as AtariPreprocessing at frame skip 1)."""
        reward, game_over, truncated = 0.0, False, False
        for k in range(frames):
            reward += self.ale.act(self.action_set[action])
            self.ale.getScreenGrayscale(self.raw[k % 2])
            game_over, truncated = self.ale.game_over(with_truncation=False), self.ale.game_truncated()
            if game_over or truncated:
                break
        if frames == 1:
            self.raw[1] = self.raw[0]
        return reward, game_over, truncated

    def reset(self) -> np.ndarray:
        """Starts a training episode: a new game if the last one ended, else the next life. Returns raw."""
        if self.game_over:
            self.ale.reset_game()
            self.game_return, self.game_length = 0.0, 0
            for _ in range(int(self.rng.integers(1, self.noop_max + 1)) if self.noop_max else 0):
                _, game_over, truncated = self._act(0, 1)
                if game_over or truncated:
                    self.ale.reset_game()
            self.ale.getScreenGrayscale(self.raw[0])
            self.raw[1] = self.raw[0]  # a fresh start has one frame to show, not two
            self.game_over = False
        self.lives = self.ale.lives()
        if self.fire_action is not None:
            self.game_over = any(self._serve())
        return self.raw

    def _serve(self) -> tuple[bool, bool]:
        reward, game_over, truncated = self._act(self.fire_action, self.frame_skip)
        self.game_return += reward
        return game_over, truncated

    def step(self, action: int):
        """Returns (raw frames, unclipped reward, terminated, truncated, game over)."""
        reward, game_over, truncated = self._act(action, self.frame_skip)
        self.game_return += reward
        self.game_length += 1
        lives = self.ale.lives()
        # lives reaching 0 is the game's end, which some games report frames later: not a second end (as SB3)
        life_lost = 0 < lives < self.lives and not game_over
        self.lives = lives
        if life_lost and not self.end_on_life_loss and self.fire_action is not None and not truncated:
            game_over, truncated = self._serve()  # evaluation plays on through lost lives: serve as reset() does
        self.game_over = game_over or truncated
        terminated = game_over or (life_lost and self.end_on_life_loss)
        return self.raw, reward, terminated, truncated, self.game_over

    def state(self) -> dict:
        """All that continues this game exactly; the emulator as ale-py's bytes, which load without unpickling."""
        emulator = self.ale.cloneState(include_rng=True).serialize()
        return {"ale": torch.frombuffer(bytearray(emulator), dtype=torch.uint8),
                "raw": torch.from_numpy(self.raw.copy()), "rng": self.rng.bit_generator.state,
                "game_over": self.game_over, "lives": self.lives, "game_return": self.game_return,
                "game_length": self.game_length}

    def load_state(self, state: dict) -> None:
        try:
            self.ale.restoreState(emulator_state(state["ale"]))
        except SystemError:  # ale-py's answer to bytes it parsed but cannot restore
            raise ConfigError(UNREADABLE_EMULATOR_STATE) from None
        self.raw[:] = state["raw"].numpy()
        self.rng.bit_generator.state = state["rng"]
        self.game_over, self.lives = state["game_over"], state["lives"]
        self.game_return, self.game_length = state["game_return"], state["game_length"]


# ---- Preprocessing on the training device ------------------------------------------------------------------


def area_weights(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) matrix averaging each output cell over its share of input pixels: OpenCV's INTER_AREA
    shrink, which gymnasium's AtariPreprocessing uses."""
    scale = n_in / n_out
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        low, high = i * scale, (i + 1) * scale
        for j in range(int(low), min(int(np.ceil(high)), n_in)):
            weights[i, j] = (min(high, j + 1) - max(low, j)) / scale
    return weights.float()


class FramePreprocessor:
    """Raw frame pairs -> 84x84 uint8 frames on the training device: the max of the two (the emulator gives
    grayscale already), then the area resize as rows @ frame @ cols, two small matmuls."""

    def __init__(self, raw_shape: tuple[int, int], device: torch.device):
        self.device = device
        self.rows = area_weights(raw_shape[0], FRAME_SIZE).to(device)
        self.cols = area_weights(raw_shape[1], FRAME_SIZE).T.contiguous().to(device)

    def __call__(self, raw: np.ndarray) -> torch.Tensor:
        """raw: (..., 2, 210, 160) uint8 -> (..., 84, 84) uint8 on the device."""
        frames = torch.from_numpy(raw).to(self.device).amax(dim=-3).float()
        return (self.rows @ frames @ self.cols).round_().to(torch.uint8)


def first_stack(frames: torch.Tensor) -> torch.Tensor:
    """(games, 84, 84) first frames of new episodes -> (games, 4, 84, 84) stacks: the frame fills all 4 slots
    (the replay rebuilds stacks the same way)."""
    return frames.unsqueeze(1).repeat(1, STACK, 1, 1)


# ---- Replay ------------------------------------------------------------------------------------------------


def available_memory_bytes() -> Optional[int]:
    try:  # Linux's estimate of what can be allocated without swapping
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None  # not Linux: no check


class FrameReplay:
    """A ring of single 84x84 uint8 frames, each stored once (not 8 times in (s, s') stacks); stacks are rebuilt
    when sampled. Slot i holds s_t's newest frame with a_t, r_t and terminated_t; s_{t+1}'s is in slot i+1. An
    episode's final frame takes a slot that starts no transition (the bootstrap at truncation needs it).
    history[i] = min(steps into the episode, 3): how far back slot i's stack reaches (at an episode start the
    first frame repeats, as first_stack does). Sampling is randint over the filled slots, redrawing the few
    that start no transition, lack s_{t+1} or lost a frame to the write pointer. On CUDA the frames are pinned."""

    def __init__(self, capacity: int, device: torch.device, seed):
        slot_bytes = FRAME_SIZE * FRAME_SIZE + 8 + 4 + 1 + 1 + 1  # frame, action, reward, three flags
        self.nbytes = capacity * slot_bytes
        available = available_memory_bytes()
        if available is not None and self.nbytes > available:
            raise ConfigError(f"a replay of {capacity:,} frames needs {self.nbytes / 1e9:.2f} GB but only "
                              f"{available / 1e9:.2f} GB is available; pass a smaller --buffer-size")
        self.capacity, self.device = capacity, device
        self.pinned = device.type == "cuda"
        # zeros, not empty: touch every page now, so a buffer that cannot fit fails here, not hours later
        self.frames = torch.zeros((capacity, FRAME_SIZE, FRAME_SIZE), dtype=torch.uint8, pin_memory=self.pinned)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=np.bool_)
        self.history = np.zeros(capacity, dtype=np.uint8)
        self.starts_transition = np.zeros(capacity, dtype=np.bool_)
        self.position = 0  # the next slot to write (the oldest, once full)
        self.size = 0  # slots filled
        self.episode_steps = 0  # steps of the current episode stored so far
        self.rng = np.random.default_rng(seed)

    def _write(self, frame: torch.Tensor, starts_transition: bool) -> int:
        i = self.position
        self.frames[i].copy_(frame)
        self.history[i] = min(self.episode_steps, STACK - 1)
        self.starts_transition[i] = starts_transition
        self.position = (self.position + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)
        return i

    def add(self, frame: torch.Tensor, action: int, reward: float, terminated: bool, episode_end: bool,
            next_frame: torch.Tensor) -> int:
        """Stores (s_t's newest frame, a_t, r_t, terminated); at an episode's end also s_{t+1}'s final frame.
        Returns the slot of the transition."""
        i = self._write(frame, True)
        self.actions[i], self.rewards[i], self.terminated[i] = action, reward, terminated
        self.episode_steps += 1
        if episode_end:
            self._write(next_frame, False)
            self.episode_steps = 0
        return i

    def start_mid_episode(self, stack: torch.Tensor) -> None:
        """A resume without the replay, mid-episode: the older frames of the agent's stack go first, so the stacks
        rebuilt next are the ones the agent saw."""
        for older in range(STACK - 1):
            self.episode_steps = older
            self._write(stack[older], False)
        self.episode_steps = STACK - 1

    def valid(self, idx: np.ndarray) -> np.ndarray:
        newest = (self.position - 1) % self.capacity
        # the intact slots older than i (all of 0..i-1 until the ring is full): the stack needs history[i] of them
        intact_behind = idx if self.size < self.capacity else (idx - self.position) % self.capacity
        return (idx < self.size) & self.starts_transition[idx] & (idx != newest) & (intact_behind >= self.history[idx])

    def sample_indices(self, batch_size: int) -> np.ndarray:
        idx = self.rng.integers(0, self.size, size=batch_size)
        invalid = ~self.valid(idx)
        while invalid.any():  # a few slots per episode are invalid; redraw only those
            idx[invalid] = self.rng.integers(0, self.size, size=int(invalid.sum()))
            invalid = ~self.valid(idx)
        return idx

    def stack_slots(self, idx: np.ndarray) -> np.ndarray:
        """(batch, 4) slots of the stacks ending at idx, oldest first, cut at the episode start."""
        back = np.minimum(np.arange(STACK - 1, -1, -1)[None, :], self.history[idx][:, None].astype(np.int64))
        return (idx[:, None] - back) % self.capacity

    def batch(self, idx: np.ndarray):
        """(obs, actions, rewards, next_obs, terminated) of the transitions at idx, on the device; obs are uint8
        (batch, 4, 84, 84), gathered in one index_select over both stacks of each transition."""
        slots = np.concatenate([self.stack_slots(idx), self.stack_slots((idx + 1) % self.capacity)], axis=1)
        stacks = torch.empty((len(idx), 2 * STACK, FRAME_SIZE, FRAME_SIZE), dtype=torch.uint8, pin_memory=self.pinned)
        flat_slots = torch.from_numpy(slots.reshape(-1))
        torch.index_select(self.frames, 0, flat_slots, out=stacks.view(-1, FRAME_SIZE, FRAME_SIZE))
        # non_blocking from pinned memory; torch keeps the pinned block until its copy is done
        stacks = stacks.to(self.device, non_blocking=True)
        actions, rewards = (torch.from_numpy(array[idx]).to(self.device) for array in (self.actions, self.rewards))
        terminated = torch.from_numpy(self.terminated[idx].astype(np.float32)).to(self.device)
        return stacks[:, :STACK], actions, rewards, stacks[:, STACK:], terminated

    def sample(self, batch_size: int):
        return self.batch(self.sample_indices(batch_size))

    ARRAYS = ("actions", "rewards", "terminated", "history", "starts_transition")

    def state(self) -> dict:
        return {"frames": self.frames, **{name: torch.from_numpy(getattr(self, name).copy()) for name in self.ARRAYS},
                "position": self.position, "size": self.size, "episode_steps": self.episode_steps,
                "rng": self.rng.bit_generator.state}

    def load_state(self, state: dict) -> None:
        if state["frames"].shape != self.frames.shape:
            raise ConfigError(f"the checkpoint's replay holds {state['frames'].shape[0]:,} frames, "
                              f"not --buffer-size {self.capacity:,}")
        self.frames.copy_(state["frames"])
        for name in self.ARRAYS:
            getattr(self, name)[:] = state[name].numpy()
        self.position, self.size, self.episode_steps = state["position"], state["size"], state["episode_steps"]
        self.rng.bit_generator.state = state["rng"]


# ---- Network, schedule and update --------------------------------------------------------------------------


class QNetwork(nn.Module):
    """Nature's network: three convolutions and a 512-unit layer over 4 stacked 84x84 frames."""

    def __init__(self, n_actions: int):
        super().__init__()
        self.network = nn.Sequential(
            nn.Conv2d(STACK, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(3136, 512), nn.ReLU(),
            nn.Linear(512, n_actions),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x.float() / 255.0)  # frames travel as uint8 (4x less to copy); scale here


def linear_schedule(start_e: float, end_e: float, duration: int, t: int) -> float:
    """Epsilon at env step t: falls linearly from start_e to end_e over `duration` steps, then stays."""
    if duration <= 0:  # a run too short to have an annealing window
        return end_e
    return end_e + (start_e - end_e) * max(0.0, 1.0 - t / duration)


class DeepMindRMSprop(torch.optim.Optimizer):
    """RMSProp as DeepMind's DQN code defines it (not torch's RMSprop, which adds eps outside the root):
    g = 0.95 g + 0.05 dw, g2 = 0.95 g2 + 0.05 dw^2, w -= lr * dw / sqrt(g2 - g^2 + 0.01).
    Their dw is the minibatch's summed gradient; ours is the mean, so it is scaled by `grad_scale`
    (the batch size) to keep the 0.01 in the root at the same relative size."""

    def __init__(self, params, lr: float, grad_scale: float, decay: float = 0.95, eps: float = 0.01):
        super().__init__(params, {"lr": lr, "grad_scale": grad_scale, "decay": decay, "eps": eps})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dw = p.grad * group["grad_scale"]
                state = self.state[p]
                if not state:
                    state["g"], state["g2"] = torch.zeros_like(p), torch.zeros_like(p)
                g, g2, decay = state["g"], state["g2"], group["decay"]
                g.mul_(decay).add_(dw, alpha=1 - decay)
                g2.mul_(decay).addcmul_(dw, dw, value=1 - decay)
                p.addcdiv_(dw, (g2 - g * g + group["eps"]).sqrt_(), value=-group["lr"])


def make_optimizer(args: Args, q_network: nn.Module) -> torch.optim.Optimizer:
    if args.optimizer == "rmsprop":
        return DeepMindRMSprop(q_network.parameters(), lr=args.learning_rate, grad_scale=args.batch_size)
    # CleanRL's Adam, fused on CPU too: one kernel for all parameters
    return torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, fused=True)


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
    """Plays `episodes` full games at once (no life-loss ends, up to 30 no-op starts, 108,000-frame cap),
    one batched forward pass per step. Each evaluation reseeds its games from (seed, step), so evaluating
    draws nothing from the training run's random streams and a resumed run evaluates as the original."""

    def __init__(self, args: Args, preprocess: FramePreprocessor, seed: int):
        self.games = [AtariGame(args.env_id, seed + i, args.frame_skip, args.noop_max, end_on_life_loss=False,
                                repeat_action_probability=args.repeat_action_probability)
                      for i in range(args.eval_episodes)]
        self.epsilon, self.seed, self.preprocess = args.eval_epsilon, seed, preprocess

    @torch.no_grad()
    def __call__(self, q_network: nn.Module, step: int, video: Optional[list] = None) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        for i, game in enumerate(self.games):
            game.seed(int(rng.integers(2**31)) + i)
        stacks = first_stack(self.preprocess(np.stack([game.reset() for game in self.games])))
        returns = np.zeros(len(self.games))
        active = np.arange(len(self.games))
        while len(active):
            actions = epsilon_greedy(lambda obs: q_network(obs).argmax(dim=1), stacks, self.epsilon,
                                     self.games[0].n_actions, rng)
            raws, still_active = [], []
            for row, (i, action) in enumerate(zip(active, actions)):
                raw, _, _, _, game_over = self.games[i].step(int(action))
                if video is not None and i == 0:
                    video.append(self.games[0].ale.getScreenRGB())
                if game_over:
                    returns[i] = self.games[i].game_return
                else:
                    raws.append(raw)
                    still_active.append(row)
            active = active[still_active]
            if len(active):
                stacks = torch.cat([stacks[still_active, 1:], self.preprocess(np.stack(raws)).unsqueeze(1)], dim=1)
        return returns


def write_gif(path: str, frames: list) -> None:
    try:
        from PIL import Image  # only --capture-video needs it
    except ImportError:
        raise ConfigError("--capture-video writes a GIF with pillow: pip install pillow") from None
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=1000 // 15, loop=0)


# ---- Speed: attached around the update and the greedy action -----------------------------------------------


def bf16_forward(network: QNetwork):
    """--bf16: the network's forward pass for the update, its convolutions and 512-unit layer under bfloat16
    autocast. The Q-value head stays float32: bf16 keeps 8 significant bits, so Q near 10 would be rounded by
    about 0.03, the size of a typical TD error. Weights, optimizer state, targets, loss and acting stay float32
    (for one observation, casting the weights costs more than bf16 saves)."""
    def forward(obs: torch.Tensor) -> torch.Tensor:
        # no cast cache: each weight is cast once per update anyway, and CUDA graph capture refuses the cache
        with torch.autocast(obs.device.type, dtype=torch.bfloat16, cache_enabled=False):
            features = network.network[:-1](obs.float() / 255.0)
        return network.network[-1](features.float())
    return forward


class CudaGraphed:
    """--cuda-graphs: fn called plainly `warmup` times (lazy set-up, such as cuBLAS handles and optimizer state,
    must not happen in a recording), then recorded once as a CUDA graph and replayed: an update is ~100 small
    kernels and a greedy action ~10, one launch each instead. A replay copies the arguments into the recorded
    inputs; its outputs are overwritten by the next call (use them first); weights are read anew each time."""

    def __init__(self, fn, warmup: int = 3):
        self.fn, self.warmup = fn, warmup
        self.calls = 0
        self.graph = None

    def __call__(self, *args: torch.Tensor):
        if self.graph is None:
            self.calls += 1
            if self.calls <= self.warmup:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    outputs = self.fn(*args)
                torch.cuda.current_stream().wait_stream(side)
                return outputs
            self.inputs = [arg.clone() for arg in args]
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records, runs nothing: the replay below makes this call's step
                self.outputs = self.fn(*self.inputs)
        else:
            for recorded, arg in zip(self.inputs, args):
                recorded.copy_(arg)
        self.graph.replay()
        return self.outputs


def keep_freed_memory() -> bool:
    """glibc's malloc keeps freed blocks under 32 MB for reuse rather than returning them to the kernel, so an
    update does not page-fault its activations and gradients in again. False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)  # the symbols already loaded into this process, the C library's among them
    if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: their malloc has no such thresholds
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def cpu_has_bf16_kernels() -> bool:
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()  # oneDNN's bfloat16 kernels need AVX-512


# ---- Checkpoints and resume (--checkpoint-every, --resume) -------------------------------------------------


CHECKPOINT_FORMAT = "dqn_atari checkpoint 3"
# formats this version refuses -> (why, the last commit whose dqn_atari.py reads them)
OLDER_FORMATS = {"dqn_atari checkpoint 1": ("its emulator state is a pickle, which can run code when loaded, so "
                                            "continue it only if you trust the file", "bcf01fb"),
                 "dqn_atari checkpoint 2": ("it is laid out for the earlier, several-game dqn_atari.py", "3d1869b")}
UNREADABLE_EMULATOR_STATE = "the emulator state is not one ale-py can read"


def emulator_state(saved) -> ale_py.ALEState:
    """An emulator state rebuilt from the bytes AtariGame.state() keeps; anything else is refused."""
    if not (isinstance(saved, torch.Tensor) and saved.dtype == torch.uint8 and saved.dim() == 1):
        raise ConfigError(f"the emulator state is a {type(saved).__name__}, not the uint8 tensor dqn_atari.py writes")
    try:
        return ale_py.ALEState(saved.numpy().tobytes())
    except Exception:  # ale-py raises SystemError for bytes that are not one of its states
        raise ConfigError(UNREADABLE_EMULATOR_STATE) from None
def make_checkpoint(args: Args, global_step: int, log, q_network, target_network, optimizer, game: AtariGame,
                    obs: torch.Tensor, replay: FrameReplay, action_rng, recent_returns: deque,
                    updates_begin_at: int, exploration_steps: int) -> dict:
    """Everything the run's next step depends on, so that a resumed run goes on exactly as this one would."""
    return {
        "format": CHECKPOINT_FORMAT,
        "args": vars(args),
        "global_step": global_step,  # env steps done
        "wall_seconds": log.wall_seconds(),  # training time so far: a resumed run's clock goes on from it
        "last_eval": log.last_eval,  # the progress line's eval field
        "wandb_run_id": log.tracking.id if log.tracking is not None else None,  # --track: where a resume goes on
        "updates_begin_at": updates_begin_at,
        "exploration_steps": exploration_steps,  # a resume with a longer --total-timesteps keeps its schedule
        "q_network": q_network.state_dict(),
        "target_network": target_network.state_dict(),
        "optimizer": optimizer.state_dict(),
        "game": game.state(),
        "obs": obs.cpu(),
        "replay": replay.state() if args.checkpoint_replay else None,  # without it, a resume refills the replay
        "recent_returns": list(recent_returns),
        "action_rng": action_rng.bit_generator.state,  # every random draw of a run is its own generators'
    }


def restore_checkpoint(checkpoint: dict, args: Args, q_network, target_network, optimizer, game: AtariGame,
                       replay: FrameReplay, action_rng, recent_returns: deque, device: torch.device):
    """Puts make_checkpoint's pieces back; returns (global_step, obs, updates_begin_at, exploration_steps)."""
    try:
        q_network.load_state_dict(checkpoint["q_network"])
        target_network.load_state_dict(checkpoint["target_network"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:  # another network's or optimizer's shape
        raise ConfigError(f"{args.resume} does not fit this network or optimizer "
                          f"({str(error).splitlines()[0]})") from None
    game.load_state(checkpoint["game"])
    obs = checkpoint["obs"].to(device)
    updates_begin_at = checkpoint["updates_begin_at"]
    if checkpoint["replay"] is not None:
        replay.load_state(checkpoint["replay"])
    else:  # refill before learning again, rather than overfit a near-empty replay
        replay.start_mid_episode(obs[0])
        updates_begin_at = max(updates_begin_at, checkpoint["global_step"] + args.learning_starts)
        print(f"the checkpoint has no replay: collecting {args.learning_starts:,} steps before updates resume",
              flush=True)
    recent_returns.extend(checkpoint["recent_returns"])
    action_rng.bit_generator.state = checkpoint["action_rng"]
    return checkpoint["global_step"], obs, updates_begin_at, checkpoint["exploration_steps"]


def save_atomically(payload: dict, path: str) -> None:
    """Temporary file, then rename: a crash mid-write leaves the previous file whole."""
    tmp_path = path + ".tmp"
    torch.save(payload, tmp_path)
    os.replace(tmp_path, path)


def load_checkpoint(path: str) -> dict:
    """weights_only: torch.load rebuilds tensors and plain containers, and refuses any other object, so no code in
    the file can run; the emulator state is checked here too, before any game or network is made."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if checkpoint.get("format") in OLDER_FORMATS:
            why, commit = OLDER_FORMATS[checkpoint["format"]]
            raise ConfigError(f"an older checkpoint ({why}); continue it with dqn_atari.py of commit {commit}")
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise ValueError("not a checkpoint")
        emulator_state(checkpoint["game"]["ale"])
    except FileNotFoundError:
        raise ConfigError(f"no checkpoint at {path}") from None
    except ConfigError as error:  # an older format, or an emulator state that is not ale-py's bytes
        raise ConfigError(f"{path}: {error}") from None
    except Exception as error:  # unpickling, truncation, another file's contents: all mean "not ours"
        raise ConfigError(f"{path} is not a readable dqn_atari.py checkpoint ({type(error).__name__}); give a "
                          "checkpoint.pt that dqn_atari.py wrote") from None
    return checkpoint


def flags_given(argv: list[str]) -> set[str]:
    """Names of the Args fields set on this command line (tyro spells them --env-id or --no-cuda)."""
    names = set()
    for token in argv:
        if token.startswith("--"):
            name = token[2:].split("=")[0].replace("-", "_")
            names.add(name[3:] if name.startswith("no_") and name[3:] in Args.__dataclass_fields__ else name)
    return names


def read_resume(args: Args, argv: list[str]) -> tuple[Args, Optional[dict]]:
    """--resume: the checkpoint, and the flags to continue it with: its own, but for those in RESUMABLE that this
    command line gives. Any other flag given with a different value is a mismatch, refused. Without --resume,
    the flags as given and no checkpoint."""
    if not args.resume:
        return args, None
    checkpoint = load_checkpoint(args.resume)
    given = flags_given(argv)
    saved = {**vars(Args()), **checkpoint["args"]}  # a flag newer than the checkpoint: it ran with the default
    for name in sorted(given & set(saved) - RESUMABLE):
        if getattr(args, name) != saved[name]:
            raise ConfigError(f"the checkpoint was trained with --{name.replace('_', '-')} {saved[name]}, not "
                              f"{getattr(args, name)}; drop the flag to continue it as it was")
    try:
        args = Args(**{**saved, **{name: getattr(args, name) for name in RESUMABLE & given | {"resume"}}})
    except TypeError as error:  # a flag this version does not have
        raise ConfigError(f"{args.resume} holds a flag this version lacks ({error}); continue it with the "
                          "dqn_atari.py that wrote it") from None
    # a checkpoint past the run's end is a typo, and resuming it would drop the eval rows and events after it
    if checkpoint["global_step"] > args.total_timesteps:
        raise ConfigError(f"the checkpoint is at step {checkpoint['global_step']:,}, past --total-timesteps "
                          f"{args.total_timesteps:,}; give one of at least {checkpoint['global_step']:,}")
    return args, checkpoint


# ---- The run's files ---------------------------------------------------------------------------------------


def make_run_dir(args: Args) -> str:
    name = args.env_id.replace("/", "-")
    base = os.path.join(args.runs_dir, f"{name}__{args.exp_name}__{args.seed}__{int(time.time())}")
    run_dir, suffix = base, 1
    while os.path.exists(run_dir):  # never write into (and so never clobber) an earlier run's files
        run_dir, suffix = f"{base}-{suffix}", suffix + 1
    try:
        os.makedirs(run_dir)
    except OSError as error:  # a missing parent we may not create, a file in the way, no permission
        raise ConfigError(f"cannot create the run directory {run_dir} ({error.strerror}); pass a writable "
                          "--runs-dir") from None
    return run_dir


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


def time_left(now: float, step: int, total_steps: int, updates_begin_at: int, learning_since) -> str:
    """The progress line's last field: extrapolated from the learning phase alone (collecting is many times
    faster). learning_since: (time, step) of the first progress line after updates began, None before."""
    if learning_since is None:
        return f"updates from step {updates_begin_at:,}"
    since_time, since_step = learning_since
    if step <= since_step:
        return "ETA     ?"
    return f"ETA {(now - since_time) * max(0, total_steps - step) / (step - since_step) / 3600:5.2f}h"


class RunLog:
    """A run's directory and what goes into it: tensorboard events (CleanRL's charts/ and losses/ names, and
    eval/), eval.csv, checkpoint.pt, the GIFs of --capture-video and, with --track, a W&B run. A resumed run
    writes on in its own directory, and its clock goes on from the wall time its checkpoint kept."""

    def __init__(self, args: Args, checkpoint: Optional[dict]):
        from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is slow to import

        self.args = args
        if checkpoint is not None:
            self.run_dir = os.path.dirname(os.path.abspath(args.resume))
            print(f"resuming {self.run_dir} at step {checkpoint['global_step']:,}", flush=True)
        else:
            self.run_dir = make_run_dir(args)
        start = checkpoint or {"global_step": 0, "wall_seconds": 0.0, "last_eval": float("nan"), "wandb_run_id": None}
        self.checkpoint_path = os.path.join(self.run_dir, "checkpoint.pt")
        self.last_checkpoint_step = checkpoint["global_step"] if checkpoint is not None else None
        self.tracking = start_tracking(args, self.run_dir, start["wandb_run_id"]) if args.track else None
        self.writer = SummaryWriter(self.run_dir, purge_step=start["global_step"] + 1 if checkpoint else None)
        if checkpoint is None:
            self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                                 "\n".join(f"|{key}|{value}|" for key, value in vars(args).items()))
        eval_path, rows = os.path.join(self.run_dir, "eval.csv"), [["step", "eval_mean", "eval_std", "episodes",
                                                                    "wall_seconds"]]
        if checkpoint is not None and os.path.exists(eval_path):  # a resumed run drops the rows past its checkpoint
            with open(eval_path, newline="") as old:
                rows += [row for row in list(csv.reader(old))[1:] if row and int(row[0]) <= start["global_step"]]
        with open(eval_path + ".tmp", "w", newline="") as new:
            csv.writer(new).writerows(rows)
        os.replace(eval_path + ".tmp", eval_path)
        self.eval_file = open(eval_path, "a", newline="")
        self.eval_csv = csv.writer(self.eval_file)
        self.wall_before, self.start_step = start["wall_seconds"], start["global_step"] + 1
        self.last_eval = start["last_eval"]
        self.learning_since = None  # (time, step) of the first progress line with updates running: the ETA's rate

    def start_clock(self) -> None:
        self.start_time = time.time()

    def wall_seconds(self) -> float:
        return self.wall_before + time.time() - self.start_time

    def steps_per_second(self, step: int, now: float) -> float:
        """This process's env steps per second, up to `step`."""
        return (step - self.start_step + 1) / (now - self.start_time)

    def game_over(self, game_return: float, game_length: int, step: int) -> None:
        self.writer.add_scalar("charts/episodic_return", game_return, step)
        self.writer.add_scalar("charts/episodic_length", game_length, step)

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
        """Plays the evaluation games and writes their returns, and with --capture-video a GIF."""
        video = [] if self.args.capture_video else None
        returns = evaluate(q_network, step, video)
        self.last_eval = float(returns.mean())  # a plain float: a checkpoint keeps it, and loads no numpy object
        self.writer.add_scalar("eval/episodic_return", returns.mean(), step)
        self.eval_csv.writerow([step, f"{returns.mean():.4f}", f"{returns.std():.4f}", len(returns),
                                f"{self.wall_seconds():.2f}"])
        self.eval_file.flush()
        if video:
            os.makedirs(os.path.join(self.run_dir, "videos"), exist_ok=True)
            gif_path = os.path.join(self.run_dir, "videos", f"eval_step{step}.gif")
            write_gif(gif_path, video)
            if self.tracking is not None:
                import wandb  # imported by start_tracking

                self.tracking.log({"videos/eval": wandb.Video(gif_path, format="gif"), "global_step": step})
        return returns

    def progress(self, step: int, epsilon: float, recent_returns: deque, updates_begin_at: int) -> None:
        now = time.time()
        if self.learning_since is None and step > updates_begin_at:
            self.learning_since = (now, step)
        recent = np.mean(recent_returns) if recent_returns else float("nan")
        eta = time_left(now, step, self.args.total_timesteps, updates_begin_at, self.learning_since)
        print(f"step {step:>9}/{self.args.total_timesteps} | SPS {self.steps_per_second(step, now):5.0f} | "
              f"eps {epsilon:.3f} | return(100) {recent:7.2f} | eval {self.last_eval:7.2f} | {eta}", flush=True)

    def checkpoint(self, checkpoint: dict) -> None:
        save_atomically(checkpoint, self.checkpoint_path)
        self.last_checkpoint_step = checkpoint["global_step"]

    def save_model(self, q_network: nn.Module, n_actions: int) -> None:
        model_path = os.path.join(self.run_dir, f"{self.args.exp_name}.pt")
        save_atomically({"state_dict": q_network.state_dict(), "env_id": self.args.env_id, "n_actions": n_actions},
                        model_path)
        print(f"model saved to {model_path}")

    def close(self, diverged: str) -> None:
        self.eval_file.close()
        self.writer.close()
        if self.tracking is not None:
            self.tracking.finish(exit_code=1 if diverged else 0)


# ---- Training ----------------------------------------------------------------------------------------------


def train(args: Args, argv: Optional[list[str]] = None) -> dict:
    """Trains (or resumes) one agent; returns its final eval returns, game returns, run dir, replay, network and
    steps done."""
    args, checkpoint = read_resume(args, argv or [])
    check_args(args)
    seed_everything(args.seed, args.torch_deterministic)
    keep_freed_memory()
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.bf16 and device.type == "cpu" and not cpu_has_bf16_kernels():
        print("warning: --bf16 on a CPU without AVX-512, where torch emulates bfloat16: the updates will run many "
              "times slower than float32; drop --bf16 here", file=sys.stderr, flush=True)
    game = AtariGame(args.env_id, args.seed, args.frame_skip, args.noop_max, True, args.repeat_action_probability)
    preprocess = FramePreprocessor(game.raw.shape[1:], device)
    evaluate = Evaluator(args, preprocess, args.seed + 10_000)
    q_network = QNetwork(game.n_actions).to(device)
    target_network = QNetwork(game.n_actions).to(device)
    target_network.load_state_dict(q_network.state_dict())
    target_network.requires_grad_(False)
    optimizer = make_optimizer(args, q_network)
    # seeds of their own: generators seeded with the same number (the game's no-ops) draw the same numbers
    replay_seed, action_seed = np.random.SeedSequence(args.seed).spawn(2)
    replay = FrameReplay(args.buffer_size, device, replay_seed)
    print(f"replay: {args.buffer_size:,} frames of {FRAME_SIZE}x{FRAME_SIZE} uint8, {replay.nbytes / 1e9:.2f} GB"
          f"{' pinned' if replay.pinned else ''}", flush=True)
    action_rng = np.random.default_rng(action_seed)
    recent_returns = deque(maxlen=100)  # the progress line's last 100 training games
    global_step, updates_begin_at = 0, args.learning_starts  # updates run at the steps after updates_begin_at
    exploration_steps = int(args.exploration_fraction * args.total_timesteps)
    if checkpoint is None:
        obs = first_stack(preprocess(game.reset()[None]))  # a batch of one game: (1, 4, 84, 84)
    else:
        global_step, obs, updates_begin_at, exploration_steps = restore_checkpoint(
            checkpoint, args, q_network, target_network, optimizer, game, replay, action_rng, recent_returns, device)

    # the update and the greedy action as the loop calls them; --bf16 and CUDA graphs attach around them
    online, target = q_network, target_network
    if args.bf16:
        online, target = bf16_forward(q_network), bf16_forward(target_network)

    def update(*batch):
        return td_update(online, target, optimizer, batch, args.gamma, args.max_grad_norm)

    def act(obs):
        return q_network(obs).argmax(dim=1)

    if args.cuda_graphs and device.type == "cuda":
        optimizer.param_groups[0]["capturable"] = True  # Adam's step count stays on the GPU, as a recording needs
        update, act = CudaGraphed(update), CudaGraphed(act)

    log = RunLog(args, checkpoint)
    stop_signal = []  # SIGINT/SIGTERM: finish the current step, write a checkpoint, exit cleanly
    previous_handlers = {sig: signal.signal(sig, lambda signum, _: stop_signal.append(signum))
                         for sig in (signal.SIGINT, signal.SIGTERM)}
    game_returns, final_returns, diverged = [], None, ""  # diverged: what went non-finite, and when
    log.start_clock()
    while global_step < args.total_timesteps:
        global_step += 1
        # act: epsilon-greedy, epsilon falling linearly over the first exploration_fraction of the run
        epsilon = linear_schedule(args.start_e, args.end_e, exploration_steps, global_step)
        with torch.no_grad():
            action = int(epsilon_greedy(act, obs, epsilon, game.n_actions, action_rng)[0])
        # step the game (the action repeated frame_skip times) and shrink its last two frames on the device
        raw, reward, terminated, truncated, game_over = game.step(action)
        next_frame = preprocess(raw[None])
        # store. The reward clipped to its sign (Nature): one scale of TD error across games. At truncation the
        # final frame is stored, so the bootstrap from it is correct; only `terminated` cuts it.
        replay.add(obs[0, -1], action, float(np.sign(reward)), terminated, terminated or truncated, next_frame[0])
        obs = torch.cat([obs[:, 1:], next_frame.unsqueeze(1)], dim=1)
        if game_over:
            log.game_over(game.game_return, game.game_length, global_step)
            recent_returns.append(game.game_return)
            game_returns.append(game.game_return)
        if terminated or truncated:
            obs = first_stack(preprocess(game.reset()[None]))

        # learn: a minibatch update every train_frequency steps once learning starts
        if global_step > updates_begin_at and global_step % args.train_frequency == 0:
            loss, q_mean = update(*replay.sample(args.batch_size))
            if global_step % LOG_EVERY < args.train_frequency:
                diverged = log.update(global_step, loss, q_mean, epsilon)
                if diverged:
                    break
        # sync the target network; the article's step counter was never incremented, so its target never moved
        if global_step % args.target_network_frequency == 0:
            target_network.load_state_dict(q_network.state_dict())

        # evaluate, report, checkpoint
        if args.eval_every and global_step % args.eval_every == 0 and global_step < args.total_timesteps:
            log.evaluate(evaluate, q_network, global_step)
        if args.progress_every and global_step % args.progress_every == 0:
            log.progress(global_step, epsilon, recent_returns, updates_begin_at)
        if (args.checkpoint_every and global_step % args.checkpoint_every == 0) or stop_signal:
            if not all(torch.isfinite(parameter).all() for parameter in q_network.parameters()):
                diverged = f"at step {global_step:,} the network's weights are not finite"
                break  # a NaN between two loss reads: the last good checkpoint stays
            log.checkpoint(make_checkpoint(args, global_step, log, q_network, target_network, optimizer, game, obs,
                                           replay, action_rng, recent_returns, updates_begin_at, exploration_steps))
        if stop_signal:
            print(f"stopped by signal {stop_signal[0]} at step {global_step:,}; checkpoint written to "
                  f"{log.checkpoint_path} (continue with --resume {log.checkpoint_path})", flush=True)
            break
    for sig, handler in previous_handlers.items():
        signal.signal(sig, handler)

    if not (stop_signal or diverged):
        final_returns = log.evaluate(evaluate, q_network, global_step)
        print(f"final eval over {len(final_returns)} games: {final_returns.mean():.2f} ± "
              f"{final_returns.std():.2f} (wall {log.wall_seconds():.1f}s)", flush=True)
        if args.save_model:
            log.save_model(q_network, game.n_actions)
    log.close(diverged)
    if diverged:
        kept = (f"the last good checkpoint, {log.checkpoint_path} (step {log.last_checkpoint_step:,}), is untouched"
                if log.last_checkpoint_step is not None else "no checkpoint was written")
        raise TrainingDiverged(f"training diverged: {diverged}; {kept}; try a smaller --learning-rate")
    return {"final_returns": final_returns, "game_returns": game_returns, "run_dir": log.run_dir,
            "replay": replay, "q_network": q_network, "global_step": global_step}


def main() -> None:
    args = tyro.cli(Args)
    try:
        train(args, sys.argv[1:])
    except (ConfigError, TrainingDiverged) as error:
        sys.exit(f"dqn_atari.py: error: {error}")


if __name__ == "__main__":
    main()
