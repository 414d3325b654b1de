"""Do `--bf16`, `--channels-last` and `--flush-denormals` learn as float32 does, from the same point? From a
dqn_atari.py (or dqn_atari_parallel.py) checkpoint saved with its replay, trains on for `--updates` updates five
ways for each seed, all starting from the checkpoint's networks and optimizer:

- float32;
- bf16, on the same batches;
- bf16 with the weights in channels-last order (dqn_atari_parallel.py --bf16 --channels-last), on the same batches;
- bf16 with values below 1.2e-38 flushed to zero (dqn_atari_parallel.py --bf16 --flush-denormals), on the same
  batches;
- float32 on other batches. This is the noise floor: how far two float32 runs drift apart on their own.

Each network is then compared with that seed's float32 one. The report gives the share of `--states` replay
states where both choose the same greedy action, the mean TD loss over the last quarter of the updates, and the
eval return on the same `--games` games (epsilon 0.05, as every evaluation).

    python benchmark/bf16_check.py runs/<run>/checkpoint.pt --updates 2000 --seeds 3 --out DIR

If either changed learning, its networks would drift from float32's further than the noise floor does. This
is not a learning curve from scratch. It checks the update itself, over thousands of steps, on a real agent's data.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from eval_checkpoint import CONFIG_ERRORS, load_agent
from run import REPO, command_line, git_commit, output_folder, provenance

sys.path.insert(0, str(REPO))
import dqn_atari  # noqa: E402
import dqn_atari_parallel  # noqa: E402

VARIANTS = {  # name: (bf16, channels_last, flush_denormals, batch stream offset)
    "float32": (False, False, False, 0),
    "bf16, same batches": (True, False, False, 0),
    "bf16 channels_last, same batches": (True, True, False, 0),
    "bf16 flushing denormals, same batches": (True, False, True, 0),
    "float32, other batches": (False, False, False, 1000),
}


def train_on(checkpoint: dict, run_args, replay, n_actions: int, bf16: bool, channels_last: bool,
             flush_denormals: bool, batch_seed: int, updates: int):
    """The checkpoint's networks and optimizer, trained on for `updates` updates; returns (network, losses)."""
    online, target = dqn_atari.QNetwork(n_actions), dqn_atari.QNetwork(n_actions)
    online.load_state_dict(checkpoint["q_network"])
    target.load_state_dict(checkpoint["target_network"])
    target.requires_grad_(False)
    if channels_last:  # as dqn_atari_parallel.py --channels-last, before its optimizer is made
        for network in (online, target):
            network.to(memory_format=torch.channels_last)
    optimizer = dqn_atari.make_optimizer(run_args, online)
    optimizer.load_state_dict(checkpoint["optimizer"])
    replay.rng = np.random.default_rng(batch_seed)  # the batches: the same stream for the same seed
    sync_every = max(1, run_args.target_network_frequency // run_args.train_frequency)  # in updates
    forward = [dqn_atari.bf16_forward(network) if bf16 else network for network in (online, target)]
    losses = []
    torch.set_flush_denormal(flush_denormals)
    try:
        for update in range(1, updates + 1):
            loss, _ = dqn_atari.td_update(*forward, optimizer, replay.sample(run_args.batch_size), run_args.gamma,
                                          run_args.max_grad_norm)
            losses.append(loss.item())
            if update % sync_every == 0:
                target.load_state_dict(online.state_dict())
    finally:
        torch.set_flush_denormal(False)
    return online, losses


def checkpoint_replay(checkpoint: dict, buffer_size: int):
    """The checkpoint's replay on the CPU, in the layout of the script that wrote it (the parallel variant keeps a
    ring per training game)."""
    if checkpoint["format"] == dqn_atari_parallel.CHECKPOINT_FORMAT:
        games = checkpoint["args"]["num_envs"]
        replay = dqn_atari_parallel.FrameReplay(buffer_size, torch.device("cpu"), 0, games=games)
    else:
        replay = dqn_atari.FrameReplay(buffer_size, torch.device("cpu"), 0)
    replay.load_state(checkpoint["replay"])
    return replay


@torch.no_grad()
def greedy_actions(network, states: torch.Tensor) -> torch.Tensor:
    return torch.cat([network(chunk).argmax(dim=1) for chunk in states.split(256)])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path,
                        help="a dqn_atari.py or dqn_atari_parallel.py checkpoint written with its replay")
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--states", type=int, default=2000, help="replay states on which greedy actions are compared")
    parser.add_argument("--games", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if min(args.updates, args.seeds, args.states, args.games, args.threads) < 1:
        parser.error("--updates, --seeds, --states, --games and --threads must be at least 1")
    try:
        checkpoint, run_args, preprocess, q_network = load_agent(args.checkpoint, args.games)
    except CONFIG_ERRORS as error:
        parser.error(str(error))
    if checkpoint.get("replay") is None:
        parser.error(f"{args.checkpoint} holds no replay: write it with --checkpoint-replay")
    out = output_folder(parser, args.out)
    torch.set_num_threads(args.threads)
    n_actions = q_network.network[-1].out_features
    replay = checkpoint_replay(checkpoint, run_args.buffer_size)
    replay.rng = np.random.default_rng(12345)
    states = replay.sample(args.states)[0]

    rows = []
    for seed in range(1, args.seeds + 1):
        networks = {}
        for name, (bf16, channels_last, flush_denormals, offset) in VARIANTS.items():
            networks[name], losses = train_on(checkpoint, run_args, replay, n_actions, bf16, channels_last,
                                              flush_denormals, seed + offset, args.updates)
            rows.append({"seed": seed, "variant": name, "td_loss_last_quarter": float(np.mean(losses[-len(losses) // 4:]))})
        reference = greedy_actions(networks["float32"], states)
        for row in rows[-len(VARIANTS):]:
            network = networks[row["variant"]]
            row["greedy_agreement_with_float32"] = float((greedy_actions(network, states) == reference).float().mean())
            row["eval_returns"] = dqn_atari.Evaluator(run_args, preprocess, 777)(network, step=1).tolist()
            print(f"seed {seed} {row['variant']}: TD loss {row['td_loss_last_quarter']:.4f}, agreement "
                  f"{row['greedy_agreement_with_float32']:.3f}, eval {np.mean(row['eval_returns']):.2f}", flush=True)

    lines = ["| variant | greedy agreement with float32 (mean over seeds) | TD loss, last quarter | eval mean | "
             "eval per seed |", "|---|---|---|---|---|"]
    for name in VARIANTS:
        mine = [row for row in rows if row["variant"] == name]
        evals = [float(np.mean(row["eval_returns"])) for row in mine]
        lines.append(f"| {name} | {statistics.mean(r['greedy_agreement_with_float32'] for r in mine):.3f} | "
                     f"{statistics.mean(r['td_loss_last_quarter'] for r in mine):.4f} | {statistics.mean(evals):.2f} | "
                     + ", ".join(f"{e:.1f}" for e in evals) + " |")
    table = "\n".join(lines)
    print(table)
    command = command_line(__file__, argv)
    commit = git_commit([Path(__file__), REPO / "dqn_atari.py", REPO / "dqn_atari_parallel.py"])
    (out / "bf16_check.json").write_text(json.dumps({"command": command, "commit": commit, "rows": rows}, indent=1))
    (out / "summary.md").write_text(
        f"# --bf16, --channels-last and --flush-denormals against float32 from {run_args.env_id} at step "
        f"{checkpoint['global_step']:,}: "
        f"{args.updates} updates, {args.seeds} seeds\n\n{table}\n\n"
        + provenance(command, commit, f"; torch {torch.__version__}, {args.threads} thread(s)")
        + f"- greedy actions compared on {args.states} replay states; eval: {args.games} games at epsilon "
        f"{run_args.eval_epsilon}, the same games for every network\n")


if __name__ == "__main__":
    main()
