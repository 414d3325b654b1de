# The policy that always presses UP, scored by dqn_atari.py's own evaluation (10 games at epsilon 0.05, seeded
# from (seed + 10,000, step) as training's evaluations are, so its random draws are those of seed SEED's). From the
# repository root: PYTHONPATH=. python benchmark/results/freeway-cpu-1.25m/always_up.py SEED > DIR/always-up-seedSEED.csv
import csv
import sys

import torch

import dqn_atari

args = dqn_atari.Args(env_id="FreewayNoFrameskip-v4", eval_episodes=10, seed=int(sys.argv[1]))
evaluate = dqn_atari.Evaluator(args, dqn_atari.FramePreprocessor((210, 160), torch.device("cpu")), args.seed + 10_000)
meanings = evaluate.games[0].env.unwrapped.get_action_meanings()


def always_up(obs: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.full((len(obs),), meanings.index("UP")), len(meanings)).float()


writer = csv.writer(sys.stdout)
writer.writerow(["step", "eval_mean", "eval_std"])
for step in [*range(100_000, 1_200_001, 100_000), 1_250_000]:
    returns = evaluate(always_up, step)
    writer.writerow([step, f"{returns.mean():.4f}", f"{returns.std():.4f}"])
