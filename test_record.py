"""The classroom loop without hardware: record on the virtual arms (a scripted hand moves the leader), read the
dataset back, survive a kill -9, resume, replay, train on it and run the result."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

import record
from data import LeRobotDataset

HERE = os.path.dirname(os.path.abspath(__file__))
SIM = ["--port", "sim", "--leader-port", "sim", "--task", "reach the red target", "--fps", "30", "--reset-s", "0.3"]


def run_record(*args, timeout=120):
    return subprocess.run([sys.executable, "record.py", *SIM, *args], cwd=HERE, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """3 episodes x 4 s at 30 fps on the virtual arms."""
    root = str(tmp_path_factory.mktemp("rec") / "ds")
    result = record.main([*SIM, "--dataset", root, "--episodes", "3", "--episode-s", "4"])
    assert result["episodes"] == 3 and result["ticks"] == 360
    return root, result


def test_a_sim_recording_reads_back_with_the_leader_as_action_and_the_follower_as_state(recorded):
    root, _ = recorded
    ds = LeRobotDataset(root, chunk_size=1, max_cache_gb=0)
    assert len(ds) == 360 and ds.fps == 30 and ds.tasks == ["reach the red target"]
    assert ds.camera_keys == ["observation.images.top"]
    for name in ("observation.state", "action", "observation.images.top"):
        assert {"mean", "std", "min", "max", "count"} <= set(ds.stats[name])
    table = pq.read_table(os.path.join(root, "data", "chunk-000", "file-001.parquet")).to_pydict()
    state, action = np.array(table["observation.state"]), np.array(table["action"])
    assert np.allclose(table["timestamp"], np.arange(120) / 30)  # on the fps grid
    assert np.ptp(action[:, :3], axis=0).max() > 20  # the hand reached for the target: the leader moved
    lag = [np.abs(state[k:, :3] - action[: len(action) - k, :3]).mean() for k in range(6)]
    assert 1 <= int(np.argmin(lag)) <= 3 and min(lag) < 0.5  # the follower tracks the leader a tick or so behind
    item = ds[130]
    assert int(item["episode_index"]) == 1 and item["observation.images.top"].shape == (3, 64, 64)


def test_kill_9_during_an_episode_leaves_the_others_and_resume_completes(recorded, tmp_path):
    import shutil

    root = str(tmp_path / "ds")
    shutil.copytree(recorded[0], root)
    process = subprocess.Popen([sys.executable, "record.py", *SIM, "--dataset", root, "--resume", "--episodes", "4",
                                "--episode-s", "30"], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    time.sleep(8)  # well into the 4th episode
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(LeRobotDataset(root, max_cache_gb=0).episodes) == 3
    result = run_record("--dataset", root, "--resume", "--episodes", "4", "--episode-s", "1")
    assert result.returncode == 0, result.stderr
    ds = LeRobotDataset(root, max_cache_gb=0)
    assert len(ds) == 390 and len(ds.episodes) == 4 and int(ds[389]["frame_index"]) == 29


def test_bad_input_gets_one_message_before_anything_is_recorded(recorded, tmp_path):
    root = recorded[0]
    with pytest.raises(FileExistsError, match=f"{root} is not empty: pass --resume"):
        record.main([*SIM, "--dataset", root, "--episodes", "4", "--episode-s", "1"])
    with pytest.raises(ValueError) as error:
        record.main([*SIM, "--dataset", root, "--resume", "--episodes", "4", "--cameras", "top=sim,wrist=sim"])
    assert str(error.value) == (
        f"{root} holds a recording at 30 fps of ['action', 'episode_index', 'frame_index', 'index', "
        "'observation.images.top', 'observation.state', 'task_index', 'timestamp']; this one is at 30 fps and "
        "differs in ['observation.images.wrist']: record into another --dataset directory")
    assert len(LeRobotDataset(root, max_cache_gb=0).episodes) == 3
    result = run_record("--dataset", str(tmp_path / "new"), "--port", "/dev/null", "--episode-s", "1")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ") and not os.path.exists(tmp_path / "new")


def test_replay_drives_the_follower_with_the_recorded_actions(recorded):
    root, _ = recorded
    actions = record.main(["--port", "sim", "--replay", root, "--episode", "2"])
    table = pq.read_table(os.path.join(root, "data", "chunk-000", "file-002.parquet")).to_pydict()
    assert np.array_equal(actions, np.array(table["action"], dtype=np.float32))


def test_the_classroom_loop_record_train_run(recorded, tmp_path):
    """record.py -> train.py --repo -> infer_async.py --port sim: the tiny checkpoint fine-tuned 2 steps on the
    recording (its wrist camera is not in the dataset: trained and run on the top one) drives the virtual arm."""
    root, tiny = recorded[0], os.path.join(HERE, "testdata", "smolvla_tiny")
    train = subprocess.run([sys.executable, "train.py", "--repo", root, "--policy", os.path.join(tiny, "checkpoint"),
                            "--vlm", os.path.join(tiny, "vlm"), "--steps", "2", "--batch-size", "2", "--device", "cpu",
                            "--num-workers", "0", "--output", str(tmp_path / "run")],
                           cwd=HERE, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    checkpoint = str(tmp_path / "run" / "checkpoints" / "last" / "pretrained_model")
    run = subprocess.run([sys.executable, "infer_async.py", "--port", "sim", "--policy", checkpoint, "--task",
                          "reach the red target", "--duration", "1"], cwd=HERE, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ticks 30," in run.stdout and "failures 0" in run.stdout
