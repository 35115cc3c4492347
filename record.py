"""Recording, the first step of the classroom loop: record demonstrations, train on them, run the result.

SmolVLA learns from demonstrations (paper §4): a person moves a leader arm, the follower copies it, cameras
film it, and every control tick's joint state, commanded action and task sentence are kept. Here (the devices,
arms and cameras, real or virtual, are opened by so100.py's `open_arm` and `open_cameras`): the writer
(`write_lerobot_dataset`: a LeRobot v3.0 or v2.1 dataset that lerobot and data.py read alike;
`append_episode`: one more episode, and a crash never costs the ones before it); the loop and the command
line: `python record.py --port P --leader-port P2 --dataset DIR --task "…"` records (or --teleoperate, or
--replay DIR); `--policy CKPT` instead of a leader records evaluation episodes, each judged a success or a
failure; `--port sim --leader-port sim` needs no hardware. To look at what was recorded before training on
it: `python data.py --show DIR --episode N` (data.py's `draw_episode`).
"""

import argparse
import concurrent.futures
import contextlib
import json
import os
import select
import shutil
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data import SUPPORTED_VERSIONS, LeRobotDataset, recorded_episodes
from infer_async import InferenceWorker, camera_sources, control_tick, make_async_scheduler
from infer_async import settle_run_options
from infer_async import build_parser as async_parser
from plumbing import CODECS, aggregate_stats, array_stats, encode_video, parse_mapping, video_stats
from plumbing import write_atomically, write_json
from policy_server import add_policy_arguments, open_policy
from smolvla import ACTION, IMAGE_PREFIX, STATE
from so100 import STATE_NAMES, FeetechError, open_arm, open_cameras
from toy_world import ScriptedHand

# keys without ENTER while recording: a POSIX terminal's cbreak mode (on Windows, ENTER-free keys are off)
try:
    import termios
    import tty
except ImportError:
    termios = None
    tty = None


# ----------------------------------------------------------------------------------------------------
# Writer: arrays -> a LeRobot v3.0 (or v2.1) dataset on disk
# ----------------------------------------------------------------------------------------------------

def write_lerobot_dataset(root, episodes, fps=30, robot_type="so100", codec="libsvtav1", joint_names=None,
                          version="v3.0", norm_mode=None):
    """Write episodes as a LeRobot dataset in `root` (must not exist or be empty); returns root. episodes:
    list of {"observation.state": (T,S), "action": (T,A), "task": str, "images": {"top": (T,H,W,3) uint8,
    ...}}. codec: "libsvtav1" (AV1, as on the hub) or "h264". version: "v3.0" (by `append_episode`) or
    "v2.1". norm_mode: the joints' units (so100.NORM_MODES), kept in info.json: a policy trained on it
    remembers them."""
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r} is not one of {sorted(CODECS)}.")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"version {version!r} is not one of {SUPPORTED_VERSIONS}.")
    if os.path.isdir(root) and os.listdir(root):
        raise FileExistsError(f"{root} exists and is not empty; choose a new directory for the dataset.")
    cameras = _check_episodes(episodes)
    if version == "v3.0":
        for episode in episodes:
            append_episode(root, episode, fps, codec, robot_type, joint_names, norm_mode)
        return root
    # v2.1: one parquet and one mp4 per episode; episodes, tasks and per-episode stats as JSON lines
    tasks, lengths, columns = _episode_columns(episodes, fps)
    bounds = np.r_[0, np.cumsum(lengths)]  # episode e is rows bounds[e]:bounds[e + 1]
    info = {
        "codebase_version": version,
        "robot_type": robot_type,
        "total_episodes": len(episodes),
        "total_frames": int(bounds[-1]),
        "total_tasks": len(tasks),
        "chunks_size": 1000,
        "fps": fps,
        "splits": {"train": f"0:{len(episodes)}"},
        "features": _features(episodes, cameras, fps, codec, joint_names),
        "total_chunks": 1,
        "total_videos": len(episodes) * len(cameras),
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
    }
    if norm_mode:
        info["norm_mode"] = norm_mode
    meta = {
        "episodes.jsonl": [],
        "tasks.jsonl": [{"task_index": index, "task": task} for index, task in enumerate(tasks)],
        "episodes_stats.jsonl": [],
    }
    for e, episode in enumerate(episodes):
        rows = slice(bounds[e], bounds[e + 1])
        path = os.path.join(root, info["data_path"].format(episode_chunk=0, episode_index=e))
        _write_parquet(path, _data_table(columns, rows))
        for name in cameras:
            video = info["video_path"].format(episode_chunk=0, video_key=IMAGE_PREFIX + name, episode_index=e)
            encode_video(os.path.join(root, video), [episode["images"][name]], fps, codec)
        meta["episodes.jsonl"].append({"episode_index": e, "tasks": [episode["task"]], "length": lengths[e]})
        episode_columns = {name: values[rows] for name, values in columns.items()}
        stats = _all_stats(episode_columns, [episode], cameras)
        meta["episodes_stats.jsonl"].append({"episode_index": e, "stats": stats})
    write_json(os.path.join(root, "meta", "info.json"), info)
    for name, rows in meta.items():
        Path(root, "meta", name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def append_episode(root, episode, fps=30, codec="libsvtav1", robot_type="so100", joint_names=None,
                   norm_mode=None):
    """Add one episode to the LeRobot v3.0 dataset in `root` (started if there is none); returns its index.

    The episode gets an mp4 per camera, then its parquet file (lerobot reads all of data/), then the metadata,
    each file by a rename; meta/episodes (the list readers go by) comes last but info.json: a crash at any
    moment leaves the episodes before it whole, and the next append overwrites what it left."""
    cameras = _check_episodes([episode])
    features = _features([episode], cameras, fps, codec, joint_names)
    info, rows = recorded_episodes(root)  # rows: one per episode already recorded, from meta/episodes
    if not info:
        info = _new_info_v3(fps, robot_type, features, norm_mode)
    check_same_features(root, info, features, fps, norm_mode)
    # every task so far, in order of first appearance, then this episode's (if it is new)
    earlier_tasks = [task for row in rows for task in row["tasks"]]
    tasks = list(dict.fromkeys(earlier_tasks + [episode["task"]]))
    episode_index = len(rows)
    # the dataset-wide index of this episode's first frame
    if rows:
        start = rows[-1]["dataset_to_index"]
    else:
        start = 0
    _, (length,), columns = _episode_columns([episode], fps)
    # the columns that place these rows in the whole dataset
    columns["episode_index"] = np.full(length, episode_index)
    columns["index"] = start + np.arange(length)
    columns["task_index"] = np.full(length, tasks.index(episode["task"]))
    # the episode's own files, for its data and each video: episode e is file e % chunks_size of chunk
    # e // chunks_size
    location = {"chunk_index": episode_index // info["chunks_size"],
                "file_index": episode_index % info["chunks_size"]}
    row = _episode_row(episode_index, episode["task"], length, start, location)
    for name in cameras:
        key = IMAGE_PREFIX + name
        _write_video(os.path.join(root, info["video_path"].format(video_key=key, **location)),
                     episode["images"][name], fps, codec)
        row.update(_video_columns(key, location, length, fps))
    _write_parquet(os.path.join(root, info["data_path"].format(**location)), _data_table(columns))
    # per episode, as lerobot keeps them: pooled into stats.json
    row.update(_flat_stats(_all_stats(columns, [episode], cameras)))
    if "success" in episode:  # an evaluation's verdict (a recording's rows have no verdict)
        row["success"] = episode["success"]
    rows.append(row)
    stats = _pooled_stats(rows, info["features"])
    _write_parquet(os.path.join(root, "meta", "tasks.parquet"), _tasks_table(tasks))
    write_json(os.path.join(root, "meta", "stats.json"), _stats_as_json(stats))
    episodes_path = os.path.join(root, "meta", "episodes", "chunk-000", "file-000.parquet")
    _write_parquet(episodes_path, _episodes_table(rows))
    info.update(total_episodes=len(rows), total_frames=start + length, total_tasks=len(tasks),
                total_videos=len(rows) * len(cameras), splits={"train": f"0:{len(rows)}"})
    write_json(os.path.join(root, "meta", "info.json"), info)
    return episode_index


def check_same_features(root, info, features, fps, norm_mode=None):
    """One dataset, one kind of recording: the same joints, cameras (and frame sizes), fps and joint units
    (norm_mode, where both say) throughout."""
    all_keys = set(info["features"]) | set(features)
    differ = sorted(key for key in all_keys if info["features"].get(key) != features.get(key))
    if info["fps"] != fps or differ:
        raise ValueError(f"{root} holds a recording at {info['fps']} fps of {sorted(info['features'])}; "
                         f"this one is at {fps} fps and differs in {differ}: "
                         "record into another --dataset directory")
    if norm_mode and info.get("norm_mode", norm_mode) != norm_mode:
        raise ValueError(f"{root} holds joints in {info['norm_mode']} units; "
                         f"this recording's are in {norm_mode}: record into another --dataset directory")


# -- the pieces of append_episode: a new dataset's info, an episode's row in meta/episodes, atomic files -

def _new_info_v3(fps, robot_type, features, norm_mode):
    """meta/info.json of a v3.0 dataset with no episode yet (append_episode fills in the totals)."""
    info = {
        "codebase_version": "v3.0",
        "robot_type": robot_type,
        "chunks_size": 1000,
        "fps": fps,
        "features": features,
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 200,
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
    }
    if norm_mode:
        info["norm_mode"] = norm_mode
    return info


def _episode_row(episode_index, task, length, start, location):
    """The episode's row in meta/episodes: its task, its rows start:start + length of the dataset, and
    where its data file is (chunk and file index; the metadata itself is all in chunk 0, file 0)."""
    return {
        "episode_index": episode_index,
        "tasks": [task],
        "length": length,
        "meta/episodes/chunk_index": 0,
        "meta/episodes/file_index": 0,
        "data/chunk_index": location["chunk_index"],
        "data/file_index": location["file_index"],
        "dataset_from_index": start,
        "dataset_to_index": start + length,
    }


def _video_columns(key, location, length, fps):
    """The row's columns for camera `key`: its video file, and the episode's span in it (the whole file)."""
    return {
        f"videos/{key}/chunk_index": location["chunk_index"],
        f"videos/{key}/file_index": location["file_index"],
        f"videos/{key}/from_timestamp": 0.0,
        f"videos/{key}/to_timestamp": length / fps,
    }


def _flat_stats(stats):
    """{feature: {"min": ..., ...}} -> the row's columns {"stats/<feature>/min": ..., ...}."""
    columns = {}
    for feature, feature_stats in stats.items():
        for name, value in feature_stats.items():
            columns[f"stats/{feature}/{name}"] = value
    return columns


def _pooled_stats(rows, features):
    """The whole dataset's stats: every episode's (its row's stats/ columns), pooled."""
    per_episode = []
    for row in rows:
        episode_stats = {}
        for feature in features:
            names = ("min", "max", "mean", "std", "count")
            episode_stats[feature] = {name: row[f"stats/{feature}/{name}"] for name in names}
        per_episode.append(episode_stats)
    return aggregate_stats(per_episode)


def _stats_as_json(stats):
    """meta/stats.json: every statistic as (nested) lists of numbers."""
    return {feature: {name: np.asarray(value).tolist() for name, value in feature_stats.items()}
            for feature, feature_stats in stats.items()}


def _episodes_table(rows):
    """meta/episodes as a table: a column for every key any row has (None where a row has none: the
    demonstrations have no "success" beside the evaluation episodes)."""
    columns = dict.fromkeys(name for row in rows for name in row)  # every key, in order of first appearance
    return pa.Table.from_pylist([{name: row.get(name) for name in columns} for row in rows])


def _write_parquet(path, table):
    """`table` as the parquet file `path`, by a rename: readers see the old file or the whole new one."""
    def write(temporary_path):
        pq.write_table(table, temporary_path)
    write_atomically(path, write)


def _write_video(path, frames, fps, codec):
    """The (T, H, W, 3) frames as the mp4 file `path`, by a rename, like `_write_parquet`."""
    def write(temporary_path):
        encode_video(temporary_path, [frames], fps, codec)
    write_atomically(path, write)


# -- the writer's pieces: input checks, columns and features, tables, statistics (videos: plumbing.py) -

def _check_episodes(episodes):
    """Validate the writer's input; returns the camera names and their (H, W)."""
    if not episodes:
        raise ValueError("write_lerobot_dataset needs at least one episode.")
    cameras = {name: np.asarray(image).shape[1:3] for name, image in episodes[0].get("images", {}).items()}
    for e, episode in enumerate(episodes):
        state = np.asarray(episode["observation.state"])
        action = np.asarray(episode["action"])
        if state.ndim != 2 or action.ndim != 2 or len(state) != len(action) or len(state) == 0:
            raise ValueError(f"episode {e}: observation.state (T,S) and action (T,A) must be 2-D with the "
                             f"same T >= 1, got {state.shape} and {action.shape}.")
        if not isinstance(episode.get("task"), str):
            raise ValueError(f"episode {e}: 'task' must be a string.")
        images = episode.get("images", {})
        if set(images) != set(cameras):
            raise ValueError(f"episode {e} has cameras {sorted(images)}, episode 0 has {sorted(cameras)}.")
        for name, image in images.items():
            image = np.asarray(image)
            expected_shape = (len(state),) + tuple(cameras[name]) + (3,)  # (T, H, W, 3)
            if image.dtype != np.uint8 or image.shape != expected_shape:
                raise ValueError(f"episode {e} camera {name}: expected uint8 ({len(state)}, H, W, 3) with "
                                 f"the same H, W in every episode, got {image.dtype} {image.shape}.")
            if image.shape[1] % 2 or image.shape[2] % 2:
                raise ValueError(f"camera {name}: yuv420p video needs an even height and width, got "
                                 f"{image.shape[1]}x{image.shape[2]}.")
    return cameras


def _episode_columns(episodes, fps):
    """Flat per-row columns of all episodes (global index continues across episodes)."""
    tasks = list(dict.fromkeys(episode["task"] for episode in episodes))
    lengths = [len(episode["action"]) for episode in episodes]
    frame_index = np.concatenate([np.arange(n) for n in lengths])
    states = [np.asarray(episode["observation.state"], np.float32) for episode in episodes]
    actions = [np.asarray(episode["action"], np.float32) for episode in episodes]
    task_indices = [tasks.index(episode["task"]) for episode in episodes]
    return tasks, lengths, {
        "observation.state": np.concatenate(states),
        "action": np.concatenate(actions),
        "timestamp": (frame_index / fps).astype(np.float32),
        "frame_index": frame_index,
        "episode_index": np.repeat(np.arange(len(episodes)), lengths),
        "index": np.arange(sum(lengths)),
        "task_index": np.repeat(task_indices, lengths),
    }


def _features(episodes, cameras, fps, codec, joint_names):
    features = {}
    for key in ("action", "observation.state"):
        dim = np.shape(episodes[0][key])[1]
        if joint_names is not None and len(joint_names) != dim:
            raise ValueError(f"joint_names has {len(joint_names)} names for vectors of {dim} entries.")
        # the entries' names: given, else the SO-100's for 6 entries, else joint_<j>
        names = list(joint_names or (STATE_NAMES if dim == 6 else [f"joint_{j}" for j in range(dim)]))
        features[key] = {"dtype": "float32", "shape": [dim], "names": names}
    for name, (height, width) in cameras.items():
        features[IMAGE_PREFIX + name] = {
            "dtype": "video", "shape": [int(height), int(width), 3], "names": ["height", "width", "channels"],
            "info": {"video.height": int(height), "video.width": int(width), "video.codec": CODECS[codec][1],
                     "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": fps,
                     "video.channels": 3, "has_audio": False},
        }
    for name in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        features[name] = {"dtype": "float32" if name == "timestamp" else "int64", "shape": [1], "names": None}
    return features


def _data_table(columns, rows=slice(None)):
    """The rows' columns; vectors as fixed-size lists of float32, as lerobot writes them."""
    arrays = {}
    for name, values in columns.items():
        if values.ndim == 2:  # (T, D): T lists of D entries
            flat = pa.array(values[rows].reshape(-1))
            arrays[name] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
        else:  # (T,)
            arrays[name] = pa.array(values[rows])
    return pa.table(arrays)


def _tasks_table(tasks):
    """meta/tasks.parquet with the task strings as the pandas index, the way lerobot reads them back."""
    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()),
                      "task": pa.array(tasks, pa.string())})
    columns = [{"name": name, "field_name": name, "pandas_type": kind, "numpy_type": dtype, "metadata": None}
               for name, kind, dtype in (("task_index", "int64", "int64"), ("task", "unicode", "object"))]
    pandas = {"index_columns": ["task"], "column_indexes": [], "pandas_version": "2.2.3", "columns": columns}
    return table.replace_schema_metadata({"pandas": json.dumps(pandas)})


def _all_stats(columns, episodes, cameras):
    """The stats block of `episodes` whose rows are `columns`: every feature, images per channel."""
    stats = {}
    for name, values in columns.items():
        stats[name] = array_stats(values)
    for name in cameras:
        videos = [np.asarray(episode["images"][name]) for episode in episodes]
        stats[IMAGE_PREFIX + name] = video_stats(videos)
    return stats


# Episodes made up for tests and benchmarks (the writer's input, without an arm)

def synthetic_episodes(n_episodes, length, height=96, width=128, cameras=("top", "wrist"), state_dim=6,
                       seed=0, noise=True, tasks=("Pick the red cube and place it in the box.",
                                          "Stack the red cube on the blue cube.")):
    """Episodes of random joint motion with camera-like images that follow it, for tests and benchmarks.

    Each camera sees a textured background (smooth waves plus fixed grain, a table seen by a camera) with
    sensor noise in every frame and a red square that moves with the joints. At 480x640 this encodes to
    ~25 KB per AV1 frame and decodes about as fast as real robot footage (flat colours would be far
    cheaper). noise=False leaves out grain and sensor noise (what a codec would smooth away anyway).
    `length` is an int or one int per episode.
    """
    rng = np.random.default_rng(seed)
    if np.isscalar(length):
        lengths = [length] * n_episodes
    else:
        lengths = list(length)
    rows, cols = np.mgrid[0:height, 0:width]
    backgrounds = {}
    for name in cameras:
        waves = np.zeros((height, width, 3))
        for _ in range(8):
            # periods of 40 to 400 pixels, whatever the image size
            fy, fx = rng.uniform(1 / 400, 1 / 40, 2)  # spatial frequencies, cycles per pixel
            phase = rng.uniform(0, 2 * np.pi)
            amplitude = rng.uniform(5, 25, 3)  # per colour channel
            waves += np.sin(2 * np.pi * (fy * rows + fx * cols) + phase)[..., None] * amplitude
        backgrounds[name] = 110 + waves + (rng.normal(0, 6, (height, width, 3)) if noise else 0)  # (H, W, 3)
    half_height = height // 8  # the red square's half size
    half_width = width // 8
    episodes = []
    for e, ticks in enumerate(lengths):
        # state: a random walk in degrees; action: the next state (the arm follows its commands)
        state = np.cumsum(rng.normal(0, 2.0, (ticks + 1, state_dim)), axis=0).astype(np.float32)
        images = {}
        for c, name in enumerate(cameras):
            frames = np.empty((ticks, height, width, 3), dtype=np.uint8)
            for t in range(ticks):
                frame = backgrounds[name] + (rng.normal(0, 2, (height, width, 3)) if noise else 0)
                # the square's centre follows two of the joints
                y = int(height / 2 + state[t, c % state_dim] * height / 200) % height
                x = int(width / 2 + state[t, (c + 1) % state_dim] * width / 200) % width
                top = max(0, y - half_height)
                left = max(0, x - half_width)
                frame[top:y + half_height, left:x + half_width] = (230, 40, 40)
                frames[t] = np.clip(frame, 0, 255)
            images[name] = frames
        episodes.append({"observation.state": state[:ticks], "action": state[1:],
                         "task": tasks[e % len(tasks)], "images": images})
    return episodes


# ----------------------------------------------------------------------------------------------------
# The recording loop (the leader's positions are the follower's goals, every tick is kept), the command line
# ----------------------------------------------------------------------------------------------------

KEYS = {"n": "next", "\x1b[C": "next", "r": "redo", "\x1b[D": "redo", "q": "stop", "\x1b": "stop",
        "y": "success"}  # the keys (and arrows: ESC [ C, ESC [ D) that end an episode early


def control_loop(follower, act, cameras, fps, seconds, label):
    """`seconds` of ticks at `fps`: read the follower's state and one frame per camera, send act(tick, state,
    frames), the goal, through the follower's per-step cap. Returns ({state, action, images: {camera:
    frames}}, the key that ended it early or None, late ticks: ticks ending after the next should have begun
    (the clock then restarts from now). Frames are kept as the cameras give them: no copy, no encoding in
    the loop."""
    period = 1.0 / fps
    ticks = round(seconds * fps)
    kept = {STATE: [], ACTION: [], "images": {key: [] for key in cameras}}
    late = 0  # ticks that ended after the next one should have begun
    key = None  # the key that ends the loop early
    next_tick = time.monotonic()  # when the next tick begins
    for tick in range(ticks):
        state = follower.get_state()
        frames = {name: camera.read() for name, camera in cameras.items()}
        for name, frame in frames.items():
            kept["images"][name].append(frame)
        goal = np.asarray(act(tick, state, frames), dtype=np.float32)
        follower.send_action(goal)
        kept[STATE].append(state)
        kept[ACTION].append(goal)
        if keys_without_enter() and select.select([sys.stdin], [], [], 0)[0]:  # a key (cbreak mode: no ENTER)
            pressed = os.read(sys.stdin.fileno(), 8).decode(errors="ignore")  # an arrow is 3 bytes: ESC [ C
            key = KEYS.get(pressed, KEYS.get(pressed[:1]))
        if sys.stdout.isatty():  # the status line: a bar, seconds left, late ticks, the keys
            bar = "#" * (20 * tick // ticks)
            print(f"\r{label} [{bar:20}] {(ticks - tick) / fps:5.1f} s left, {late} late ticks "
                  "(n/→ next, r/← again, q/Esc stop) ", end="", flush=True)
        if key is not None:
            break
        next_tick += period
        delay = next_tick - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            late += 1
            next_tick = time.monotonic()
    return kept, key, late


class PolicyDriver:
    """act(tick, state, frames) for control_loop evaluating a policy: its actions by asynchronous inference
    (infer_async.py's scheduler and inference thread; the policy in this process or on a --server). Each
    episode (tick 0) starts a new queue and thread: nothing of the last one is executed. Until a chunk comes,
    or when the queue runs dry, the goal stays (the arm holds still). `reached`, in the toy world (`scene`,
    the arm's true pose from `pose()`): whether the gripper touched the target."""

    def __init__(self, args, compute, chunk_size, rename, scene=None, pose=None):
        self.args = args
        self.compute = compute
        self.chunk_size = chunk_size
        self.rename = rename  # {camera key: the policy's camera key}
        self.scene = scene
        self.pose = pose
        self.worker = None  # the inference thread, one per episode

    def __call__(self, tick, state, frames):
        if tick == 0:
            self.close()
            self.scheduler = make_async_scheduler(self.args, self.chunk_size, len(state))
            self.worker = InferenceWorker(self.compute)
            self.goal = state  # until a chunk comes: hold still
            # False until the gripper touches the target; None (unknown) outside the toy world
            self.reached = False if self.scene else None

        # the arm as control_tick sees it: this tick's state, and its action kept as the goal
        def get_state():
            return state

        def send_action(action):
            self.goal = action

        def capture(_state):  # the observation sent with a request
            return self.observation(state, frames)

        def log(text):
            print("\n" + text)

        arm = SimpleNamespace(get_state=get_state, send_action=send_action)
        control_tick(arm, capture, self.worker, self.scheduler, log=log)
        if self.scene and not self.reached:
            self.reached = self.scene.success(self.pose())
        return self.goal

    def observation(self, state, frames):
        """The policy's observation: the task, the state, the frames under the policy's camera names."""
        observation = {"task": self.args.task, STATE: state}
        for key, frame in frames.items():
            observation[self.rename[key]] = frame
        return observation

    def close(self):  # (waits for a request in flight: a --server client carries one request at a time)
        if self.worker:
            self.worker.close(self.args.timeout + 1)


def keys_without_enter():
    """Whether keys are read as they are pressed: a terminal on stdin, and a system with cbreak mode."""
    return termios is not None and sys.stdin.isatty()


def verdict(key, reached):
    """An evaluation episode's verdict: y (success) or n/→ (failure) pressed while it ran, else asked now on
    the terminal (the arm holds still); without one, the toy world's `reached`, else None (unknown)."""
    if key in ("success", "next"):
        return key == "success"
    if key is None and keys_without_enter():
        print("\nsuccess? y/n ", end="", flush=True)
        while True:  # until y, n, or nothing: the terminal is gone
            answer = os.read(sys.stdin.fileno(), 8).decode(errors="ignore")[:1].lower()
            if answer in ("y", "n", ""):
                break
        return {"y": True, "n": False}.get(answer)  # ("": the terminal is gone: not judged)
    return reached


def record(args, follower, act, cameras, hand, done, driver=None, reset=None):
    """Episodes `done`..args.episodes: record one (act: the leader's pose, or a PolicyDriver: then each is
    judged), save it in the background while the scene is reset (by reset, default act), start the next only
    once it is completely written. Returns {episodes, late_ticks, ticks, successes: the verdicts}."""
    saving = None  # the write of the last episode, in the background
    episode = done  # episodes in the dataset (the next one's index)
    late_total = 0
    ticks_total = 0
    verdicts = []  # an evaluation's: True, False or None (not judged), one per episode
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as writer:  # leaving waits for the last write
        while episode < args.episodes:
            # sim: a new target
            if hand:
                hand.new_episode()
            elif driver and driver.scene:
                driver.scene.reset()
            label = f"episode {episode + 1}/{args.episodes}"
            if driver:
                label += " (y: success, n: failure)"
            kept, key, late = control_loop(follower, act, cameras, args.fps, args.episode_s, label)
            ticks_total += len(kept[ACTION])
            late_total += late
            if driver and key != "redo":
                judged = {"success": verdict(key, driver.reached)}
            else:
                judged = {}
            _print_episode_summary(episode + 1, len(kept[ACTION]), late, key, judged)
            if key != "redo":
                data = {STATE: np.stack(kept[STATE]), ACTION: np.stack(kept[ACTION]), "task": args.task,
                        "images": _stacked_images(kept["images"])}
                saving = writer.submit(append_episode, args.dataset, data | judged, args.fps,
                                       norm_mode=follower.norm_mode)
                episode += 1
                verdicts += judged.values()
            if key == "stop" or episode == args.episodes:
                break
            if hand:
                hand.go_home()
            control_loop(follower, reset or act, {}, args.fps, args.reset_s, "reset the scene")
            if saving is not None:
                saving.result()  # (raises if the episode could not be written)
    if saving is not None:
        saving.result()
    summary = (f"{episode} episodes in {args.dataset}; late ticks: {late_total} of {ticks_total} "
               f"({100 * late_total / max(ticks_total, 1):.1f}%)")
    if driver:
        summary += f"; success: {verdicts.count(True)} of {len(verdicts)} ({verdicts.count(None)} not judged)"
    print(summary)
    if args.push:
        _push_to_hub(args.dataset, args.repo_id)
    return {"episodes": episode, "late_ticks": late_total, "ticks": ticks_total, "successes": verdicts}


def _print_episode_summary(number, ticks, late, key, judged):
    """One line after episode `number`: its ticks, late ticks, and its verdict (or that it is recorded
    again)."""
    line = f"episode {number}: {ticks} ticks, {late} late"
    if key == "redo":
        line += "; recording it again"
    if judged:
        line += {True: "; success", False: "; failure"}.get(judged["success"], "; not judged")
    if sys.stdout.isatty():  # (below the status line)
        line = "\n" + line
    print(line)


def _stacked_images(kept_images):
    """{camera key: the list of its frames} -> {camera name (without the prefix): (T, H, W, 3)}."""
    return {key[len(IMAGE_PREFIX):]: np.stack(frames) for key, frames in kept_images.items()}


def _push_to_hub(dataset, repo_id):
    """Upload the dataset to repo_id on the Hugging Face hub."""
    from huggingface_hub import HfApi
    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
    # (without the lock file of the recording that is pushing it)
    api.upload_folder(folder_path=dataset, repo_id=repo_id, repo_type="dataset", ignore_patterns=[LOCK_FILE])
    # lerobot finds a hub dataset's format by its version tag
    api.create_tag(repo_id, tag="v3.0", repo_type="dataset", exist_ok=True)


def replay(args, follower):
    """Drive the follower with the recorded actions of episode --episode of the dataset --replay."""
    dataset = LeRobotDataset(args.replay, episodes=[args.episode], max_cache_gb=0)

    def recorded_action(tick, state, frames):
        return dataset.action[tick]

    control_loop(follower, recorded_action, {}, dataset.fps, len(dataset) / dataset.fps,
                 f"replaying episode {args.episode}")
    return dataset.action


# -- one writer per dataset: a lock file in its root holds the id of the process recording into it ------

LOCK_FILE = ".recording.lock"  # in the dataset's root while a recording writes to it; readers never look


@contextlib.contextmanager
def lock_dataset(root):
    """Hold the dataset in `root` for this process while the block runs: root/LOCK_FILE is created atomically
    (of two processes creating it at the same moment, exactly one succeeds) with this process's id in it,
    and removed on any exit from the block (an error, Ctrl-C, `kill`: all unwind through `finally`). A lock
    left by a process that no longer runs (killed with -9, a crash, a reboot) is stale: it is said and taken
    over. A lock held by a running process refuses, naming that process. Readers (data.py, train.py) do not
    take it, so a dataset can be looked at while it is recorded."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, LOCK_FILE)
    if not _create_lock(path):
        holder = _lock_holder(path)
        if holder is not None and _is_running(holder):
            raise ValueError(_locked_message(root, holder))
        if holder is None:
            print(f"{root}: taking over a stale lock ({LOCK_FILE} holds no process id)")
        else:
            print(f"{root}: taking over the stale lock of process {holder}, which no longer runs "
                  "(a recording that was killed or crashed; its whole episodes are kept)")
        with contextlib.suppress(FileNotFoundError):  # (gone already: another process took it over first)
            os.remove(path)
        if not _create_lock(path):  # another process took the stale lock over at the same moment
            raise ValueError(_locked_message(root, _lock_holder(path)))
    try:
        yield path
    finally:
        # removed only by the process that holds it (a child forked inside the block exits without it)
        if _lock_holder(path) == os.getpid():
            os.remove(path)


def _create_lock(path):
    """Create the lock file holding this process's id, atomically; False if it exists already."""
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as file:
        file.write(f"{os.getpid()}\n")
    return True


def _lock_holder(path):
    """The process id in a lock file; None if it holds none (its writer died between creating and writing it:
    looked at twice, a moment apart, not to catch a writer in that moment) or is gone."""
    for _ in range(2):
        try:
            text = Path(path).read_text().strip()
        except FileNotFoundError:
            return None
        if text.isdigit() and int(text) > 0:
            return int(text)
        time.sleep(0.1)
    return None


def _is_running(pid):
    """Whether a process with this id runs (signal 0 checks, sends nothing). On Windows os.kill(pid, 0) would
    end the process (TerminateProcess): there a lock is taken as held, and its message says to delete it."""
    if sys.platform == "win32":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def _locked_message(root, holder):
    message = (f"{root} is being recorded by process {holder} (its {LOCK_FILE}): one recording at a time per "
               "dataset; wait for it to end or stop it, or record into another --dataset")
    if sys.platform == "win32":  # (a dead holder cannot be told from a live one there: _is_running)
        message += f"; if process {holder} no longer runs, delete {os.path.join(root, LOCK_FILE)}"
    return message


# -- the command line -----------------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--port", required=True, help="the follower's serial port, or sim (the virtual arm)")
    add("--leader-port", help="the leader arm's serial port, or sim (a scripted hand moves it)")
    add("--cameras", help="name=/dev/video0,...; name=sim films the toy world "
                          "(default with --port sim: top=sim)")
    add("--dataset", help="the dataset directory to record into")
    add("--task", help="what the demonstrations do, in words: the policy's instruction")
    add("--episodes", type=int, default=50, help="episodes in the dataset (with --resume: in all)")
    add("--episode-s", type=float, default=20, help="seconds per episode")
    add("--reset-s", type=float, default=10, help="seconds between episodes to reset the scene")
    add("--fps", type=int, help="control ticks and dataset frames per second (default: --policy's, else 30)")
    add("--resume", action="store_true", help="add episodes to the --dataset a crash or a stop left")
    add("--repo-id", help="user/name on the Hugging Face hub, for --push")
    add("--push", action="store_true", help="upload the dataset to --repo-id at the end")
    add("--teleoperate", action="store_true", help="the follower copies the leader, nothing is saved")
    add("--replay", metavar="DIR", help="drive the follower with the actions of episode --episode of DIR")
    add("--episode", type=int, default=0, help="the episode --replay plays")
    add("--max-relative-target", type=float, default=10.0, help="largest joint step per tick (robot units)")
    add("--id", default="my_so100", help="the arms' calibration name (so100.py --id, and --leader --id)")
    add("--sim-size", default="64x64", help="HxW of the frames of the sim cameras")
    add("--rename", help="--policy: camera name=the policy's camera name, e.g. top=camera1,wrist=camera2")
    # --policy CKPT: record evaluation episodes it drives; --server HOST:PORT, ...
    add_policy_arguments(parser)
    return parser


def check_arguments(args):
    """What can be checked before a device opens, each with one clear message; True when recording."""
    recording = not (args.teleoperate or args.replay)
    if (args.fps or 1) <= 0 or args.episode_s <= 0 or args.reset_s < 0 or args.episodes < 1:
        raise ValueError("--fps, --episode-s and --episodes must be positive, --reset-s at least 0")
    if args.serve:
        raise ValueError("record.py drives an arm; a policy server is started with infer_async.py --serve")
    # something moves the follower: the recorded actions, the leader arm, or a policy
    something_moves_it = args.replay or args.leader_port or args.policy or args.server
    # a recording also needs a directory and a task (a policy may know its own)
    has_dataset_and_task = args.dataset and (args.task or args.policy or args.server)
    if not something_moves_it or (recording and not has_dataset_and_task):
        raise ValueError("the leader arm (--leader-port, or sim) or a --policy moves the follower; "
                         "recording also needs --dataset DIR and --task \"what the robot does\"")
    if args.push and not args.repo_id:
        raise ValueError("--push needs --repo-id user/name")
    # (a lock file alone is no recording: lock_dataset says whose it is)
    if recording and os.path.isdir(args.dataset):
        recorded_files = [name for name in os.listdir(args.dataset) if name != LOCK_FILE]
    else:
        recorded_files = []
    if recorded_files and not args.resume:
        raise FileExistsError(f"{args.dataset} is not empty: pass --resume to add episodes to it, or choose "
                              "another --dataset")
    return recording


def check_dataset(args, frames):
    """The dataset to add to holds the same joints, cameras, frame sizes and fps, and the disk has room for
    the episodes to record (AV1: ~25 KB per 480x640 frame, twice that to be safe, and 200 B of parquet per
    tick); returns the number of episodes already in it."""
    info, rows = recorded_episodes(args.dataset)
    if rows:  # --resume: the episodes there are read as training reads them (each file whole) before adding
        LeRobotDataset(args.dataset, max_cache_gb=0)
    if info is not None:  # the features a one-tick episode of this recording would have
        probe = {STATE: np.zeros((1, 6)), ACTION: np.zeros((1, 6)), "task": "",
                 "images": {key[len(IMAGE_PREFIX):]: frame[None] for key, frame in frames.items()}}
        features = _features([probe], _check_episodes([probe]), args.fps, "libsvtav1", None)
        check_same_features(args.dataset, info, features, args.fps, args.norm_mode or "degrees")
    raw = sum(frame.size for frame in frames.values())  # bytes per tick, uncompressed (480x640x3: 921,600)
    to_record = args.episodes - len(rows)
    needed = to_record * args.episode_s * args.fps * (5e4 / 921_600 * raw + 200)
    os.makedirs(args.dataset, exist_ok=True)  # (empty: nothing is recorded before these checks pass)
    free = shutil.disk_usage(args.dataset).free
    if free < needed:
        raise OSError(f"{to_record} episodes need about {needed / 1e9:.1f} GB; {free / 1e9:.1f} GB are free "
                      f"where {args.dataset} goes")
    return len(rows)


def with_infer_async_defaults(args):
    """An evaluation runs infer_async.py's scheduler and inference thread, which read options record.py does
    not have (--threshold, --aggregate, --rtc, ...): args with infer_async.py's defaults added for those
    (record.py's own values win where both have an option)."""
    defaults = vars(async_parser().parse_args([]))
    return argparse.Namespace(**(defaults | vars(args)))


def main(argv=None):
    args = build_parser().parse_args(argv)
    recording = check_arguments(args)
    args.norm_mode = None  # the joints' units: the policy's (settle_run_options), else degrees
    # an evaluation: a policy, not a leader, makes the episodes
    evaluating = bool(recording and (args.policy or args.server))
    if evaluating:
        args = with_infer_async_defaults(args)
    if keys_without_enter():
        terminal = termios.tcgetattr(sys.stdin)  # the terminal's settings, restored at the end
    else:
        terminal = None
    with contextlib.ExitStack() as cleanup:  # unwound in reverse: the arms' torque off, then the virtual arms
        if terminal is not None:
            tty.setcbreak(sys.stdin)  # keys without ENTER, until the end
            cleanup.callback(termios.tcsetattr, sys.stdin, termios.TCSADRAIN, terminal)
        if args.cameras:
            cameras_text = args.cameras
        elif args.port == "sim":
            cameras_text = "top=sim"
        else:
            cameras_text = ""
        camera_sources_by_name = parse_mapping(cameras_text, "--cameras")
        if evaluating:  # the policy first: its units, fps and cameras
            compute, policy_info, rename = _open_the_policy(args, cameras_text, camera_sources_by_name,
                                                            cleanup)
        args.fps = args.fps or 30
        # the follower's and the leader's alike: the leader's pose is the goal
        units = args.norm_mode or "degrees"
        follower, virtual = _open_the_follower(args, units, cleanup)
        if args.replay:
            return replay(args, follower)
        leader, leader_virtual = _open_the_leader(args, units, cleanup)
        size = [int(n) for n in args.sim_size.split("x")]  # the sim cameras' (H, W)
        hand = _open_the_scripted_hand(leader_virtual, args.fps, size, cleanup)
        teleoperate = _follow(leader)
        if not recording:
            _teleoperate_until_stopped(follower, teleoperate, args.fps)
            return None
        cameras = _open_the_cameras(camera_sources_by_name, virtual, hand, size, cleanup)
        # one recording at a time per dataset: locked before it is read (made only once the devices open)
        cleanup.enter_context(lock_dataset(args.dataset))
        done = check_dataset(args, {key: camera.read() for key, camera in cameras.items()})
        if not evaluating:
            return record(args, follower, teleoperate, cameras, hand, done)
        driver = _open_the_policy_driver(args, compute, policy_info, rename, cameras, virtual, cleanup)
        start = _warm_up(compute, driver, follower, cameras)
        if leader:
            reset = teleoperate
        else:
            reset = _hold(start)  # (without a leader: back to the start)
        return record(args, follower, driver, cameras, hand, done, driver, reset)


# -- main's steps: each opens one thing and hands its closing to `cleanup` (an ExitStack, unwound in
# reverse: the policy's driver, the cameras, the scripted hand, the leader (torque off), its virtual arm,
# the follower (torque off), its virtual arm, the policy, the terminal's settings)

def _open_the_policy(args, cameras_text, camera_sources_by_name, cleanup):
    """The policy (here or on a --server): (compute, its info, {camera key: the policy's camera key}). It
    settles --fps, --norm-mode and --task (the policy's by default), and its cameras are checked against
    --cameras and --rename before any device opens."""
    compute, info = open_policy(args)
    if hasattr(compute, "close"):
        cleanup.callback(compute.close)
    settle_run_options(args, info.get("trained_on", {}))  # (--fps: the policy's by default)
    args.fps = round(args.fps)  # (a dataset's frames per second)
    camera_sources(cameras_text, args.rename, info["cameras"])  # (checks them against the policy's)
    renames = parse_mapping(args.rename, "--rename")
    rename = {}
    for name in camera_sources_by_name:
        rename[IMAGE_PREFIX + name] = IMAGE_PREFIX + renames.get(name, name)
    return compute, info, rename


def _open_the_follower(args, units, cleanup):
    """The follower arm: (arm, its virtual arm for --port sim, else None)."""
    follower, virtual = open_arm(args.port, arm_id=args.id, max_relative_target=args.max_relative_target,
                                 verbose=False, norm_mode=units)
    if virtual:
        cleanup.callback(virtual.close)
    cleanup.callback(follower.disconnect)
    return follower, virtual


def _open_the_leader(args, units, cleanup):
    """The leader arm, if --leader-port: (arm, its virtual arm for sim, else None); else (None, None)."""
    if not args.leader_port:
        return None, None
    leader, leader_virtual = open_arm(args.leader_port, arm_id=args.id, leader=True, verbose=False,
                                      norm_mode=units)
    if leader_virtual:
        cleanup.callback(leader_virtual.close)
    if leader:
        cleanup.callback(leader.disconnect)
    return leader, leader_virtual


def _open_the_scripted_hand(leader_virtual, fps, size, cleanup):
    """A virtual leader is moved by a scripted hand (its scene is the toy world the sim cameras film); a
    real one by a person: None."""
    if not leader_virtual:
        return None
    hand = ScriptedHand(leader_virtual, fps, image_size=size)
    cleanup.callback(hand.close)
    return hand


def _open_the_cameras(camera_sources_by_name, virtual, hand, size, cleanup):
    """{camera key: camera}; a sim camera films the toy world: the scripted hand's scene, if there is one."""
    sources = {IMAGE_PREFIX + name: source for name, source in camera_sources_by_name.items()}
    if hand:
        scene = hand.scene
    else:
        scene = None
    cameras = open_cameras(sources, virtual, scene, size)
    cleanup.callback(_close_cameras, cameras)
    return cameras


def _close_cameras(cameras):
    for camera in cameras.values():
        if hasattr(camera, "close"):
            camera.close()


def _follow(leader):
    """act for control_loop: the leader's pose is the follower's goal."""
    def teleoperate(tick, state, frames):
        return leader.get_state()
    return teleoperate


def _hold(pose):
    """act for control_loop: `pose` is the goal, every tick."""
    def hold(tick, state, frames):
        return pose
    return hold


def _teleoperate_until_stopped(follower, teleoperate, fps):
    """--teleoperate: the follower copies the leader, an hour at a time, until q/Esc."""
    while True:
        _, key, _ = control_loop(follower, teleoperate, {}, fps, 3600, "teleoperating")
        if key == "stop":
            break


def _open_the_policy_driver(args, compute, policy_info, rename, cameras, virtual, cleanup):
    """The PolicyDriver of the evaluation episodes; in the toy world (a sim camera films it) it judges each
    episode by the virtual arm's true pose."""
    scene = next((camera.scene for camera in cameras.values() if hasattr(camera, "scene")), None)
    if virtual:
        pose = virtual.joint_positions_deg
    else:
        pose = None
    driver = PolicyDriver(args, compute, policy_info["chunk_size"], rename, scene, pose)
    cleanup.callback(driver.close)
    return driver


def _warm_up(compute, driver, follower, cameras):
    """One inference before the first episode: the first is slow; and a policy for another arm fails here.
    Returns the follower's state, where it started."""
    state = follower.get_state()
    frames = {key: camera.read() for key, camera in cameras.items()}
    chunk = np.asarray(compute(driver.observation(state, frames))["actions"])  # (chunk_size, joints)
    if chunk.ndim != 2 or chunk.shape[1] != len(state):
        raise ValueError(f"the policy predicts chunks of shape {chunk.shape}; "
                         f"the arm takes {len(state)} joints")
    return state


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops like Ctrl-C: torque off, saved
    try:
        main()
    except KeyboardInterrupt:
        print("\nstopped: torque off; a recording keeps every episode finished before")
    except (FileNotFoundError, FileExistsError, ValueError, OSError, RuntimeError, FeetechError) as e:
        sys.exit(f"error: {e}")
