"""Nature DQN (Mnih et al. 2015) on Atari, in one file: dqn_atari.py plus two parallel speed-ups.

`diff dqn_atari.py dqn_atari_parallel.py` shows only them: --num-envs N plays N training games at once, each past
the first in a worker process (on a GPU, --replay-on-gpu keeps the replay in GPU memory), and --overlap-updates
(CPU) computes each update's gradient in a learner thread while the next steps are played. Both change what is
learned a little (README's results say how much); with one game and no overlap, this is dqn_atari.py. Two CPU
options come with them: --channels-last (the weights' memory order) and --flush-denormals (values below 1.2e-38
zeroed, which Adam's step on an Intel CPU needs to run at speed).

Top to bottom: the flags, the game behind Nature's wrappers, preprocessing on the training device, the replay,
the network and the TD update, evaluation, the speed-ups attached around the update (--bf16, CUDA graphs), the
several games, and train(), whose loop reads as the algorithm: act, step, store, learn, sync. Below it: the
flags' checks, the checkpoints and the run's files that train() writes, out of the algorithm's reading path.
"The article" is "Learnings from reproducing DQN for Atari games": each mistake it describes has a test.
"""

import atexit
import copy
import csv
import hashlib
import ctypes
import fcntl
import math
import os
import random
import signal
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Literal, NamedTuple, Optional, Union, get_args, get_origin

if __name__ == "__main__":  # Ctrl-C while torch and the rest load, or outside the loop's own handler: one line
    signal.signal(signal.SIGINT, lambda *_: sys.exit(f"{os.path.basename(__file__)}: interrupted outside the "
                                                      "training loop, so no checkpoint was written"))

import ale_py
import gymnasium as gym
import numpy as np
import torch
import torch.multiprocessing
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
    channels_last: bool = False
    """keep the networks' weights in channels-last (NHWC) memory order, which oneDNN's convolutions run faster
    (bfloat16 most of all); their sums then run in another order, so the numbers differ in the last bits"""
    cuda_graphs: bool = True
    """on CUDA, record the update and the greedy action once each as a CUDA graph and replay them (same numbers)"""
    replay_on_gpu: bool = False
    """on CUDA, keep the replay's frames in GPU memory (7.06 GB for 1M) instead of pinned host memory: a batch
    is gathered there, with no copy over the bus, and storing a frame needs no sync. The same numbers"""
    overlap_updates: bool = False
    """on the CPU, compute each update's gradient in a learner thread while the next train_frequency steps are
    played, and apply it at the next update step: a batch is then drawn train_frequency steps before its update
    is applied (see OverlappedUpdates). The two threads get half the torch threads each. No effect on CUDA"""
    flush_denormals: bool = False
    """on the CPU, flush floating-point values below 1.2e-38 to zero. Adam's moments of weights that get no
    gradient decay into that range, where Intel CPUs take many times as long for each operation; zeroed there,
    such a value changes no weight. The numbers differ only once a value reaches that range"""
    num_envs: int = 1
    """training games stepped at once, each past the first in a worker process of its own. Every game's
    step counts as one env step, so train_frequency, learning_starts, target_network_frequency and
    total_timesteps count transitions as with one game (a run ends at the first multiple of num_envs at or past
    total_timesteps); game k is seeded with seed + k. 1: Nature's setting"""
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


class ConfigError(Exception):
    """Bad input, or a file that cannot be read or written: one line and a non-zero exit, never a traceback."""


class TrainingDiverged(Exception):
    """Training stopped being finite: the run stops in one line, and writes no model or checkpoint of NaNs."""


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
    """One ALE game behind Nature's wrappers: step() repeats the action frame_skip times and returns the last two
    raw frames (their max hides sprites drawn every other frame); a game starts with 1..noop_max no-ops; with
    end_on_life_loss (training) a lost life ends the episode, not the game (the article trained on whole games);
    FIRE serves where a game waits for it (the article's Breakout idled). game_return counts unclipped rewards."""

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
        """Emulates `frames` frames into raw[k % 2]; returns (reward, game over, truncated)."""
        reward, game_over, truncated = 0.0, False, False
        for k in range(frames):
            reward += self.ale.act(self.action_set[action])
            self.ale.getScreenGrayscale(self.raw[k % 2])
            game_over, truncated = self.ale.game_over(with_truncation=False), self.ale.game_truncated()
            if game_over or truncated:
                break
        if frames == 1:
            self.raw[1] = self.raw[0]  # one frame: no max, as AtariPreprocessing at frame skip 1
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
            raise ConfigError("the emulator state is not one ale-py can restore") from None
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
    """Raw grayscale frame pairs -> their max, area-resized to 84x84 uint8 on the device as rows @ frame @ cols."""

    def __init__(self, raw_shape: tuple[int, int], device: torch.device):
        self.device = device
        self.rows = area_weights(raw_shape[0], FRAME_SIZE).to(device)
        self.cols = area_weights(raw_shape[1], FRAME_SIZE).T.contiguous().to(device)

    def __call__(self, raw: np.ndarray) -> torch.Tensor:
        """raw: (..., 2, 210, 160) uint8 -> (..., 84, 84) uint8 on the device."""
        frames = torch.from_numpy(raw).to(self.device).amax(dim=-3).float()
        return (self.rows @ frames @ self.cols).round_().to(torch.uint8)


def first_stack(frames: torch.Tensor) -> torch.Tensor:
    """(games, 84, 84) first frames of episodes -> (games, 4, 84, 84) stacks of them, as the replay rebuilds."""
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
    that start no transition, lack s_{t+1} or lost a frame to the write pointer. On CUDA the frames are pinned.
    Each training game writes to a ring of its own, capacity // games slots, so its stacks stay contiguous; a
    batch draws from all the rings alike. on_device (CUDA): the frames in GPU memory, where a batch is gathered."""

    def __init__(self, capacity: int, device: torch.device, seed, games: int = 1, on_device: bool = False):
        self.games, self.ring = games, capacity // games
        capacity = self.ring * games
        slot_bytes = FRAME_SIZE * FRAME_SIZE + 8 + 4 + 1 + 1 + 1  # frame, action, reward, three flags
        self.nbytes = capacity * slot_bytes
        on_device = on_device and device.type == "cuda"
        available = torch.cuda.mem_get_info(device)[0] if on_device else available_memory_bytes()
        if available is not None and self.nbytes > available:
            raise ConfigError(f"a replay of {capacity:,} frames needs {self.nbytes / 1e9:.2f} GB but only "
                              f"{available / 1e9:.2f} GB is available{' on the GPU' if on_device else ''}; pass "
                              "a smaller --buffer-size")
        self.capacity, self.device = capacity, device
        self.pinned = device.type == "cuda" and not on_device
        # zeros, not empty: touch every page now, so a buffer that cannot fit fails here, not hours later
        self.frames = torch.zeros((capacity, FRAME_SIZE, FRAME_SIZE), dtype=torch.uint8, pin_memory=self.pinned,
                                  device=device if on_device else "cpu")
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=np.bool_)
        self.history = np.zeros(capacity, dtype=np.uint8)
        self.starts_transition = np.zeros(capacity, dtype=np.bool_)
        # per ring: the next slot to write (its oldest once full), the slots filled, the current episode's steps
        self.positions = np.zeros(games, dtype=np.int64)
        self.sizes = np.zeros(games, dtype=np.int64)
        self.episode_steps = np.zeros(games, dtype=np.int64)
        self.rng = np.random.default_rng(seed)

    @property
    def size(self) -> int:
        """Slots filled, over all rings."""
        return int(self.sizes.sum())

    def _write(self, frame: torch.Tensor, starts_transition: bool, game: int) -> int:
        i = game * self.ring + int(self.positions[game])
        self.frames[i].copy_(frame)
        self.history[i] = min(self.episode_steps[game], STACK - 1)
        self.starts_transition[i] = starts_transition
        self.positions[game] = (self.positions[game] + 1) % self.ring
        self.sizes[game] = min(self.sizes[game] + 1, self.ring)
        return i

    def add(self, frame: torch.Tensor, action: int, reward: float, terminated: bool, episode_end: bool,
            next_frame: torch.Tensor, game: int) -> int:
        """Stores (s_t's newest frame, a_t, r_t, terminated) in the ring of training game `game`; at an episode's
        end also s_{t+1}'s final frame. Returns the slot of the transition."""
        i = self._write(frame, True, game)
        self.actions[i], self.rewards[i], self.terminated[i] = action, reward, terminated
        self.episode_steps[game] += 1
        if episode_end:
            self._write(next_frame, False, game)
            self.episode_steps[game] = 0
        return i

    def start_mid_episode(self, stack: torch.Tensor, game: int) -> None:
        """A resume without the replay, mid-episode: the older frames of the agent's stack go first, so the stacks
        rebuilt next are the ones the agent saw."""
        for older in range(STACK - 1):
            self.episode_steps[game] = older
            self._write(stack[older], False, game)
        self.episode_steps[game] = STACK - 1

    def shift(self, idx: np.ndarray, by) -> np.ndarray:
        """The slots `by` places after idx (before, if negative), each within its own ring."""
        ring_start = idx - idx % self.ring
        return ring_start + (idx - ring_start + by) % self.ring

    def valid(self, idx: np.ndarray) -> np.ndarray:
        game, offset = np.divmod(idx, self.ring)
        position, size = self.positions[game], self.sizes[game]
        newest = (position - 1) % self.ring
        # the intact slots older than i (all of the ring's start..i-1 until it is full): the stack needs history[i]
        intact_behind = np.where(size < self.ring, offset, (offset - position) % self.ring)
        return ((offset < size) & self.starts_transition[idx] & (offset != newest)
                & (intact_behind >= self.history[idx]))

    def _draw(self, count: int) -> np.ndarray:
        """Slots drawn with randint over every ring's first max(sizes) slots (the filled ones, and with several
        rings a few not yet filled, which valid() refuses)."""
        filled = int(self.sizes.max())
        flat = self.rng.integers(0, self.games * filled, size=count)
        return flat // filled * self.ring + flat % filled

    def sample_indices(self, batch_size: int) -> np.ndarray:
        idx = self._draw(batch_size)
        invalid = ~self.valid(idx)
        while invalid.any():  # a few slots per episode are invalid; redraw only those
            idx[invalid] = self._draw(int(invalid.sum()))
            invalid = ~self.valid(idx)
        return idx

    def stack_slots(self, idx: np.ndarray) -> np.ndarray:
        """(batch, 4) slots of the stacks ending at idx, oldest first, cut at the episode start."""
        back = np.minimum(np.arange(STACK - 1, -1, -1)[None, :], self.history[idx][:, None].astype(np.int64))
        return self.shift(idx[:, None], -back)

    def batch(self, idx: np.ndarray):
        """(obs, actions, rewards, next_obs, terminated) of the transitions at idx, on the device; obs are uint8
        (batch, 4, 84, 84), gathered in one index_select over both stacks of each transition."""
        slots = torch.from_numpy(np.concatenate([self.stack_slots(idx), self.stack_slots(self.shift(idx, 1))], axis=1))
        if self.frames.device.type == "cuda":  # gathered where the frames are, with no copy over the bus
            stacks = self.frames.index_select(0, slots.reshape(-1).to(self.frames.device))
        else:
            stacks = torch.empty((slots.numel(), FRAME_SIZE, FRAME_SIZE), dtype=torch.uint8, pin_memory=self.pinned)
            torch.index_select(self.frames, 0, slots.reshape(-1), out=stacks)
            # non_blocking from pinned memory; torch keeps the pinned block until its copy is done
            stacks = stacks.to(self.device, non_blocking=True)
        stacks = stacks.view(len(idx), 2 * STACK, FRAME_SIZE, FRAME_SIZE)
        actions, rewards = (torch.from_numpy(array[idx]).to(self.device) for array in (self.actions, self.rewards))
        terminated = torch.from_numpy(self.terminated[idx].astype(np.float32)).to(self.device)
        return stacks[:, :STACK], actions, rewards, stacks[:, STACK:], terminated

    def sample(self, batch_size: int):
        return self.batch(self.sample_indices(batch_size))

    def state(self) -> dict:
        return {"frames": self.frames, "actions": torch.from_numpy(self.actions.copy()),
                "rewards": torch.from_numpy(self.rewards.copy()), "history": torch.from_numpy(self.history.copy()),
                "terminated": torch.from_numpy(self.terminated.copy()),
                "starts_transition": torch.from_numpy(self.starts_transition.copy()),
                "positions": torch.from_numpy(self.positions.copy()), "sizes": torch.from_numpy(self.sizes.copy()),
                "episode_steps": torch.from_numpy(self.episode_steps.copy()), "rng": self.rng.bit_generator.state}

    def load_state(self, state: dict) -> None:
        self.frames.copy_(state["frames"])
        self.actions[:], self.rewards[:] = state["actions"].numpy(), state["rewards"].numpy()
        self.terminated[:], self.history[:] = state["terminated"].numpy(), state["history"].numpy()
        self.starts_transition[:] = state["starts_transition"].numpy()
        self.positions[:], self.sizes[:] = state["positions"].numpy(), state["sizes"].numpy()
        self.episode_steps[:] = state["episode_steps"].numpy()
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
    """RMSProp as DeepMind's DQN code has it (torch's adds eps outside the root): g = .95 g + .05 dw,
    g2 = .95 g2 + .05 dw^2, w -= lr dw / sqrt(g2 - g^2 + .01), dw the batch's summed gradient (grad_scale x ours)."""

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


@torch.no_grad()  # the target is a constant: no graph through the target network, so no gradient reaches it
def td_target(target_network, rewards, next_obs, terminated, gamma: float) -> torch.Tensor:
    """r + gamma * max_a' Q_target(s', a'), with the bootstrap cut where the episode terminated."""
    next_q = target_network(next_obs).max(dim=1).values
    # (1 - terminated): a terminal state has no future. terminated, not truncated: a time limit is not one.
    return rewards + gamma * next_q * (1.0 - terminated)


def td_gradients(q_network, optimizer, obs, actions, targets: torch.Tensor, max_grad_norm: float):
    """The Huber TD error's gradient against the batch's TD targets, clipped, left in the online network's .grad
    (no step). Returns (loss, mean Q of the taken actions), both detached."""
    q_taken = q_network(obs).gather(1, actions.unsqueeze(1)).squeeze(1)
    # smooth_l1 is Huber with delta 1: the paper's TD-error clipping to [-1, 1], at the right scale
    # (the article's hand-written version was off by a factor of 2).
    loss = F.smooth_l1_loss(q_taken, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm > 0:
        nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], max_grad_norm)
    return loss.detach(), q_taken.detach().mean()


def td_update(q_network, target_network, optimizer, batch, gamma: float, max_grad_norm: float):
    """One gradient step on the Huber TD error of a batch (obs, actions, rewards, next_obs, terminated).
    Returns (loss, mean Q of the taken actions), both detached."""
    obs, actions, rewards, next_obs, terminated = batch
    targets = td_target(target_network, rewards, next_obs, terminated, gamma)
    loss_and_q = td_gradients(q_network, optimizer, obs, actions, targets, max_grad_norm)
    optimizer.step()
    return loss_and_q


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
    """Plays eval_episodes full games at once, one batched forward pass per step. Each evaluation seeds its games
    from (seed, step): it draws nothing from training's random streams, and a resumed run evaluates the same."""

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
    from PIL import Image  # only --capture-video needs it (check_args has seen it is installed)
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=1000 // 15, loop=0)


# ---- Speed: attached around the update and the greedy action -----------------------------------------------
def bf16_forward(network: QNetwork):
    """--bf16: the update's forward pass with the convolutions and 512-unit layer under bfloat16 autocast. The
    Q head stays float32 (8 bits would round Q near 10 by 0.03, a typical TD error), as do weights and acting."""
    layers = network.network[:-1]
    if not network.network[-1].weight.requires_grad:  # the target network: its weights change only when loaded
        float_layers, layers = layers, copy.deepcopy(layers).to(torch.bfloat16)  # so cast once a sync, not an update

        def cast_again(*_):  # after each load: a target sync or a resume
            layers.load_state_dict(float_layers.state_dict())
        network.register_load_state_dict_post_hook(cast_again)

    def forward(obs: torch.Tensor) -> torch.Tensor:
        # no cast cache: the online weights change at every update, and CUDA graph capture refuses the cache
        with torch.autocast(obs.device.type, dtype=torch.bfloat16, cache_enabled=False):
            # the bits of (obs.float() / 255.0) cast to bfloat16, in two passes over the batch where that takes three
            features = layers(obs.to(torch.bfloat16) / 255.0)
        return network.network[-1](features.float())
    return forward


class CudaGraphed:
    """--cuda-graphs: fn run plainly `warmup` times (lazy set-up must not be recorded), then recorded once as a
    CUDA graph and replayed: one launch for an update's ~100 kernels. Outputs are overwritten by the next call."""

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


class OverlappedUpdates:
    """--overlap-updates (CPU): each update's gradient is computed while the loop plays the train_frequency steps
    that follow, and the optimizer's step applies it at the next update step.

    A learner thread runs the online network's forward and backward pass. The loop's thread computes the next
    batch's TD targets (the target network's forward pass, which needs no online weights) while the learner
    finishes, then applies the gradient, hands the learner the next one and plays. Acting reads the weights the
    gradient is taken at: only the optimizer's step moves them, in the loop's thread, between two steps of play.
    A target sync takes the gradient in flight again with the new target network's targets. So the one difference
    from DQN's order is that an update's batch is drawn train_frequency steps before the update is applied: the
    newest train_frequency transitions wait for the next batch, and the first update step only starts a gradient.

    Why: on a CPU, a step of play (acting, the emulator, preprocessing) keeps one core busy and leaves the others
    idle, while an update spread over two cores runs far from twice as fast as on one.
    Overlapped, one core plays while the other computes the gradient."""

    def __init__(self, gradients, targets, optimizer):
        """gradients(batch, targets): td_gradients, run in the learner thread; targets(batch): td_target."""
        self.gradients, self.targets, self.optimizer = gradients, targets, optimizer
        self.learner = ThreadPoolExecutor(1, thread_name_prefix="learner")
        self.in_flight = None  # the gradient being computed: a Future of (loss, mean Q)
        self.batch = None  # its batch, kept for a checkpoint and for a target sync

    def __call__(self, *batch: torch.Tensor):
        """Applies the gradient in flight, if any, then starts one on `batch`. Returns the applied update's
        (loss, mean Q), or None."""
        targets = self.targets(batch)  # first: the learner finishes the gradient in flight meanwhile
        loss_and_q = None
        if self.in_flight is not None:
            loss_and_q = self.in_flight.result()
            self.optimizer.step()
        self.start(batch, targets)
        return loss_and_q

    def start(self, batch: tuple, targets: Optional[torch.Tensor] = None) -> None:
        """Queues the gradient of `batch` in the learner thread, with its TD targets (computed here if not given)."""
        self.batch = batch
        self.in_flight = self.learner.submit(self.gradients, batch, self.targets(batch) if targets is None else targets)

    def retarget(self) -> None:
        """After a target sync: takes the gradient in flight again, with the new target network's targets (the
        online network is still the one it was taken at). The learner finishes the old one first, unused."""
        if self.in_flight is not None:
            self.start(self.batch)

    def close(self) -> None:
        """Ends the learner thread once the gradient in flight is done (it is left unapplied)."""
        self.learner.shutdown(wait=True)


def keep_freed_memory() -> bool:
    """glibc keeps freed blocks under 32 MB, so an update does not page-fault its buffers in again; False without."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)  # the symbols already loaded into this process, the C library's among them
    if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: their malloc has no such thresholds
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def cpu_has_bf16_kernels() -> bool:
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()  # oneDNN's bfloat16 kernels need AVX-512


# ---- Several games at once (--num-envs N; with 1, its one game runs in this process) -----------------------
class Outcome(NamedTuple):
    """One training game's step, as the loop needs it (game_return and game_length: the whole game so far)."""
    reward: float
    terminated: bool
    truncated: bool
    game_over: bool
    game_return: float
    game_length: int


def step_game(game: AtariGame, action: int, step_frames: np.ndarray, reset_frames: np.ndarray) -> Outcome:
    """Steps a training game: its last two raw frames go to `step_frames` and, when its episode ended, the next
    episode's first frames to `reset_frames` (the reset happens here, where the game is)."""
    raw, reward, terminated, truncated, game_over = game.step(action)
    step_frames[:] = raw
    outcome = Outcome(reward, terminated, truncated, game_over, game.game_return, game.game_length)
    if terminated or truncated:
        reset_frames[:] = game.reset()
    return outcome


def game_worker(connection, frames: torch.Tensor, index: int, settings: tuple) -> None:
    """A worker process: plays training game `index`, told what to do through `connection`; its frames go
    to the shared `frames` tensor, where the trainer reads them without a copy through the pipe."""
    game = AtariGame(*settings)
    step_frames, reset_frames = frames.numpy()[:, index]
    try:
        while True:
            command, argument = connection.recv()
            if command == "step":
                connection.send(step_game(game, argument, step_frames, reset_frames))
            elif command == "reset":
                reset_frames[:] = game.reset()
                connection.send(None)
            elif command == "state":
                connection.send(game.state())
            elif command == "load_state":
                try:
                    game.load_state(argument)
                    connection.send(None)
                except ConfigError as error:  # the trainer reports it, in one line
                    connection.send(error)
            else:  # "close"
                return
    except EOFError:  # the trainer is gone
        return


class GameWorkerFailed(RuntimeError):
    """A training game's worker process died or stopped answering: reported in one line."""


WORKER_ANSWER_TIMEOUT_S = 60.0  # a step takes milliseconds, and a worker's start (imports, the ROM) seconds
WORKER_BYTES = 200 << 20  # a worker process's own memory: torch, gymnasium and the emulator (about 170 MB measured)


class Games:
    """The training games, stepped together. Game 0 runs in this process and each other game in a worker
    process of its own, all emulating at once: ALE holds Python's GIL while it emulates, so threads would
    take turns. Game k is seeded with seed + k; with one game, this is exactly that game.
    `step_frames` and `reset_frames` (games, 2, 210, 160) hold each game's last step and next episode's first
    frames."""

    def __init__(self, n: int, env_id: str, seed: int, frame_skip: int, noop_max: int,
                 repeat_action_probability: Optional[float]):
        available = available_memory_bytes()  # after the replay is made: what is left for the workers
        if available is not None and (n - 1) * WORKER_BYTES > available:
            raise ConfigError(f"--num-envs {n} starts {n - 1} worker processes of about {WORKER_BYTES / 1e9:.1f} GB "
                              f"each, but only {available / 1e9:.2f} GB is available; pass a smaller --num-envs")
        settings = [(env_id, seed + k, frame_skip, noop_max, True, repeat_action_probability) for k in range(n)]
        self.local = AtariGame(*settings[0])
        self.n_actions, self.raw_shape = self.local.n_actions, self.local.raw.shape[1:]
        shared = torch.zeros((2, n, *self.local.raw.shape), dtype=torch.uint8).share_memory_()
        self.step_frames, self.reset_frames = shared.numpy()
        context = torch.multiprocessing.get_context("spawn")  # a forked child would inherit a CUDA context
        self.connections, self.workers = [], []
        # Ctrl-C reaches every process of the terminal's group, and a scheduler may signal them all: the trainer
        # alone handles both, and asks each game for its state for the checkpoint. A worker starts with them
        # ignored (an ignored signal stays ignored in the new process), so not even its imports see them.
        handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for k in range(1, n):
                ours, theirs = context.Pipe()
                worker = context.Process(target=game_worker, args=(theirs, shared, k, settings[k]), daemon=True)
                worker.start()
                theirs.close()
                self.connections.append(ours)
                self.workers.append(worker)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        # a run that stops on an error never reaches close(), and at exit multiprocessing waits for its daemon
        # processes after a SIGTERM these ignore: killed first (atexit calls the latest registered first)
        atexit.register(self.kill)

    def _ask_all(self, command: str, arguments: list, local_call) -> list:
        """Sends each worker its command, runs game 0's part here meanwhile, then collects the answers."""
        for k, (connection, argument) in enumerate(zip(self.connections, arguments[1:]), start=1):
            self._call_worker(k, connection.send, (command, argument))
        answers = [local_call(arguments[0])]
        answers += [self._call_worker(k, self._answer_of, connection)
                    for k, connection in enumerate(self.connections, start=1)]
        return answers

    def _answer_of(self, connection):
        if not connection.poll(WORKER_ANSWER_TIMEOUT_S):
            raise TimeoutError
        return connection.recv()

    def _call_worker(self, k: int, call, *message):
        """A worker gone or silent stops the run with its game named (no checkpoint is written after it)."""
        try:
            return call(*message)
        except TimeoutError:  # first: it is an OSError too
            self.kill()
            raise GameWorkerFailed(f"the worker process of training game {k} has not answered for "
                                   f"{WORKER_ANSWER_TIMEOUT_S:g} s; stopped it and the run") from None
        except (EOFError, OSError):  # end of file, broken pipe, reset: the worker process is gone
            self.kill()
            raise GameWorkerFailed(f"the worker process of training game {k} exited (its error, if any, is "
                                   "above)") from None

    def kill(self) -> None:
        for worker in self.workers:
            worker.kill()
            worker.join()
        self.connections, self.workers = [], []

    def reset(self) -> np.ndarray:
        """Starts every game's first episode; returns `reset_frames`."""
        def reset_local(_):
            self.reset_frames[0] = self.local.reset()
        self._ask_all("reset", [None] * self.n, reset_local)
        return self.reset_frames

    def step(self, actions: np.ndarray) -> list:
        """One step of every game; returns their Outcomes (their frames are in `step_frames` and `reset_frames`)."""
        return self._ask_all("step", [int(action) for action in actions],
                             lambda action: step_game(self.local, action, self.step_frames[0], self.reset_frames[0]))

    def states(self) -> list:
        return self._ask_all("state", [None] * self.n, lambda _: self.local.state())

    def load_states(self, states: list) -> None:
        for answer in self._ask_all("load_state", states, self.local.load_state):
            if isinstance(answer, ConfigError):
                raise answer

    @property
    def n(self) -> int:
        return len(self.connections) + 1

    def close(self) -> None:
        for connection in self.connections:
            connection.send(("close", None))
        for worker in self.workers:
            worker.join()
        atexit.unregister(self.kill)


# ---- Training ----------------------------------------------------------------------------------------------
def weights_not_finite(network: nn.Module, step: int) -> str:
    """What went non-finite in the network's weights at `step`, if anything (as RunLog.update says of the loss)."""
    if all(torch.isfinite(parameter).all() for parameter in network.parameters()):
        return ""
    return f"at step {step:,} the network's weights are not finite"


def train(args: Args, argv: Optional[list[str]] = None) -> dict:
    """Trains (or resumes) one agent; returns its final eval returns, game returns, run dir, replay, network and
    steps done."""
    args, checkpoint = read_resume(args, argv or [])
    check_args(args)
    seed_everything(args.seed, args.torch_deterministic)
    threads_before = torch.get_num_threads()
    if args.num_envs > 1:  # torch's threads spinning on every core would starve the workers' emulators
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, min(threads_before, cores - (args.num_envs - 1))))
    keep_freed_memory()
    if args.flush_denormals:  # before the learner thread starts: a new thread takes its creator's float mode
        torch.set_flush_denormal(True)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.bf16 and device.type == "cpu" and not cpu_has_bf16_kernels():
        print("warning: --bf16 on a CPU without AVX-512, where torch emulates bfloat16: the updates will run many "
              "times slower than float32; drop --bf16 here", file=sys.stderr, flush=True)
    # seeds of their own: generators seeded with the same number (the game's no-ops) draw the same numbers
    replay_seed, action_seed = np.random.SeedSequence(args.seed).spawn(2)
    replay = FrameReplay(args.buffer_size, device, replay_seed, games=args.num_envs, on_device=args.replay_on_gpu)
    print(f"replay: {args.buffer_size:,} frames of {FRAME_SIZE}x{FRAME_SIZE} uint8, {replay.nbytes / 1e9:.2f} GB"
          f"{' pinned' if replay.pinned else ''} on {replay.frames.device}", flush=True)
    games = Games(args.num_envs, args.env_id, args.seed, args.frame_skip, args.noop_max,
                  args.repeat_action_probability)  # after the replay, whose memory its workers must leave
    preprocess = FramePreprocessor(games.raw_shape, device)
    evaluate = Evaluator(args, preprocess, args.seed + 10_000)
    q_network = QNetwork(games.n_actions).to(device)
    target_network = QNetwork(games.n_actions).to(device)
    target_network.load_state_dict(q_network.state_dict())
    target_network.requires_grad_(False)
    if args.channels_last:  # the convolutions take their input in the weights' order
        for network in (q_network, target_network):
            network.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(args, q_network)
    action_rng = np.random.default_rng(action_seed)
    recent_returns = deque(maxlen=100)  # the progress line's last 100 training games
    global_step, updates_begin_at = 0, args.learning_starts  # updates run at the steps after updates_begin_at
    exploration_steps = int(args.exploration_fraction * args.total_timesteps)
    if checkpoint is None:
        obs = first_stack(preprocess(games.reset()))  # (games, 4, 84, 84)
    else:
        global_step, obs, updates_begin_at, exploration_steps = restore_checkpoint(
            checkpoint, args, q_network, target_network, optimizer, games, replay, action_rng, recent_returns, device)

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
    learner = None  # --overlap-updates: the learner thread, which then makes the updates
    if args.overlap_updates and device.type == "cpu":
        # torch's thread count holds for every thread of the process: each of the two gets half the cores' worth
        torch.set_num_threads(max(1, torch.get_num_threads() // 2))
        update = learner = OverlappedUpdates(
            lambda batch, targets: td_gradients(online, optimizer, batch[0], batch[1], targets, args.max_grad_norm),
            lambda batch: td_target(target, *batch[2:], args.gamma), optimizer)
        if checkpoint is not None and checkpoint["learner_batch"] is not None:  # the gradient in flight, again
            learner.start(checkpoint["learner_batch"])

    log = RunLog(args, checkpoint)
    del checkpoint  # restored: free its copy of the replay, as large as the replay, for the rest of the run
    stop_signal = []  # SIGINT/SIGTERM: finish the current step, write a checkpoint, exit cleanly
    previous_handlers = {sig: signal.signal(sig, lambda signum, _: stop_signal.append(signum))
                         for sig in (signal.SIGINT, signal.SIGTERM)}
    game_returns, final_returns, diverged = [], None, ""  # diverged: what went non-finite, and when
    log.start_clock()
    while global_step < args.total_timesteps:
        # act: epsilon-greedy, epsilon falling linearly over the first exploration_fraction of the run; this pass
        # steps every game once (env steps global_step + 1 .. global_step + num_envs)
        epsilon = linear_schedule(args.start_e, args.end_e, exploration_steps, global_step + 1)
        with torch.no_grad():
            actions = epsilon_greedy(act, obs, epsilon, games.n_actions, action_rng)
        # step the games (each repeats its action frame_skip times) and shrink their frames on the device
        outcomes = games.step(actions)
        frames = preprocess(games.step_frames)
        ended = [k for k, outcome in enumerate(outcomes) if outcome.terminated or outcome.truncated]
        for k, outcome in enumerate(outcomes):
            # store. The reward clipped to its sign (Nature): one scale of TD error across games. At truncation
            # the final frame is stored, so the bootstrap from it is correct; only `terminated` cuts it.
            replay.add(obs[k, -1], actions[k], float(np.sign(outcome.reward)), outcome.terminated, k in ended,
                       frames[k], game=k)
            if outcome.game_over:
                log.game_over(outcome.game_return, outcome.game_length, global_step + k + 1)
                recent_returns.append(outcome.game_return)
                game_returns.append(outcome.game_return)
        obs = torch.cat([obs[:, 1:], frames.unsqueeze(1)], dim=1)
        if ended:
            obs[ended] = first_stack(preprocess(games.reset_frames[ended]))

        # learn and sync, at each env step of this pass
        for step in range(global_step + 1, global_step + args.num_envs + 1):
            if step > updates_begin_at and step % args.train_frequency == 0:
                loss_and_q = update(*replay.sample(args.batch_size))  # OverlappedUpdates: None at its first call
                if step % LOG_EVERY < args.train_frequency and loss_and_q is not None:
                    diverged = log.update(step, *loss_and_q, epsilon)
                    if diverged:
                        break
            # sync the target network; the article's step counter was never incremented, so its target never moved
            if step % args.target_network_frequency == 0:
                target_network.load_state_dict(q_network.state_dict())
                if learner is not None:  # the gradient in flight needs the new target network's targets
                    learner.retarget()
        if diverged:
            break
        previous_step, global_step = global_step, global_step + args.num_envs

        # evaluate, report, checkpoint
        if passes_multiple_of(args.eval_every, previous_step, global_step) and global_step < args.total_timesteps:
            log.evaluate(evaluate, q_network, global_step)
        if passes_multiple_of(args.progress_every, previous_step, global_step):
            log.progress(global_step, epsilon, recent_returns, updates_begin_at)
        if passes_multiple_of(args.checkpoint_every, previous_step, global_step) or stop_signal:
            diverged = weights_not_finite(q_network, global_step)
            if diverged:
                break  # a NaN between two loss reads: the last good checkpoint stays
            log.checkpoint(make_checkpoint(args, global_step, log, q_network, target_network, optimizer, games, obs,
                                           replay, action_rng, recent_returns, updates_begin_at, exploration_steps,
                                           learner))
        if stop_signal:
            print(f"stopped by signal {stop_signal[0]} at step {global_step:,}; checkpoint written to "
                  f"{log.checkpoint_path} (continue with --resume {log.checkpoint_path})", flush=True)
            break
    for sig, handler in previous_handlers.items():
        signal.signal(sig, handler)

    if not (stop_signal or diverged):
        diverged = weights_not_finite(q_network, global_step)  # the last update's: never evaluated or saved
    if not (stop_signal or diverged):
        if args.save_model:  # first: a Ctrl-C in the final evaluation, minutes of play, keeps the trained weights
            log.save_model(q_network, games.n_actions)
        # past total_timesteps if num_envs does not divide it
        final_returns = log.evaluate(evaluate, q_network, global_step)
        print(f"final eval over {len(final_returns)} games: {final_returns.mean():.2f} ± "
              f"{final_returns.std():.2f} (wall {log.wall_seconds():.1f}s)", flush=True)
    games.close()
    if learner is not None:
        learner.close()
    torch.set_num_threads(threads_before)
    if args.flush_denormals:
        torch.set_flush_denormal(False)
    log.close(diverged)
    if diverged:
        kept = (f"the last good checkpoint, {log.checkpoint_path} (step {log.last_checkpoint_step:,}), is untouched"
                if log.last_checkpoint_step is not None else "no checkpoint was written")
        raise TrainingDiverged(f"training diverged: {diverged}; {kept}; try a smaller --learning-rate")
    return {"final_returns": final_returns, "game_returns": game_returns, "run_dir": log.run_dir,
            "replay": replay, "q_network": q_network, "global_step": global_step}


# ---- The flags' checks -------------------------------------------------------------------------------------
def check_args(args: Args) -> None:
    # learning_starts >= 1: the first update then finds at least one transition whose next frame is stored
    positive = ["total_timesteps", "buffer_size", "batch_size", "train_frequency", "target_network_frequency",
                "eval_episodes", "frame_skip", "learning_rate", "learning_starts", "num_envs"]
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
    if args.buffer_size < 2 * STACK * args.num_envs:  # each game's ring must hold two stacks
        raise ConfigError(f"--buffer-size must be at least {2 * STACK} frames per game "
                          f"({2 * STACK * args.num_envs} for {args.num_envs}), got {args.buffer_size}")
    if args.learning_starts < args.num_envs:  # the first pass stores each ring's newest slot only, none valid yet
        raise ConfigError(f"--learning-starts must be at least --num-envs ({args.num_envs}), got "
                          f"{args.learning_starts}")
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
    if args.capture_video:
        try:
            import PIL  # noqa: F401 (here, not at the first evaluation hours later)
        except ImportError:
            raise ConfigError("--capture-video writes GIFs with pillow, not installed: pip install pillow") from None
    # where the run's files go, tried now: a place they cannot go stops the run before the replay takes its memory
    place = os.path.dirname(os.path.abspath(args.resume)) if args.resume else os.path.abspath(args.runs_dir)
    try:
        if not os.path.exists(place):
            os.makedirs(place)
        tempfile.TemporaryFile(dir=place).close()
    except OSError as error:
        fix = "copy the run elsewhere to resume it" if args.resume else "pass a writable --runs-dir"
        raise ConfigError(f"cannot write in {place} ({error.strerror}); {fix}") from None


# ---- Checkpoints and resume (--checkpoint-every, --resume) -------------------------------------------------
# Flags a resumed run may take from its command line; every other one comes from the checkpoint.
RESUMABLE = {"total_timesteps", "eval_every", "eval_episodes", "capture_video", "progress_every",
             "checkpoint_every", "checkpoint_replay", "resume", "cuda", "cuda_graphs", "save_model",
             "replay_on_gpu", "track", "wandb_project_name", "wandb_entity"}
CHECKPOINT_FORMAT = "dqn_atari_parallel checkpoint 1"
OLDER_FORMATS = {  # formats this version refuses: why, and the commit whose dqn_atari.py reads them
    "dqn_atari checkpoint 1": "its emulator state is a pickle, which can run code when loaded; continue it, only if "
                              "you trust the file, with dqn_atari.py of commit bcf01fb",
    "dqn_atari checkpoint 2": "laid out for the several-game dqn_atari.py; continue it with dqn_atari.py of commit "
                              "3d1869b"}


def make_checkpoint(args: Args, global_step: int, log, q_network, target_network, optimizer, games: Games,
                    obs: torch.Tensor, replay: FrameReplay, action_rng, recent_returns: deque,
                    updates_begin_at: int, exploration_steps: int, learner) -> dict:
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
        "games": games.states(),
        "obs": obs.cpu(),
        "replay": replay.state() if args.checkpoint_replay else None,  # without it, a resume refills the replay
        # --overlap-updates: the batch of the gradient in flight, taken again on resuming with the replay
        "learner_batch": learner.batch if learner is not None and args.checkpoint_replay else None,
        "recent_returns": list(recent_returns),
        "action_rng": action_rng.bit_generator.state,  # every random draw of a run is its own generators'
    }


def restore_checkpoint(checkpoint: dict, args: Args, q_network, target_network, optimizer, games: Games,
                       replay: FrameReplay, action_rng, recent_returns: deque, device: torch.device):
    """Puts make_checkpoint's pieces back, each checked first against what this version writes in its place;
    returns (global_step, obs, updates_begin_at, exploration_steps)."""
    try:
        # the emulator's bytes vary in length from state to state: load_checkpoint has read them already
        states = games.states()
        for state, saved in zip(states, checkpoint["games"]):
            state["ale"] = saved["ale"]
        check_as_written(checkpoint["games"], states, "games")
        check_as_written(checkpoint["obs"], torch.zeros((args.num_envs, STACK, FRAME_SIZE, FRAME_SIZE),
                                                        dtype=torch.uint8), "obs")
        if checkpoint["replay"] is not None:
            check_as_written(checkpoint["replay"], replay.state(), "replay")
            for field, high in [("positions", replay.ring - 1), ("sizes", replay.ring),
                                ("episode_steps", math.inf), ("actions", games.n_actions - 1)]:
                check_in_range(f"replay.{field}", checkpoint["replay"][field], high)
        check_as_written(checkpoint["recent_returns"], [0.0] * len(checkpoint["recent_returns"]), "recent_returns")
        check_as_written(checkpoint["action_rng"], action_rng.bit_generator.state, "action_rng")
        check_in_range("global_step", checkpoint["global_step"], last_step(args))  # a run may checkpoint there
    except ConfigError as error:
        raise ConfigError(f"{args.resume}: {error}") from None
    try:
        q_network.load_state_dict(checkpoint["q_network"])
        target_network.load_state_dict(checkpoint["target_network"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:  # another network's or optimizer's shape
        raise ConfigError(f"{args.resume} does not fit this network or optimizer "
                          f"({str(error).splitlines()[0]})") from None
    games.load_states(checkpoint["games"])
    obs = checkpoint["obs"].to(device)
    updates_begin_at = checkpoint["updates_begin_at"]
    if checkpoint["replay"] is not None:
        replay.load_state(checkpoint["replay"])
    else:  # refill before learning again, rather than overfit a near-empty replay
        for k in range(args.num_envs):
            replay.start_mid_episode(obs[k], game=k)
        updates_begin_at = max(updates_begin_at, checkpoint["global_step"] + args.learning_starts)
        print(f"the checkpoint has no replay: collecting {args.learning_starts:,} steps before updates resume",
              flush=True)
    recent_returns.extend(checkpoint["recent_returns"])
    action_rng.bit_generator.state = checkpoint["action_rng"]
    return checkpoint["global_step"], obs, updates_begin_at, checkpoint["exploration_steps"]


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


def load_checkpoint(path: str) -> dict:
    """weights_only: torch.load rebuilds tensors and plain containers, and refuses any other object, so no code in
    the file can run; the emulator state is checked here too, before any game or network is made."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if checkpoint.get("format") in OLDER_FORMATS:
            raise ConfigError(f"an older checkpoint ({OLDER_FORMATS[checkpoint['format']]})")
        if str(checkpoint.get("format")).startswith("dqn_atari") and checkpoint["format"] != CHECKPOINT_FORMAT:
            raise ConfigError(f"its format is {checkpoint['format']!r}, another script's (this one reads "
                              f"{CHECKPOINT_FORMAT!r}): resume it with the script that wrote it")
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise ValueError("not a checkpoint")
        for field, kinds in CHECKPOINT_FIELDS.items():
            if not isinstance(checkpoint.get(field), kinds):
                raise ConfigError(f"its field {field!r} holds {checkpoint.get(field)!r:.40}, where this version "
                                  f"writes a value of the type {' or '.join(kind.__name__ for kind in kinds)}")
        for game in checkpoint["games"]:
            emulator_state(game["ale"])
        verified(checkpoint, path, "q_network")
    except FileNotFoundError:
        raise ConfigError(f"no checkpoint at {path}") from None
    except ConfigError as error:  # an older format, an emulator state that is not ale-py's bytes, a corrupt file
        raise ConfigError(f"{path}: {error}") from None
    except Exception as error:  # unpickling, truncation, another file's contents: all mean "not ours"
        raise ConfigError(f"{path} is not a readable dqn_atari_parallel.py checkpoint ({type(error).__name__}); give "
                          "a checkpoint.pt that dqn_atari_parallel.py wrote") from None
    return checkpoint


def read_resume(args: Args, argv: list[str]) -> tuple[Args, Optional[dict]]:
    """--resume: the checkpoint, and its flags with those of this command line in RESUMABLE; another flag given
    with another value is refused. Without --resume: the flags as given, and no checkpoint."""
    if not args.resume:
        return args, None
    checkpoint = load_checkpoint(args.resume)
    try:  # a flag newer than the checkpoint ran with its default
        saved = Args(**{**vars(Args()), **checkpoint["args"], "resume": args.resume})
    except TypeError as error:  # a flag this version does not have
        raise ConfigError(f"{args.resume} holds a flag this version lacks ({error}); continue it with the "
                          "dqn_atari_parallel.py that wrote it") from None
    for flag in fields(Args):
        if not takes(getattr(saved, flag.name), flag.type):
            raise ConfigError(f"{args.resume}: its flag --{flag.name.replace('_', '-')} holds "
                              f"{getattr(saved, flag.name)!r}, which this version's flag does not take")
    resumed = tyro.cli(Args, args=argv, default=saved)  # this command line over the checkpoint's flags
    for name, value in vars(resumed).items():
        if name not in RESUMABLE and value != getattr(saved, name):
            raise ConfigError(f"the checkpoint was trained with --{name.replace('_', '-')} {getattr(saved, name)}, "
                              f"not {value}; drop the flag to continue it as it was")
    # a checkpoint past the run's end is a typo, and resuming it would drop the eval rows and events after it
    if checkpoint["global_step"] > last_step(resumed):
        raise ConfigError(f"the checkpoint is at step {checkpoint['global_step']:,}, past --total-timesteps "
                          f"{resumed.total_timesteps:,}; give one of at least {checkpoint['global_step']:,}")
    print(f"resuming {os.path.dirname(os.path.abspath(args.resume))} at step {checkpoint['global_step']:,}",
          flush=True)
    return resumed, checkpoint


# what the fields that every checkpoint has must hold: a file edited by hand, or from another version, is refused
# naming the field rather than failing deep in a restore
CHECKPOINT_FIELDS = {"args": (dict,), "global_step": (int,), "wall_seconds": (float,), "last_eval": (float,),
                     "wandb_run_id": (str, type(None)), "updates_begin_at": (int,), "exploration_steps": (int,),
                     "q_network": (dict,), "target_network": (dict,), "optimizer": (dict,), "obs": (torch.Tensor,),
                     "replay": (dict, type(None)), "recent_returns": (list,), "action_rng": (dict,)}


def check_as_written(loaded, written, field: str) -> None:
    """Refuses, naming the field, a loaded piece whose keys, types or tensor shapes differ from what this version
    writes in its place (another version's file, or one edited by hand), before any of it is restored."""
    if isinstance(written, dict) and isinstance(loaded, dict):
        missing, unknown = written.keys() - loaded.keys(), loaded.keys() - written.keys()
        if missing or unknown:
            raise ConfigError(f"its field {field!r} " + (f"lacks {sorted(map(str, missing))}" if missing else
                                                         f"has {sorted(map(str, unknown))}, which this version lacks"))
        for key in written:
            check_as_written(loaded[key], written[key], f"{field}.{key}")
    elif isinstance(written, list) and isinstance(loaded, list):
        if len(loaded) != len(written):
            raise ConfigError(f"its field {field!r} holds {len(loaded)} entries, not {len(written)}")
        for index, (loaded_item, written_item) in enumerate(zip(loaded, written)):
            check_as_written(loaded_item, written_item, f"{field}.{index}")
    elif isinstance(written, torch.Tensor) and isinstance(loaded, torch.Tensor):
        if loaded.dtype != written.dtype:
            raise ConfigError(f"its field {field!r} holds {loaded.dtype} values, not {written.dtype}")
        if loaded.shape != written.shape:
            raise ConfigError(f"its field {field!r} has the shape {tuple(loaded.shape)}, not {tuple(written.shape)}")
    elif type(loaded) is not type(written) or (isinstance(written, str) and loaded != written):
        raise ConfigError(f"its field {field!r} holds {loaded!r:.40}, where this version writes a value of the type "
                          f"{type(written).__name__}{f' ({written!r})' if isinstance(written, str) else ''}")


def check_in_range(field: str, values, high) -> None:
    """Refuses, naming the field, a count or an index below 0 or above `high`: a file edited by hand (its checksum
    written anew) that would fail mid-run, or silently count wrong."""
    values = torch.as_tensor(values, dtype=torch.float64)
    if values.numel() and not (0 <= values.min() and values.max() <= high):
        raise ConfigError(f"its field {field!r} holds a value outside [0, {high}]")


def takes(value, annotation) -> bool:
    """Whether a flag of the type `annotation` (int, Optional[float], a Literal...) can hold `value`."""
    if get_origin(annotation) is Literal:
        return value in get_args(annotation)
    if get_origin(annotation) is Union:
        return any(takes(value, option) for option in get_args(annotation))
    return type(value) is annotation or (annotation is float and type(value) is int)


def emulator_state(saved) -> ale_py.ALEState:
    """An emulator state from the bytes AtariGame.state() keeps; anything else is refused."""
    if isinstance(saved, torch.Tensor) and saved.dtype == torch.uint8 and saved.dim() == 1:
        try:
            return ale_py.ALEState(saved.numpy().tobytes())
        except Exception:  # ale-py raises SystemError for bytes that are not one of its states
            pass
    raise ConfigError(f"the emulator state ({type(saved).__name__}) is not one ale-py can read")


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


def last_step(args: Args) -> int:
    """The env step a run ends at: the first multiple of num_envs at or past total_timesteps."""
    return -(-args.total_timesteps // args.num_envs) * args.num_envs


def passes_multiple_of(every: int, before: int, after: int) -> bool:
    """Whether a multiple of `every` lies in (before, after]: with several games a step of the loop moves
    the step count by more than one. every = 0: never."""
    return every > 0 and after // every > before // every


class RunLog:
    """A run's directory and what goes into it: tensorboard events (CleanRL's charts/ and losses/ names, and
    eval/), eval.csv, checkpoint.pt, --capture-video's GIFs and --track's W&B run. A resumed run writes on in its
    own directory, and its clock goes on from the wall time its checkpoint kept."""

    def __init__(self, args: Args, checkpoint: Optional[dict]):
        from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is slow to import

        self.args = args
        start = checkpoint or {"global_step": 0, "wall_seconds": 0.0, "last_eval": float("nan"), "wandb_run_id": None}
        self.run_dir = os.path.dirname(os.path.abspath(args.resume)) if checkpoint else make_run_dir(args)
        self.lock = os.open(self.run_dir, os.O_RDONLY)  # held until close() or this process ends, kill -9 too
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another process is training in {self.run_dir}: wait for it to end, or stop it, "
                              "before resuming") from None
        self.checkpoint_path = os.path.join(self.run_dir, "checkpoint.pt")
        self.last_checkpoint_step = checkpoint["global_step"] if checkpoint else None
        eval_path, rows = os.path.join(self.run_dir, "eval.csv"), [["step", "eval_mean", "eval_std", "episodes",
                                                                    "wall_seconds"]]
        # a resumed run drops the rows past its checkpoint, and the final evaluation's, which it plays again
        if checkpoint and os.path.exists(eval_path):
            with open(eval_path, newline="") as old:
                try:
                    rows += [row for row in list(csv.reader(old))[1:]
                             if row and int(row[0]) <= start["global_step"] and int(row[0]) < args.total_timesteps]
                except ValueError:
                    raise ConfigError(f"{eval_path} has a row that does not start with a step; mend or delete the "
                                      "row to resume") from None
        try:  # first of the run's files: a disk that is full (or went read-only since check_args) stops here
            with open(eval_path + ".tmp", "w", newline="") as new:
                csv.writer(new).writerows(rows)
            os.replace(eval_path + ".tmp", eval_path)
        except OSError as error:
            if os.path.exists(eval_path + ".tmp"):  # a disk that filled mid-write: free it, keep eval.csv as it was
                os.remove(eval_path + ".tmp")
            raise ConfigError(f"cannot write in the run directory {self.run_dir} ({error.strerror}); a run needs a "
                              "writable disk with space (to resume from a read-only one, copy it elsewhere)") from None
        self.eval_file = open(eval_path, "a", newline="")
        self.eval_csv = csv.writer(self.eval_file)
        self.tracking = start_tracking(args, self.run_dir, start["wandb_run_id"]) if args.track else None
        self.writer = SummaryWriter(self.run_dir, purge_step=start["global_step"] + 1 if checkpoint else None)
        if checkpoint is None:
            self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                                 "\n".join(f"|{key}|{value}|" for key, value in vars(args).items()))
        self.wall_before, self.start_step = start["wall_seconds"], start["global_step"]
        self.last_eval = start["last_eval"]

    def start_clock(self) -> None:
        self.start_time = time.time()
        self.last_progress = (self.start_time, self.start_step)  # (time, step): the ETA's rate is from the last line

    def wall_seconds(self) -> float:
        return self.wall_before + time.time() - self.start_time

    def steps_per_second(self, step: int, now: float) -> float:
        """This process's env steps per second, up to `step`."""
        return (step - self.start_step) / (now - self.start_time)

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
        os.close(self.lock)


def main() -> None:
    args = tyro.cli(Args)
    try:
        train(args, sys.argv[1:])
    except (ConfigError, TrainingDiverged, GameWorkerFailed, OSError) as error:  # OSError: a full or read-only disk
        sys.exit(f"dqn_atari_parallel.py: error: {error}")


if __name__ == "__main__":
    main()
