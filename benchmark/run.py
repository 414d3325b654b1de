"""Multi-seed runner: trains a script over N seeds in parallel worker processes and reports the spread.

    python benchmark/run.py --env-ids CartPole-v1 --seeds 10 --workers 2 --out benchmark/results/cartpole

Each run is `python <script> --env-id E --seed S <extra args>` in its own process, with one torch thread and
pinned to one core (--cores-per-run K: K cores and K threads, for an Atari run with several games). Per env
it writes <env>.csv (every eval of every seed), <env>_runs.csv (final eval and wall seconds per seed),
<env>.png (mean eval curve with a one-standard-error band, seeds faint), and
summary.md (the table, the exact command, commit and machine). Extra arguments after `--` go to the script.

    python benchmark/run.py --from-runs runs/PongNoFrameskip-v4__dqn_atari__1__* --out benchmark/results/pong

makes the same report from finished run directories instead (runs trained elsewhere, or resumed from
checkpoints across sessions): their seed comes from the directory name, their wall time from eval.csv. It adds
the training return, read from each run's tensorboard events (`charts/episodic_return`: whole games,
unclipped, at the training epsilon, as CleanRL logs it): <env>_training.csv (every game of every seed) and
<env>_training.png (the mean over seeds of each seed's last 100 games, a one-standard-error band), with
published figures marked beside it by `--reference "LABEL=STEP:VALUE,STEP:VALUE"`.

    python benchmark/run.py --save-seeds runs/BreakoutNoFrameskip-v4__dqn_atari__1__* --out benchmark/results/breakout

keeps a finished run's data in the results folder, as files to commit (a run directory dies with its machine):
<out>/seeds/<run name>/eval.csv (every evaluation) and training.csv (every training game's step and return).
--from-runs reads such a folder as it reads a run directory, so the report is rebuilt from the committed seeds:
`--from-runs <out>/seeds/* --out <out>`.
"""

import argparse
import csv
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# Training processes now running: stopped with the runner, never left behind as orphans. Launches and the
# stop take LAUNCH_LOCK, so no run can start after a stop (queued jobs would otherwise still run). Re-entrant:
# the stop handler runs in the main thread, perhaps while that thread holds the lock to launch a run; a plain
# Lock deadlocked there, leaving the runner and its runs alive.
RUNNING = set()
STOPPED = threading.Event()
LAUNCH_LOCK = threading.RLock()
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
# Set while the main thread launches a run. Its signal mask cannot hold a stop back then: another thread may
# take the signal, and Python runs the handler in the main thread all the same, inside the launch.
MAIN_LAUNCHING = threading.Event()
DEFERRED_STOPS = []


def stop_runs(signum, frame):
    if MAIN_LAUNCHING.is_set():  # the run being launched is not in RUNNING yet: stop once it is
        DEFERRED_STOPS.append(signum)
        return
    with LAUNCH_LOCK:
        STOPPED.set()
        running = list(RUNNING)
    for process in running:
        process.terminate()
    sys.exit(f"stopped by signal {signum}: terminated {len(running)} running run(s)")


@dataclass
class RunResult:
    env_id: str
    seed: int
    wall_seconds: float
    curve: list  # rows of eval.csv as dicts
    error: str = ""
    training: list = field(default_factory=list)  # (step, return) of each training game, where read (--from-runs)

    @property
    def final(self) -> float:
        return float(self.curve[-1]["eval_mean"]) if self.curve else float("nan")

    @property
    def steps(self) -> int:
        """Env steps trained: the last eval's step (short of the budget where a run stopped when solved)."""
        return int(self.curve[-1]["step"]) if self.curve else 0


def steps_range(steps: list) -> str:
    """The steps column: one number, or the range ("20000–60000") where runs stopped at different steps."""
    if not steps:
        return "0"
    return str(min(steps)) if min(steps) == max(steps) else f"{min(steps)}–{max(steps)}"


def curve_on_grid(curve: list, grid: np.ndarray) -> np.ndarray:
    """A run's eval mean at each grid step: its latest eval at or before that step, NaN before its first.

    A run that stopped when solved keeps its final policy, so its final eval stands for the steps it did not
    train; where a step has two rows (the stopping eval, then the final one on fresh episodes) the last counts."""
    by_step = {int(row["step"]): float(row["eval_mean"]) for row in curve}
    steps = np.array(sorted(by_step))
    values = np.array([by_step[step] for step in steps])
    latest = np.searchsorted(steps, grid, side="right") - 1
    return np.where(latest >= 0, values[np.maximum(latest, 0)], np.nan)


def file_stem(env_id: str) -> str:
    return env_id.replace("/", "-")  # ALE/Pong-v5 names a file, not a folder


def start_run(script: Path, env_id: str, seed: int, extra: list, cores, work_dir: Path, log_dir: Path):
    """Launches one training process pinned to the set `cores`, with as many torch threads; None: one torch
    thread, unpinned.

    Returns (process, runs_dir, log path), or None when the runner has been stopped."""
    runs_dir = work_dir / f"{file_stem(env_id)}__{seed}"
    command = [sys.executable, str(script), "--env-id", env_id, "--seed", str(seed),
               "--runs-dir", str(runs_dir), *extra]
    threads = str(len(cores)) if cores else "1"
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    log_path = log_dir / f"{file_stem(env_id)}_seed{seed}.log"
    in_main_thread = threading.current_thread() is threading.main_thread()
    with LAUNCH_LOCK:
        if STOPPED.is_set():
            return None
        # A stop signal waits until the new run is in RUNNING, where the handler finds it: landing inside
        # Popen, after the fork, it would leave a child that nothing stops.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

        def prepare_child():  # runs in the child before exec; a child keeps the mask it is forked with
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # or it would never hear a stop (nor checkpoint)
            if cores and hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(0, cores)
        if in_main_thread:
            MAIN_LAUNCHING.set()
        try:
            with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           preexec_fn=prepare_child)
            RUNNING.add(process)
        finally:
            MAIN_LAUNCHING.clear()
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    if in_main_thread and DEFERRED_STOPS:
        stop_runs(DEFERRED_STOPS.pop(), None)
    return process, runs_dir, log_path


def finish_run(process, runs_dir: Path, log_path: Path, env_id: str, seed: int, started: float) -> RunResult:
    """Waits for a started run and reads its eval curve."""
    returncode = process.wait()
    with LAUNCH_LOCK:  # the stop handler reads RUNNING under the lock; never change it beneath that read
        RUNNING.discard(process)
    wall = time.perf_counter() - started
    curve = read_eval_curve(runs_dir)
    if returncode != 0 or not curve:
        return RunResult(env_id, seed, wall, [], f"exit {returncode}, see {log_path}")
    return RunResult(env_id, seed, wall, curve)


def read_eval_curve(runs_dir: Path) -> list:
    """The complete rows of the eval.csv a run writes under runs_dir, as dicts ([] before its first eval)."""
    eval_files = sorted(runs_dir.glob("*/eval.csv"))
    if not eval_files:
        return []
    text = eval_files[-1].read_text()
    lines = text.splitlines()[: text.count("\n")]  # a row still being written has no newline yet
    return list(csv.DictReader(lines))


def result_of(future):
    """future.result(), waking every half second: a stop signal the OS hands to a worker thread only flags Python's
    handler, which then runs in the main thread when it next wakes; blocked in a plain wait, not before the run ends."""
    while True:
        try:
            return future.result(timeout=0.5)
        except TimeoutError:  # concurrent.futures' own, the builtin since Python 3.11
            continue


def run_one(script: Path, env_id: str, seed: int, extra: list, cores, work_dir: Path, log_dir: Path) -> RunResult:
    started = time.perf_counter()
    launched = start_run(script, env_id, seed, extra, cores, work_dir, log_dir)
    if launched is None:
        return RunResult(env_id, seed, 0.0, [], "not started: the runner was stopped")
    return finish_run(*launched, env_id, seed, started)


TRAINING_WINDOW = 100  # games averaged at each point of a training curve, as the scripts' return(100)
TRAINING_GRID = 10_000  # env steps between the points of a training curve


def read_training_returns(run_dir: Path) -> list:
    """(step, return) of every training game of a run, from the training.csv --save-seeds keeps, else from its
    tensorboard events; [] when it logged none. The events of a resumed run's interrupted tail are dropped, as
    tensorboard drops them."""
    if (run_dir / "training.csv").is_file():
        with open(run_dir / "training.csv") as f:
            return [(int(row["step"]), float(row["episodic_return"])) for row in csv.DictReader(f)]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    if "charts/episodic_return" not in events.Tags()["scalars"]:
        return []
    return [(event.step, event.value) for event in events.Scalars("charts/episodic_return")]


def training_curve(games: list, grid: np.ndarray) -> np.ndarray:
    """At each grid step, the mean return of the last TRAINING_WINDOW games ended by then (nan before any)."""
    games = sorted(games)
    steps = np.array([step for step, _ in games])
    sums = np.concatenate([[0.0], np.cumsum([value for _, value in games])])
    ends = np.searchsorted(steps, grid, side="right")
    starts = np.maximum(0, ends - TRAINING_WINDOW)
    with np.errstate(invalid="ignore"):
        return np.where(ends > 0, (sums[ends] - sums[starts]) / (ends - starts), np.nan)


def parse_reference(text: str) -> tuple:
    """--reference "LABEL=STEP:VALUE,STEP:VALUE" as (label, [(step, value), ...])."""
    label, _, points = text.rpartition("=")
    try:
        pairs = [(int(float(step)), float(value)) for step, value in
                 (point.split(":") for point in points.split(","))]
    except ValueError:
        raise ValueError(f"--reference {text!r}: give LABEL=STEP:VALUE,STEP:VALUE") from None
    if not label or not pairs:
        raise ValueError(f"--reference {text!r}: give LABEL=STEP:VALUE,STEP:VALUE")
    return label, pairs


def write_training_outputs(out: Path, env_id: str, results: list, references: list) -> str:
    """<env>_training.csv and .png from the runs' training games; returns summary.md's line on them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out / f"{file_stem(env_id)}_training.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["seed", "step", "episodic_return"])
        for r in results:
            writer.writerows([r.seed, step, f"{value:g}"] for step, value in sorted(r.training))
    last_common = min(max(step for step, _ in r.training) for r in results) // TRAINING_GRID * TRAINING_GRID
    grid = np.arange(TRAINING_GRID, last_common + 1, TRAINING_GRID)
    curves = np.array([training_curve(r.training, grid) for r in results])
    mean = curves.mean(axis=0)
    se = curves.std(axis=0, ddof=1) / np.sqrt(len(curves)) if len(curves) > 1 else np.zeros_like(mean)
    fig, ax = plt.subplots(figsize=(6, 4))
    for curve in curves:
        ax.plot(grid, curve, color="tab:blue", alpha=0.2, linewidth=0.8)
    ax.plot(grid, mean, color="tab:blue", label=f"mean of {len(curves)} seeds (last {TRAINING_WINDOW} games)"
            if len(curves) > 1 else f"one seed: no spread shown (last {TRAINING_WINDOW} games)")
    if len(curves) > 1:
        ax.fill_between(grid, mean - se, mean + se, color="tab:blue", alpha=0.3, label="± 1 standard error")
    for (label, points), marker in zip(references, "osD^"):
        ax.plot(*zip(*points), marker, color="black", fillstyle="none", linestyle="none", label=label)
    ax.set(title=f"{env_id}: training return", xlabel="env steps", ylabel="episodic return (charts/episodic_return)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{file_stem(env_id)}_training.png", dpi=100)
    plt.close(fig)
    spread = f" ± {se[-1]:.1f} over {len(curves)} seeds" if len(curves) > 1 else ", one seed"
    lines = [f"- {env_id} training return at step {grid[-1]:,} (each seed's last {TRAINING_WINDOW} games, "
             f"mean ± SE): {mean[-1]:.1f}{spread}; {file_stem(env_id)}_training.png"]
    lines += [f"- beside it, {label}: " + ", ".join(f"{value:g} at {step:,}" for step, value in points)
              for label, points in references]
    return "\n".join(lines)


def result_from_run_dir(run_dir: Path) -> RunResult:
    """A finished run's directory, <env>__<exp>__<seed>__<time> as the scripts name it, read as a RunResult."""
    parts = run_dir.name.split("__")
    eval_file = run_dir / "eval.csv"
    if len(parts) != 4 or not parts[2].isdigit() or not eval_file.is_file():
        raise ValueError(f"{run_dir} is not a run directory with an eval.csv")
    with open(eval_file) as f:
        curve = list(csv.DictReader(f))
    env_id = parts[0].replace("ALE-", "ALE/", 1)  # the scripts write ALE/Pong-v5's runs as ALE-Pong-v5
    return RunResult(env_id, int(parts[2]), float(curve[-1]["wall_seconds"]) if curve else 0.0, curve,
                     training=read_training_returns(run_dir))


def save_seed(run_dir: Path, out: Path) -> Path:
    """A finished run's evaluations and training games, copied to <out>/seeds/<run name>/ (see the docstring)."""
    result = result_from_run_dir(run_dir)
    if not result.curve or not result.training:
        raise ValueError(f"{run_dir} has no evaluation or no training game to keep")
    kept = out / "seeds" / run_dir.name
    kept.mkdir(parents=True, exist_ok=True)
    (kept / "eval.csv").write_text((run_dir / "eval.csv").read_text())
    with open(kept / "training.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "episodic_return"])
        writer.writerows([step, f"{value:g}"] for step, value in sorted(result.training))
    return kept


def mean_and_se(values) -> tuple:
    values = np.asarray(values, dtype=float)
    se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return values.mean(), se


def write_env_outputs(out: Path, env_id: str, results: list, threshold) -> dict:
    ok = [r for r in results if not r.error]
    with open(out / f"{file_stem(env_id)}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["seed", "step", "eval_mean", "eval_std", "episodes", "wall_seconds"])
        for r in ok:
            for row in r.curve:
                writer.writerow([r.seed, row["step"], row["eval_mean"], row["eval_std"], row["episodes"],
                                 row["wall_seconds"]])
    with open(out / f"{file_stem(env_id)}_runs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["seed", "steps", "final_eval_mean", "solved", "run_wall_seconds", "error"])
        for r in results:
            solved = "" if threshold is None or r.error else int(r.final >= threshold)
            writer.writerow([r.seed, r.steps if not r.error else "", f"{r.final:.4f}", solved,
                             f"{r.wall_seconds:.1f}", r.error])
    finals = [r.final for r in ok]
    mean, se = mean_and_se(finals) if finals else (float("nan"), float("nan"))
    if ok:
        plot_curves(out / f"{file_stem(env_id)}.png", env_id, ok, threshold)
    return {"env": env_id, "seeds": len(results), "failed": len(results) - len(ok),
            "steps": steps_range([r.steps for r in ok]), "mean": mean, "se": se,
            "solved": sum(f >= threshold for f in finals) if threshold is not None else None,
            "threshold": threshold, "median_wall": float(np.median([r.wall_seconds for r in results]))}


def plot_curves(path: Path, env_id: str, results: list, threshold) -> None:
    plot_groups(path, env_id, [(None, results)], threshold)


def plot_groups(path: Path, title: str, groups: list, threshold) -> None:
    """One mean curve with a one-standard-error band per (label, results) group, each seed faint."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (label, results), color in zip(groups, ["tab:blue", "tab:orange", "tab:green", "tab:red"]):
        steps = np.array(sorted({int(row["step"]) for r in results for row in r.curve}))
        curves = np.array([curve_on_grid(r.curve, steps) for r in results])
        mean = curves.mean(axis=0)
        se = curves.std(axis=0, ddof=1) / np.sqrt(len(curves)) if len(curves) > 1 else np.zeros_like(mean)
        for r in results:  # each seed's own evals only, ending where it stopped
            ax.plot([int(row["step"]) for row in r.curve], [float(row["eval_mean"]) for row in r.curve],
                    color=color, alpha=0.15, linewidth=0.8)
        seeds = f"mean of {len(curves)} seeds" if len(curves) > 1 else "one seed: no spread shown"
        if len({r.steps for r in results}) > 1:
            seeds += " (stopped seeds hold their final eval)"
        ax.plot(steps, mean, color=color, label=f"{label}: {seeds}" if label else seeds)
        if len(curves) > 1:
            ax.fill_between(steps, mean - se, mean + se, color=color, alpha=0.3,
                            label=f"{label}: ± 1 standard error" if label else "± 1 standard error")
    if threshold is not None:
        ax.axhline(threshold, color="gray", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set(title=title, xlabel="env steps", ylabel="eval episodic return")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine_description() -> str:
    """The CPU names its vector instructions too: a model name such as "AMD EPYC" covers CPUs with and without
    AVX-512, and --bf16 is many times faster with it than without."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in info if line.startswith("flags"))
        widest = {"avx512_bf16": "AVX-512 BF16", "avx512f": "AVX-512", "avx2": "AVX2"}  # the first one it has
        cpu += " with " + next((name for flag, name in widest.items() if flag in flags), "no AVX2")
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def command_line(script: str, argv: list) -> str:
    """How a benchmark script was invoked, written as the command that reruns it from the repository root."""
    return "python " + shlex.join([os.path.relpath(script, REPO)] + argv)


def provenance(command: str, commit: str, machine_note: str = "") -> str:
    """The lines every summary.md ends its header with: how to rerun it, from which code, on what machine."""
    return (f"- command (from the repository root): `{command}`\n- commit: {commit}\n"
            f"- machine: {machine_description()}{machine_note}\n")


def output_folder(parser, out) -> Path:
    """--out, made now, before the work: a folder that cannot be made is refused in one line at the start,
    not after hours of runs whose results would then have nowhere to go."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"cannot create --out {out} ({error.strerror}); give a folder that can be written")
    return out


def solve_thresholds(parser, env_ids: list, threshold) -> dict:
    """Each env's final eval that counts as solved: --threshold, else its spec's (None for Atari games).
    An id gymnasium does not know is refused before any run starts."""
    import gymnasium as gym
    try:
        import ale_py  # registers the Atari ids
        gym.register_envs(ale_py)
    except ImportError:
        pass
    thresholds = {}
    for env_id in env_ids:
        try:
            thresholds[env_id] = threshold if threshold is not None else gym.spec(env_id).reward_threshold
        except gym.error.Error as error:
            parser.error(f"unknown env id {env_id!r} ({type(error).__name__}: {error})")
    return thresholds


def git_commit(code: list) -> str:
    """HEAD, flagged when the files that produced the result (script, runner) differ from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", *map(str, code)], cwd=REPO,
                                capture_output=True, text=True).stdout
        dirty = [line[3:] for line in status.splitlines()]
        return commit + (f" (with uncommitted changes to {', '.join(dirty)})" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def format_table(rows: list) -> str:
    lines = ["| env | seeds | steps | final eval mean ± SE | seeds solved | median wall s/run |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        solved = "n/a" if row["solved"] is None else f"{row['solved']}/{row['seeds']} (>= {row['threshold']:g})"
        failed = f" ({row['failed']} failed)" if row["failed"] else ""
        lines.append(f"| {row['env']} | {row['seeds']}{failed} | {row['steps']} | {row['mean']:.2f} ± {row['se']:.2f} "
                     f"| {solved} | {row['median_wall']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--script", default=str(REPO / "dqn.py"), help="the training script to run")
    parser.add_argument("--env-ids", nargs="+", default=["CartPole-v1"])
    parser.add_argument("--seeds", type=int, default=10, help="number of seeds: 1..N")
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=None,
                        help="runs in parallel (default: the cores divided by --cores-per-run)")
    parser.add_argument("--cores-per-run", type=int, default=1,
                        help="cores each run is pinned to, with as many torch threads "
                             "(dqn_atari_parallel.py with --num-envs N: N, one per game)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="final eval that counts as solved (default: the env spec's reward_threshold)")
    parser.add_argument("--out", required=True, help="folder for CSVs, PNGs, logs and summary.md")
    parser.add_argument("--from-runs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="report these finished run directories instead of training")
    parser.add_argument("--save-seeds", nargs="+", type=Path, metavar="RUN_DIR",
                        help="keep these finished runs' evaluations and training games in <out>/seeds/, to commit")
    parser.add_argument("--reference", action="append", default=[], metavar="LABEL=STEP:VALUE,...",
                        help="with --from-runs: published training returns to mark beside the curve (repeatable)")
    args = parser.parse_args(argv[:split])
    if args.save_seeds:
        out = output_folder(parser, args.out)
        try:
            for run_dir in args.save_seeds:
                print(f"kept {run_dir} in {save_seed(run_dir, out)}")
        except ValueError as error:
            parser.error(str(error))
        return
    if args.from_runs:
        try:
            results = [result_from_run_dir(run_dir) for run_dir in args.from_runs]
            references = [parse_reference(text) for text in args.reference]
        except ValueError as error:
            parser.error(str(error))
        thresholds = solve_thresholds(parser, list(dict.fromkeys(r.env_id for r in results)), args.threshold)
        out = output_folder(parser, args.out)
        training = [write_training_outputs(out, env_id, with_games, references) for env_id in thresholds
                    if (with_games := [r for r in results if r.env_id == env_id and r.training])]
        write_report(out, argv, thresholds, results, script=None, seconds=sum(r.wall_seconds for r in results),
                     how="runs read from their directories (trained before this report; see each run's flags)",
                     notes=training)
        return
    extra = argv[split + 1:]
    script = Path(args.script).resolve()
    if not script.is_file():
        parser.error(f"no script at {script}")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count()))
    if not 1 <= args.cores_per_run <= len(cores):
        parser.error(f"--cores-per-run must be from 1 to the {len(cores)} cores here, got {args.cores_per_run}")
    core_sets = [set(cores[start:start + args.cores_per_run])
                 for start in range(0, len(cores) - args.cores_per_run + 1, args.cores_per_run)]
    if args.workers is None:
        args.workers = len(core_sets)
    if args.seeds < 1 or args.workers < 1 or args.first_seed < 0:
        parser.error("--seeds and --workers must be at least 1, --first-seed at least 0")
    thresholds = solve_thresholds(parser, args.env_ids, args.threshold)
    out = output_folder(parser, args.out)
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, stop_runs)
    log_dir = out / "logs"
    log_dir.mkdir(exist_ok=True)
    jobs = [(env_id, seed) for env_id in args.env_ids
            for seed in range(args.first_seed, args.first_seed + args.seeds)]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dqn-bench-") as work, ThreadPoolExecutor(args.workers) as pool:
        # Job k runs on core set k mod sets: with the default workers, no two runs share a core.
        futures = [pool.submit(run_one, script, env_id, seed, extra, core_sets[k % len(core_sets)], Path(work),
                               log_dir) for k, (env_id, seed) in enumerate(jobs)]
        results = []
        for future in futures:
            result = result_of(future)
            results.append(result)
            status = result.error or f"final eval {result.final:.2f}"
            print(f"{result.env_id} seed {result.seed}: {status} ({result.wall_seconds:.1f}s)", flush=True)
    write_report(out, argv, thresholds, results, script, time.perf_counter() - started,
                 f"workers: {args.workers}, each run pinned to {args.cores_per_run} core(s) with as many torch "
                 "threads")
    if any(r.error for r in results):
        sys.exit(f"{sum(bool(r.error) for r in results)} run(s) failed; see {log_dir}")


def write_report(out: Path, argv: list, thresholds: dict, results: list, script, seconds: float, how: str,
                 notes: list = ()) -> None:
    """Per env outputs, the printed table and summary.md with the command, commit and machine.
    thresholds: each env id's solve threshold, in the report's order."""
    env_ids = list(thresholds)
    rows = [write_env_outputs(out, env_id, [r for r in results if r.env_id == env_id], threshold)
            for env_id, threshold in thresholds.items()]
    table = format_table(rows)
    print(table)
    command = command_line(__file__, argv)
    code = [Path(__file__)] + ([script] if script else [])
    seeds = sorted({r.seed for r in results})
    (out / "summary.md").write_text(
        f"# {', '.join(env_ids)}: {len(seeds)} seed{'s' if len(seeds) > 1 else ''}\n\n{table}\n\n"
        + provenance(command, git_commit(code)) + f"- {how}\n- total wall: {seconds:.0f} s\n"
        + "".join(f"{note}\n" for note in notes))


if __name__ == "__main__":
    main()
