"""Evaluates a dqn_atari.py (or dqn_atari_parallel.py) checkpoint's online network at several evaluation epsilons,
on the same games.

    python benchmark/eval_checkpoint.py runs/<run>/checkpoint.pt --epsilons 0.05 0.01 0 --games 10

Shows how much of an eval score is the policy and how much the evaluation's random actions: each epsilon
plays the same `--games` games (dqn_atari.py's Evaluator, seeded from --seed), whole games as in training's
evaluations.
"""

import argparse
import signal
import sys
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while torch loads or while the games play: one line, not a traceback
    signal.signal(signal.SIGINT, lambda *_: sys.exit("eval_checkpoint.py: interrupted"))

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dqn_atari  # noqa: E402
import dqn_atari_parallel  # noqa: E402

CONFIG_ERRORS = (dqn_atari.ConfigError, dqn_atari_parallel.ConfigError)


def written_by_the_parallel_variant(path: Path) -> bool:
    """Whether the file is in dqn_atari_parallel.py's layout; read with mmap, so only its format field is read."""
    try:
        return (torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("format")
                == dqn_atari_parallel.CHECKPOINT_FORMAT)
    except Exception:  # dqn_atari.load_checkpoint then says what is wrong with the file
        return False


def load_agent(path: Path, games: int):
    """A checkpoint, its run's Args (evaluating `games` games), a CPU frame preprocessor and the online network.
    Raises one of CONFIG_ERRORS for a file that neither Atari script wrote."""
    script = dqn_atari_parallel if written_by_the_parallel_variant(path) else dqn_atari
    checkpoint = script.load_checkpoint(str(path))
    defaults = vars(dqn_atari.Args())  # the variant's own flags (--num-envs...) play no part in an evaluation
    flags = {name: value for name, value in checkpoint["args"].items() if name in defaults}
    run_args = dqn_atari.Args(**{**defaults, **flags, "eval_episodes": games})
    game = dqn_atari.AtariGame(run_args.env_id, 0, run_args.frame_skip, run_args.noop_max,
                               repeat_action_probability=run_args.repeat_action_probability)
    preprocess = dqn_atari.FramePreprocessor(game.raw.shape[1:], torch.device("cpu"))
    q_network = dqn_atari.QNetwork(game.n_actions)
    q_network.load_state_dict(checkpoint["q_network"])
    return checkpoint, run_args, preprocess, q_network


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.05, 0.01, 0.0])
    parser.add_argument("--games", type=int, default=10)
    parser.add_argument("--seed", type=int, default=777, help="seeds the games (the same for every epsilon)")
    args = parser.parse_args(argv)
    if args.games < 1 or not 0 <= args.seed < 2**32 or not all(0.0 <= e <= 1.0 for e in args.epsilons):
        parser.error(f"give --games of at least 1 (got {args.games}), a --seed from 0 to {2**32 - 1} (got "
                     f"{args.seed}) and --epsilons in [0, 1] (got {' '.join(f'{e:g}' for e in args.epsilons)})")
    try:
        checkpoint, run_args, preprocess, q_network = load_agent(args.checkpoint, args.games)
    except CONFIG_ERRORS as error:
        parser.error(str(error))
    print(f"{args.checkpoint}: {run_args.env_id}, step {checkpoint['global_step']:,}, {args.games} games per epsilon")
    for epsilon in args.epsilons:
        run_args.eval_epsilon = epsilon
        returns = dqn_atari.Evaluator(run_args, preprocess, args.seed)(q_network, step=1)
        print(f"epsilon {epsilon:g}: mean {returns.mean():.2f} ± {returns.std():.2f} | "
              + " ".join(f"{r:g}" for r in returns), flush=True)


if __name__ == "__main__":
    main()
