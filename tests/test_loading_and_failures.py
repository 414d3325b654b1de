"""What a loader trusts (no file we load may run code, nor a corrupt one) and how a run fails: a full disk, two
processes at once, a diverging loss, a resume on other hardware or without the replay, a game whose lives counter
reaches 0 before it ends."""

import os
import pickle
import re
import signal
import subprocess
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import dqn
import dqn_atari as atari
from script_runner import (INTERRUPTED, assert_one_line_error, interrupted_at_import, lines_without_emulator_banners,
                           run_script)
from conftest import rewrite, small_args


# ---- no file we load runs code ----


class CreatesAFile:
    """Unpickled, this object creates `path`: a stand-in for any code a crafted file could run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory) -> dict:
    tmp_path = tmp_path_factory.mktemp("real")
    run = atari.train(small_args(tmp_path, total_timesteps=120, checkpoint_every=120, checkpoint_replay=True))
    return torch.load(os.path.join(run["run_dir"], "checkpoint.pt"), weights_only=True)


def crafted_checkpoints(real: dict, marker) -> dict:
    """Checkpoints that each carry a payload creating `marker` when unpickled, by the three ways in."""
    pickled = pickle.dumps(CreatesAFile(marker))
    in_emulator_field = {**real, "game": {**real["game"], "ale": pickled}}
    older_format = {**in_emulator_field, "format": "dqn_atari checkpoint 1"}
    as_an_object = {**real, "args": CreatesAFile(marker)}  # torch.save pickles the object itself
    return {"emulator bytes": (in_emulator_field, "the emulator state (bytes) is not one ale-py can read"),
            "older format": (older_format, "with dqn_atari.py of commit bcf01fb"),
            "object": (as_an_object, "is not a readable dqn_atari.py checkpoint (UnpicklingError)")}


def test_load_checkpoint_refuses_every_pickle_payload_without_running_it(real_checkpoint, tmp_path):
    marker = tmp_path / "ran"
    for name, (payload, message) in crafted_checkpoints(real_checkpoint, marker).items():
        path = str(tmp_path / f"{name}.pt")
        torch.save(payload, path)
        with pytest.raises(atari.ConfigError, match=re.escape(message)):
            atari.load_checkpoint(path)
        assert not marker.exists(), f"{name}: loading ran the payload"
    pickle.loads(pickle.dumps(CreatesAFile(marker)))
    assert marker.exists(), "the payload does run when unpickled: the check above can fail"


def test_every_loader_on_the_command_line_refuses_a_crafted_file_in_one_line(real_checkpoint, tmp_path):
    marker = tmp_path / "ran"
    path = str(tmp_path / "crafted.pt")
    torch.save(crafted_checkpoints(real_checkpoint, marker)["emulator bytes"][0], path)
    assert_one_line_error(run_script("dqn_atari.py", "--resume", path, cwd=tmp_path), "emulator state", "dqn_atari.py")
    # the benchmark scripts answer as argparse does: their usage line, then the error line
    for script, arguments in {"benchmark/eval_checkpoint.py": [path, "--games", "1"],
                              "benchmark/bf16_check.py": [path, "--updates", "1", "--out", str(tmp_path / "out")]}.items():
        finished = run_script(script, *arguments, cwd=tmp_path)
        assert finished.returncode != 0 and "Traceback" not in finished.stderr, finished.stderr
        assert "error:" in finished.stderr.splitlines()[-1] and "emulator state" in finished.stderr.splitlines()[-1]
    assert not marker.exists(), "a loader ran the payload"
    model = str(tmp_path / "model.pt")
    torch.save({"state_dict": CreatesAFile(marker), "env_id": "CartPole-v1"}, model)
    assert_one_line_error(run_script("dqn.py", "--eval-model", model, cwd=tmp_path), "is not a readable dqn.py model")
    assert not marker.exists(), "dqn.py ran the payload"


def test_emulator_state_is_kept_as_ale_py_bytes_and_restores_the_game(tmp_path):
    game = atari.AtariGame("BreakoutNoFrameskip-v4", seed=3)
    game.reset()
    saved = game.state()
    assert saved["ale"].dtype == torch.uint8 and saved["ale"].dim() == 1
    later = [game.step(1)[0].copy() for _ in range(20)]
    game.load_state(saved)
    assert all(np.array_equal(game.step(1)[0], frames) for frames in later)
    for unreadable in (torch.zeros(64, dtype=torch.uint8), torch.full((100,), 255, dtype=torch.uint8)):
        with pytest.raises(atari.ConfigError, match="not one ale-py can (read|restore)"):
            game.load_state({**saved, "ale": unreadable})


# ---- a corrupt file, a full disk ----


def flip_a_byte_of(path: str, tensor: torch.Tensor) -> None:
    """Flips one bit inside the stored bytes of `tensor`, as a bad disk or a torn copy would."""
    data = bytearray(open(path, "rb").read())
    at = data.find(tensor.numpy().tobytes()) + tensor.numel() * tensor.element_size() // 2
    assert at > 0, "the tensor's bytes are stored as they are"
    data[at] ^= 0x10
    open(path, "wb").write(bytes(data))


def test_a_flipped_bit_in_weights_or_replay_or_non_finite_weights_are_refused_on_load(real_checkpoint, tmp_path):
    for field, tensor in [("weights", real_checkpoint["q_network"]["network.7.weight"]),
                          ("replay frames", real_checkpoint["replay"]["frames"][:60])]:
        path = rewrite(real_checkpoint, tmp_path / f"{field}.pt")
        atari.load_checkpoint(path)
        flip_a_byte_of(path, tensor)
        with pytest.raises(atari.ConfigError, match="do not match the checksum written with them: the file is corrupt"):
            atari.load_checkpoint(path)
    nan_weights = {**real_checkpoint, "q_network": {name: torch.full_like(weight, float("nan"))
                                                    for name, weight in real_checkpoint["q_network"].items()}}
    with pytest.raises(atari.ConfigError, match="its weights are not finite"):
        atari.load_checkpoint(rewrite(nan_weights, tmp_path / "nan.pt"))
    older = str(tmp_path / "older.pt")
    torch.save({key: value for key, value in real_checkpoint.items() if key != "checksum"}, older)
    assert atari.load_checkpoint(older)["global_step"] == real_checkpoint["global_step"]  # loads, with a warning


def test_a_checkpoint_edited_by_hand_is_refused_in_one_line_naming_the_field(real_checkpoint, tmp_path):
    for field, value, message in [
            ("global_step", "120",
             "its field 'global_step' holds '120', where this version writes a value of the type int"),
            ("replay", [],
             "its field 'replay' holds [], where this version writes a value of the type dict or NoneType"),
            ("obs", real_checkpoint["obs"][:, :2], "its field 'obs' has the shape (1, 2, 84, 84), not (1, 4, 84, 84)"),
            # inside the pieces: each would have failed deep in a restore, or later in training, or not at all
            ("replay", {**real_checkpoint["replay"], "actions": real_checkpoint["replay"]["actions"][:1]},
             "its field 'replay.actions' has the shape (1,), not (600,)"),  # numpy would have broadcast it
            ("replay", {**real_checkpoint["replay"], "position": "7"},
             "its field 'replay.position' holds '7', where this version writes a value of the type int"),
            ("game", {key: value for key, value in real_checkpoint["game"].items() if key != "lives"},
             "its field 'game' lacks ['lives']"),
            ("game", {**real_checkpoint["game"], "raw": real_checkpoint["game"]["raw"].float()},
             "its field 'game.raw' holds torch.float32 values, not torch.uint8"),
            ("recent_returns", ["12"], "its field 'recent_returns.0' holds '12', where this version writes a value "
                                       "of the type float"),
            ("action_rng", {**real_checkpoint["action_rng"], "bit_generator": "MT19937"},
             "its field 'action_rng.bit_generator' holds 'MT19937', where this version writes a value of the type "
             "str ('PCG64')"),
            ("args", {**real_checkpoint["args"], "learning_starts": "20"},
             "its flag --learning-starts holds '20', which this version's flag does not take"),
            ("args", {**real_checkpoint["args"], "optimizer": "sgd"},
             "its flag --optimizer holds 'sgd', which this version's flag does not take"),
            # in range: each would have failed mid-run (an index past the ring, a negative count), or run on wrongly
            ("replay", {**real_checkpoint["replay"], "position": 10**9},
             "its field 'replay.position' holds a value outside [0, 599]"),
            ("replay", {**real_checkpoint["replay"], "actions": real_checkpoint["replay"]["actions"] + 99},
             "its field 'replay.actions' holds a value outside [0, 3]"),
            ("replay", {**real_checkpoint["replay"], "episode_steps": -3},
             "its field 'replay.episode_steps' holds a value outside [0, inf]"),
            ("global_step", -100, "its field 'global_step' holds a value outside [0, 120]")]:
        path = rewrite({**real_checkpoint, field: value}, tmp_path / f"{field}.pt")
        with pytest.raises(atari.ConfigError, match=re.escape(message)):
            atari.train(atari.Args(resume=path), ["--resume", path])


def test_saved_models_that_are_corrupt_or_not_finite_are_refused_by_every_loader(tmp_path):
    trained = run_script("dqn.py", "--total-timesteps", "600", "--learning-starts", "300", "--save-model",
                         "--runs-dir", "runs", "--no-cuda", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    (model,) = (tmp_path / "runs").glob("*/dqn.pt")
    flip_a_byte_of(str(model), torch.load(model, weights_only=True)["state_dict"]["network.2.weight"])
    assert_one_line_error(run_script("dqn.py", "--eval-model", str(model), cwd=tmp_path), "the file is corrupt")
    saved = atari.QNetwork(4)
    with torch.no_grad():
        saved.network[0].weight[0, 0, 0, 0] = float("inf")
    path = rewrite({"state_dict": saved.state_dict(), "env_id": "BreakoutNoFrameskip-v4", "n_actions": 4},
                   tmp_path / "inf.pt")
    finished = run_script("benchmark/agent_gif.py", path, "--out", str(tmp_path / "agent.gif"), cwd=tmp_path)
    assert finished.returncode != 0 and "Traceback" not in finished.stderr, finished.stderr
    assert "its weights are not finite" in finished.stderr.splitlines()[-1]


def test_a_checkpoint_write_that_fails_for_space_leaves_the_previous_checkpoint_and_no_temporary_file(
        tmp_path, monkeypatch):
    real_save, saves = torch.save, []

    def save_until_the_disk_is_full(payload, file):
        saves.append(payload["global_step"])
        if len(saves) == 2:
            file.write(b"x" * 1000)  # part of it, as a disk that fills up mid-write
            raise OSError(28, "No space left on device")
        real_save(payload, file)

    monkeypatch.setattr(atari.torch, "save", save_until_the_disk_is_full)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(atari.ConfigError, match=r"cannot write .*checkpoint.pt \(No space left on device\); the "
                                                "file there before, if any, is as it was"):
        atari.train(small_args(tmp_path, total_timesteps=300, checkpoint_every=100))
    for sig, handler in handlers.items():  # the run ended by an exception, as main() ends it, not by returning
        signal.signal(sig, handler)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert sorted(os.listdir(run_dir)) == ["checkpoint.pt", "eval.csv"] + sorted(
        name for name in os.listdir(run_dir) if name.startswith("events"))
    monkeypatch.setattr(atari.torch, "save", real_save)
    assert atari.load_checkpoint(str(run_dir / "checkpoint.pt"))["global_step"] == 100


@pytest.mark.parametrize("script", [atari, dqn])
def test_a_directory_that_cannot_be_synced_keeps_the_new_file_and_warns(script, tmp_path, monkeypatch, capsys):
    real_fsync = os.fsync

    def fsync_files_only(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(22, "Invalid argument")  # as file systems that cannot sync a directory answer
        real_fsync(fd)

    monkeypatch.setattr(script.os, "fsync", fsync_files_only)
    path = tmp_path / "model.pt"
    script.save_atomically({"weights": torch.ones(3)}, str(path))
    assert torch.load(path, weights_only=True)["weights"].tolist() == [1.0, 1.0, 1.0]
    assert os.listdir(tmp_path) == ["model.pt"]
    assert capsys.readouterr().err == (f"warning: {path} is written, but its directory could not be synced (Invalid "
                                       "argument), so a power loss could still undo the write\n")


@pytest.fixture
def own_disk(tmp_path):
    """Makes a file system of the test's own, a tmpfs of the size asked (root's mount rights needed); unmounted after."""
    mounted = []

    def mount(megabytes: int) -> Path:
        mount_point = tmp_path / f"disk{len(mounted)}"
        mount_point.mkdir()
        made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(mount_point)],
                              capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"a real full or read-only disk needs the right to mount one: {made.stderr.strip()}")
        mounted.append(mount_point)
        return mount_point

    yield mount
    for mount_point in mounted:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


def test_a_disk_that_fills_at_a_checkpoint_ends_in_one_line_and_leaves_no_temporary_file(own_disk, tmp_path):
    disk = own_disk(4)  # a checkpoint holds two networks and Adam's moments: 27 MB
    finished = run_script("dqn_atari.py", "--total-timesteps", "40", "--learning-starts", "20", "--buffer-size", "600",
                          "--eval-episodes", "1", "--checkpoint-every", "40", "--runs-dir", str(disk), "--no-cuda",
                          cwd=tmp_path)
    assert_one_line_error(finished, "checkpoint.pt (No space left on device); the file there before, if any, is as "
                                    "it was", "dqn_atari.py")
    (run_dir,) = disk.iterdir()
    assert not [name for name in os.listdir(run_dir) if name.startswith("checkpoint")]


@pytest.mark.parametrize("script", ["dqn_atari.py", "dqn_atari_parallel.py"])
def test_a_runs_dir_that_cannot_be_written_is_refused_before_the_replay_is_allocated(script, tmp_path):
    (tmp_path / "a-file").write_text("")  # a file in the way of the directory
    finished = run_script(script, "--runs-dir", str(tmp_path / "a-file" / "runs"), "--buffer-size", "1000000",
                          "--no-cuda", cwd=tmp_path)
    assert_one_line_error(finished, "(Not a directory); pass a writable --runs-dir", script)
    assert "replay:" not in finished.stdout  # its 7 GB were never taken


def test_an_empty_runs_dir_is_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    atari.check_args(atari.Args(runs_dir=""))  # as make_run_dir takes it; nothing is left behind
    assert not os.listdir(tmp_path)


def test_a_run_on_a_read_only_disk_ends_in_one_line(own_disk, tmp_path):
    disk = own_disk(64)
    first = atari.train(small_args(tmp_path, total_timesteps=30, checkpoint_every=30, runs_dir=str(disk)))
    path = os.path.join(first["run_dir"], "checkpoint.pt")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    resumed = run_script("dqn_atari.py", "--resume", path, "--total-timesteps", "40", cwd=tmp_path)
    assert_one_line_error(resumed, f"cannot write in {first['run_dir']} (Read-only file system); copy the run "
                                   "elsewhere to resume it", "dqn_atari.py")
    fresh = run_script("dqn_atari.py", "--total-timesteps", "40", "--buffer-size", "600", "--runs-dir", str(disk),
                       cwd=tmp_path)
    assert_one_line_error(fresh, "(Read-only file system); pass a writable --runs-dir", "dqn_atari.py")
    assert atari.load_checkpoint(path)["global_step"] == 30


def test_a_resume_on_a_full_disk_ends_in_one_line_and_leaves_eval_csv_as_it_was(own_disk, tmp_path):
    disk = own_disk(64)
    first = atari.train(small_args(tmp_path, total_timesteps=30, checkpoint_every=30, runs_dir=str(disk)))
    eval_csv = Path(first["run_dir"]) / "eval.csv"
    before = eval_csv.read_text()
    with open(disk / "filler", "wb", buffering=0) as filler:  # every page of the disk taken, down to the last one
        for chunk in (1 << 20, 4096):
            try:
                while True:
                    filler.write(bytes(chunk))
            except OSError:
                pass
    resumed = run_script("dqn_atari.py", "--resume", os.path.join(first["run_dir"], "checkpoint.pt"),
                         "--total-timesteps", "40", cwd=tmp_path)
    assert_one_line_error(resumed, f"cannot write in the run directory {first['run_dir']} (No space left on device)",
                          "dqn_atari.py")
    assert not (eval_csv.parent / "eval.csv.tmp").exists()
    assert eval_csv.read_text() == before


def test_a_malformed_eval_csv_row_is_refused_on_resume_in_one_line(tmp_path):
    first = atari.train(small_args(tmp_path, total_timesteps=30, checkpoint_every=30))
    with open(os.path.join(first["run_dir"], "eval.csv"), "a") as eval_csv:
        eval_csv.write("a row edited by hand\n")
    path = os.path.join(first["run_dir"], "checkpoint.pt")
    resumed = run_script("dqn_atari.py", "--resume", path, "--total-timesteps", "40", cwd=tmp_path)
    assert_one_line_error(resumed, "eval.csv has a row that does not start with a step", "dqn_atari.py")


@pytest.mark.parametrize("script", INTERRUPTED)
def test_ctrl_c_while_torch_loads_ends_in_one_line(script, tmp_path):
    finished = run_script(script, cwd=tmp_path, interpreter_args=interrupted_at_import("torch"))
    assert finished.returncode != 0 and finished.stdout == ""  # before the script printed anything
    assert finished.stderr.strip() == INTERRUPTED[script], finished.stderr


@pytest.mark.parametrize("script", ["dqn_atari.py", "dqn.py"])
def test_ctrl_c_while_the_run_is_set_up_ends_in_one_line(script, tmp_path):
    # tensorboard is imported as the run's files are made: after the replay, before the training loop
    finished = run_script(script, "--buffer-size", "1000", "--no-cuda", cwd=tmp_path,
                          interpreter_args=interrupted_at_import("torch.utils.tensorboard"))
    assert finished.returncode != 0 and "Traceback" not in finished.stderr
    assert lines_without_emulator_banners(finished.stderr) == [INTERRUPTED[script]]


# ---- several processes at once ----


def test_a_second_process_resuming_a_run_that_is_going_on_is_refused_in_one_line(tmp_path):
    first = atari.train(small_args(tmp_path, total_timesteps=30, checkpoint_every=30))
    path = os.path.join(first["run_dir"], "checkpoint.pt")
    holder = atari.RunLog(*atari.read_resume(atari.Args(resume=path), ["--resume", path]))  # this one resumed it
    second = run_script("dqn_atari.py", "--resume", path, "--total-timesteps", "40", cwd=tmp_path)
    assert_one_line_error(second, f"another process is training in {first['run_dir']}", "dqn_atari.py")
    holder.close("")
    assert run_script("dqn_atari.py", "--resume", path, "--total-timesteps", "40", cwd=tmp_path).returncode == 0


def test_runs_started_in_the_same_second_get_a_directory_each(tmp_path, monkeypatch):
    monkeypatch.setattr(atari.time, "time", lambda: 1_000_000.0)
    args = small_args(tmp_path)
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _: atari.make_run_dir(args), range(16)))
    assert len(set(made)) == 16 and all(os.path.isdir(run_dir) for run_dir in made)


# ---- a diverging run ----


def poison_weights_after(module, calls: int, monkeypatch):
    """td_update that fills the network's weights with NaN after `calls` updates, as a divergence ends."""
    real_update, count = module.td_update, [0]

    def update(q_network, *rest, **kwargs):
        count[0] += 1
        if count[0] == calls:
            with torch.no_grad():
                for parameter in q_network.parameters():
                    parameter.fill_(float("nan"))
        return real_update(q_network, *rest, **kwargs)

    monkeypatch.setattr(module, "td_update", update)


@pytest.mark.parametrize("checkpoint_every, what", [
    (100, "at step 200 the TD loss is nan and the mean Q-value nan"),  # where the loss is read, every 100 steps
    (50, "at step 150 the network's weights are not finite"),  # a checkpoint between two loss reads
])
def test_a_diverging_run_stops_and_leaves_its_last_good_checkpoint(tmp_path, monkeypatch, checkpoint_every, what):
    poison_weights_after(atari, calls=7, monkeypatch=monkeypatch)  # updates every 4 steps from 104: NaN from 128
    with pytest.raises(atari.TrainingDiverged) as failure:
        atari.train(small_args(tmp_path, total_timesteps=300, checkpoint_every=checkpoint_every))
    [run_dir] = os.listdir(tmp_path / "runs")
    checkpoint_path = str(tmp_path / "runs" / run_dir / "checkpoint.pt")
    assert str(failure.value) == (f"training diverged: {what}; the last good checkpoint, {checkpoint_path} "
                                  "(step 100), is untouched; try a smaller --learning-rate")
    kept = atari.load_checkpoint(checkpoint_path)
    assert kept["global_step"] == 100
    assert all(torch.isfinite(tensor).all() for tensor in kept["q_network"].values())


def test_a_last_update_that_goes_non_finite_is_neither_evaluated_nor_saved(tmp_path, monkeypatch):
    poison_weights_after(atari, calls=49, monkeypatch=monkeypatch)  # the last update, at step 296: no loss read after
    with pytest.raises(atari.TrainingDiverged, match="at step 298 the network's weights are not finite; no checkpoint "
                                                     "was written"):
        atari.train(small_args(tmp_path, total_timesteps=298, save_model=True))
    assert not list((tmp_path / "runs").glob("*/*.pt"))

    poison_weights_after(dqn, calls=56, monkeypatch=monkeypatch)  # the last phase's last step, at 896: no loss read
    args = dqn.Args(total_timesteps=900, learning_starts=500, train_frequency=64, gradient_steps=8, buffer_size=1000,
                    hidden_sizes=(32,), eval_every=0, progress_every=0, runs_dir=str(tmp_path / "dqn"), cuda=False,
                    save_model=True)
    with pytest.raises(dqn.TrainingDiverged, match="at step 900 the network's weights are not finite; no model"):
        dqn.train(args)
    assert not list((tmp_path / "dqn").glob("*/*.pt"))


@pytest.mark.parametrize("script", [atari, dqn], ids=["dqn_atari", "dqn"])
def test_ctrl_c_in_the_final_evaluation_keeps_the_trained_weights(tmp_path, monkeypatch, script):
    """The final evaluation plays whole games, minutes of them for a trained Atari agent: --save-model writes the
    weights before it, so a Ctrl-C there loses none of the training."""
    def interrupted(*_):
        raise KeyboardInterrupt
    monkeypatch.setattr(script.Evaluator, "__call__", interrupted)
    if script is atari:
        args = small_args(tmp_path, total_timesteps=30, save_model=True)
    else:
        args = dqn.Args(total_timesteps=600, learning_starts=500, buffer_size=1000, hidden_sizes=(32,), eval_every=0,
                        progress_every=0, runs_dir=str(tmp_path / "runs"), cuda=False, save_model=True)
    with pytest.raises(KeyboardInterrupt):
        script.train(args)
    (model,) = (tmp_path / "runs").glob("*/*.pt")
    saved = torch.load(model, weights_only=True)
    assert saved["checksum"] == script.checksum({key: value for key, value in saved.items() if key != "checksum"})


def test_a_diverging_dqn_run_stops_in_one_line_and_saves_no_model(tmp_path):
    # Adam's steps are about the learning rate in size: at 1e38 the weights overflow within a few updates
    finished = run_script("dqn.py", "--learning-rate", "1e38", "--total-timesteps", "1500", "--learning-starts", "500",
                          "--save-model", "--runs-dir", str(tmp_path / "runs"), "--no-cuda", cwd=tmp_path)
    assert_one_line_error(finished, "training diverged: at step ")
    assert "no model was saved" in finished.stderr
    assert not list((tmp_path / "runs").glob("*/*.pt"))


def test_dqn_in_process_divergence_is_caught_at_the_next_loss_read(tmp_path, monkeypatch):
    poison_weights_after(dqn, calls=8, monkeypatch=monkeypatch)  # the first train step's 8th gradient step
    args = dqn.Args(total_timesteps=1000, learning_starts=500, train_frequency=64, gradient_steps=8, buffer_size=1000,
                    hidden_sizes=(32,), eval_every=0, progress_every=0, runs_dir=str(tmp_path / "runs"), cuda=False)
    with pytest.raises(dqn.TrainingDiverged, match="at step 512 the TD loss is nan"):
        dqn.train(args)


# ---- a CPU checkpoint resumed where CUDA graphs record the optimizer step ----


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to record CUDA graphs")
def test_a_cpu_checkpoint_resumes_on_the_gpu_with_cuda_graphs(tmp_path):
    first = atari.train(small_args(tmp_path, total_timesteps=150, checkpoint_every=150, checkpoint_replay=True))
    path = os.path.join(first["run_dir"], "checkpoint.pt")
    resumed = atari.train(atari.Args(resume=path, total_timesteps=300, cuda=True),
                          ["--resume", path, "--total-timesteps", "300", "--cuda"])
    assert resumed["global_step"] == 300


# ---- a resume without the replay ----


def test_a_resumed_run_frees_the_loaded_replay_once_it_is_restored(tmp_path, monkeypatch):
    """A checkpoint's replay is as large as the run's (7 GB for 1M frames): once copied into the run's own, the
    loaded one is freed, not held beside it for the whole resumed run."""
    first = atari.train(small_args(tmp_path, total_timesteps=120, checkpoint_every=120, checkpoint_replay=True))
    path = os.path.join(first["run_dir"], "checkpoint.pt")
    loaded_frames, load = [], atari.load_checkpoint

    def load_and_watch(path):
        checkpoint = load(path)
        loaded_frames.append(weakref.ref(checkpoint["replay"]["frames"]))
        return checkpoint
    held_in_final_eval, evaluate = [], atari.Evaluator.__call__

    def final_eval(self, *args):
        held_in_final_eval.append(loaded_frames[0]() is not None)
        return evaluate(self, *args)
    monkeypatch.setattr(atari, "load_checkpoint", load_and_watch)
    monkeypatch.setattr(atari.Evaluator, "__call__", final_eval)
    atari.train(atari.Args(resume=path, total_timesteps=150), ["--resume", path, "--total-timesteps", "150"])
    assert held_in_final_eval == [False]


def test_a_resume_without_the_replay_stores_the_stacks_the_agent_saw(tmp_path):
    first = atari.train(small_args(tmp_path, total_timesteps=130, checkpoint_every=130))
    path = os.path.join(first["run_dir"], "checkpoint.pt")
    saw = atari.load_checkpoint(path)["obs"][0]
    assert len({frame.numpy().tobytes() for frame in saw}) == atari.STACK, "mid-episode: four different frames"
    resumed = atari.train(atari.Args(resume=path, total_timesteps=140), ["--resume", path, "--total-timesteps", "140"])
    replay = resumed["replay"]
    first_transition = np.flatnonzero(replay.starts_transition[:replay.size])[:1]
    stored, *_ = replay.batch(first_transition)
    assert torch.equal(stored[0], saw)


# ---- lives ----


class LivesScript:
    """A stand-in emulator: lives per frame as given, game over from `over_at` on; every frame rewards 0."""

    def __init__(self, lives_by_frame: dict, over_at: int):
        self.frame, self.lives_by_frame, self.over_at = 0, lives_by_frame, over_at

    def act(self, action):
        self.frame += 1
        return 0.0

    def lives(self):
        return [lives for frame, lives in sorted(self.lives_by_frame.items()) if frame <= self.frame][-1]

    def game_over(self, with_truncation=False):
        return self.frame >= self.over_at

    def game_truncated(self):
        return False

    def getScreenGrayscale(self, buffer):
        buffer[:] = self.frame % 256

    def reset_game(self):
        self.frame = 0


def test_a_lives_counter_that_reaches_0_before_the_game_ends_ends_one_episode_not_two():
    """As SB3's EpisodicLifeEnv: a life lost ends an episode while lives remain; reaching 0 is the game's end,
    which this game reports 8 frames later."""
    game = atari.AtariGame("BreakoutNoFrameskip-v4", seed=0, noop_max=0)
    game.ale = LivesScript({0: 2, 20: 1, 40: 0}, over_at=48)
    game.reset()
    ends = []
    while not game.game_over:
        _, _, terminated, truncated, game_over = game.step(0)
        if terminated:
            ends.append((game.ale.frame, game_over))
            if not game_over:
                game.reset()
    assert ends == [(20, False), (48, True)]
