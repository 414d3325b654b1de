"""A GIF of a trained dqn_atari.py agent playing one whole game, from the weights --save-model wrote.

    python benchmark/agent_gif.py runs/<run>/dqn_atari.pt --out agent.gif --seed 1

The game is played as an evaluation game is (dqn_atari.py's Evaluator: full game, up to 30 no-ops, epsilon
0.05 by default); the GIF shows every --every-th agent step at half the screen's size, so that a whole game of
a few thousand steps stays a few hundred KB. Prints the game's score and the GIF's size.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dqn_atari  # noqa: E402


def load_weights(path: Path):
    """(env id, network) from a --save-model file; dqn_atari.ConfigError for anything else."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)  # no code in the file can run
        dqn_atari.verified(saved, str(path), "state_dict")
        q_network = dqn_atari.QNetwork(saved["n_actions"])
        q_network.load_state_dict(saved["state_dict"])
        return saved["env_id"], q_network
    except FileNotFoundError:
        raise dqn_atari.ConfigError(f"no saved model at {path}") from None
    except dqn_atari.ConfigError as error:  # a corrupt file, or weights that are not finite
        raise dqn_atari.ConfigError(f"{path}: {error}") from None
    except Exception as error:  # unpickling, a missing key, other shapes: all mean "not a saved model"
        raise dqn_atari.ConfigError(f"{path} is not a model dqn_atari.py --save-model wrote "
                                    f"({type(error).__name__})") from None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="the .pt file dqn_atari.py --save-model wrote")
    parser.add_argument("--out", type=Path, required=True, help="the GIF to write")
    parser.add_argument("--seed", type=int, default=1, help="seeds the game")
    parser.add_argument("--epsilon", type=float, default=0.05, help="the evaluation epsilon")
    parser.add_argument("--every", type=int, default=2, help="keep every N-th agent step in the GIF")
    args = parser.parse_args(argv)
    if args.every < 1 or not 0.0 <= args.epsilon <= 1.0 or not 0 <= args.seed < 2**32:
        parser.error(f"give --every of at least 1 (got {args.every}), --epsilon in [0, 1] (got {args.epsilon:g}) "
                     f"and a --seed from 0 to {2**32 - 1} (got {args.seed})")
    try:
        env_id, q_network = load_weights(args.model)
    except dqn_atari.ConfigError as error:
        parser.error(str(error))
    run_args = dqn_atari.Args(env_id=env_id, eval_episodes=1, eval_epsilon=args.epsilon)
    probe = dqn_atari.AtariGame(env_id, 0)
    evaluate = dqn_atari.Evaluator(run_args, dqn_atari.FramePreprocessor(probe.raw.shape[1:], torch.device("cpu")),
                                   args.seed)
    frames = []
    score = evaluate(q_network, step=1, video=frames)[0]
    from PIL import Image  # matplotlib, in requirements-dev.txt, brings pillow

    images = [Image.fromarray(np.ascontiguousarray(frame[::2, ::2])) for frame in frames[::args.every]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(args.out, save_all=True, append_images=images[1:], duration=1000 * args.every // 15, loop=0,
                   optimize=True)
    print(f"{env_id}: score {score:g} in {len(frames)} steps; {args.out} ({args.out.stat().st_size / 1e3:.0f} KB, "
          f"{len(images)} frames)")


if __name__ == "__main__":
    main()
