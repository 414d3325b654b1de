"""Puts each bug of the article "Learnings from reproducing DQN for Atari games" back into a copy of the
repository, one at a time, runs the suite's fast tests there, and prints which tests caught it. Every bug must
be caught by at least one test; exit status 1 if not.

    python benchmark/reintroduce_seed_bugs.py            # about 30 minutes on two cores

A check of the suite, not a test (it runs the suite many times over); the list it prints is the evidence that
each bug named in the tests' docstrings really fails them.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHOICE = "np.random.choice sampling"
# Shared by both scripts' learners: (bug, line as it is, line with the bug)
LEARNER = [
    ("loss off by a factor of 2", "loss = F.smooth_l1_loss(q_taken, target)",
     "loss = 0.5 * F.smooth_l1_loss(q_taken, target)"),
    ("backprop through the target network", "with torch.no_grad():  # the target is a constant",
     "if True:  # the target is a constant"),
    ("`done` where `1 - done` belongs", "gamma * next_q * (1.0 - terminated)", "gamma * next_q * terminated"),
    ("target-sync counter never incremented", "if global_step % args.target_network_frequency == 0:",
     "if 0 % args.target_network_frequency == 0:"),
]
BUGS = {
    "dqn.py": LEARNER + [
        (CHOICE, "idx = self.rng.integers(0, self.size, size=batch_size)",
         "idx = np.random.choice(self.size, batch_size, replace=False)"),
        ("float64 replay", "self.observations = np.zeros((capacity, obs_dim), dtype=np.float32)",
         "self.observations = np.zeros((capacity, obs_dim), dtype=np.float64)"),
        ("batch built from a list of arrays", "return tuple(torch.from_numpy(array[idx]).to(self.device) for",
         "return tuple(torch.tensor([row for row in array[idx]]).to(self.device) for"),
        ("tensors left on the CPU", "return tuple(torch.from_numpy(array[idx]).to(self.device) for",
         "return tuple(torch.from_numpy(array[idx]) for"),
        ("a time limit stored as terminal", "reward * args.reward_scale, next_obs, terminated)",
         "reward * args.reward_scale, next_obs, terminated or truncated)"),
    ],
    "dqn_atari.py": LEARNER + [
        (CHOICE, "idx = self.rng.integers(0, self.size, size=batch_size)",
         "idx = np.random.choice(self.size, batch_size, replace=False)"),
        ("float64 replay", "torch.zeros((capacity, FRAME_SIZE, FRAME_SIZE), dtype=torch.uint8",
         "torch.zeros((capacity, FRAME_SIZE, FRAME_SIZE), dtype=torch.float64"),
        ("batch built from a list of arrays", "torch.index_select(self.frames, 0, flat_slots, out=",
         "stacks = torch.tensor(np.array([self.frames[int(s)].numpy() for s in flat_slots])).view(stacks.shape); ("),
        ("tensors left on the CPU", "stacks = stacks.to(self.device, non_blocking=True)", "stacks = stacks"),
        ("preprocessing on the CPU", "frames = torch.from_numpy(raw).to(self.device).amax(",
         "frames = torch.from_numpy(raw).amax("),
        ("whole games instead of life-loss episodes", "terminated = game_over or (life_lost and self.end_on_life_loss)",
         "terminated = game_over"),
        ("Breakout idling without FIRE", "self.fire_action = 1 if len(meanings)", "self.fire_action = None if len(meanings)"),
        ("a time limit stored as terminal", "float(np.sign(reward)), terminated, terminated or truncated",
         "float(np.sign(reward)), terminated or truncated, terminated or truncated"),
        ("rewards not clipped", "float(np.sign(reward)), terminated, terminated or truncated",
         "float(reward), terminated, terminated or truncated"),
        ("stacks across an episode start", "np.minimum(np.arange(STACK - 1, -1, -1)[None, :], self.history[idx][:, None]"
         ".astype(np.int64))", "np.arange(STACK - 1, -1, -1)[None, :].repeat(len(idx), 0)"),
    ],
}
# The suite's check that each line above is in its script would fail on every patched copy: left out here
NOT_THE_LINE_CHECK = "not reintroduce_seed_bugs"
TESTS = {"dqn.py": ["tests/test_dqn.py", "tests/test_learner.py", "tests/test_parity_sb3.py", "-k",
                    f"not atari and not learns_quickly and {NOT_THE_LINE_CHECK}"],
         "dqn_atari.py": ["tests/test_dqn_atari.py", "tests/test_learner.py", "tests/test_parity_sb3.py", "-k",
                          f"atari and {NOT_THE_LINE_CHECK}"]}


def stale_patches() -> list:
    """The patches that no longer apply: a line not in its script exactly once (reworded since), or a "bug"
    that leaves the line as it is. The suite checks this list is empty; main() refuses to start otherwise."""
    stale = []
    for script, bugs in BUGS.items():
        source = (REPO / script).read_text()
        stale += [f"{script}, {bug}: {line!r}" for bug, line, buggy in bugs
                  if source.count(line) != 1 or buggy == line]
    return stale


def main() -> None:
    stale = stale_patches()
    if stale:
        sys.exit(f"reintroduce_seed_bugs.py: these patches no longer apply, update BUGS: {'; '.join(stale)}")
    missed = []
    with tempfile.TemporaryDirectory(prefix="seed-bugs-") as work:
        for script, bugs in BUGS.items():
            original = (REPO / script).read_text()
            for bug, line, buggy in bugs:
                copy = Path(work) / "repo"
                shutil.rmtree(copy, ignore_errors=True)
                shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", "runs", "results", ".*venv*"))
                (copy / script).write_text(original.replace(line, buggy))
                finished = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                           *TESTS[script]], cwd=copy, capture_output=True, text=True,
                                          env=dict(os.environ, OMP_NUM_THREADS="1"))
                caught = [line.split()[1].split("::")[-1] for line in finished.stdout.splitlines()
                          if line.startswith(("FAILED", "ERROR"))]
                print(f"{script}: {bug} -> {', '.join(caught) if caught else 'MISSED'}", flush=True)
                if not caught:
                    missed.append(f"{script}: {bug}")
    if missed:
        sys.exit(f"not caught by any test: {'; '.join(missed)}")


if __name__ == "__main__":
    main()
