"""--track: each script logs to Weights & Biases as CleanRL's do, checked with the real package in offline mode (the
run it leaves on disk is read back record by record); a resumed Atari run goes on in the same W&B run."""

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from script_runner import REPO, as_if_not_installed, assert_one_line_error, run_script

pytest.importorskip("wandb", reason="--track's tests need wandb (requirements-dev.txt installs it)")
from wandb.proto import wandb_internal_pb2  # noqa: E402

CARTPOLE = ["--total-timesteps", "300", "--learning-starts", "100", "--hidden-sizes", "16", "--eval-every", "0",
            "--eval-episodes", "2", "--no-cuda", "--runs-dir", "runs"]
ATARI = ["--total-timesteps", "400", "--learning-starts", "100", "--buffer-size", "1000", "--eval-every", "0",
         "--eval-episodes", "1", "--no-cuda", "--runs-dir", "runs"]
LOG_BLOCK = 32 * 1024  # a .wandb file is a LevelDB-style log: 32 KiB blocks of records, each with a 7-byte header


def offline_env(tmp_path: Path) -> dict:
    """W&B kept on this machine, in tmp_path/wandb, with no account: what a user gets with WANDB_MODE=offline."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
               WANDB_SILENT="true", HOME=str(tmp_path))
    return env


def log_records(path: Path) -> list:
    """The protobuf records of a .wandb file, each reassembled from its pieces across blocks."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, piece, position = [], b"", 7  # the file's own header: ':W&B', a magic number, a version
    while position + 7 <= len(data):
        if LOG_BLOCK - position % LOG_BLOCK < 7:  # a block's tail too short for a header is padding
            position += LOG_BLOCK - position % LOG_BLOCK
            continue
        length, kind = struct.unpack_from("<HB", data, position + 4)
        piece += data[position + 7: position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(piece)
            records.append(record)
            piece = b""
    return records


def offline_runs(tmp_path: Path) -> list:
    """Each offline run under tmp_path/wandb, oldest first: its id, its name, its config, its logged keys."""
    runs = []
    for run_file in sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb")):
        run = {"id": None, "name": None, "config": {}, "logged": set(), "files": run_file.parent / "files"}
        for record in log_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"], run["name"] = record.run.run_id, record.run.display_name
                run["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "config":
                run["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
            elif kind == "history":
                run["logged"].update(item.key or "/".join(item.nested_key) for item in record.history.item)
        runs.append(run)
    return runs


def test_dqn_track_leaves_an_offline_run_with_the_flags_the_scalars_and_the_code(tmp_path):
    # W&B saves the code of a script under the directory it runs in, as `python dqn.py` from a clone does
    shutil.copy(REPO / "dqn.py", tmp_path)
    finished = run_script(str(tmp_path / "dqn.py"), *CARTPOLE, "--track", "--wandb-project-name", "tests", cwd=tmp_path,
                          env=offline_env(tmp_path))
    assert finished.returncode == 0, finished.stderr
    (run,) = offline_runs(tmp_path)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run["name"] == run_dir.name  # the tensorboard run directory's name, as CleanRL's run_name
    assert run["config"]["env_id"] == "CartPole-v1" and run["config"]["total_timesteps"] == 300
    assert run["config"]["track"] is True and run["config"]["hidden_sizes"] == [16]
    assert {"charts/episodic_return", "eval/episodic_return", "global_step"} <= run["logged"]
    assert (run["files"] / "code" / "dqn.py").read_text() == (REPO / "dqn.py").read_text()


@pytest.mark.parametrize("script", ["dqn_atari.py", "dqn_atari_profiled.py"])
def test_atari_track_logs_the_eval_gif_and_a_resume_goes_on_in_the_same_run(tmp_path, script):
    env = offline_env(tmp_path)
    first = run_script(script, *ATARI, "--track", "--capture-video", "--checkpoint-every", "200", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    checkpoint = run_dir / "checkpoint.pt"
    run_id = torch.load(checkpoint, map_location="cpu", weights_only=True)["wandb_run_id"]
    resumed = run_script(script, "--resume", str(checkpoint), "--total-timesteps", "600", cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout

    started, went_on = offline_runs(tmp_path)
    assert started["id"] == went_on["id"] == run_id and started["name"] == went_on["name"] == run_dir.name
    assert started["config"]["env_id"] == "BreakoutNoFrameskip-v4" and started["config"]["total_timesteps"] == 400
    assert went_on["config"]["total_timesteps"] == 600  # the resume's longer run, the rest as the checkpoint's
    assert went_on["config"]["buffer_size"] == 1000 and went_on["config"]["track"] is True
    assert {"charts/episodic_return", "eval/episodic_return", "videos/eval/_type"} <= started["logged"]
    assert list((started["files"] / "media").rglob("*.gif")), "the evaluation GIF was not logged"


@pytest.mark.parametrize("script, short_run", [("dqn.py", CARTPOLE), ("dqn_atari.py", ATARI),
                                               ("dqn_atari_profiled.py", ATARI)])
def test_track_without_wandb_or_without_an_account_stops_at_once_in_one_line(tmp_path, script, short_run):
    finished = run_script(script, *short_run, "--track", cwd=tmp_path, env=offline_env(tmp_path),
                          interpreter_args=as_if_not_installed("wandb"))
    assert_one_line_error(finished, "--track logs to Weights & Biases, which is not installed: pip install wandb",
                          script)
    assert not (tmp_path / "runs").exists()  # nothing started

    online_without_account = {**offline_env(tmp_path), "WANDB_MODE": "online"}
    finished = run_script(script, *short_run, "--track", cwd=tmp_path, env=online_without_account)
    assert_one_line_error(finished, "--track could not start a Weights & Biases run (No API key configured", script)
