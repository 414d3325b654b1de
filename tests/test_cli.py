"""dqn.py as users run it: bad input gets one line and a non-zero exit; a saved model evaluates again."""

import pytest

from script_runner import assert_one_line_error, run_script

TINY = ["--total-timesteps", "400", "--learning-starts", "100", "--train-frequency", "50", "--gradient-steps", "2",
        "--hidden-sizes", "16", "--eval-every", "0", "--eval-episodes", "2", "--no-cuda"]


def run_dqn(*args, cwd):
    return run_script("dqn.py", *args, cwd=cwd)


@pytest.mark.parametrize("args, fragment", [
    (["--env-id", "NoSuchEnv-v0"], "unknown env id 'NoSuchEnv-v0'"),
    (["--env-id", "Pendulum-v1"], "DQN needs Discrete"),
    (["--env-id", "ALE/Breakout-v5"], "ALE/Breakout-v5 is an Atari game: train it with dqn_atari.py"),
    (["--env-id", "Blackjack-v1"], "dqn.py takes a Discrete or a Box observation space"),
    (["--total-timesteps", "0"], "--total-timesteps must be positive, got 0"),
    (["--gamma", "1.5"], "--gamma must be in [0, 1], got 1.5"),
    (["--hidden-sizes", "0"], "--hidden-sizes must be one or more positive widths"),
    (["--reward-scale", "0"], "--reward-scale must be positive, got 0.0"),
    (["--learning-rate", "0"], "--learning-rate must be positive, got 0.0"),
    (["--learning-rate", "-1"], "--learning-rate must be positive, got -1.0"),
    (["--learning-rate", "nan"], "--learning-rate must be positive, got nan"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be >= 0, got nan"),
    (["--eval-model", "missing.pt"], "no saved model at missing.pt"),
    (["--runs-dir", "/dev/null"], "cannot create the run directory /dev/null/CartPole-v1__dqn__1__"),
    (["--seed", "-1"], "--seed must be from 0 to 4294967295, got -1"),
    (["--exp-name", "a/b"], "--exp-name names the run directory and must not contain '/', got 'a/b'"),
    (["--batch-size", "200", "--buffer-size", "100"], "--batch-size 200 is larger than the replay (--buffer-size 100)"),
])
def test_bad_input_gets_one_line_and_nonzero_exit(tmp_path, args, fragment):
    assert_one_line_error(run_dqn(*args, cwd=tmp_path), fragment)


def test_saved_model_evaluates_again_and_refuses_the_wrong_env_or_a_corrupt_file(tmp_path):
    trained = run_dqn(*TINY, "--save-model", "--runs-dir", "runs", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "final eval over 2 episodes" in trained.stdout
    (model,) = (tmp_path / "runs").glob("*/dqn.pt")
    assert not list(tmp_path.glob("runs/*/*.tmp")), "the atomic write left its temporary file behind"

    again = run_dqn("--eval-model", str(model), "--eval-episodes", "3", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "on CartPole-v1:" in again.stdout and "over 3 episodes" in again.stdout

    mismatch = run_dqn("--eval-model", str(model), "--env-id", "Acrobot-v1", cwd=tmp_path)
    assert_one_line_error(mismatch, "was trained on CartPole-v1 (obs 4, actions 2); this env has obs 6, actions 3: "
                                    "pass --env-id CartPole-v1")

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(model.read_bytes()[:100])
    refused = run_dqn("--eval-model", str(corrupt), cwd=tmp_path)
    assert_one_line_error(refused, "is not a readable dqn.py model")
    assert "give a file that dqn.py --save-model wrote" in refused.stderr
    assert model.stat().st_size > 100, "evaluating must never touch the saved file"


def test_progress_line_reports_step_sps_epsilon_return_and_eta(tmp_path):
    finished = run_dqn(*TINY, "--progress-every", "200", "--runs-dir", "runs", cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    progress = [line for line in finished.stdout.splitlines() if line.startswith("step")]
    assert len(progress) == 2
    for field in ("step       200/400", "SPS", "eps", "return(100)", "eval", "ETA"):
        assert field in progress[0]
