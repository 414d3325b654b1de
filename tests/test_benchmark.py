"""benchmark/run.py: the statistics it reports, the files it writes, and one tiny real multi-seed run."""

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch
from script_runner import assert_signal_stops_every_run, unique_marker

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmark"))
import run as bench  # noqa: E402

RUNNER = [sys.executable, str(REPO / "benchmark" / "run.py")]


def test_mean_and_standard_error():
    mean, se = bench.mean_and_se([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0
    assert se == pytest.approx(math.sqrt(14 / 3) / 2)  # sample std (ddof=1) over sqrt(n)


def fake_result(seed, finals):
    curve = [{"step": str(1000 * (i + 1)), "eval_mean": str(v), "eval_std": "0", "episodes": "10",
              "wall_seconds": str(i)} for i, v in enumerate(finals)]
    return bench.RunResult("CartPole-v1", seed, wall_seconds=10.0 * seed, curve=curve)


def test_env_outputs_count_solved_seeds_and_keep_failures(tmp_path):
    results = [fake_result(1, [20, 480]), fake_result(2, [30, 470]), fake_result(3, [10, 500]),
               bench.RunResult("CartPole-v1", 4, 5.0, [], error="exit 1")]
    row = bench.write_env_outputs(tmp_path, "CartPole-v1", results, threshold=475)
    assert (row["seeds"], row["failed"], row["solved"], row["steps"]) == (4, 1, 2, "2000")
    assert row["mean"] == pytest.approx(1450 / 3)
    assert row["median_wall"] == pytest.approx(15.0)
    with open(tmp_path / "CartPole-v1_runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert [r["solved"] for r in runs] == ["1", "0", "1", ""] and runs[3]["error"] == "exit 1"
    with open(tmp_path / "CartPole-v1.csv") as f:
        assert len(list(csv.DictReader(f))) == 6  # two evals of each successful seed
    assert (tmp_path / "CartPole-v1.png").stat().st_size > 0
    table = bench.format_table([row])
    assert "| CartPole-v1 | 4 (1 failed) | 2000 | 483.33 ± 8.82 | 2/4 (>= 475) | 15.0 |" in table


def test_a_run_that_stopped_when_solved_counts_its_final_eval_for_the_steps_it_skipped(tmp_path):
    # stopped at 1000: the stopping eval (480), then the final eval on fresh episodes (490), which counts
    stopped = bench.RunResult("CartPole-v1", 2, 5.0, fake_result(2, [480, 490]).curve)
    for row in stopped.curve:
        row["step"] = "1000"
    grid = np.array([1000, 2000, 3000])
    assert bench.curve_on_grid(stopped.curve, grid).tolist() == [490, 490, 490]
    assert bench.curve_on_grid(fake_result(1, [20, 480]).curve, grid).tolist() == [20, 480, 480]
    assert np.isnan(bench.curve_on_grid(fake_result(1, [20]).curve, np.array([500]))).all()

    row = bench.write_env_outputs(tmp_path, "CartPole-v1", [fake_result(1, [20, 480]), stopped], threshold=475)
    assert (row["steps"], row["solved"], row["mean"]) == ("1000–2000", 2, 485)
    with open(tmp_path / "CartPole-v1_runs.csv") as f:
        assert [(r["seed"], r["steps"]) for r in csv.DictReader(f)] == [("1", "2000"), ("2", "1000")]
    assert (tmp_path / "CartPole-v1.png").stat().st_size > 0


def test_two_seed_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    command = [*RUNNER, "--env-ids", "CartPole-v1", "--seeds", "2",
               "--workers", "2", "--out", str(out), "--", "--total-timesteps", "600", "--learning-starts", "200",
               "--eval-every", "300", "--eval-episodes", "2", "--hidden-sizes", "16", "--no-cuda"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert "| CartPole-v1 | 2 | 600 |" in finished.stdout
    with open(out / "CartPole-v1.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted({(r["seed"], r["step"]) for r in rows}) == [("1", "300"), ("1", "600"), ("2", "300"), ("2", "600")]
    summary = (out / "summary.md").read_text()
    assert "command (from the repository root): `python benchmark/run.py --env-ids CartPole-v1" in summary
    assert (out / "CartPole-v1.png").exists() and (out / "logs" / "CartPole-v1_seed2.log").exists()


def test_cores_per_run_pins_each_run_to_that_many_cores_with_as_many_threads(tmp_path):
    """An Atari run with several games pinned to one core, as every run once was, would emulate them in turn."""
    cores = sorted(os.sched_getaffinity(0))
    fake = tmp_path / "fake.py"  # reports where it runs, then writes a one-row eval.csv as the scripts do
    fake.write_text("import os, sys\n"
                    "print('cores', sorted(os.sched_getaffinity(0)), 'threads', os.environ['OMP_NUM_THREADS'])\n"
                    "run_dir = os.path.join(sys.argv[sys.argv.index('--runs-dir') + 1], 'x__fake__1__1')\n"
                    "os.makedirs(run_dir)\n"
                    "open(os.path.join(run_dir, 'eval.csv'), 'w')"
                    ".write('step,eval_mean,eval_std,episodes,wall_seconds\\n10,1.0,0,1,0.5\\n')\n")
    out = tmp_path / "out"
    finished = subprocess.run([*RUNNER, "--script", str(fake), "--env-ids", "CartPole-v1", "--seeds", "2",
                               "--cores-per-run", str(len(cores)), "--out", str(out)],
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    for seed in (1, 2):
        log = (out / "logs" / f"CartPole-v1_seed{seed}.log").read_text()
        assert log == f"cores {cores} threads {len(cores)}\n"
    assert f"each run pinned to {len(cores)} core(s)" in (out / "summary.md").read_text()
    for wrong in (0, len(cores) + 1):
        refused = subprocess.run([*RUNNER, "--cores-per-run", str(wrong), "--out", str(out)],
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2
        assert f"--cores-per-run must be from 1 to the {len(cores)} cores here" in refused.stderr


def test_a_failing_run_is_reported_and_exits_nonzero(tmp_path):
    command = [*RUNNER, "--env-ids", "CartPole-v1", "--seeds", "1",
               "--out", str(tmp_path), "--", "--total-timesteps", "-5"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert finished.returncode != 0
    assert "1 run(s) failed" in finished.stderr
    assert "total-timesteps must be positive" in (tmp_path / "logs" / "CartPole-v1_seed1.log").read_text()


def test_stopping_the_runner_stops_its_runs(tmp_path):
    marker = unique_marker("orphan-check")  # appears in the child's command line, so /proc can find it
    # two seeds on one worker: the second is still queued when the signal comes, and must never start
    command = [*RUNNER, "--env-ids", "CartPole-v1", "--seeds", "2",
               "--workers", "1", "--out", str(tmp_path), "--", "--total-timesteps", "10000000",
               "--exp-name", marker, "--no-cuda"]
    runner = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    assert_signal_stops_every_run(runner, marker, "terminated 1 running run(s)")
    assert not (tmp_path / "logs" / "CartPole-v1_seed2.log").exists(), "a queued run started after the stop"


def test_a_stop_signal_taken_by_a_worker_thread_is_handled_at_once():
    """The OS may hand the runner's SIGTERM to a worker thread: Python then only flags its handler, and a main
    thread blocked in a plain future.result() ran it when that run ended (a CI run's orphan trained on for an
    hour). Waiting through result_of, the handler runs within a second."""
    class Stopped(Exception):
        pass

    def stop(signum, frame):
        raise Stopped

    never_done = Future()
    handlers = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGUSR1, stop), (signal.SIGALRM, lambda *_: None))}
    worker = threading.Timer(0.2, lambda: signal.pthread_kill(threading.get_ident(), signal.SIGUSR1))
    signal.alarm(10)  # the bound on a hang: its signal goes to the main thread, which then runs both handlers
    started = time.monotonic()
    try:
        worker.start()
        with pytest.raises(Stopped):
            bench.result_of(never_done)
        assert time.monotonic() - started < 3, "the handler waited for the main thread to wake on its own"
    finally:
        signal.alarm(0)
        worker.join()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_a_stop_signal_during_a_launch_waits_for_the_run_and_stops_it(tmp_path, monkeypatch):
    """A stop landing while a run is launched (in the thread that holds LAUNCH_LOCK, after the fork) must neither
    deadlock, as a plain Lock did, nor miss the new run, not yet in RUNNING."""
    launched = []

    def popen_then_signal(*args, **kwargs):
        launched.append(real_popen(*args, **kwargs))
        os.kill(os.getpid(), signal.SIGTERM)  # the stop arrives as the child starts
        return launched[-1]

    def deadlocked(signum, frame):
        raise TimeoutError("the stop handler deadlocked on LAUNCH_LOCK")

    real_popen = subprocess.Popen
    monkeypatch.setattr(bench.subprocess, "Popen", popen_then_signal)
    monkeypatch.setattr(bench, "STOPPED", bench.threading.Event())
    monkeypatch.setattr(bench, "RUNNING", set())
    script = tmp_path / "sleeper.py"
    script.write_text("import time\ntime.sleep(60)\n")
    handlers = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGTERM, bench.stop_runs), (signal.SIGALRM, deadlocked))}
    signal.alarm(20)  # lock waits are interruptible: a deadlock becomes this test's failure, not a hang
    try:
        with pytest.raises(SystemExit, match="terminated 1 running run"):
            bench.start_run(script, "CartPole-v1", 1, [], None, tmp_path, tmp_path)
    finally:
        signal.alarm(0)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert launched[0].wait(timeout=20) == -signal.SIGTERM
    assert bench.start_run(script, "CartPole-v1", 2, [], None, tmp_path, tmp_path) is None


def test_report_from_finished_run_directories(tmp_path):
    """Runs trained elsewhere (an Atari run resumed across sessions, say) get the same report."""
    run_dirs = []
    for seed, finals in ((3, [-21, -5]), (4, [-20, 1])):
        run_dir = tmp_path / "runs" / f"ALE-Pong-v5__dqn_atari__{seed}__1700000000"
        run_dir.mkdir(parents=True)
        (run_dir / "eval.csv").write_text("step,eval_mean,eval_std,episodes,wall_seconds\n" + "".join(
            f"{50000 * (i + 1)},{v},0,10,{3600 * (i + 1)}\n" for i, v in enumerate(finals)))
        run_dirs.append(str(run_dir))
    out = tmp_path / "report"
    bench.main(["--from-runs", *run_dirs, "--out", str(out)])
    summary = (out / "summary.md").read_text()
    assert "| ALE/Pong-v5 | 2 | 100000 | -2.00 ± 3.00 | n/a | 7200.0 |" in summary
    assert "runs read from their directories" in summary and (out / "ALE-Pong-v5.png").exists()

    with pytest.raises(SystemExit):
        bench.main(["--from-runs", str(tmp_path / "runs"), "--out", str(out)])


def test_training_curve_is_the_mean_of_the_last_games_ended_by_each_step():
    games = [(step, float(step // 10)) for step in range(10, 1510, 10)]  # 150 games, returns 1..150
    curve = bench.training_curve(games, np.array([5, 10, 20, 1000, 1500]))
    assert np.isnan(curve[0]) and curve[1:3].tolist() == [1.0, 1.5]
    assert curve[3] == pytest.approx(np.mean(np.arange(1, 101)))  # games 1..100: all so far
    assert curve[4] == pytest.approx(np.mean(np.arange(51, 151)))  # the last 100 of 150


def test_training_returns_from_tensorboard_events_beside_published_points(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run_dirs = []
    for seed, level in ((1, 10.0), (2, 20.0)):
        run_dir = tmp_path / "runs" / f"BreakoutNoFrameskip-v4__dqn_atari__{seed}__1700000000"
        run_dir.mkdir(parents=True)
        (run_dir / "eval.csv").write_text(f"step,eval_mean,eval_std,episodes,wall_seconds\n20000,{level},0,10,60\n")
        with SummaryWriter(str(run_dir)) as writer:  # a game ends every 100 steps, returns level, level + 1, ...
            for game in range(200):
                writer.add_scalar("charts/episodic_return", level + game, 100 * (game + 1))
        run_dirs.append(str(run_dir))
    out = tmp_path / "report"
    bench.main(["--from-runs", *run_dirs, "--out", str(out), "--reference", "paper, read off=10000:50,20000:90"])
    with open(out / "BreakoutNoFrameskip-v4_training.csv") as f:
        assert len(list(csv.DictReader(f))) == 400
    # at step 20,000: each seed's games 100..199, mean level + 149.5; seeds 159.5 and 169.5
    summary = (out / "summary.md").read_text()
    assert ("- BreakoutNoFrameskip-v4 training return at step 20,000 (each seed's last 100 games, mean ± SE): "
            "164.5 ± 5.0 over 2 seeds") in summary
    assert "- beside it, paper, read off: 50 at 10,000, 90 at 20,000" in summary
    assert (out / "BreakoutNoFrameskip-v4_training.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        bench.main(["--from-runs", *run_dirs, "--out", str(out), "--reference", "no points"])

    # kept as files to commit, then the report rebuilt from them alone, once the run directories are gone
    kept = tmp_path / "kept"
    bench.main(["--save-seeds", *run_dirs, "--out", str(kept)])
    training = (out / "BreakoutNoFrameskip-v4_training.csv").read_text()
    shutil.rmtree(tmp_path / "runs")
    seeds = sorted(str(path) for path in (kept / "seeds").iterdir())
    assert [Path(seed).name for seed in seeds] == [Path(run_dir).name for run_dir in run_dirs]
    bench.main(["--from-runs", *seeds, "--out", str(kept), "--reference", "paper, read off=10000:50,20000:90"])
    assert "164.5 ± 5.0 over 2 seeds" in (kept / "summary.md").read_text()
    assert (kept / "BreakoutNoFrameskip-v4_training.csv").read_text() == training
    with pytest.raises(SystemExit):  # a directory with no run in it is refused, not kept empty
        bench.main(["--save-seeds", str(tmp_path / "kept"), "--out", str(tmp_path / "nothing")])


def test_speed_comparison_end_to_end(tmp_path):
    """Both programs really run, interleaved, and the report holds their medians and ratio. The dev
    environment has SB3 installed, so it stands in for the reference environment --setup makes."""
    out = tmp_path / "speed"
    command = [sys.executable, str(REPO / "benchmark" / "speed.py"), "--learning-starts", "300", "--steps", "300",
               "--buffer-size", "2000", "--repeats", "2", "--threads", "1", "--reference-python", sys.executable,
               "--out", str(out)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert [line.split(":")[0] for line in finished.stdout.splitlines() if line.startswith("round")] == [
        "round 1/2 dqn_atari.py, clip 10", "round 1/2 sb3", "round 2/2 dqn_atari.py, clip 10", "round 2/2 sb3"]
    report = json.loads((out / "speed.json").read_text())
    assert set(report["medians"]) == {"dqn_atari.py, clip 10", "sb3"} and min(report["medians"].values()) > 0
    ratio = report["medians"]["dqn_atari.py, clip 10"] / report["medians"]["sb3"]
    assert f"| sb3 | {report['medians']['sb3']:.1f} | {ratio:.2f} |" in (out / "summary.md").read_text()


def test_compare_puts_two_programs_in_one_plot_and_table(tmp_path, capsys):
    import compare

    for name, finals in (("a", [[20, 480], [30, 500]]), ("b", [[10, 100], [40, 300]])):
        (tmp_path / name).mkdir()
        results = [fake_result(seed, curve) for seed, curve in enumerate(finals, start=1)]
        bench.write_env_outputs(tmp_path / name, "CartPole-v1", results, threshold=475)
    out = tmp_path / "both"
    compare.main(["--out", str(out), f"ours={tmp_path / 'a'}", f"theirs={tmp_path / 'b'}"])
    summary = (out / "summary.md").read_text()
    assert "| ours | 2 | 2000 | 490.00 ± 10.00 | 480.0, 500.0 |" in summary
    assert "| theirs | 2 | 2000 | 200.00 ± 100.00 | 100.0, 300.0 |" in summary
    assert (out / "CartPole-v1.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        compare.main(["--out", str(out), f"missing={tmp_path / 'nothing'}"])
    compare.main(["--out", str(out), "--seeds", "1", "--first-seed", "2", f"ours={tmp_path / 'a'}"])
    assert "| ours | 1 | 2000 | 500.00 ± nan | 500.0 |" in (out / "summary.md").read_text()
    # runs of different lengths, cut at one step: each seed's last eval at or before it counts
    compare.main(["--out", str(out), "--until-step", "1999", f"ours={tmp_path / 'a'}", f"theirs={tmp_path / 'b'}"])
    summary = (out / "summary.md").read_text()
    assert "| ours | 2 | 1000 | 25.00 ± 5.00 | 20.0, 30.0 |" in summary
    assert "| theirs | 2 | 1000 | 25.00 ± 15.00 | 10.0, 40.0 |" in summary
    # a window's mean: each seed's evals from the step on, then their mean and SE over seeds
    compare.main(["--out", str(out), "--window-from", "1000", f"ours={tmp_path / 'a'}", f"theirs={tmp_path / 'b'}"])
    summary = (out / "summary.md").read_text()
    assert "| ours | 2 | 2000 | 490.00 ± 10.00 | 480.0, 500.0 | 257.50 ± 7.50 | 250.0, 265.0 |" in summary
    assert "| theirs | 2 | 2000 | 200.00 ± 100.00 | 100.0, 300.0 | 112.50 ± 57.50 | 55.0, 170.0 |" in summary
    compare.main(["--out", str(out), "--window-from", "1000", "--until-step", "1999", f"ours={tmp_path / 'a'}"])
    assert "| ours | 2 | 1000 | 25.00 ± 5.00 | 20.0, 30.0 | 25.00 ± 5.00 | 20.0, 30.0 |" in (out / "summary.md").read_text()
    for options, message in ((["--until-step", "999"], "with an eval at or before step 999"),
                             (["--until-step", "0"], "--until-step must be at least 1"),
                             (["--window-from", "2001", "--until-step", "2000"], "must not be past --until-step"),
                             (["--window-from", "2001"], "ours: a seed has no eval from step 2001 on (seed 1); "
                                                         "give a smaller --window-from")):
        plot_before = (out / "CartPole-v1.png").read_bytes()
        with pytest.raises(SystemExit):
            compare.main(["--out", str(out), *options, f"ours={tmp_path / 'a'}"])
        assert message in capsys.readouterr().err
        assert (out / "CartPole-v1.png").read_bytes() == plot_before  # refused before the plot is redrawn
    with pytest.raises(SystemExit):
        compare.main(["--out", str(out), "--first-seed", "3", "--seeds", "1", f"ours={tmp_path / 'a'}"])
    with pytest.raises(SystemExit):
        compare.main(["--out", str(out), "--seeds", "0", f"ours={tmp_path / 'a'}"])
    assert "--seeds must be at least 1" in capsys.readouterr().err
    (tmp_path / "failed").mkdir()  # every run failed: a CSV with its header only
    bench.write_env_outputs(tmp_path / "failed", "CartPole-v1", [bench.RunResult("CartPole-v1", 1, 1.0, [], "exit 1")],
                            threshold=475)
    with pytest.raises(SystemExit):
        compare.main(["--out", str(out), f"failed={tmp_path / 'failed'}"])


def test_speed_comparison_refuses_a_missing_reference_or_cleanrl_checkout(tmp_path, capsys):
    import speed

    checkout = tmp_path / "cleanrl-checkout"
    (checkout / "cleanrl").mkdir(parents=True)
    (checkout / "cleanrl" / "dqn_atari.py").touch()
    reference = ["--reference-python", sys.executable, "--out", str(tmp_path)]
    for argv, message in ((["--reference-python", str(tmp_path / "none"), "--out", str(tmp_path)],
                           "no reference environment at"),
                          ([*reference, "--cleanrl", str(tmp_path)],
                           "is not a CleanRL checkout (no cleanrl/dqn_atari.py)"),
                          ([*reference, "--cleanrl", str(checkout), "--cleanrl-python", str(tmp_path / "none")],
                           "no CleanRL environment at"),
                          (["--no-sb3", "--out", str(tmp_path)], "--no-sb3 leaves nothing to compare against"),
                          ([*reference, "--repeats", "0"], "--repeats, --steps, --learning-starts and --buffer-size"),
                          ([*reference, "--threads", "0"], "--threads must be from 1 to the"),
                          # a typed flag is named first, before a set-up that is missing too
                          (["--reference-python", str(tmp_path / "none"), "--out", str(tmp_path), "--repeats", "0"],
                           "--repeats, --steps, --learning-starts and --buffer-size")):
        with pytest.raises(SystemExit) as exit_info:
            speed.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    # a copy of CleanRL inside another repository must not report that repository's commit as CleanRL's
    assert speed.cleanrl_commit(checkout) == speed.cleanrl_commit(REPO / "benchmark") == "unknown (not a git checkout)"


@pytest.mark.parametrize("script, argv", [
    ("run", ["--env-ids", "CartPole-v1", "--seeds", "1"]),
    ("speed", ["--reference-python", sys.executable]),
    ("update_speed", []),
    ("tune", []),
])
def test_an_out_folder_that_cannot_be_made_is_refused_before_the_work(script, argv, capsys):
    """The folder is made first: an unwritable --out once cost a whole measurement and ended in a traceback."""
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(script).main([*argv, "--out", "/dev/null/results"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        ": error: cannot create --out /dev/null/results (Not a directory); give a folder that can be written")


@pytest.mark.parametrize("argv, message", [
    (["--env-ids", "CartPole-v1", "NoSuchEnv-v0"], ": error: unknown env id 'NoSuchEnv-v0'"),
    (["--first-seed", "-1"], "--first-seed at least 0"),  # each run would fail on its own, later
])
def test_the_runner_refuses_an_unknown_env_id_or_a_negative_seed_before_any_run(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_update_speed_times_every_variant(tmp_path):
    import update_speed

    update_speed.main(["--rounds", "1", "--updates", "1", "--compile", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "update_speed.json").read_text())
    assert set(report["medians_ms"]) == {*update_speed.VARIANTS, *update_speed.COMPILED_VARIANTS}
    assert min(report["medians_ms"].values()) > 0
    assert "| bf16 |" in (tmp_path / "summary.md").read_text()


def test_update_speed_hands_every_variant_its_batch_as_the_replay_does(monkeypatch):
    """channels_last weights get NCHW batches, as dqn_atari_parallel.py --channels-last feeds them: the reorder
    inside the convolutions is part of an update's time (a batch reordered once, untimed, made it look faster)."""
    import update_speed

    layouts = []
    monkeypatch.setattr(update_speed.dqn_atari, "td_update",
                        lambda online, target, optimizer, batch, *rest: layouts.append(
                            (batch[0].is_contiguous(), batch[3].is_contiguous())))
    for bf16, channels_last, compiled in update_speed.VARIANTS.values():
        update_speed.make_update(bf16, channels_last, compiled, torch.device("cpu"))()
    assert layouts == [(True, True)] * len(update_speed.VARIANTS)


def test_update_speed_layers_time_each_layer_and_count_the_update_s_arithmetic(tmp_path):
    import update_speed

    update_speed.main(["--rounds", "1", "--updates", "1", "--layers", "--out", str(tmp_path)])
    medians = json.loads((tmp_path / "update_speed.json").read_text())["medians_ms"]
    assert {f"{name}, {kind}" for name in update_speed.LAYERS for kind in ("float32", "bf16")} <= set(medians)
    summary = (tmp_path / "summary.md").read_text()
    # two forwards and the weights' gradient of each layer, and the input's gradient after the first: 2.18 GFLOP,
    # the update's arithmetic (2.2 GFLOP in issue 4)
    assert "| all four |" in summary and "| 2.182 |" in summary
    assert "| conv1 8x8 stride 4 |" in summary and "| 0.629 |" in summary


def test_cartpole_failures_names_how_episodes_end_and_reads_q_against_the_truth(tmp_path, capsys):
    import cartpole_failures
    import dqn  # importable: cartpole_failures puts the repository root on the path

    assert cartpole_failures.end_reason(np.array([-2.41, 0, 0.01, 0]), terminated=True) == "cart off the track"
    assert cartpole_failures.end_reason(np.array([0.3, 0, 0.22, 0]), terminated=True) == "pole down"
    assert cartpole_failures.end_reason(np.array([-2.41, 0, 0.01, 0]), terminated=False) == "time limit"
    # A policy that always pushes left: the pole falls long before the cart reaches the edge; Q is 0.7 everywhere
    q_network = dqn.QNetwork(4, 2, (8,))
    with torch.no_grad():
        q_network.network[-1].weight.zero_()
        q_network.network[-1].bias.copy_(torch.tensor([0.7, 0.0]))
    args = dqn.Args(hidden_sizes=(8,))
    model = str(tmp_path / "left.pt")
    dqn.save_model(model, q_network, args, obs_dim=4, n_actions=2)
    cartpole_failures.main([model, "--episodes", "3", "--lookahead", "5", "--out", str(tmp_path / "out")])
    row = json.loads((tmp_path / "out" / "failures.json").read_text())["models"][model]
    assert row["ends"] == {"cart off the track": 0, "pole down": 3, "time limit": 0}
    assert row["q_first_state"] == pytest.approx(0.7) and row["q_5_steps_before_failure"] == pytest.approx(0.7)
    assert row["q_ceiling"] == pytest.approx(args.reward_scale / (1 - args.gamma))
    assert row["return_5_steps_before_failure"] == pytest.approx(args.reward_scale * sum(0.99 ** k for k in range(5)))
    for bad, message in [([str(tmp_path / "missing.pt")], "no saved model at"),
                         ([model, "--seed", "-1"], "--seed at least 0"),
                         ([model, "--reward-scale", "0"], "--reward-scale positive")]:
        with pytest.raises(SystemExit) as exit_info:
            cartpole_failures.main(bad)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
