"""Fixed-seed CPU runs of dqn_atari.py, dqn_atari_parallel.py and dqn.py, hashed: a change meant to keep the
numerics (a refactor, a fix of a case these runs never meet) must leave every hash as recorded, so every
committed result still stands.

The hashes cover the final weights and every training game's return (the final evaluation is left out). Float
results differ from one CPU family (its vector instructions: AVX2 and AVX-512 kernels sum in other orders) or
torch build to another, so each machine kind has its own record; on a kind with none the test is skipped with
that reason. A change that alters the numerics on purpose records them anew, `python tests/test_fingerprints.py
--record` (this kind's record only), committed with the change and the reason; the kinds it could not be run on
then fail until recorded.
"""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dqn  # noqa: E402
import dqn_atari as atari  # noqa: E402
import dqn_atari_parallel as parallel  # noqa: E402

RECORDED = Path(__file__).with_name("fingerprints.json")

# 500 Breakout steps meet lost lives and game overs; Pong has no lives. name -> (script, its flags)
ATARI_RUNS = {
    "breakout": (atari, dict(env_id="BreakoutNoFrameskip-v4")),
    "breakout-4-games": (parallel, dict(env_id="BreakoutNoFrameskip-v4", num_envs=4)),
    "breakout-bf16-overlap": (parallel, dict(env_id="BreakoutNoFrameskip-v4", bf16=True, overlap_updates=True)),
    "breakout-bf16-overlap-channels-last": (parallel, dict(env_id="BreakoutNoFrameskip-v4", bf16=True,
                                                           overlap_updates=True, channels_last=True)),
    "pong": (atari, dict(env_id="PongNoFrameskip-v4")),
}


def machine_kind() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    return {"cpu": model, "vector instructions": torch.backends.cpu.get_cpu_capability(),
            "native bf16": atari.cpu_has_bf16_kernels(), "torch": torch.__version__}


def fingerprint(q_network: torch.nn.Module, game_returns: list) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(q_network.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps([float(value) for value in game_returns]).encode())
    return digest.hexdigest()


def skip_final_evaluation(evaluator, q_network, step, video=None):
    return np.zeros(1)  # an untrained agent's evaluation game is most of the run's time, and changes no weight


def run_atari(name: str, runs_dir: str) -> str:
    script, flags = ATARI_RUNS[name]
    evaluate = script.Evaluator.__call__
    script.Evaluator.__call__ = skip_final_evaluation
    try:
        args = script.Args(total_timesteps=500, learning_starts=100, buffer_size=1000, target_network_frequency=100,
                           eval_every=0, eval_episodes=1, progress_every=0, cuda=False, runs_dir=runs_dir, **flags)
        result = script.train(args)
    finally:
        script.Evaluator.__call__ = evaluate
    return fingerprint(result["q_network"], result["game_returns"])


def run_cartpole(runs_dir: str) -> str:
    args = dqn.Args(total_timesteps=3000, learning_starts=500, train_frequency=64, gradient_steps=8, buffer_size=2000,
                    hidden_sizes=(32,), eval_every=0, eval_episodes=1, progress_every=0, runs_dir=runs_dir,
                    cuda=False)
    result = dqn.train(args)
    return fingerprint(result["q_network"], result["episode_returns"])


def run(name: str, runs_dir: str) -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the thread count can change the order of float sums: one, on any machine
    try:
        return run_cartpole(runs_dir) if name == "cartpole" else run_atari(name, runs_dir)
    finally:
        torch.set_num_threads(threads)


ALL_RUNS = [*ATARI_RUNS, "cartpole"]


def records() -> list:
    return json.loads(RECORDED.read_text())


@pytest.mark.parametrize("name", ALL_RUNS)
def test_fixed_seed_runs_give_the_recorded_weights_bit_for_bit(name, tmp_path):
    record = next((record for record in records() if record["machine"] == machine_kind()), None)
    if record is None:
        pytest.skip(f"fingerprints were recorded on {[record['machine'] for record in records()]}, "
                    f"this is {machine_kind()}")
    assert run(name, str(tmp_path)) == record["runs"][name], f"{name}: the numerics changed"


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_fingerprints.py --record  (after a change that alters the numerics)")
    import tempfile
    with tempfile.TemporaryDirectory() as runs_dir:
        runs = {name: run(name, runs_dir) for name in ALL_RUNS}
    others = [record for record in records() if record["machine"] != machine_kind()]
    RECORDED.write_text(json.dumps(others + [{"machine": machine_kind(), "runs": runs}], indent=2) + "\n")
    print(f"wrote {RECORDED} for {machine_kind()}; the other kinds' records are kept as they were")
