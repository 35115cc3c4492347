"""Damaged files: one line that names the file and what is wrong, wherever a file enters.

Every command that reads files is driven as a user runs it (a subprocess, no terminal) on a copy of good
files in which one file is damaged. The table `CASES` holds one row per case:

    id           the test id, readable: <what is read>-<file>-<damage>
    source       which copy and which command (SOURCES): a checkpoint and its VLM (infer_async.py), the
                 checkpoint of a demo run (infer_async.py), a dataset (data.py --show), a calibration file
                 (so100.py read), a training run (train.py --resume), a recording (record.py --resume)
    file         the damaged file, relative to the copy
    damage       what is done to it (the functions below): truncated to half its size, JSON cut in the
                 middle, a list where an object belongs, a required key removed, deleted, a tensor of the
                 wrong shape, a video with fewer frames than the dataset says
    names        what else the error line must contain: what to do (re-download, the calibrate command,
                 --resume from another checkpoint), the tensor of the wrong shape

Each damaged case must end in a non-zero exit, no traceback, a last line of stderr that starts with "error:"
(or "<command>.py: error:"), names the damaged file (its whole path, or the directory given and the path in
it) and holds `names`; every file of the copy is exactly as it was, and no recording lock is left behind.
For each source, the undamaged copy is first run to succeed: the table proves that the damage, not the
setup, makes the command fail.

The last tests check the lock a recording takes (record.lock_dataset): a second writer is refused naming
the process that holds the lock, a stale lock of a dead process is taken over, the lock is released on any
exit, and readers (data.py) are not blocked.
"""

import collections
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "testdata", "smolvla_tiny")
DATASET = os.path.join(HERE, "testdata", "lerobot_dataset_tiny", "dataset")
DATASET_FRAMES = 63  # 23 + 9 + 31 frames (testdata/README.md), one mp4 per camera
RECORDED_FRAMES = 15  # the recording fixture: one episode of 0.5 s at 30 fps
RECORD = ["--port", "sim", "--leader-port", "sim", "--task", "t", "--fps", "30", "--episode-s", "0.5",
          "--reset-s", "0"]
LOCK_FILE = ".recording.lock"  # record.LOCK_FILE, spelled out: the tests run before record.py has it


# ----------------------------------------------------------------------------------------------------------
# Running a command and looking at what it left
# ----------------------------------------------------------------------------------------------------------

def run(argv, cache, timeout=180):
    """python <argv> in the repository, no stdin, its own frame cache."""
    env = {**os.environ, "SMOLVLA_CACHE_DIR": str(cache)}
    return subprocess.run([sys.executable, *argv], cwd=HERE, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def last_line(result):
    """The last non-empty line of stderr (where sys.exit(message) writes)."""
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    if lines:
        return lines[-1]
    return ""


def is_error_line(line):
    """The project's one-line errors: "error: ..." or "train.py: error: ..." (argparse's form)."""
    return re.match(r"^([\w.]+\.py: )?error: \S", line) is not None


def names_file(line, root, file):
    """Whether the line names root/file: its whole path, or the directory given and the path inside it."""
    return str(root / file) in line or (str(root) in line and file in line)


def snapshot(root):
    """relative path -> bytes of every regular file under root (links are not followed)."""
    files = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as file:
                    files[os.path.relpath(path, root)] = file.read()
    return files


def changed_files(before, root):
    """The files of `before` that are gone or hold other bytes now (new files are not looked at)."""
    after = snapshot(root)
    return sorted(name for name, data in before.items() if after.get(name) != data)


def output_of(result):
    return f"rc {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"


# ----------------------------------------------------------------------------------------------------------
# Damages: each takes the file's path and damages it in place
# ----------------------------------------------------------------------------------------------------------

def truncate(path):
    """Cut a file to half its size, as an interrupted copy or download leaves it."""
    with open(path, "rb") as file:
        data = file.read()
    with open(path, "wb") as file:
        file.write(data[: len(data) // 2])


def cut_json(path):
    """A JSON file cut in the middle: a syntax error."""
    truncate(path)


def json_list(path):
    """A list where the object belongs: valid JSON of the wrong type."""
    with open(path) as file:
        data = json.load(file)
    with open(path, "w") as file:
        json.dump(list(data), file)


def drop_key(key):
    """Remove a required key of a JSON object."""

    def damage(path):
        with open(path) as file:
            data = json.load(file)
        del data[key]
        with open(path, "w") as file:
            json.dump(data, file, indent=4)

    damage.__name__ = f"drop_{key}"
    return damage


def delete(path):
    os.remove(path)


def reshape_tensor(key):
    """Rewrite a safetensors file with one (R, C) tensor stored as (C, R): the same bytes, the wrong shape."""

    def damage(path):
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(path, "pt") as file:
            metadata = file.metadata()
        tensors = load_file(path)
        rows, columns = tensors[key].shape
        tensors[key] = tensors[key].reshape(columns, rows).contiguous()
        save_file(tensors, path, metadata=metadata)

    damage.__name__ = f"reshape_{key}"
    return damage


def torch_list(path):
    """A training state that torch.load reads, but a list instead of the dict of step, optimizer, ..."""
    import torch

    torch.save([1, 2, 3], path)


def short_video(frames):
    """Re-encode an mp4 with only its first `frames` frames: a valid video, shorter than the dataset says."""

    def damage(path):
        import av
        import numpy as np

        import plumbing

        with av.open(path) as container:
            stream = container.streams.video[0]
            fps = int(round(stream.average_rate))
            images = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)][:frames]
        codec = next(name for name, (encoder, _) in plumbing.CODECS.items() if encoder in av.codecs_available)
        os.remove(path)
        plumbing.encode_video(path, [np.stack(images)], fps, codec)

    damage.__name__ = f"short_video_{frames}"
    return damage


# ----------------------------------------------------------------------------------------------------------
# The sources: a good copy of the files under tmp_path, and the command that reads them
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A tiny demo run (2 steps): its checkpoints/000002 holds training_state.pt and trained_on.json."""
    root = tmp_path_factory.mktemp("demo")
    output = str(root / "run")
    result = run(["demo.py", "--steps", "2", "--batch-size", "8", "--episodes", "2", "--length", "10",
                  "--eval-episodes", "1", "--output", output], root / "cache", timeout=300)
    assert result.returncode == 0, output_of(result)
    return output


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A recording of one short episode on the virtual arms, as record.py writes it."""
    root = tmp_path_factory.mktemp("recorded")
    dataset = str(root / "dataset")
    result = run(["record.py", *RECORD, "--dataset", dataset, "--episodes", "1"], root / "cache")
    assert result.returncode == 0, output_of(result)
    return dataset


def copy_checkpoint(request, tmp_path):
    """The reference's tiny checkpoint and its VLM, run on the virtual arm for a moment."""
    root = tmp_path / "tiny"
    shutil.copytree(os.path.join(TINY, "checkpoint"), root / "checkpoint")
    shutil.copytree(os.path.join(TINY, "vlm"), root / "vlm")
    argv = ["infer_async.py", "--port", "sim", "--policy", str(root / "checkpoint"),
            "--vlm", str(root / "vlm"), "--duration", "0.2"]
    return root, argv


def copy_run_checkpoint(request, tmp_path):
    """The demo run's checkpoint (with trained_on.json and its own vlm/), run on the virtual arm."""
    root = tmp_path / "pretrained_model"
    run = request.getfixturevalue("demo_run")
    shutil.copytree(os.path.join(run, "checkpoints", "000002", "pretrained_model"), root)
    argv = ["infer_async.py", "--port", "sim", "--policy", str(root), "--duration", "0.2"]
    return root, argv


def copy_dataset(request, tmp_path):
    """The reference's tiny dataset, its first episode drawn to a PNG outside the dataset."""
    root = tmp_path / "dataset"
    shutil.copytree(DATASET, root)
    argv = ["data.py", "--show", str(root), "--out", str(tmp_path / "sheet.png")]
    return root, argv


def write_calibration(request, tmp_path):
    """The virtual arm's true calibration as a JSON file, read back by so100.py."""
    from virtual_arm import TRUE_CALIBRATION

    root = tmp_path / "calibration"
    root.mkdir()
    with open(root / "arm.json", "w") as file:
        json.dump(TRUE_CALIBRATION, file, indent=4)
    argv = ["so100.py", "--port", "sim", "--calibration", str(root / "arm.json"), "read"]
    return root, argv


def copy_run(request, tmp_path):
    """The demo run, resumed for 2 more steps."""
    root = tmp_path / "run"
    shutil.copytree(request.getfixturevalue("demo_run"), root, symlinks=True)
    argv = ["train.py", "--resume", str(root), "--steps", "4"]
    return root, argv


def copy_recording(request, tmp_path):
    """The recording, resumed to two episodes."""
    root = tmp_path / "dataset"
    shutil.copytree(request.getfixturevalue("recorded"), root)
    argv = ["record.py", *RECORD, "--dataset", str(root), "--episodes", "2", "--resume"]
    return root, argv


SOURCES = {
    "checkpoint": copy_checkpoint,
    "run-checkpoint": copy_run_checkpoint,
    "dataset": copy_dataset,
    "calibration": write_calibration,
    "training": copy_run,
    "recording": copy_recording,
}


# ----------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------

Case = collections.namedtuple("Case", "id source file damage names")

EPISODES = "meta/episodes/chunk-000/file-000.parquet"
DATA = "data/chunk-000/file-000.parquet"
TOP_VIDEO = "videos/observation.images.top/chunk-000/file-000.mp4"
STATE = "checkpoints/000002/training_state.pt"
NORMALIZER = "policy_preprocessor_step_5_normalizer_processor.safetensors"

# what the lines say to do, per kind of file
DOWNLOAD = ("download",)  # a checkpoint, a VLM, a dataset: download (or write) it again
CALIBRATE = ("so100.py", "calibrate")  # the command that makes the calibration again
RESUME = ("--resume",)  # from the last complete checkpoint

CASES = [
    # the checkpoint (infer_async.py --policy)
    Case("checkpoint-model-truncated", "checkpoint", "checkpoint/model.safetensors", truncate, DOWNLOAD),
    Case("checkpoint-model-missing", "checkpoint", "checkpoint/model.safetensors", delete, DOWNLOAD),
    Case("checkpoint-model-wrong-shape", "checkpoint", "checkpoint/model.safetensors",
         reshape_tensor("model.state_proj.weight"), DOWNLOAD + ("model.state_proj.weight", "wrong shape")),
    Case("checkpoint-config-syntax", "checkpoint", "checkpoint/config.json", cut_json, DOWNLOAD),
    Case("checkpoint-config-list", "checkpoint", "checkpoint/config.json", json_list, DOWNLOAD),
    Case("checkpoint-config-no-input-features", "checkpoint", "checkpoint/config.json",
         drop_key("input_features"), DOWNLOAD + ("input_features",)),
    Case("checkpoint-preprocessor-syntax", "checkpoint", "checkpoint/policy_preprocessor.json", cut_json,
         DOWNLOAD),
    Case("checkpoint-postprocessor-list", "checkpoint", "checkpoint/policy_postprocessor.json", json_list,
         DOWNLOAD),
    Case("checkpoint-normalizer-truncated", "checkpoint", f"checkpoint/{NORMALIZER}", truncate, DOWNLOAD),
    Case("checkpoint-trained-on-syntax", "run-checkpoint", "trained_on.json", cut_json, DOWNLOAD),
    # the VLM directory and its tokenizer (infer_async.py --vlm)
    Case("vlm-config-syntax", "checkpoint", "vlm/config.json", cut_json, DOWNLOAD),
    Case("vlm-tokenizer-truncated", "checkpoint", "vlm/tokenizer.json", truncate, DOWNLOAD),
    Case("vlm-tokenizer-missing", "checkpoint", "vlm/tokenizer.json", delete, DOWNLOAD),
    Case("vlm-tokenizer-config-list", "checkpoint", "vlm/tokenizer_config.json", json_list, DOWNLOAD),
    # the dataset (data.py --show)
    Case("dataset-info-syntax", "dataset", "meta/info.json", cut_json, DOWNLOAD),
    Case("dataset-info-list", "dataset", "meta/info.json", json_list, DOWNLOAD),
    Case("dataset-info-no-features", "dataset", "meta/info.json", drop_key("features"),
         DOWNLOAD + ("features",)),
    Case("dataset-episodes-truncated", "dataset", EPISODES, truncate, DOWNLOAD),
    Case("dataset-tasks-truncated", "dataset", "meta/tasks.parquet", truncate, DOWNLOAD),
    Case("dataset-stats-syntax", "dataset", "meta/stats.json", cut_json, DOWNLOAD),
    Case("dataset-data-truncated", "dataset", DATA, truncate, DOWNLOAD),
    Case("dataset-video-short", "dataset", TOP_VIDEO, short_video(40), DOWNLOAD),
    # the calibration file (so100.py --calibration)
    Case("calibration-syntax", "calibration", "arm.json", cut_json, CALIBRATE),
    Case("calibration-list", "calibration", "arm.json", json_list, CALIBRATE),
    Case("calibration-no-gripper", "calibration", "arm.json", drop_key("gripper"), CALIBRATE + ("gripper",)),
    Case("calibration-missing", "calibration", "arm.json", delete, CALIBRATE),
    # the training state (train.py --resume)
    Case("training-state-truncated", "training", STATE, truncate, RESUME),
    Case("training-state-list", "training", STATE, torch_list, RESUME),
    Case("training-state-missing", "training", STATE, delete, RESUME),
    # a recording being resumed (record.py --resume)
    Case("recording-info-syntax", "recording", "meta/info.json", cut_json, DOWNLOAD),
    # (the reader's standard line for a gap: "DIR is missing FILE, named by its episodes metadata")
    Case("recording-data-missing", "recording", DATA, delete, ()),
    Case("recording-video-short", "recording", TOP_VIDEO, short_video(10), DOWNLOAD),
]

# the frames a short video holds, and the frames its dataset says it has: both must be in the message
SHORT_VIDEOS = {"dataset-video-short": (40, DATASET_FRAMES), "recording-video-short": (10, RECORDED_FRAMES)}


@pytest.mark.parametrize("source", list(SOURCES))
def test_the_undamaged_copy_succeeds(source, request, tmp_path):
    root, argv = SOURCES[source](request, tmp_path)
    result = run(argv, tmp_path / "cache")
    assert result.returncode == 0, output_of(result)
    assert "Traceback" not in result.stdout + result.stderr
    assert not (root / LOCK_FILE).exists()


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_damaged_file_is_one_error_line_naming_it(case, request, tmp_path):
    root, argv = SOURCES[case.source](request, tmp_path)
    case.damage(str(root / case.file))
    before = snapshot(root)
    result = run(argv, tmp_path / "cache")
    line = last_line(result)
    assert result.returncode != 0, output_of(result)
    assert "Traceback" not in result.stdout + result.stderr, output_of(result)
    assert is_error_line(line), output_of(result)
    assert names_file(line, root, case.file), output_of(result)
    for name in case.names:
        assert name in line, output_of(result)
    if case.id in SHORT_VIDEOS:  # both counts, as numbers of their own (not digits of a path)
        holds, says = SHORT_VIDEOS[case.id]
        words = line.replace(str(tmp_path), "")
        assert re.search(rf"\b{holds}\b", words) and re.search(rf"\b{says}\b", words), output_of(result)
    assert changed_files(before, root) == []
    assert not (root / LOCK_FILE).exists()  # (a recording that ends in an error releases its lock)


# ----------------------------------------------------------------------------------------------------------
# The recording lock (record.lock_dataset)
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture
def live_process():
    """A process that lives while the test runs (its pid holds a lock)."""
    process = subprocess.Popen(["sleep", "30"])
    yield process
    process.kill()
    process.wait()


def dead_pid():
    """The pid of a process that has exited."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_held_lock_refuses_a_second_writer_naming_its_process(recorded, live_process, tmp_path):
    import record

    assert record.LOCK_FILE == LOCK_FILE
    root = tmp_path / "dataset"
    shutil.copytree(recorded, root)
    with record.lock_dataset(str(root)):
        with pytest.raises(ValueError, match=f"is being recorded by process {os.getpid()}"):
            with record.lock_dataset(str(root)):
                pass
    (root / LOCK_FILE).write_text(str(live_process.pid))
    before = snapshot(root)
    argv = ["record.py", *RECORD, "--dataset", str(root), "--episodes", "2", "--resume"]
    result = run(argv, tmp_path / "cache")
    line = last_line(result)
    assert result.returncode != 0, output_of(result)
    assert "Traceback" not in result.stdout + result.stderr, output_of(result)
    assert is_error_line(line), output_of(result)
    assert f"is being recorded by process {live_process.pid}" in line, output_of(result)
    assert changed_files(before, root) == []


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_message(recorded, tmp_path, capsys):
    import record

    root = tmp_path / "dataset"
    shutil.copytree(recorded, root)
    (root / LOCK_FILE).write_text(str(dead_pid()))
    with record.lock_dataset(str(root)):
        assert (root / LOCK_FILE).read_text().strip() == str(os.getpid())
    captured = capsys.readouterr()
    assert "stale lock" in captured.out + captured.err
    assert not (root / LOCK_FILE).exists()


def test_on_windows_a_lock_is_never_probed_with_os_kill_and_says_how_to_clear_it(tmp_path, monkeypatch):
    """os.kill(pid, 0) ends the process on Windows: there a lock counts as held, and the line says what to
    delete if its holder is gone."""
    import record

    def no_kill(pid, signal_number):
        raise AssertionError(f"os.kill({pid}, {signal_number}) called")

    monkeypatch.setattr(record.sys, "platform", "win32")
    monkeypatch.setattr(record.os, "kill", no_kill)
    root = tmp_path / "dataset"
    root.mkdir()
    holder = dead_pid()
    (root / LOCK_FILE).write_text(str(holder))
    with pytest.raises(ValueError, match=f"being recorded by process {holder}.*delete .*{LOCK_FILE}"):
        with record.lock_dataset(str(root)):
            pass
    assert (root / LOCK_FILE).read_text() == str(holder)


def test_the_lock_is_released_on_a_normal_exit_and_on_an_exception(recorded, tmp_path):
    import record

    root = tmp_path / "dataset"
    shutil.copytree(recorded, root)
    with record.lock_dataset(str(root)):
        assert (root / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert not (root / LOCK_FILE).exists()
    with pytest.raises(RuntimeError, match="inside the lock"):
        with record.lock_dataset(str(root)):
            raise RuntimeError("inside the lock")
    assert not (root / LOCK_FILE).exists()


def test_a_reader_is_not_blocked_by_a_recording_in_progress(recorded, live_process, tmp_path):
    root = tmp_path / "dataset"
    shutil.copytree(recorded, root)
    (root / LOCK_FILE).write_text(str(live_process.pid))
    result = run(["data.py", "--show", str(root), "--out", str(tmp_path / "sheet.png")], tmp_path / "cache")
    assert result.returncode == 0, output_of(result)
    assert (tmp_path / "sheet.png").is_file()
