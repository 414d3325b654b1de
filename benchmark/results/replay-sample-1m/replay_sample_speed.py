"""Time dqn_atari.py's FrameReplay.sample(32) on a full replay of 100k frames against a full one of 1M frames,
interleaved in blocks, on the CPU. Frames are random bytes; episodes end every 200 steps, as Breakout's lives do
early on."""
import sys
import time

import numpy as np
import torch

sys.path.insert(0, ".")  # run from the repository root
import dqn_atari  # noqa: E402

torch.set_num_threads(1)
CPU = torch.device("cpu")
replays = {}
for capacity in (100_000, 1_000_000):
    replay = dqn_atari.FrameReplay(capacity, CPU, 0)
    frames = torch.randint(0, 256, (256, 84, 84), dtype=torch.uint8)
    start = time.perf_counter()
    for step in range(capacity + 10):
        end = step % 200 == 199
        replay.add(frames[step % 256], step % 4, 0.0, end, end, frames[(step + 1) % 256])
    print(f"filled {capacity:,} slots in {time.perf_counter() - start:.1f} s (size {replay.size:,})", flush=True)
    replays[capacity] = replay
BLOCK, ROUNDS = 2000, 10
times = {capacity: [] for capacity in replays}
for round_ in range(ROUNDS):
    for capacity, replay in replays.items():
        start = time.perf_counter()
        for _ in range(BLOCK):
            replay.sample(32)
        times[capacity].append((time.perf_counter() - start) / BLOCK * 1e6)
    print(f"round {round_ + 1}: " + ", ".join(f"{c:,}: {times[c][-1]:.1f} us" for c in replays), flush=True)
for capacity in replays:
    print(f"replay {capacity:,} frames: median {np.median(times[capacity]):.1f} us per sample(32) "
          f"(rounds {' '.join(f'{t:.1f}' for t in times[capacity])})")
print(f"ratio 1M / 100k: {np.median(times[1_000_000]) / np.median(times[100_000]):.3f}")
