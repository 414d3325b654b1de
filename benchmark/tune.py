"""Optuna study over a script's hyperparameters in which every trial is the mean of several seeds, so that
one lucky seed cannot pick the winner.

    python benchmark/tune.py --study cartpole --n-trials 50 --workers 2 --out benchmark/results/tune-cartpole

Each trial trains the script (dqn.py by default, or `--script dqn_atari.py` with a short budget given after
`--`) once per seed, the seeds in parallel processes with one torch thread each, and scores the mean over
seeds of the final eval return (`--objective final`) or of the mean eval return over the run (`auc`, the
area under the eval curve over its length). After every eval that all seeds have reached, the trial
reports that score so far, and the median pruner stops trials that trail the others at the same point.

The study lives in `--storage`: a journal file (the default, `<out>/study.journal`: no server, and several
processes on one machine can share it) or any Optuna storage URL (`postgresql://user:pass@host/db`, with
that database's driver installed) so that workers on many machines fill one study: run the same command on
each, and each machine's workers stop once the study holds `--n-trials` trials. On a database each trial
records a heartbeat every `--heartbeat` seconds: a trial silent for twice that (its machine died, its worker
was killed) is marked failed and run again, with the same flags, by a worker still alive; a worker done with
its share waits for the trials running elsewhere, so that the study never ends with one left running.
At the end the process writes the report: trials.csv, the best configuration as a ready-to-run command,
parallel-coordinate and parameter-importance plots, and a re-check of the best configuration against the
script's defaults over `--recheck-seeds` fresh seeds (benchmark/run.py, then compare.py, so each result
folder is a normal one).
Arguments after `--` go to every run unchanged (a budget, for instance).
"""

import argparse
import csv
import dataclasses
import math
import multiprocessing
import os
import shlex
import signal
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

import compare
import run
from run import (REPO, command_line, finish_run, git_commit, output_folder, provenance, read_eval_curve,
                 start_run)

POLL_SECONDS = 0.5
RECHECK_FIRST_SEED = 1001  # seeds no trial has seen


@dataclasses.dataclass(frozen=True)
class Float:
    low: float
    high: float
    log: bool = False

    def suggest(self, trial, name):
        return trial.suggest_float(name, self.low, self.high, log=self.log)


@dataclasses.dataclass(frozen=True)
class Int:
    low: int
    high: int
    log: bool = False

    def suggest(self, trial, name):
        return trial.suggest_int(name, self.low, self.high, log=self.log)


@dataclasses.dataclass(frozen=True)
class Choice:
    options: tuple

    def suggest(self, trial, name):
        return trial.suggest_categorical(name, self.options)


@dataclasses.dataclass(frozen=True)
class PerTrainStep:
    """gradient_steps as updates per env step times train_frequency: the replay ratio, not a raw count,
    so that no trial pairs a short train period with a long phase and costs a hundred times the others."""
    ratios: tuple

    def suggest(self, trial, name):
        return trial.suggest_categorical("updates_per_env_step", self.ratios)


# What each script's flags may range over. Keys are the scripts' Args fields (a test checks them).
SEARCH_SPACES = {
    "dqn.py": {
        "learning_rate": Float(3e-4, 1e-2, log=True),
        "batch_size": Choice((32, 64, 128, 256)),
        "target_network_frequency": Int(1, 1000, log=True),
        "exploration_fraction": Float(0.05, 0.5),
        "end_e": Float(0.01, 0.1),
        "gamma": Choice((0.98, 0.99, 0.995)),
        "reward_scale": Float(0.003, 1.0, log=True),
        "hidden_sizes": Choice(("64 64", "128 128", "256 256")),
        "train_frequency": Choice((16, 64, 256)),
        "gradient_steps": PerTrainStep((0.125, 0.25, 0.5)),  # 0.5: the defaults' 128 per 256
        "max_grad_norm": Choice((1.0, 10.0, 0.0)),
        "anneal_lr": Choice((True, False)),
    },
    "dqn_atari.py": {
        "learning_rate": Float(2e-5, 5e-4, log=True),
        "target_network_frequency": Choice((500, 1000, 2000, 4000, 8000)),
        "exploration_fraction": Float(0.05, 0.3),
        "end_e": Float(0.01, 0.1),
        "gamma": Choice((0.99, 0.995)),
        "batch_size": Choice((32, 64)),
        "train_frequency": Choice((1, 2, 4, 8)),
        "optimizer": Choice(("adam", "rmsprop")),
    },
}
# Without --params, every parameter of the script's space but these (settled ones, kept to save trials).
NOT_TUNED_BY_DEFAULT = {"dqn.py": {"max_grad_norm", "anneal_lr"}, "dqn_atari.py": {"optimizer"}}
# Trials train their whole budget: the objective and the pruner compare curves eval by eval, which a run
# stopped when solved would leave short.
TRIAL_FLAGS = {"dqn.py": ["--no-stop-when-solved"]}


class TuneError(Exception):
    """Bad input: one line and a non-zero exit."""


def suggest_params(trial, space: dict, names: list) -> dict:
    """Flag values for one trial, in `names` order (gradient_steps after train_frequency)."""
    params = {}
    for name in names:
        value = space[name].suggest(trial, name)
        if isinstance(space[name], PerTrainStep):
            value = max(1, round(value * params["train_frequency"]))
        params[name] = value
    return params


def flags_for(params: dict) -> list:
    """The command-line flags that set these Args values (tyro: --no-x for False, tuples as words)."""
    flags = []
    for name, value in params.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            flags += [flag, *str(value).split()]
    return flags


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a worker needs (picklable: workers are fresh processes)."""
    study: str
    storage: str
    script: Path
    env_id: str
    seeds: tuple
    objective: str
    params: tuple
    fixed: tuple  # flags after `--`
    n_trials: int
    pruner: str
    out: Path
    heartbeat: int  # seconds between a trial's heartbeats, on a database storage

    @property
    def on_database(self) -> bool:
        """A database records heartbeats, so a dead worker's trial can be told from a running one; a journal
        file cannot."""
        return is_database_url(self.storage)

    def describe(self) -> dict:
        """What defines the study: a later invocation must agree on all of it to add trials."""
        return {"objective": self.objective, "script": self.script.name, "env_id": self.env_id,
                "seeds": list(self.seeds), "params": list(self.params), "fixed": list(self.fixed)}


def score(curves: list, objective: str, evals: int) -> float:
    """The mean over seeds of each curve's first `evals` evals, reduced by the objective."""
    per_seed = []
    for curve in curves:
        values = [float(row["eval_mean"]) for row in curve[:evals]]
        per_seed.append(values[-1] if objective == "final" else sum(values) / len(values))
    return sum(per_seed) / len(per_seed)


def is_database_url(spec: str) -> bool:
    """--storage names a database by an Optuna storage URL, and a journal file by a path."""
    return "://" in spec


def shown_storage(spec: str) -> str:
    """The storage as errors and reports show it: a URL's password masked (summary.md is committed, logs shared)."""
    if not is_database_url(spec):
        return spec
    import sqlalchemy.engine

    try:
        return sqlalchemy.engine.make_url(spec).render_as_string(hide_password=True)
    except Exception:  # a URL SQLAlchemy cannot parse: its scheme only
        return spec.split("://")[0] + "://..."


def open_storage(spec: str, heartbeat: int = 60):
    """A journal file for a path, the URL's database otherwise; refused in one line when it cannot open.
    On a database, a trial whose heartbeat stops for 2 x heartbeat seconds is failed and queued again (3 times
    at most: a trial that keeps killing its worker is left failed)."""
    import optuna
    import sqlalchemy.exc  # optuna's database layer
    from optuna.storages.journal import JournalFileBackend

    try:
        if not is_database_url(spec):
            return optuna.storages.JournalStorage(JournalFileBackend(spec))
        for attempt in range(3):
            try:
                with warnings.catch_warnings():  # optuna calls heartbeats experimental
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(
                        spec, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # machines starting at once on an empty database race to make its tables: the loser finds them made
                if attempt == 2:
                    raise
                time.sleep(1)
    except Exception as error:  # drivers and databases raise many kinds; all mean "cannot use this storage"
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise TuneError(f"cannot open storage {shown_storage(spec)!r}: {first_line}") from None


def load_study(config: Config, create: bool):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(config.storage, config.heartbeat)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2) if config.pruner == "median"
              else optuna.pruners.NopPruner())
    # constant_liar: trials running elsewhere count as mediocre, so parallel workers do not all sample one spot
    sampler = optuna.samplers.TPESampler(constant_liar=True)
    if not create:
        return optuna.load_study(study_name=config.study, storage=storage, sampler=sampler, pruner=pruner)
    study = optuna.create_study(study_name=config.study, storage=storage, sampler=sampler, pruner=pruner,
                                direction="maximize", load_if_exists=True)
    made_with = study.user_attrs.get("definition")
    if made_with is None:
        study.set_user_attr("definition", config.describe())
    elif made_with != config.describe():
        differ = ", ".join(f"{key}={made_with.get(key)!r} (this run: {value!r})"
                           for key, value in config.describe().items() if made_with.get(key) != value)
        raise TuneError(f"study {config.study!r} in {shown_storage(config.storage)} was made with {differ}; "
                        "give another --study name or the same settings")
    return study


class TrialFailed(Exception):
    pass


def run_trial(trial, config: Config, work_dir: Path) -> float:
    """Trains every seed of one trial in parallel, reporting the score after each eval all seeds have done."""
    import optuna

    params = suggest_params(trial, SEARCH_SPACES[config.script.name], list(config.params))
    flags = flags_for(params)
    trial.set_user_attr("flags", shlex.join(flags))
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    started = time.perf_counter()
    last_heartbeat = -math.inf
    runs = []
    try:
        for seed in config.seeds:
            extra = [*TRIAL_FLAGS.get(config.script.name, []), *config.fixed, *flags]
            launched = start_run(config.script, config.env_id, seed, extra, None, work_dir, work_dir)
            if launched is None:
                raise TrialFailed("stopped by a signal")
            runs.append(launched)
        reported = 0
        while True:
            if config.on_database and time.monotonic() - last_heartbeat >= config.heartbeat:
                # ask-and-tell has no heartbeat of its own (study.optimize runs one): the storage's call
                trial.study._storage.record_heartbeat(trial._trial_id)
                last_heartbeat = time.monotonic()
            finished = all(process.poll() is not None for process, _, _ in runs)
            curves = [read_eval_curve(runs_dir) for _, runs_dir, _ in runs]
            while reported < min(len(curve) for curve in curves):
                trial.report(score(curves, config.objective, reported + 1), reported)
                reported += 1
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after eval {reported}")
            if finished:
                break
            time.sleep(POLL_SECONDS)
        results = [finish_run(*launched, config.env_id, seed, started) for launched, seed in zip(runs, config.seeds)]
        for result, (_, _, log_path) in zip(results, runs):
            if result.error:
                last_line = (log_path.read_text().strip().splitlines() or [result.error])[-1]
                raise TrialFailed(f"seed {result.seed} of trial {trial.number} failed: {last_line}")
        return score([r.curve for r in results], config.objective, len(results[0].curve))
    finally:
        for process, _, _ in runs:
            if process.poll() is None:
                process.terminate()
                process.wait()
            with run.LAUNCH_LOCK:
                run.RUNNING.discard(process)


def counted_trials(study) -> int:
    """Trials that count toward --n-trials: finished, pruned or running (failed ones are replaced)."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                        TrialState.RUNNING, TrialState.WAITING)))


def work(config: Config) -> None:
    """One worker: asks the study for trials until it holds n_trials, then waits for the trials running
    elsewhere (one of a dead worker is failed and queued again, which this worker then runs). Exits non-zero
    on a failed trial."""
    import optuna
    from optuna.trial import TrialState

    for stop_signal in run.STOP_SIGNALS:
        signal.signal(stop_signal, run.stop_runs)
    study = load_study(config, create=False)
    while True:
        if config.on_database:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # a dead worker's trials: failed, and queued again
        queued = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))  # the next ask takes one
        if counted_trials(study) >= config.n_trials and not queued:
            if not (config.on_database and study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))):
                break
            time.sleep(config.heartbeat / 2)  # trials running elsewhere: they finish, or go stale and come back
            continue
        signal.pthread_sigmask(signal.SIG_BLOCK, run.STOP_SIGNALS)  # a stop between ask and try would leave it running
        trial = study.ask()
        with tempfile.TemporaryDirectory(prefix=f"tune-trial{trial.number}-") as work_dir:
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, run.STOP_SIGNALS)
                value = run_trial(trial, config, Path(work_dir))
            except optuna.TrialPruned as pruned:
                study.tell(trial, state=TrialState.PRUNED)
                print(f"trial {trial.number}: {pruned} | {trial.user_attrs['flags']}", flush=True)
                continue
            except BaseException as error:  # a failed run, a signal, Ctrl-C: the trial is failed, never left running
                study.tell(trial, state=TrialState.FAIL)
                if isinstance(error, TrialFailed):
                    sys.exit(f"tune.py: error: {error}")
                raise
        study.tell(trial, value)
        print(f"trial {trial.number}: {value:.2f} | {trial.user_attrs['flags']}", flush=True)


def write_trials_csv(path: Path, trials: list) -> None:
    names = sorted({name for t in trials for name in t.params})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["number", "state", "value", "evals_reported", "seconds", "worker", *names, "flags"])
        for t in trials:
            seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else ""
            writer.writerow([t.number, t.state.name, "" if t.value is None else f"{t.value:.4f}",
                             len(t.intermediate_values), f"{seconds:.1f}" if seconds != "" else "",
                             t.user_attrs.get("worker", ""), *[t.params.get(n, "") for n in names],
                             t.user_attrs.get("flags", "")])


def write_plots(study, out: Path) -> list:
    """Parallel coordinates and parameter importances as PNGs; returns the notes for what could not be drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    notes = []
    for name, plot in [("parallel_coordinate", optuna_plots.plot_parallel_coordinate),
                       ("param_importances", optuna_plots.plot_param_importances)]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
                ax = plot(study)
            figure = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            figure.set_size_inches(12, 5)
            figure.tight_layout()
            figure.savefig(out / f"{name}.png", dpi=100)
            plt.close(figure)
        except (ValueError, RuntimeError) as error:  # e.g. importances need two finished trials
            notes.append(f"{name}.png not drawn: {error}")
    return notes


def recheck(config: Config, best_flags: list, seeds: int, workers: int) -> str:
    """The best flags and the script's defaults over the same fresh seeds, each a benchmark/run.py folder,
    then both curves in one plot (compare.py). Returns compare's table."""
    script = os.path.relpath(config.script) if Path.cwd() == REPO else str(config.script)  # as summary.md shows it
    base = ["--script", script, "--env-ids", config.env_id, "--seeds", str(seeds),
            "--first-seed", str(RECHECK_FIRST_SEED), "--workers", str(workers)]
    folders = {}
    for label, flags in [("best", best_flags), ("defaults", [])]:
        folders[label] = config.out / f"recheck-{label}"
        try:
            run.main([*base, "--out", str(folders[label]), "--", *config.fixed, *flags])
        except SystemExit as stop:
            if stop.code:  # run.py exits only on failure or a signal
                raise TuneError(f"re-check of the {label} configuration: {stop.code}") from None
    compare_out = config.out / "recheck"
    compare.main(["--env-id", config.env_id, "--out", str(compare_out),
                  *[f"{label}={folder}" for label, folder in folders.items()]])
    return (compare_out / "summary.md").read_text().split("\n\n")[1]


def report(config: Config, argv: list, workers: int, recheck_seeds: int, seconds: float) -> None:
    from optuna.trial import TrialState

    study = load_study(config, create=False)
    trials = study.get_trials(deepcopy=False)
    write_trials_csv(config.out / "trials.csv", trials)
    counts = {state: sum(t.state == state for t in trials) for state in TrialState}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise TuneError(f"study {config.study!r} has no finished trial yet (see {config.out / 'trials.csv'})")
    best = study.best_trial
    best_flags = shlex.split(best.user_attrs["flags"])
    script = os.path.relpath(config.script, REPO)
    best_command = shlex.join(["python", script, "--env-id", config.env_id, *config.fixed, *best_flags])
    (config.out / "best_command.txt").write_text(best_command + "\n")
    notes = write_plots(study, config.out)
    if recheck_seeds:
        recheck_text = (f"Re-check over {recheck_seeds} fresh seeds ({RECHECK_FIRST_SEED} on), the best configuration "
                        f"beside the script's defaults (recheck/):\n\n{recheck(config, best_flags, recheck_seeds, workers)}")
    else:
        recheck_text = "Re-check: not run (`--recheck-seeds 0`)."
    seeds = ", ".join(map(str, config.seeds))
    command = command_line(__file__, [shown_storage(arg) if arg == config.storage else arg for arg in argv])
    text = (
        f"# {config.env_id}: study {config.study!r} ({config.objective} eval return, mean of seeds {seeds})\n\n"
        f"Best: trial {best.number}, {best.value:.2f}\n\n```bash\n{best_command}\n```\n\n"
        f"{recheck_text}\n\n"
        f"- trials: {len(trials)} ({counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
        f"{counts[TrialState.FAIL]} failed, {counts[TrialState.RUNNING]} running elsewhere); trials.csv has each\n"
        f"- tuned: {', '.join(config.params)}; fixed after `--`: `{shlex.join(config.fixed) or 'nothing'}`\n"
        f"- pruner: {config.pruner}; this invocation: {workers} worker process(es), {seconds:.0f} s wall "
        f"including the re-check\n"
        + provenance(command, git_commit([Path(__file__), config.script])) + "".join(f"- {note}\n" for note in notes))
    (config.out / "summary.md").write_text(text)
    print(text)


def parse(argv: list):
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--script", default=str(REPO / "dqn.py"), help="the training script (its space: "
                        + ", ".join(SEARCH_SPACES) + ")")
    parser.add_argument("--env-id", default="CartPole-v1")
    parser.add_argument("--study", default="dqn", help="the study's name in the storage")
    parser.add_argument("--storage", help="a journal file path or an Optuna storage URL (default: <out>/study.journal)")
    parser.add_argument("--out", required=True, help="folder for the report (and the default storage)")
    parser.add_argument("--n-trials", type=int, default=50, help="trials the study should hold in all")
    parser.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per trial: 1..N, run in parallel")
    parser.add_argument("--objective", choices=["final", "auc"], default="final")
    parser.add_argument("--params", nargs="+", help="the flags to tune (Args field names; default: most of the space)")
    parser.add_argument("--pruner", choices=["median", "none"], default="median")
    parser.add_argument("--recheck-seeds", type=int, default=10, help="fresh seeds for the re-check (0: none)")
    parser.add_argument("--heartbeat", type=int, default=60, help="on a database storage: seconds between a "
                        "trial's heartbeats; one silent for twice this is failed and run again elsewhere")
    args = parser.parse_args(argv[:split])
    fixed = tuple(argv[split + 1:])
    script = Path(args.script).resolve()
    try:
        space = SEARCH_SPACES[script.name]
    except KeyError:
        parser.error(f"no search space for {script.name}; known: {', '.join(SEARCH_SPACES)}")
    if not script.is_file():
        parser.error(f"no script at {script}")
    names = args.params or [n for n in space if n not in NOT_TUNED_BY_DEFAULT[script.name]]
    unknown = [n for n in names if n not in space]
    if unknown:
        parser.error(f"unknown parameter(s) {', '.join(unknown)} for {script.name}; known: {', '.join(space)}")
    if "gradient_steps" in names and "train_frequency" not in names:
        parser.error("gradient_steps is tuned as updates per env step times train_frequency: tune both")
    clash = [f for f in fixed if f.startswith("--") and f[2:].replace("-", "_").removeprefix("no_") in names]
    if clash:
        parser.error(f"{', '.join(clash)} after -- is also tuned; drop it or leave it out of --params")
    if args.n_trials < 1 or args.workers < 1 or args.seeds < 1 or args.recheck_seeds < 0 or args.heartbeat < 1:
        parser.error("--n-trials, --workers, --seeds and --heartbeat must be at least 1, --recheck-seeds at least 0")
    out = output_folder(parser, args.out)
    config = Config(args.study, args.storage or str(out / "study.journal"), script, args.env_id,
                    tuple(range(1, args.seeds + 1)), args.objective, tuple(n for n in space if n in names), fixed,
                    args.n_trials, args.pruner, out, args.heartbeat)
    return args, config


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args, config = parse(argv)
    started = time.perf_counter()
    try:
        load_study(config, create=True)
        # fresh interpreters: every worker opens the storage itself, as a worker on another machine would
        context = multiprocessing.get_context("spawn")
        workers = [context.Process(target=work, args=(config,)) for _ in range(args.workers)]

        def stop_workers(signum, frame):  # each worker, on SIGTERM, stops its runs and marks its trial failed
            for worker in workers:
                if worker.is_alive():
                    worker.terminate()
            for worker in workers:
                worker.join()
            sys.exit(f"tune.py: stopped by signal {signum}; the study keeps every finished trial")

        for stop_signal in run.STOP_SIGNALS:
            signal.signal(stop_signal, stop_workers)
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        failed = [worker.exitcode for worker in workers if worker.exitcode]
        if failed:  # a failed trial has printed its own line and exits 1; anything else is said here
            sys.exit(1 if set(failed) == {1} else f"tune.py: error: worker exit codes {failed}")
        report(config, argv, args.workers, args.recheck_seeds, time.perf_counter() - started)
    except TuneError as error:
        sys.exit(f"tune.py: error: {error}")


if __name__ == "__main__":
    main()
