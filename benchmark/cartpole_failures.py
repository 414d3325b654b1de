"""How saved dqn.py CartPole-v1 policies end their greedy episodes, and whether their Q-values saw it coming.

    python dqn.py --seed 22 --save-model --runs-dir runs
    python benchmark/cartpole_failures.py runs/CartPole-v1__dqn__22__*/dqn.pt --out benchmark/results/cartpole-failures

For each model: the greedy policy plays `--episodes` episodes, each ending by the cart leaving the track
(|x| > 2.4), the pole falling (|angle| > 12 degrees) or the 500-step time limit. Then its Q-values against the
truth: the greedy Q at each episode's first state beside the ceiling no true value can pass (reward scale /
(1 - gamma): the return of never failing), and, in episodes that failed, the greedy Q `--lookahead` steps before
the end beside the discounted return that actually followed (exact there: the failure ends the sum).
"""

import argparse
import json
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from run import REPO, command_line, git_commit, output_folder, provenance

sys.path.insert(0, str(REPO))
import dqn  # noqa: E402

X_LIMIT, ANGLE_LIMIT = 2.4, 12 * 2 * np.pi / 360  # CartPole-v1's own termination bounds


def end_reason(final_obs: np.ndarray, terminated: bool) -> str:
    if not terminated:
        return "time limit"
    return "cart off the track" if abs(final_obs[0]) > X_LIMIT else "pole down"


@torch.no_grad()
def play(q_network: torch.nn.Module, episodes: int, seed: int) -> list:
    """Greedy episodes: for each, (why it ended, its length, the greedy Q of each state visited)."""
    env = gym.make("CartPole-v1")
    played = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        q_values, terminated, truncated = [], False, False
        while not (terminated or truncated):
            q = q_network(torch.as_tensor(obs, dtype=torch.float32))
            q_values.append(float(q.max()))
            obs, _, terminated, truncated, _ = env.step(int(q.argmax()))
        played.append((end_reason(obs, terminated), len(q_values), q_values))
    env.close()
    return played


def summarize(played: list, gamma: float, reward_scale: float, lookahead: int) -> dict:
    reasons = [reason for reason, _, _ in played]
    before_failure = [q[-lookahead] for reason, n, q in played if reason != "time limit" and n >= lookahead]
    return {
        "episodes": len(played), "mean_length": float(np.mean([n for _, n, _ in played])),
        "ends": {reason: reasons.count(reason) for reason in ("cart off the track", "pole down", "time limit")},
        "q_first_state": float(np.mean([q[0] for _, _, q in played])),
        "q_ceiling": reward_scale / (1 - gamma),
        f"q_{lookahead}_steps_before_failure": float(np.mean(before_failure)) if before_failure else None,
        f"return_{lookahead}_steps_before_failure": reward_scale * (1 - gamma ** lookahead) / (1 - gamma),
    }


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    defaults = dqn.Args()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="files written by dqn.py --save-model on CartPole-v1")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=10_000, help="episode i resets with seed + i")
    parser.add_argument("--gamma", type=float, default=defaults.gamma, help="the models' training gamma")
    parser.add_argument("--reward-scale", type=float, default=defaults.reward_scale,
                        help="the models' training reward scale")
    parser.add_argument("--lookahead", type=int, default=50, help="steps before a failure to read Q at")
    parser.add_argument("--out", help="folder for failures.json and summary.md")
    args = parser.parse_args(argv)
    if args.episodes < 1 or args.lookahead < 1 or not 0 <= args.gamma < 1 or args.reward_scale <= 0 or args.seed < 0:
        parser.error("--episodes and --lookahead must be at least 1, --gamma in [0, 1), --reward-scale positive "
                     "and --seed at least 0")
    out = output_folder(parser, args.out) if args.out else None
    rows = {}
    for path in args.models:
        try:
            q_network = dqn.load_model(path, obs_dim=4, n_actions=2, device=torch.device("cpu"))
        except dqn.ConfigError as error:
            parser.error(str(error))
        rows[path] = summarize(play(q_network, args.episodes, args.seed), args.gamma, args.reward_scale,
                               args.lookahead)
    k = args.lookahead
    lines = [f"| model | mean length | off the track / pole down / time limit | Q at start (ceiling) | "
             f"Q {k} steps before a failure (true) |", "|---|---|---|---|---|"]
    for path, row in rows.items():
        ends, q_before = row["ends"], row[f"q_{k}_steps_before_failure"]
        lines.append(f"| {path} | {row['mean_length']:.1f} | {ends['cart off the track']} / {ends['pole down']} / "
                     f"{ends['time limit']} | {row['q_first_state']:.3f} ({row['q_ceiling']:.3f}) | "
                     f"{'n/a' if q_before is None else f'{q_before:.3f}'} "
                     f"({row[f'return_{k}_steps_before_failure']:.3f}) |")
    table = "\n".join(lines)
    print(table)
    if out:
        command = command_line(__file__, argv)
        commit = git_commit([Path(__file__), REPO / "dqn.py"])
        (out / "failures.json").write_text(json.dumps({"command": command, "commit": commit, "models": rows},
                                                      indent=1) + "\n")
        (out / "summary.md").write_text(
            f"# How greedy CartPole-v1 episodes end ({args.episodes} per model)\n\n{table}\n\n"
            + provenance(command, commit))


if __name__ == "__main__":
    main()
