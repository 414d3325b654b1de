"""Speed, side by side: dqn_atari.py against Stable-Baselines3's DQN (and CleanRL's dqn_atari.py, given a
checkout), with identical hyperparameters, run interleaved and repeated, each with the same threads on the
same cores. Reports the median learning-phase SPS of each, the ratio, peak RSS and replay bytes.

    python benchmark/speed.py --setup                   # once: SB3 into its own environment, benchmark/.sb3-venv
    python benchmark/speed.py --setup-cleanrl           # once, for --cleanrl: benchmark/.cleanrl-venv
    python benchmark/speed.py --repeats 5 --out benchmark/results/speed-cpu [--cleanrl PATH] [-- dqn_atari.py flags]
    python benchmark/speed.py --script dqn_atari_parallel.py ... -- --bf16 --overlap-updates   # the variant

Learning-phase SPS: env steps per second from the first step after learning starts to the last, read from
each run's own clock (tensorboard event times of charts/SPS for dqn_atari.py and CleanRL, a callback for SB3).
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import REPO, command_line, git_commit, output_folder, provenance

SB3_VENV = REPO / "benchmark" / ".sb3-venv"
CLEANRL_VENV = REPO / "benchmark" / ".cleanrl-venv"
# What each reference environment needs; torch pinned as ours everywhere, so all run the same kernels.
SB3_REQUIREMENTS = ["torch==2.13.0", "stable-baselines3==2.9.2", "gymnasium>=1.0,<2", "ale-py>=0.9,<1",
                    "opencv-python-headless", "tensorboard", "tyro"]
# CleanRL's dqn_atari.py uses gymnasium 0.29's wrapper names (GrayScaleObservation, FrameStack), hence its pin;
# ale-py 0.9 is the first to ship the game ROMs, and gymnasium 0.29 still uses np.bool8 (gone in numpy 2).
CLEANRL_REQUIREMENTS = ["torch==2.13.0", "gymnasium==0.29.1", "ale-py==0.9.0", "numpy<2", "opencv-python-headless",
                        "tensorboard", "tyro"]


def setup_environment(venv: Path, requirements: list, import_at_start: str = "") -> None:
    """A venv with `requirements`; `import_at_start` names a module its python imports at every start (a .pth line)."""
    python = str(venv / "bin" / "python")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([python, "-m", "pip", "install", *requirements], check=True)
    if import_at_start:
        site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        (Path(site) / f"import_{import_at_start}.pth").write_text(f"import {import_at_start}\n")
    print(f"reference environment ready: {venv}")


def learning_sps_from_events(run_dir: Path, learning_starts: int) -> float:
    """Steps per second between the first charts/SPS event after learning starts and the last one."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [e for e in EventAccumulator(str(run_dir)).Reload().Scalars("charts/SPS") if e.step > learning_starts]
    if len(events) < 2:
        raise RuntimeError(f"{run_dir}: too few SPS events after learning starts to time the learning phase")
    return (events[-1].step - events[0].step) / (events[-1].wall_time - events[0].wall_time)


def run_measured(command: list, threads: int, cores: set, log_path: Path, cwd=None, **extra_env):
    """Runs a command with `threads` torch threads on `cores`; returns (stdout, peak RSS in bytes)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **extra_env)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=cwd,
                                   preexec_fn=lambda: os.sched_setaffinity(0, cores))
        stdout = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)  # wait4: this child's own peak RSS
    exit_code = os.waitstatus_to_exitcode(status)
    if exit_code != 0:
        raise RuntimeError(f"{shlex.join(command)} failed ({exit_code}); see {log_path}")
    return stdout, usage.ru_maxrss * 1024


# Each reference is timed against a run of our script with its own settings: SB3 always clips the gradient norm
# (at 10), CleanRL never does.
OURS_AS = {"sb3": (", clip 10", ["--max-grad-norm", "10"]), "cleanrl": ("", [])}  # (name suffix, flags)


def ours_name(args, reference: str) -> str:
    """Our run timed against `reference`: the script timed, and what it changes to match the reference."""
    return args.script + OURS_AS[reference][0]


def programs(args, work: Path) -> dict:
    """name -> function(repeat) returning (learning SPS, replay bytes or None, peak RSS), in running order."""
    shared = ["--env-id", args.env_id, "--total-timesteps", str(args.learning_starts + args.steps),
              "--learning-starts", str(args.learning_starts), "--buffer-size", str(args.buffer_size),
              "--batch-size", "32", "--train-frequency", "4", "--target-network-frequency", "1000"]
    cuda = [] if args.cuda else ["--no-cuda"]

    def ours(reference):
        name, flags = ours_name(args, reference), OURS_AS[reference][1]

        def run(repeat):
            runs_dir = work / f"ours-as-{reference}-{repeat}"
            command = [sys.executable, str(REPO / args.script), *shared, *flags, *cuda, "--eval-every", "0",
                       "--eval-episodes", "1", "--progress-every", "0", "--runs-dir", str(runs_dir), *args.extra]
            stdout, rss = run_measured(command, args.threads, args.cores, runs_dir.with_suffix(".log"))
            replay_gb = float(stdout.split("uint8, ")[1].split(" GB")[0])
            return learning_sps_from_events(next(runs_dir.iterdir()), args.learning_starts), replay_gb * 1e9, rss
        return name, run

    def sb3(repeat):
        command = [str(args.reference_python), str(REPO / "benchmark" / "sb3_dqn_atari.py"), *shared,
                   *(["--cuda"] if args.cuda else [])]
        stdout, rss = run_measured(command, args.threads, args.cores, work / f"sb3-{repeat}.log")
        result = json.loads(stdout.strip().splitlines()[-1])
        return result["learning_sps"], result["replay_bytes"], rss

    def cleanrl(repeat):
        run_root = work / f"cleanrl-{repeat}"  # CleanRL writes runs/ under its working directory
        run_root.mkdir()
        checkout = Path(args.cleanrl).resolve()
        command = [str(args.cleanrl_python), str(checkout / "cleanrl" / "dqn_atari.py"), *shared,
                   "--no-capture-video", *cuda]  # CleanRL's tyro flags: --no-cuda as ours
        # cleanrl_utils sits at the checkout's root, which is not the script's folder
        _, rss = run_measured(command, args.threads, args.cores, work / f"cleanrl-{repeat}.log", cwd=run_root,
                              PYTHONPATH=str(checkout))
        (run_dir,) = (run_root / "runs").iterdir()
        return learning_sps_from_events(run_dir, args.learning_starts), None, rss

    found = {} if args.no_sb3 else dict([ours("sb3"), ("sb3", sb3)])
    if args.cleanrl:
        found.update([ours("cleanrl"), ("cleanrl", cleanrl)])
    return found


def cleanrl_commit(checkout: Path) -> str:
    """HEAD of the checkout, if it is a git repository's top (a plain copy inside another repository is not)."""
    found = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                           text=True)
    lines = found.stdout.splitlines()
    if found.returncode != 0 or Path(lines[0]).resolve() != checkout.resolve():
        return "unknown (not a git checkout)"
    return lines[1]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", action="store_true", help="create SB3's reference environment and exit")
    parser.add_argument("--setup-cleanrl", action="store_true", help="create CleanRL's environment and exit")
    parser.add_argument("--env-id", default="BreakoutNoFrameskip-v4")
    parser.add_argument("--script", default="dqn_atari.py", choices=["dqn_atari.py", "dqn_atari_parallel.py"],
                        help="our script to time")
    parser.add_argument("--learning-starts", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=5000, help="env steps timed after learning starts")
    parser.add_argument("--buffer-size", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each round runs every program once")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--cuda", action="store_true", help="train on the GPU (both programs)")
    parser.add_argument("--cleanrl", help="a CleanRL checkout: also time its cleanrl/dqn_atari.py")
    parser.add_argument("--no-sb3", action="store_true", help="time only CleanRL (needs --cleanrl), not SB3")
    parser.add_argument("--reference-python", type=Path, default=SB3_VENV / "bin" / "python",
                        help="the python of the reference environment (default: made by --setup)")
    parser.add_argument("--cleanrl-python", type=Path, default=CLEANRL_VENV / "bin" / "python",
                        help="the python that runs CleanRL (default: made by --setup-cleanrl)")
    parser.add_argument("--out", help="folder for speed.json and summary.md")
    args = parser.parse_args(argv[:split])
    args.extra = argv[split + 1:]
    if args.setup:
        return setup_environment(SB3_VENV, SB3_REQUIREMENTS)
    if args.setup_cleanrl:  # gymnasium 0.29 learns the Atari ids only from an import of ale_py; CleanRL's never makes it
        return setup_environment(CLEANRL_VENV, CLEANRL_REQUIREMENTS, import_at_start="ale_py")
    # the flags as typed first, then what they point to: a typo is named before a missing set-up
    if not args.out:
        parser.error("--out is required")
    if min(args.repeats, args.steps, args.learning_starts, args.buffer_size) < 1:
        parser.error("--repeats, --steps, --learning-starts and --buffer-size must be at least 1")
    if not 1 <= args.threads <= len(os.sched_getaffinity(0)):
        parser.error(f"--threads must be from 1 to the {len(os.sched_getaffinity(0))} cores here, got {args.threads}")
    if args.no_sb3 and not args.cleanrl:
        parser.error("--no-sb3 leaves nothing to compare against: give --cleanrl PATH")
    if not args.no_sb3 and not args.reference_python.exists():
        parser.error(f"no reference environment at {args.reference_python}: run `python benchmark/speed.py --setup`")
    if args.cleanrl and not (Path(args.cleanrl) / "cleanrl" / "dqn_atari.py").is_file():
        parser.error(f"{args.cleanrl} is not a CleanRL checkout (no cleanrl/dqn_atari.py)")
    if args.cleanrl and not args.cleanrl_python.exists():
        parser.error(f"no CleanRL environment at {args.cleanrl_python}: run `python benchmark/speed.py --setup-cleanrl`")
    out = output_folder(parser, args.out)
    args.cores = set(sorted(os.sched_getaffinity(0))[:args.threads])

    samples = {}
    with tempfile.TemporaryDirectory(prefix="dqn-speed-") as work:
        runners = programs(args, Path(work))
        for repeat in range(args.repeats):  # interleaved: machine noise falls on every program alike
            for name, runner in runners.items():
                started = time.perf_counter()
                sps, replay_bytes, rss = runner(repeat)
                samples.setdefault(name, []).append({"learning_sps": sps, "replay_bytes": replay_bytes,
                                                     "peak_rss_bytes": rss})
                print(f"round {repeat + 1}/{args.repeats} {name}: {sps:.1f} SPS in the learning phase "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
    medians = {name: statistics.median(s["learning_sps"] for s in runs) for name, runs in samples.items()}
    lines = [f"| program | median learning-phase SPS | {args.script} with its settings / program | peak RSS | replay |",
             "|---|---|---|---|---|"]
    for name, runs in samples.items():
        rss = max((s["peak_rss_bytes"] or 0) for s in runs)
        replay = runs[0]["replay_bytes"]
        ratio = f"{medians[ours_name(args, name)] / medians[name]:.2f}" if name in OURS_AS else ""
        lines.append(f"| {name} | {medians[name]:.1f} | {ratio} | {f'{rss / 1e9:.2f} GB' if rss else 'n/a'} | "
                     f"{f'{replay / 1e9:.3f} GB' if replay else 'n/a'} |")
    table = "\n".join(lines)
    print(table)
    command = command_line(__file__, argv)
    commit = git_commit([REPO / args.script, Path(__file__), REPO / "benchmark" / "sb3_dqn_atari.py"])
    (out / "speed.json").write_text(json.dumps({"samples": samples, "medians": medians}, indent=1))
    (out / "summary.md").write_text(
        f"# Learning-phase speed, {args.env_id}\n\n{table}\n\n"
        + provenance(command, commit, f"; device: {'cuda' if args.cuda else 'cpu'}")
        + (f"- CleanRL: {args.cleanrl} at commit {cleanrl_commit(Path(args.cleanrl))}\n" if args.cleanrl else "") +
        f"- {args.repeats} interleaved rounds; each run {args.threads} torch thread(s) on cores "
        f"{sorted(args.cores)}; {args.learning_starts} steps before learning, {args.steps} timed after; "
        f"batch 32, train every 4, target sync 1000, buffer {args.buffer_size}; each reference against "
        f"{args.script} with its gradient clipping (SB3 clips the norm at 10, CleanRL does not clip)"
        + (f"; {args.script} flags: `{shlex.join(args.extra)}`" if args.extra else "")
        + f"\n- python {platform.python_version()}\n")


if __name__ == "__main__":
    main()
