"""benchmark/tune.py: its search spaces are real flags, its scores, a study shared by two worker processes,
and its refusals."""

import csv
import dataclasses
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import tyro
from script_runner import assert_signal_stops_every_run, unique_marker

import dqn
import dqn_atari

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmark"))
import tune  # noqa: E402

TUNER = [sys.executable, str(REPO / "benchmark" / "tune.py")]
TINY_RUN = ["--total-timesteps", "1000", "--learning-starts", "200", "--eval-every", "500", "--eval-episodes", "3",
            "--no-cuda"]


@pytest.mark.parametrize("script", [dqn, dqn_atari], ids=["dqn", "dqn_atari"])
def test_every_suggested_configuration_parses_into_the_scripts_args(script):
    space = tune.SEARCH_SPACES[Path(script.__file__).name]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        params = tune.suggest_params(study.ask(), space, list(space))
        parsed = tyro.cli(script.Args, args=tune.flags_for(params))
        for name, value in params.items():
            expected = tuple(int(w) for w in value.split()) if name == "hidden_sizes" else value
            assert getattr(parsed, name) == expected, name
    assert set(space) <= {field.name for field in dataclasses.fields(script.Args)}


def test_gradient_steps_follow_the_suggested_replay_ratio():
    space = tune.SEARCH_SPACES["dqn.py"]
    trial = optuna.trial.FixedTrial({"train_frequency": 64, "updates_per_env_step": 0.25})
    assert tune.suggest_params(trial, space, ["train_frequency", "gradient_steps"]) == {
        "train_frequency": 64, "gradient_steps": 16}


def test_scores_are_means_over_seeds_of_the_last_or_the_average_eval():
    curves = [[{"eval_mean": "10"}, {"eval_mean": "30"}], [{"eval_mean": "20"}, {"eval_mean": "60"}]]
    assert tune.score(curves, "final", 2) == 45.0  # (30 + 60) / 2
    assert tune.score(curves, "auc", 2) == 30.0  # (20 + 40) / 2
    assert tune.score(curves, "final", 1) == 15.0  # what a trial reports after its first eval


def test_two_worker_processes_share_one_study_and_lose_or_repeat_no_trial(tmp_path):
    """As two machines would: two invocations, each with its own report folder, one storage."""
    storage = tmp_path / "shared.journal"
    n_trials = 6
    workers = [subprocess.Popen([*TUNER, "--storage", str(storage), "--out", str(tmp_path / f"out{i}"),
                                 "--n-trials", str(n_trials), "--seeds", "2", "--recheck-seeds", str(1 - i),
                                 "--pruner", "none", "--", *TINY_RUN],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [worker.communicate(timeout=400) for worker in workers]
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr
    study = optuna.load_study(study_name="dqn", storage=tune.open_storage(str(storage)))
    trials = study.get_trials()
    # Both may ask at once when one trial is left: one extra at most, never fewer.
    assert n_trials <= len(trials) <= n_trials + 1
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), [t.state for t in trials]
    assert len({t.user_attrs["worker"] for t in trials}) == 2, "one worker did every trial"
    announced = [line.split(":")[0] for stdout, _ in outputs for line in stdout.splitlines()
                 if line.startswith("trial ")]
    assert sorted(announced) == sorted(f"trial {t.number}" for t in trials)  # each trained once, by one worker
    with open(tmp_path / "out1" / "trials.csv") as f:
        assert len(list(csv.DictReader(f))) == len(trials)
    assert "Re-check: not run" in (tmp_path / "out1" / "summary.md").read_text()
    # the other re-checked the best flags and the defaults on a seed no trial used, both in one plot
    recheck = (tmp_path / "out0" / "recheck" / "summary.md").read_text()
    assert "| best | 1 |" in recheck and "| defaults | 1 |" in recheck
    assert (tmp_path / "out0" / "recheck-best" / "CartPole-v1_runs.csv").read_text().splitlines()[1].startswith("1001,")
    best_command = (tmp_path / "out0" / "best_command.txt").read_text()
    assert best_command.startswith("python dqn.py --env-id CartPole-v1 --total-timesteps 1000")
    assert (tmp_path / "out0" / "param_importances.png").exists()


def tuner_error(capsys, argv):
    with pytest.raises(SystemExit) as stop:
        tune.main(argv)
    return stop.value.code, capsys.readouterr().err


def test_unknown_parameters_and_flags_tuned_twice_are_refused(tmp_path, capsys):
    code, err = tuner_error(capsys, ["--out", str(tmp_path), "--params", "learning_rate", "lr"])
    assert code == 2 and "unknown parameter(s) lr for dqn.py; known: learning_rate," in err
    code, err = tuner_error(capsys, ["--out", str(tmp_path), "--params", "learning_rate", "--",
                                     "--learning-rate", "0.1"])
    assert code == 2 and "--learning-rate after -- is also tuned" in err
    code, err = tuner_error(capsys, ["--out", str(tmp_path), "--params", "gradient_steps"])
    assert code == 2 and "tune both" in err


def test_an_unreachable_storage_is_one_line(tmp_path, capsys):
    code, _ = tuner_error(capsys, ["--out", str(tmp_path), "--storage", "sqlite:////no/such/folder/study.db"])
    assert code.startswith("tune.py: error: cannot open storage 'sqlite:////no/such/folder/study.db'")
    assert "\n" not in code


def test_a_database_password_never_reaches_an_error_or_a_report(tmp_path, capsys):
    assert tune.shown_storage("postgresql://tune:secret@db.example/tune") == "postgresql://tune:***@db.example/tune"
    assert tune.shown_storage(str(tmp_path / "study.journal")) == str(tmp_path / "study.journal")
    code, _ = tuner_error(capsys, ["--out", str(tmp_path), "--storage", "postgresql://tune:secret@127.0.0.1:1/tune"])
    assert code.startswith("tune.py: error: cannot open storage 'postgresql://tune:***@127.0.0.1:1/tune': ")
    assert "secret" not in code


def test_a_study_made_with_another_objective_is_refused(tmp_path, capsys):
    _, config = tune.parse(["--out", str(tmp_path), "--objective", "final"])
    tune.load_study(config, create=True)
    code, _ = tuner_error(capsys, ["--out", str(tmp_path), "--objective", "auc"])
    assert code.startswith("tune.py: error: study 'dqn' in ") and "objective='final' (this run: 'auc')" in code


def test_a_failing_trial_stops_the_study_with_the_runs_last_line(tmp_path):
    finished = subprocess.run([*TUNER, "--out", str(tmp_path), "--seeds", "1", "--n-trials", "1", "--",
                               "--total-timesteps", "-5"], capture_output=True, text=True, timeout=120)
    assert finished.returncode != 0
    assert "tune.py: error: seed 1 of trial 0 failed: dqn.py: error: --total-timesteps must be positive, got -5\n" == finished.stderr
    study = optuna.load_study(study_name="dqn", storage=tune.open_storage(str(tmp_path / "study.journal")))
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.FAIL]  # failed, not left running


def test_stopping_the_tuner_stops_its_workers_and_their_runs_and_fails_their_trials(tmp_path):
    marker = unique_marker("tune-stop")
    tuner = subprocess.Popen([*TUNER, "--out", str(tmp_path), "--workers", "2", "--seeds", "2", "--", "--total-timesteps",
                              "10000000", "--exp-name", marker, "--no-cuda"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert_signal_stops_every_run(tuner, marker, "tune.py: stopped by signal 15")
    study = optuna.load_study(study_name="dqn", storage=tune.open_storage(str(tmp_path / "study.journal")))
    assert {t.state for t in study.get_trials()} == {optuna.trial.TrialState.FAIL}  # none left "running"


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server on loopback, from the installed binaries (Debian's postgresql package, which
    .ci/run installs): skipped, with that reason, where there are none; a failure in CI, which must have them."""
    initdb = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    missing = ("no PostgreSQL server installed (Debian: apt-get install postgresql)" if not initdb else
               "no PostgreSQL driver (pip install 'psycopg[binary]')" if importlib.util.find_spec("psycopg") is None
               else "")
    if missing:
        if os.environ.get("CI"):  # .ci/run installs both: without them CI would test less than it says
            pytest.fail(missing)
        pytest.skip(f"{missing}: tune.py on a real database is not tested here")
    bin_dir = initdb[-1].parent
    data = Path(tempfile.mkdtemp(prefix="dqn-tests-postgres-"))
    as_server_user = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: its own user runs it
        server_user = pwd.getpwnam("postgres")
        os.chown(data, server_user.pw_uid, server_user.pw_gid)
        as_server_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as probe:  # a free port on loopback
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    quiet = {"check": True, "capture_output": True, "timeout": 120}
    subprocess.run([*as_server_user, bin_dir / "initdb", "-D", data / "db", "-U", "tune", "--auth=trust"], **quiet)
    subprocess.run([*as_server_user, bin_dir / "pg_ctl", "-D", data / "db", "-l", data / "server.log", "-w", "-o",
                    f"-c listen_addresses=127.0.0.1 -p {port} -k {data}", "start"], **quiet)
    try:
        subprocess.run([bin_dir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "tune", "tune"], **quiet)
        yield f"postgresql://tune@127.0.0.1:{port}/tune"
    finally:
        subprocess.run([*as_server_user, bin_dir / "pg_ctl", "-D", data / "db", "-m", "immediate", "stop"], **quiet)
        shutil.rmtree(data)


def trials_of(worker_group: int, study) -> list:
    """RUNNING trials whose worker process (its pid in the trial's "worker" attribute) is in this process group."""
    found = []
    for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
        try:
            if os.getpgid(int(t.user_attrs.get("worker", ":0").rsplit(":", 1)[1])) == worker_group:
                found.append(t)
        except (ProcessLookupError, ValueError):
            continue
    return found


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # optuna's word for heartbeats
def test_on_postgresql_a_worker_killed_mid_trial_has_its_trial_failed_and_run_again_by_the_other(
        tmp_path, postgres_url):
    """Two tune.py invocations against one PostgreSQL server, as two machines; one dies (SIGKILL to its whole
    process group: its worker and its runs) in the middle of a trial."""
    n_trials = 4  # both start at once on an empty database, and race to make its tables

    def machine(i, **popen):
        return subprocess.Popen([*TUNER, "--storage", postgres_url, "--study", "killed-worker", "--out",
                                 str(tmp_path / f"machine{i}"), "--n-trials", str(n_trials), "--seeds", "1",
                                 "--recheck-seeds", "0", "--pruner", "none", "--heartbeat", "2", "--", *TINY_RUN],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    survivor, doomed = machine(0), machine(1, start_new_session=True)
    deadline, killed = time.monotonic() + 120, []
    while not killed and time.monotonic() < deadline and doomed.poll() is None:
        try:  # this poll joins the race to make the tables, so it opens the storage as the workers do
            killed = trials_of(doomed.pid, optuna.load_study(study_name="killed-worker",
                                                             storage=tune.open_storage(postgres_url)))
        except KeyError:  # the study is not made yet
            pass
        time.sleep(0.2)
    assert killed, "the doomed worker never started a trial"
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed_out, _ = doomed.communicate(timeout=60)
    survivor_out, survivor_err = survivor.communicate(timeout=400)
    assert survivor.returncode == 0, survivor_err

    trials = optuna.load_study(study_name="killed-worker", storage=postgres_url).get_trials()
    states = [t.state for t in trials]
    assert [t.number for t in trials if t.state == optuna.trial.TrialState.FAIL] == [killed[0].number]
    assert states.count(optuna.trial.TrialState.COMPLETE) == n_trials == len(trials) - 1  # nothing left running
    (retried,) = [t for t in trials if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) ==
                  killed[0].number]
    assert retried.state == optuna.trial.TrialState.COMPLETE and retried.params == killed[0].params
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert len({t.user_attrs["worker"] for t in trials}) == 2, "one worker took every trial"
    announced = [line.split(":")[0] for line in (survivor_out + doomed_out).splitlines() if line.startswith("trial ")]
    assert sorted(announced) == sorted(f"trial {t.number}" for t in trials if t.state.is_finished() and
                                       t.state != optuna.trial.TrialState.FAIL)  # each trained once
