"""Milliseconds per learner update of dqn_atari.py (Nature network, batch 32): float32 against the speed
options, interleaved round by round with a fixed torch thread count, medians and ratios reported.

    python benchmark/update_speed.py --threads 1 --rounds 10 --out benchmark/results/update-speed-cpu
    python benchmark/update_speed.py --threads 2 --layers --out DIR   # + each layer's share, float32 and bf16

One update is what the training loop does every `--train-frequency` steps: the target network's forward
under no_grad, the online forward and backward, the optimizer's step (dqn_atari.td_update on a random uint8
batch). Each variant starts from the same weights; warm-up updates are not timed. --layers also times each
layer's part of an update alone, interleaved with the rest, and the rate of arithmetic it reaches.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from run import REPO, command_line, git_commit, machine_description, output_folder

sys.path.insert(0, str(REPO))
import dqn_atari  # noqa: E402

VARIANTS = {  # name: (bf16, channels_last, torch.compile)
    "float32": (False, False, False),
    "bf16": (True, False, False),
    "float32 channels_last": (False, True, False),
    "bf16 channels_last": (True, True, False),
}
COMPILED_VARIANTS = {  # --compile: each network's forward (and so its backward) compiled by inductor
    "float32 compiled": (False, False, True),
    "bf16 compiled": (True, False, True),
}


LAYERS = {  # --layers: name -> (index in QNetwork.network, its input's shape for one observation)
    "conv1 8x8 stride 4": (0, (dqn_atari.STACK, 84, 84)),
    "conv2 4x4 stride 2": (2, (32, 20, 20)),
    "conv3 3x3": (4, (64, 9, 9)),
    "linear 3136-512": (7, (3136,)),
}


def make_layer_pass(index: int, input_shape: tuple, bf16: bool, device: torch.device, batch_size: int = 32):
    """A closure doing one layer's part of an update: a forward under no_grad (the target network's), a forward
    and its backward (the online network's; the first layer's input, the frames, needs no gradient). Under
    bf16 a later layer's input is already bf16, as the layer before hands it on. Returns (closure, GFLOP)."""
    torch.manual_seed(0)
    layer = dqn_atari.QNetwork(6).network[index].to(device)
    dtype = torch.bfloat16 if bf16 and index > 0 else torch.float32
    inputs, target_inputs = torch.rand(2, batch_size, *input_shape, device=device).to(dtype)
    inputs.requires_grad_(index > 0)
    with torch.no_grad():
        outputs = layer(target_inputs.float()).numel()
    passes = 4 if index > 0 else 3  # two forwards, the weights' gradient, and the input's where it is needed
    gflop = passes * 2 * outputs * layer.weight[0].numel() / 1e9

    def layer_pass():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            with torch.no_grad():
                layer(target_inputs)
            out = layer(inputs)
        out.float().sum().backward()
        layer.zero_grad(set_to_none=True)
        inputs.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
    return layer_pass, gflop


def layer_table(medians: dict, gflops: dict) -> str:
    """Each layer's ms in float32 and bf16 and bf16's GFLOP/s; their sums against the whole updates'."""
    lines = ["| layer | float32 ms | bf16 ms | GFLOP | bf16 GFLOP/s |", "|---|---|---|---|---|"]
    for name, gflop in gflops.items():
        fp32, bf16 = medians[f"{name}, float32"], medians[f"{name}, bf16"]
        lines.append(f"| {name} | {fp32:.2f} | {bf16:.2f} | {gflop:.3f} | {gflop / bf16 * 1000:.0f} |")
    sums = [sum(medians[f"{name}, {kind}"] for name in gflops) for kind in ("float32", "bf16")]
    lines.append(f"| all four | {sums[0]:.2f} | {sums[1]:.2f} | {sum(gflops.values()):.3f} | "
                 f"{sum(gflops.values()) / sums[1] * 1000:.0f} |")
    lines.append(f"| whole update (above) | {medians['float32']:.2f} | {medians['bf16']:.2f} | | |")
    return "\n".join(lines)


def make_update(bf16: bool, channels_last: bool, compiled: bool, device: torch.device, n_actions: int = 6,
                batch_size: int = 32):
    """A closure doing one td_update, with its own networks, optimizer and batch."""
    torch.manual_seed(0)
    online, target = dqn_atari.QNetwork(n_actions).to(device), dqn_atari.QNetwork(n_actions).to(device)
    target.load_state_dict(online.state_dict())
    target.requires_grad_(False)
    obs, next_obs = torch.randint(0, 256, (2, batch_size, dqn_atari.STACK, 84, 84), dtype=torch.uint8, device=device)
    if channels_last:  # the batch stays as the replay gives it (NCHW): the convolutions reorder it, and that is timed
        online, target = online.to(memory_format=torch.channels_last), target.to(memory_format=torch.channels_last)
    forward = [dqn_atari.bf16_forward(network) if bf16 else network for network in (online, target)]
    if compiled:
        forward = [torch.compile(network) for network in forward]
    optimizer = dqn_atari.make_optimizer(dqn_atari.Args(), online)  # the script's: fused Adam, lr 1e-4
    batch = (obs, torch.randint(0, n_actions, (batch_size,), device=device), torch.randn(batch_size, device=device),
             next_obs, torch.zeros(batch_size, device=device))

    def update():
        dqn_atari.td_update(*forward, optimizer, batch, 0.99, 0.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return update


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (pinned to that many cores)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds; each times every variant once")
    parser.add_argument("--updates", type=int, default=10, help="updates per variant per round")
    parser.add_argument("--cuda", action="store_true", help="time on the GPU instead of the CPU")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd networks (float32, bf16)")
    parser.add_argument("--layers", action="store_true", help="also time each layer's part of an update alone")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if min(args.threads, args.rounds, args.updates) < 1:
        parser.error("--threads, --rounds and --updates must be at least 1")
    if args.cuda and not torch.cuda.is_available():
        parser.error("--cuda: no CUDA device here")
    out = output_folder(parser, args.out)
    torch.set_num_threads(args.threads)
    dqn_atari.keep_freed_memory()  # as dqn_atari.py's train() does: updates that do not page-fault
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.threads]))
    device = torch.device("cuda" if args.cuda else "cpu")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")  # others' work sharing the machine
    variants = {**VARIANTS, **(COMPILED_VARIANTS if args.compile else {})}
    updates = {name: make_update(*options, device) for name, options in variants.items()}
    gflops = {}
    if args.layers:
        for name, (index, input_shape) in LAYERS.items():
            for kind, bf16 in (("float32", False), ("bf16", True)):
                updates[f"{name}, {kind}"], gflops[name] = make_layer_pass(index, input_shape, bf16, device)
    for update in updates.values():
        for _ in range(3):
            update()
    times = {name: [] for name in updates}
    for round_index in range(args.rounds):
        for name, update in updates.items():
            started = time.perf_counter()
            for _ in range(args.updates):
                update()
            times[name].append(1000 * (time.perf_counter() - started) / args.updates)
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(f"{n} {t[-1]:.1f} ms" for n, t in times.items()),
              flush=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    lines = ["| variant | median ms per update | speed-up over float32 |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.1f} | {medians['float32'] / ms:.2f}x |" for name, ms in medians.items()
              if name in variants]
    table = "\n".join(lines) + (f"\n\nEach layer's part of an update, alone:\n\n{layer_table(medians, gflops)}"
                                if gflops else "")
    print(table)
    command = command_line(__file__, argv)
    code = [Path(__file__), REPO / "dqn_atari.py"]
    device_name = torch.cuda.get_device_name() if args.cuda else machine_description()
    (out / "update_speed.json").write_text(json.dumps(
        {"command": command, "commit": git_commit(code), "device": device_name, "threads": args.threads,
         "torch": torch.__version__, "load_average": load, "medians_ms": medians, "rounds_ms": times}, indent=1) + "\n")
    (out / "summary.md").write_text(
        f"# dqn_atari.py: one learner update (batch 32), {args.rounds} interleaved rounds of {args.updates}\n\n"
        f"{table}\n\n- command (from the repository root): `{command}`\n- commit: {git_commit(code)}\n"
        f"- device: {device_name}; torch {torch.__version__}, {args.threads} thread(s)\n"
        f"- load average at the start: {load:.2f} on {os.cpu_count()} cores (above the threads used: other "
        "processes shared the machine, which slows every variant; the interleaving keeps the ratios fair)\n")


if __name__ == "__main__":
    main()
