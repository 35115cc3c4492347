"""The classroom loop without hardware: record on the virtual arms (a scripted hand moves the leader), read the
dataset back, survive a kill -9, resume, replay, train on it and run the result."""

import os
import select
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


def test_a_recording_in_other_joint_units_is_refused():
    """--resume with a policy of other units (norm_mode) would mix degrees and range_m100_100 in one dataset."""
    info = {"fps": 30, "features": {}, "norm_mode": "degrees"}
    record.check_same_features("data/x", info, {}, 30, "degrees")
    with pytest.raises(ValueError, match="data/x holds joints in degrees units; this recording's are in range_m100_100"):
        record.check_same_features("data/x", info, {}, 30, "range_m100_100")
    record.check_same_features("data/x", {"fps": 30, "features": {}}, {}, 30, "range_m100_100")  # older: unsaid


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


# ----------------------------------------------------------------------------------------------------------
# Evaluation episodes (record.py --policy) and the episode sheet (data.py --show)
# ----------------------------------------------------------------------------------------------------------

EVAL = ["--port", "sim", "--task", "reach the red target", "--fps", "30", "--reset-s", "0.3"]


def scripted_policy(monkeypatch, reach):
    """record.open_policy replaced by a policy that knows the toy world: the expert's next 10 steps toward the
    target (reach), or the state held (never reaches). Returns the chunks it computed, with their states."""
    world, chunks = {}, []

    def open_cameras(*args):
        cameras = record_open_cameras(*args)
        world["scene"] = cameras["observation.images.top"].scene
        return cameras

    def compute(observation):
        joints, chunk = np.asarray(observation["observation.state"], dtype=np.float64), []
        for _ in range(10):
            joints = world["scene"].expert_action(joints) if reach else joints
            chunk.append(joints)
        chunks.append((observation["observation.state"], np.stack(chunk).astype(np.float32)))
        return {"actions": chunks[-1][1]}

    record_open_cameras = record.open_cameras
    monkeypatch.setattr(record, "open_cameras", open_cameras)
    monkeypatch.setattr(record, "open_policy", lambda args: (compute, {
        "chunk_size": 10, "cameras": ["observation.images.top"], "trained_on": {}}))
    return chunks


@pytest.mark.parametrize("reach", [True, False])
def test_without_a_terminal_the_toy_world_judges_each_evaluation_episode(monkeypatch, tmp_path, reach):
    chunks = scripted_policy(monkeypatch, reach)
    root = str(tmp_path / "eval")
    result = record.main([*EVAL, "--dataset", root, "--episodes", "2", "--episode-s", "3", "--policy", "expert"])
    assert result["episodes"] == 2 and result["successes"] == [reach, reach]
    episodes = pq.read_table(os.path.join(root, "meta", "episodes", "chunk-000", "file-000.parquet")).to_pydict()
    assert episodes["success"] == [reach, reach]  # the verdicts are kept with the episodes
    table = pq.read_table(os.path.join(root, "data", "chunk-000", "file-001.parquet")).to_pydict()
    state, action = np.array(table["observation.state"]), np.array(table["action"])
    assert np.allclose(action[0], state[0])  # before its first chunk (the warm-up's is not used) the arm holds
    if reach:  # then the policy's actions: this episode's first chunk (asked from its first state), executed from
        # its first step (each episode starts a new queue: nothing of the last one is left)
        first_chunk = [chunk for observed, chunk in chunks if np.allclose(observed, state[0])][-1]
        moved = int(np.argmax(~np.isclose(action, state[0], atol=1e-4).all(axis=1)))
        assert np.allclose(action[moved:moved + 3], first_chunk[:3], atol=1e-4)
        assert np.abs(state[-1, :3] - state[0, :3]).max() > 20  # the follower went for the target
    else:  # held (the wrist roll's rounding lets it creep a little)
        assert np.allclose(state, state[0], atol=2) and np.allclose(action, state[0], atol=2)


def test_an_evaluation_runs_at_the_policys_fps_and_a_server_is_not_started_here(monkeypatch, tmp_path):
    scripted_policy(monkeypatch, reach=True)
    open_policy = record.open_policy  # the scripted one, told it was trained at 10 fps on one task
    monkeypatch.setattr(record, "open_policy", lambda args: (open_policy(args)[0], {**open_policy(args)[1], "trained_on": {
        "fps": 10, "norm_mode": "degrees", "tasks": ["reach the red target"]}}))
    root = str(tmp_path / "eval10")
    argv = [a for a in EVAL if a not in ("--fps", "30", "--task", "reach the red target")]
    record.main([*argv, "--dataset", root, "--episodes", "1", "--episode-s", "2", "--policy", "expert"])
    ds = LeRobotDataset(root, max_cache_gb=0)
    assert ds.fps == 10 and len(ds) == 20 and ds.tasks == ["reach the red target"]
    with pytest.raises(ValueError, match="infer_async.py --serve"):
        record.main([*EVAL, "--dataset", str(tmp_path / "x"), "--policy", "expert", "--serve"])


def test_a_policy_evaluation_appends_to_a_recording_with_its_verdicts(recorded, tmp_path):
    """The tiny checkpoint, in this process through asynchronous inference, records 2 more episodes into a copy
    of the sim recording; the demonstrations have no verdict, the evaluation episodes do."""
    import shutil

    root, tiny = str(tmp_path / "ds"), os.path.join(HERE, "testdata", "smolvla_tiny")
    shutil.copytree(recorded[0], root)
    result = record.main([*EVAL, "--dataset", root, "--resume", "--episodes", "5", "--episode-s", "1", "--policy",
                          os.path.join(tiny, "checkpoint"), "--vlm", os.path.join(tiny, "vlm")])
    assert result["episodes"] == 5 and len(result["successes"]) == 2
    episodes = pq.read_table(os.path.join(root, "meta", "episodes", "chunk-000", "file-000.parquet")).to_pydict()
    assert episodes["success"] == [None, None, None, *result["successes"]]
    ds = LeRobotDataset(root, max_cache_gb=0)
    assert len(ds) == 360 + 60 and ds[400]["task"] == "reach the red target"
    assert not np.allclose(ds.action[360:420], ds.state[360:420])  # the policy's actions, not the state


def test_the_episode_sheet_shows_frames_and_joints(recorded, tmp_path):
    from PIL import Image

    root, sheet = recorded[0], str(tmp_path / "sheet.png")
    result = subprocess.run([sys.executable, "data.py", "--show", root, "--episode", "1", "--out", sheet], cwd=HERE,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"wrote {sheet}", result.stderr
    image = np.asarray(Image.open(sheet).convert("RGB"))
    assert image.shape == (round(80 * (1.8 + 5)), 80 * 14, 3)  # a strip for the one camera above the joints
    assert (np.abs(image[:140].astype(int) - (196, 186, 164)).sum(-1) < 30).mean() > 0.2  # the toy world's table
    result = subprocess.run([sys.executable, "data.py", "--show", root, "--episode", "7"], cwd=HERE,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr == "error: episodes [7] are not in the dataset (it has episodes 0..2).\n"


def test_on_a_terminal_the_keys_judge_each_evaluation_episode(tmp_path):
    """On a terminal: `y` while the policy runs ends the episode as a success; an episode that runs out asks
    `success? y/n`, here answered `n`; the summary and meta/episodes keep both verdicts."""
    import pty

    root, tiny = str(tmp_path / "eval"), os.path.join(HERE, "testdata", "smolvla_tiny")
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "record.py", *EVAL, "--dataset", root, "--episodes", "2", "--episode-s",
                                "2", "--policy", os.path.join(tiny, "checkpoint"), "--vlm", os.path.join(tiny, "vlm")],
                               cwd=HERE, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    # y once episode 1 has run a few ticks (its progress bar shows it), n when episode 2 asks
    output, answers = b"", {b"failure) [##": b"y", b"success? y/n": b"n"}
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if not select.select([leader], [], [], 1)[0]:  # (never blocks past the deadline)
            continue
        try:
            output += os.read(leader, 4096)
        except OSError:  # the command ended: its side of the terminal is closed
            break
        for prompt, key in list(answers.items()):
            if prompt in output:
                os.write(leader, answers.pop(prompt))
    if process.poll() is None:  # past the deadline: end it, and show what it printed
        process.kill()
    process.wait(timeout=30)
    os.close(leader)
    assert process.returncode == 0, output.decode(errors="replace")[-2000:]
    assert b"2 episodes in" in output and b"success: 1 of 2 (0 not judged)" in output
    episodes = pq.read_table(os.path.join(root, "meta", "episodes", "chunk-000", "file-000.parquet")).to_pydict()
    assert episodes["success"] == [True, False] and episodes["length"][0] < 60 == episodes["length"][1]
