"""Recording: cameras, and episodes written as a LeRobot dataset (the first step of the classroom loop).

The loop a classroom runs is: record demonstrations, train on them (train.py), drive the arm with the
result (infer_async.py). SmolVLA learns from such demonstrations (paper §4): someone moves the arm, the
cameras film it, and every control step's joint state, commanded action and task sentence are kept.
This file is the recording side:

- `OpenCVCamera` reads (H, W, 3) uint8 RGB frames from a USB camera or a video file; `camera_sources`
  maps `--cameras top=/dev/video0 --rename top=camera1` to the policy's camera names;
- `write_lerobot_dataset` writes episodes (arrays in memory) as a LeRobot v3.0 (or v2.1) dataset on disk:
  parquet tables of states and actions, one AV1 (or H.264) mp4 per camera, and the metadata lerobot reads
  (info.json, episodes, tasks, normalization statistics). lerobot's reader and data.py read it identically;
- `synthetic_episodes` makes episodes of random motion with camera-like images.

The tests and the offline demo build their datasets here. (A later step adds the recording command line.)
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
import termios
import threading
import time
import tty
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data import SUPPORTED_VERSIONS, aggregate_stats
from policy import ACTION, IMAGE_PREFIX, STATE, parse_mapping, read_json
from so100 import STATE_NAMES, FeetechError, SO100Follower, SO100Leader, default_calibration
from virtual_arm import ScriptedHand, VirtualArm, toy_world_cameras

# SVT-AV1 prints its configuration to stderr for every stream it opens; keep only its errors.
os.environ.setdefault("SVT_LOG", "1")


# ----------------------------------------------------------------------------------------------------
# Cameras
# ----------------------------------------------------------------------------------------------------

class OpenCVCamera:
    """A USB camera (device index) or a video file, read as (H, W, 3) uint8 RGB frames.

    A background thread takes the frames as the camera delivers them and `read()` returns the latest at once:
    a control loop never waits up to a frame period for the camera's next one."""

    def __init__(self, index_or_path, width=640, height=480, fps=None):
        import cv2

        self._cv2 = cv2
        self.source = index_or_path
        self._capture = cv2.VideoCapture(index_or_path)
        if not self._capture.isOpened():
            raise FileNotFoundError(f"cannot open camera {index_or_path!r}: check `ls /dev/video*` or the path")
        self._capture.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        self._capture.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        if fps is not None:
            self._capture.set(cv2.CAP_PROP_FPS, fps)
        self.width, self.height = width, height
        self._error, self._running = None, True
        self._latest = self._grab()
        if self._error:
            self.close()
            raise ValueError(self._error + (f": pass width={self._size[1]}, height={self._size[0]}" if self._size else ""))
        self._thread = threading.Thread(target=self._keep_grabbing, name=f"camera {index_or_path}", daemon=True)
        self._thread.start()

    def _grab(self):
        """The next frame, RGB; None (and `_error` says why) when the camera stops or changes its frame size."""
        ok, bgr = self._capture.read()
        self._size = bgr.shape[:2] if ok else None
        if not ok:
            self._error = f"camera {self.source!r} returned no frame (unplugged, or end of the video)"
        elif self._size != (self.height, self.width):
            self._error = (f"camera {self.source!r} delivers {self._size[1]}x{self._size[0]} frames, not "
                           f"{self.width}x{self.height}")
        return None if self._error else self._cv2.cvtColor(bgr, self._cv2.COLOR_BGR2RGB)  # datasets are RGB

    def _keep_grabbing(self):
        while self._running and not self._error:
            frame = self._grab()
            if frame is not None:
                self._latest = frame  # a new array each time: frames already handed out never change
        if self._size is None and os.path.isfile(str(self.source)):
            self._error = None  # a video file has ended: its last frame stays

    def read(self):
        if self._error:
            raise RuntimeError(self._error)
        return self._latest

    def close(self):
        self._running = False
        if hasattr(self, "_thread"):
            self._thread.join()
        self._capture.release()


def camera_sources(cameras, rename, policy_cameras, sim=False):
    """--cameras "top=/dev/video0,..." and --rename "top=camera1,..." -> {policy camera key: device},
    checked against the cameras the policy reads before any device is opened. A device "sim" films the toy
    world; with `sim` (--port sim) and no --cameras, every camera the policy reads does."""
    if sim and not cameras:
        return dict.fromkeys(policy_cameras, "sim")
    rename = parse_mapping(rename, "--rename")
    sources = {IMAGE_PREFIX + rename.get(name, name): source
               for name, source in parse_mapping(cameras, "--cameras").items()}
    missing = [key for key in policy_cameras if key not in sources]
    unknown = [key for key in sources if key not in policy_cameras]
    if unknown or len(missing) == len(policy_cameras):  # fewer cameras: the policy runs on those present
        raise ValueError(f"the policy reads cameras {policy_cameras}; --cameras/--rename give {sorted(sources)} "
                         f"(missing {missing}, unknown {unknown}). Pass --cameras name=/dev/videoN,... and, where "
                         f"your names differ from the policy's, --rename name=policy_name,...")
    return sources


def open_cameras(sources, virtual_arm=None, scene=None):
    """{key: device index, path or "sim"} (from camera_sources) -> {key: camera}; "sim" cameras film the toy
    world (`scene`, or a new one) with `virtual_arm` in it."""
    simulated = [key for key, source in sources.items() if source == "sim"]
    if simulated and virtual_arm is None:
        raise ValueError("camera device 'sim' films the virtual arm: it needs --port sim")
    cameras = toy_world_cameras(simulated, virtual_arm.joint_positions_deg, scene) if simulated else {}
    for key, source in sources.items():
        if source != "sim":
            cameras[key] = OpenCVCamera(int(source) if source.isdigit() else source)
    return {key: cameras[key] for key in sources}


def open_arm(port, calibration=None, norm_mode="degrees", max_relative_target=None, arm_id="my_so100",
             verbose=True, leader=False, **sim_options):
    """Connect to a real arm ("/dev/ttyACM0") or a fresh virtual one ("sim"); `leader`: the leader arm.

    Returns (connected SO100Follower or SO100Leader, VirtualArm or None). A real arm's calibration defaults to
    the file `<calibration_dir>/<arm_id>.json`; the virtual arm comes calibrated. `sim_options` go to
    VirtualArm. Close the virtual arm with `.close()` after disconnecting the arm.
    """
    arm_class = SO100Leader if leader else SO100Follower
    virtual = None
    if port == "sim":
        virtual = VirtualArm(**sim_options)
        port = virtual.port
    elif sim_options:
        raise ValueError(f"options {sorted(sim_options)} only apply to --port sim")
    calibration = default_calibration(calibration, arm_id, virtual, arm_class.calibration_dir)
    try:
        arm = arm_class(port, calibration, norm_mode=norm_mode, max_relative_target=max_relative_target,
                        verbose=verbose)
        arm.connect()
    except BaseException:
        if virtual is not None:
            virtual.close()
        raise
    return arm, virtual


# ----------------------------------------------------------------------------------------------------
# Writer: arrays -> a LeRobot v3.0 (or v2.1) dataset on disk
# ----------------------------------------------------------------------------------------------------

CODECS = {"libsvtav1": ("libsvtav1", "av1"), "av1": ("libsvtav1", "av1"), "h264": ("libx264", "h264"),
          "libx264": ("libx264", "h264")}


def write_lerobot_dataset(root, episodes, fps=30, robot_type="so100", codec="libsvtav1", joint_names=None,
                          version="v3.0"):
    """Write episodes as a LeRobot dataset in `root` (must not exist or be empty); returns root.

    episodes: list of {"observation.state": (T,S), "action": (T,A), "task": str,
                       "images": {"top": (T,H,W,3) uint8, ...}}
    codec: "libsvtav1" (AV1, as on the hub) or "h264".  version: "v3.0" (default, episode after episode as
    `append_episode` records them) or "v2.1".
    """
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r} is not one of {sorted(CODECS)}.")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"version {version!r} is not one of {SUPPORTED_VERSIONS}.")
    if os.path.isdir(root) and os.listdir(root):
        raise FileExistsError(f"{root} exists and is not empty; choose a new directory for the dataset.")
    cameras = _check_episodes(episodes)
    if version == "v3.0":
        for episode in episodes:
            append_episode(root, episode, fps, codec, robot_type, joint_names)
        return root
    tasks, lengths, columns = _episode_columns(episodes, fps)
    bounds = np.r_[0, np.cumsum(lengths)]
    info = {
        "codebase_version": version, "robot_type": robot_type, "total_episodes": len(episodes),
        "total_frames": int(bounds[-1]), "total_tasks": len(tasks), "chunks_size": 1000, "fps": fps,
        "splits": {"train": f"0:{len(episodes)}"},
        "features": _features(episodes, cameras, fps, codec, joint_names),
    }
    os.makedirs(os.path.join(root, "meta"), exist_ok=True)
    _write_v2(root, info, episodes, cameras, tasks, lengths, columns, bounds, fps, codec)
    return root


EPISODES_FILE = os.path.join("meta", "episodes", "chunk-000", "file-000.parquet")


def append_episode(root, episode, fps=30, codec="libsvtav1", robot_type="so100", joint_names=None):
    """Add one episode to the LeRobot v3.0 dataset in `root` (started if there is none); returns its index.

    The episode gets its own parquet file and one mp4 per camera, then the metadata is rewritten. Every file
    is written under a temporary name and renamed into place, and meta/episodes (the list of episodes readers
    go by) only after the episode's data and videos: a crash at any moment leaves the episodes before it
    whole, and the next append starts after the last listed one (overwriting what a crash left behind)."""
    cameras = _check_episodes([episode])
    features = _features([episode], cameras, fps, codec, joint_names)
    info, rows = recorded_episodes(root)
    info = info or {"codebase_version": "v3.0", "robot_type": robot_type, "chunks_size": 1000, "fps": fps,
                    "features": features, "data_files_size_in_mb": 100, "video_files_size_in_mb": 200,
                    "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                    "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"}
    check_same_features(root, info, features, fps)
    tasks = list(dict.fromkeys([task for row in rows for task in row["tasks"]] + [episode["task"]]))
    e, start = len(rows), rows[-1]["dataset_to_index"] if rows else 0
    _, (length,), columns = _episode_columns([episode], fps)
    columns.update(episode_index=np.full(length, e), index=start + np.arange(length),
                   task_index=np.full(length, tasks.index(episode["task"])))
    where = {"chunk_index": e // info["chunks_size"], "file_index": e % info["chunks_size"]}
    _atomically(os.path.join(root, info["data_path"].format(**where)), lambda p: pq.write_table(_data_table(columns), p))
    row = {"episode_index": e, "tasks": [episode["task"]], "length": length,
           **{f"data/{k}": v for k, v in where.items()}, "dataset_from_index": start, "dataset_to_index": start + length}
    for name in cameras:
        key = IMAGE_PREFIX + name
        _atomically(os.path.join(root, info["video_path"].format(video_key=key, **where)),
                    lambda p: _encode_video(p, [episode["images"][name]], fps, codec))
        row.update({f"videos/{key}/{k}": v for k, v in where.items()})
        row.update({f"videos/{key}/from_timestamp": 0.0, f"videos/{key}/to_timestamp": length / fps})
    row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
    row.update({f"stats/{feature}/{name}": value for feature, stats in _all_stats(columns, [episode], cameras).items()
                for name, value in stats.items()})  # per episode, as lerobot keeps them: pooled into stats.json
    rows.append(row)
    stats = aggregate_stats([_row_stats(row) for row in rows])
    _atomically(os.path.join(root, "meta", "tasks.parquet"), lambda p: pq.write_table(_tasks_table(tasks), p))
    _write_json(os.path.join(root, "meta", "stats.json"),
                {feature: {k: np.asarray(v).tolist() for k, v in s.items()} for feature, s in stats.items()})
    _atomically(os.path.join(root, EPISODES_FILE), lambda p: pq.write_table(pa.Table.from_pylist(rows), p))
    info.update(total_episodes=len(rows), total_frames=start + length, total_tasks=len(tasks),
                total_videos=len(rows) * len(cameras), splits={"train": f"0:{len(rows)}"})
    _write_json(os.path.join(root, "meta", "info.json"), info)
    return e


def recorded_episodes(root):
    """(info, the rows of meta/episodes) of the v3.0 dataset in `root`; (None, []) where there is none yet."""
    if not os.path.isfile(os.path.join(root, "meta", "info.json")):
        return None, []
    info = read_json(os.path.join(root, "meta", "info.json"), "meta/info.json")
    if info.get("codebase_version") != "v3.0":
        raise ValueError(f"{root} is a {info.get('codebase_version')} dataset: recording appends to v3.0 ones only")
    episodes = os.path.join(root, EPISODES_FILE)
    return info, pq.read_table(episodes).to_pylist() if os.path.isfile(episodes) else []


def check_same_features(root, info, features, fps):
    """One dataset, one kind of recording: the same joints, cameras (and frame sizes) and fps throughout."""
    differ = sorted(k for k in set(info["features"]) | set(features) if info["features"].get(k) != features.get(k))
    if info["fps"] != fps or differ:
        raise ValueError(f"{root} holds a recording at {info['fps']} fps of {sorted(info['features'])}; this one "
                         f"is at {fps} fps and differs in {differ}: record into another --dataset directory")


def _row_stats(row):
    """A meta/episodes row's "stats/<feature>/<name>" columns -> {feature: {name: value}}."""
    stats = {}
    for key, value in row.items():
        if key.startswith("stats/"):
            feature, name = key[len("stats/"):].rsplit("/", 1)
            stats.setdefault(feature, {})[name] = value
    return stats


def _atomically(path, write):
    """write(temporary path), then rename it to `path`: readers see the old file or the whole new one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write(path + ".partial")
    os.replace(path + ".partial", path)


def _write_json(path, value):
    _atomically(path, lambda p: Path(p).write_text(json.dumps(value, indent=4)))


def _write_v2(root, info, episodes, cameras, tasks, lengths, columns, bounds, fps, codec):
    """One parquet and one mp4 per episode; episodes, tasks and per-episode stats as JSON lines."""
    info.update({"total_chunks": 1, "total_videos": len(episodes) * len(cameras),
                 "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
                 "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"})
    meta = {"episodes.jsonl": [], "tasks.jsonl": [{"task_index": i, "task": t} for i, t in enumerate(tasks)],
            "episodes_stats.jsonl": []}
    for e, episode in enumerate(episodes):
        rows = slice(bounds[e], bounds[e + 1])
        path = os.path.join(root, info["data_path"].format(episode_chunk=0, episode_index=e))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(_data_table(columns, rows), path)
        for name in cameras:
            video = info["video_path"].format(episode_chunk=0, video_key=IMAGE_PREFIX + name, episode_index=e)
            _encode_video(os.path.join(root, video), [episode["images"][name]], fps, codec)
        meta["episodes.jsonl"].append({"episode_index": e, "tasks": [episode["task"]], "length": lengths[e]})
        episode_columns = {name: values[rows] for name, values in columns.items()}
        meta["episodes_stats.jsonl"].append({"episode_index": e, "stats": _all_stats(episode_columns, [episode], cameras)})
    for name, rows in meta.items():
        with open(os.path.join(root, "meta", name), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    with open(os.path.join(root, "meta", "info.json"), "w") as f:
        json.dump(info, f, indent=4)


# -- the writer's pieces: input checks, columns and features, tables, video, statistics --------------

def _check_episodes(episodes):
    """Validate the writer's input; returns the camera names and their (H, W)."""
    if not episodes:
        raise ValueError("write_lerobot_dataset needs at least one episode.")
    cameras = {name: np.asarray(image).shape[1:3] for name, image in episodes[0].get("images", {}).items()}
    for e, episode in enumerate(episodes):
        state, action = np.asarray(episode["observation.state"]), np.asarray(episode["action"])
        if state.ndim != 2 or action.ndim != 2 or len(state) != len(action) or len(state) == 0:
            raise ValueError(f"episode {e}: observation.state (T,S) and action (T,A) must be 2-D with the same T >= 1, "
                             f"got {state.shape} and {action.shape}.")
        if not isinstance(episode.get("task"), str):
            raise ValueError(f"episode {e}: 'task' must be a string.")
        images = episode.get("images", {})
        if set(images) != set(cameras):
            raise ValueError(f"episode {e} has cameras {sorted(images)}, episode 0 has {sorted(cameras)}.")
        for name, image in images.items():
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.shape != (len(state),) + tuple(cameras[name]) + (3,):
                raise ValueError(f"episode {e} camera {name}: expected uint8 ({len(state)}, H, W, 3) with the "
                                 f"same H, W in every episode, got {image.dtype} {image.shape}.")
    for name, (height, width) in cameras.items():
        if height % 2 or width % 2:
            raise ValueError(f"camera {name}: yuv420p video needs an even height and width, got {height}x{width}.")
    return cameras


def _episode_columns(episodes, fps):
    """Flat per-row columns of all episodes (global index continues across episodes)."""
    tasks = list(dict.fromkeys(e["task"] for e in episodes))
    lengths = [len(e["action"]) for e in episodes]
    frame_index = np.concatenate([np.arange(n) for n in lengths])
    return tasks, lengths, {
        "observation.state": np.concatenate([np.asarray(e["observation.state"], np.float32) for e in episodes]),
        "action": np.concatenate([np.asarray(e["action"], np.float32) for e in episodes]),
        "timestamp": (frame_index / fps).astype(np.float32),
        "frame_index": frame_index,
        "episode_index": np.repeat(np.arange(len(episodes)), lengths),
        "index": np.arange(sum(lengths)),
        "task_index": np.repeat([tasks.index(e["task"]) for e in episodes], lengths),
    }


def _features(episodes, cameras, fps, codec, joint_names):
    state_dim, action_dim = np.shape(episodes[0]["observation.state"])[1], np.shape(episodes[0]["action"])[1]
    features = {
        "action": {"dtype": "float32", "shape": [action_dim], "names": _joint_names(action_dim, joint_names)},
        "observation.state": {"dtype": "float32", "shape": [state_dim], "names": _joint_names(state_dim, joint_names)},
    }
    for name, (height, width) in cameras.items():
        features[IMAGE_PREFIX + name] = {
            "dtype": "video", "shape": [int(height), int(width), 3], "names": ["height", "width", "channels"],
            "info": {"video.height": int(height), "video.width": int(width), "video.codec": CODECS[codec][1],
                     "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": fps,
                     "video.channels": 3, "has_audio": False},
        }
    for name, dtype in (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
                        ("index", "int64"), ("task_index", "int64")):
        features[name] = {"dtype": dtype, "shape": [1], "names": None}
    return features


def _joint_names(dim, joint_names):
    """Names of a state/action vector's entries: given, else SO-100's for 6 entries, else joint_<j>."""
    if joint_names is not None:
        if len(joint_names) != dim:
            raise ValueError(f"joint_names has {len(joint_names)} names for vectors of {dim} entries.")
        return list(joint_names)
    return list(STATE_NAMES) if dim == 6 else [f"joint_{j}" for j in range(dim)]


def _data_table(columns, rows=slice(None)):
    arrays = {}
    for name, values in columns.items():
        values = values[rows]
        if values.ndim == 2:  # vectors: fixed-size lists of float32, as lerobot writes them
            arrays[name] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
        else:
            arrays[name] = pa.array(values)
    return pa.table(arrays)


def _tasks_table(tasks):
    """meta/tasks.parquet with the task strings as the pandas index, the way lerobot reads them back."""
    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(tasks, pa.string())})
    pandas = {"index_columns": ["task"], "column_indexes": [], "pandas_version": "2.2.3",
              "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
                           "numpy_type": "int64", "metadata": None},
                          {"name": "task", "field_name": "task", "pandas_type": "unicode",
                           "numpy_type": "object", "metadata": None}]}
    return table.replace_schema_metadata({"pandas": json.dumps(pandas)})


def _encode_video(path, videos, fps, codec):
    """Encode (T, H, W, 3) uint8 videos one after the other into one mp4 (yuv420p, a keyframe every 2 frames
    like lerobot); frame k of the file is shown at k / fps."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    encoder = CODECS[codec][0]
    options = {"crf": "30", "g": "2", "preset": "10"} if encoder == "libsvtav1" else {"crf": "23", "g": "2", "preset": "veryfast"}
    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream(encoder, rate=fps, options=options)
        stream.height, stream.width = np.shape(videos[0])[1:3]
        stream.pix_fmt = "yuv420p"
        images = (image for video in videos for image in video)
        for k, image in enumerate(images):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts, frame.time_base = k, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _all_stats(columns, episodes, cameras):
    """The stats block of `episodes` whose rows are `columns`: every feature, images per channel."""
    stats = {name: _numeric_stats(values) for name, values in columns.items()}
    for name in cameras:
        stats[IMAGE_PREFIX + name] = _image_stats([np.asarray(e["images"][name]) for e in episodes])
    return stats


def _numeric_stats(values):
    """min/max/mean/std/count over axis 0 of a (T, ...) array."""
    values = np.asarray(values, dtype=np.float64).reshape(len(values), -1)  # scalars as (T, 1), stats as [x]
    return {"min": values.min(0).tolist(), "max": values.max(0).tolist(), "mean": values.mean(0).tolist(),
            "std": values.std(0).tolist(), "count": [len(values)]}


def _image_stats(videos, max_frames=300):
    """Per-channel stats in [0, 1] of a camera's (T, H, W, 3) uint8 videos, shaped (3, 1, 1) as lerobot stores them.

    Computed from at most ~max_frames evenly spaced frames, one frame at a time (images are big).
    """
    step = max(1, sum(len(video) for video in videos) // max_frames)
    frames = [frame for video in videos for frame in video[::step]]
    total, squares = np.zeros(3), np.zeros(3)
    low, high = np.full(3, np.inf), np.full(3, -np.inf)
    for frame in frames:
        pixels = frame.reshape(-1, 3).astype(np.float64) / 255.0  # (H*W, 3)
        total += pixels.sum(0)
        squares += (pixels ** 2).sum(0)
        low, high = np.minimum(low, pixels.min(0)), np.maximum(high, pixels.max(0))
    count = len(frames) * frames[0].shape[0] * frames[0].shape[1]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
    stats = {"min": low, "max": high, "mean": mean, "std": std}
    return {**{name: value.reshape(3, 1, 1).tolist() for name, value in stats.items()}, "count": [len(frames)]}


# ----------------------------------------------------------------------------------------------------
# Synthetic episodes: random motion a camera can see (tests, benchmarks)
# ----------------------------------------------------------------------------------------------------

def synthetic_episodes(n_episodes, length, height=96, width=128, cameras=("top", "wrist"), state_dim=6, seed=0,
                       noise=True, tasks=("Pick the red cube and place it in the box.", "Stack the red cube on the blue cube.")):
    """Episodes of random joint motion with camera-like images that follow it, for tests and benchmarks.

    Each camera sees a textured background (smooth waves plus fixed grain, a table seen by a camera) with
    sensor noise in every frame and a red square that moves with the joints. At 480x640 this encodes to
    ~25 KB per AV1 frame and decodes about as fast as real robot footage (flat colours would be far
    cheaper). noise=False leaves out grain and sensor noise (what a codec would smooth away anyway).
    `length` is an int or one int per episode.
    """
    rng = np.random.default_rng(seed)
    lengths = [length] * n_episodes if np.isscalar(length) else list(length)
    rows, cols = np.mgrid[0:height, 0:width]
    backgrounds = {}
    for name in cameras:
        waves = np.zeros((height, width, 3))
        for _ in range(8):
            # periods of 40 to 400 pixels, whatever the image size
            (fy, fx), phase, amplitude = rng.uniform(1 / 400, 1 / 40, 2), rng.uniform(0, 2 * np.pi), rng.uniform(5, 25, 3)
            waves += np.sin(2 * np.pi * (fy * rows + fx * cols) + phase)[..., None] * amplitude
        backgrounds[name] = 110 + waves + (rng.normal(0, 6, (height, width, 3)) if noise else 0)  # (H, W, 3)
    episodes = []
    for e, n in enumerate(lengths):
        # state: a random walk in degrees; action: the next state (the arm follows its commands)
        state = np.cumsum(rng.normal(0, 2.0, (n + 1, state_dim)), axis=0).astype(np.float32)
        images = {}
        for c, name in enumerate(cameras):
            frames = np.empty((n, height, width, 3), dtype=np.uint8)
            for t in range(n):
                frame = backgrounds[name] + (rng.normal(0, 2, (height, width, 3)) if noise else 0)
                y = int(height / 2 + state[t, c % state_dim] * height / 200) % height
                x = int(width / 2 + state[t, (c + 1) % state_dim] * width / 200) % width
                frame[max(0, y - height // 8):y + height // 8, max(0, x - width // 8):x + width // 8] = (230, 40, 40)
                frames[t] = np.clip(frame, 0, 255)
            images[name] = frames
        episodes.append({"observation.state": state[:n], "action": state[1:], "task": tasks[e % len(tasks)],
                         "images": images})
    return episodes


# ----------------------------------------------------------------------------------------------------
# The recording loop: the leader's positions are the follower's goals, every tick is kept
# ----------------------------------------------------------------------------------------------------

KEYS = {"n": "next", "\x1b[C": "next", "r": "redo", "\x1b[D": "redo", "q": "stop", "\x1b": "stop"}


class Keys:
    """Single key presses from the terminal, without ENTER and without waiting (no terminal: no keys)."""

    def __init__(self):
        self.fd = sys.stdin.fileno() if sys.stdin.isatty() else None
        if self.fd is not None:
            self.saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)

    def poll(self):
        if self.fd is None or not select.select([self.fd], [], [], 0)[0]:
            return None
        pressed = os.read(self.fd, 8).decode(errors="ignore")  # an arrow key is 3 bytes: ESC [ C
        return KEYS.get(pressed, KEYS.get(pressed[:1]))

    def close(self):
        if self.fd is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)


def control_loop(follower, act, cameras, fps, seconds, keys, status=lambda tick, ticks, late: None):
    """`seconds` of control ticks at `fps`. Each tick reads the follower's state and one frame per camera,
    then sends act(tick, state), the goal, through the follower's per-step cap (None: hold still).

    Returns ({"observation.state": [...], "action": [...], "images": {camera: [...]}}, the key that ended it
    early or None, late ticks). A tick is late when its work ends after the next one should have begun: the
    loop then starts counting again from now rather than rushing. Frames are kept as the cameras hand them
    over (no copy, no encoding here: that happens between episodes)."""
    period, ticks = 1.0 / fps, round(seconds * fps)
    kept = {STATE: [], ACTION: [], "images": {key: [] for key in cameras}}
    late, key, next_tick = 0, None, time.monotonic()
    for tick in range(ticks):
        state = follower.get_state()
        for name, camera in cameras.items():
            kept["images"][name].append(camera.read())
        goal = act(tick, state)
        if goal is not None:
            follower.send_action(goal)
        kept[STATE].append(state)
        kept[ACTION].append(state if goal is None else np.asarray(goal, dtype=np.float32))
        key = keys.poll()
        status(tick + 1, ticks, late)
        if key in ("next", "redo", "stop"):
            break
        next_tick += period
        delay = next_tick - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            late, next_tick = late + 1, time.monotonic()
    return kept, key, late


def progress(label, fps):
    """The status line on a terminal: what runs, a bar, seconds left, late ticks, the keys."""
    def show(tick, ticks, late):
        if sys.stdout.isatty():
            print(f"\r{label} [{'#' * (20 * tick // ticks):20}] {(ticks - tick) / fps:5.1f} s left, {late} late ticks "
                  "(n/→ next, r/← again, q/Esc stop)", end="\n" if tick == ticks else "", flush=True)
    return show


# ----------------------------------------------------------------------------------------------------
# Command line: record, teleoperate, replay
# ----------------------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description="Record demonstrations on an SO-100/SO-101 (a leader arm moves the "
                                "follower) into a LeRobot v3.0 dataset; or teleoperate, or replay an episode.")
    p.add_argument("--port", required=True, help="the follower's serial port, or sim (the virtual arm)")
    p.add_argument("--leader-port", help="the leader arm's serial port, or sim (a scripted hand moves it)")
    p.add_argument("--cameras", help="name=/dev/video0,name2=2; name=sim films the toy world (default with "
                   "--port sim: top=sim)")
    p.add_argument("--dataset", help="the dataset directory to record into")
    p.add_argument("--task", help="what the demonstrations do, in words: the policy's instruction")
    p.add_argument("--episodes", type=int, default=50, help="episodes in the dataset (with --resume: in all)")
    p.add_argument("--episode-s", type=float, default=20, help="seconds per episode (n/→ ends one early)")
    p.add_argument("--reset-s", type=float, default=10, help="seconds between episodes to reset the scene")
    p.add_argument("--fps", type=int, default=30, help="control ticks (and dataset frames) per second")
    p.add_argument("--resume", action="store_true", help="add episodes to the existing --dataset")
    p.add_argument("--repo-id", help="user/name on the Hugging Face hub, with --push")
    p.add_argument("--push", action="store_true", help="upload the dataset to --repo-id when done")
    p.add_argument("--teleoperate", action="store_true", help="the follower copies the leader; nothing saved")
    p.add_argument("--replay", metavar="DIR", help="drive the follower with the actions of an episode of DIR")
    p.add_argument("--episode", type=int, default=0, help="the episode --replay plays")
    p.add_argument("--max-relative-target", type=float, default=10.0, help="largest joint step per tick")
    p.add_argument("--id", default="my_so100", help="the follower's calibration name (so100.py --id)")
    p.add_argument("--leader-id", default="my_so100", help="the leader's calibration name (so100.py --leader --id)")
    p.add_argument("--sim-size", default="64x64", help="HxW of the sim cameras' frames")
    p.add_argument("--codec", default="libsvtav1", choices=sorted(CODECS), help="video codec of the dataset")
    return p


def check_arguments(args):
    """Everything that can be checked before a device opens, with one clear message each."""
    if args.fps <= 0 or args.episode_s <= 0 or args.reset_s < 0 or args.episodes < 1:
        raise ValueError("--fps, --episode-s and --episodes must be positive, --reset-s at least 0")
    recording = not (args.teleoperate or args.replay)
    if not args.replay and not args.leader_port:
        raise ValueError("--leader-port is needed: the leader arm (or sim) moves the follower")
    if recording and not (args.dataset and args.task):
        raise ValueError("recording needs --dataset DIR and --task \"what the robot does\"")
    if args.push and not args.repo_id:
        raise ValueError("--push needs --repo-id user/name")
    if recording and os.path.isdir(args.dataset) and os.listdir(args.dataset) and not args.resume:
        raise FileExistsError(f"{args.dataset} is not empty: pass --resume to add episodes to it, or choose "
                              "another --dataset")
    return recording


def check_dataset(args, cameras, frames, state_dim):
    """The dataset to add to records the same joints, cameras, frame sizes and fps; the disk has room.
    Returns the number of episodes already in it."""
    probe = {STATE: np.zeros((1, state_dim), np.float32), ACTION: np.zeros((1, state_dim), np.float32),
             "task": args.task, "images": {key[len(IMAGE_PREFIX):]: frame[None] for key, frame in frames.items()}}
    info, rows = recorded_episodes(args.dataset)
    if info is not None:
        check_same_features(args.dataset, info, _features([probe], _check_episodes([probe]), args.fps,
                                                          args.codec, None), args.fps)
    # ~25 KB per AV1 frame at 480x640 (synthetic_episodes), twice that to be safe
    pixels = sum(frame.shape[0] * frame.shape[1] for frame in frames.values())
    needed = (args.episodes - len(rows)) * args.episode_s * args.fps * (2 * 25e3 * pixels / (480 * 640) + 200)
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(args.dataset))).free
    if free < needed:
        raise OSError(f"{args.episodes - len(rows)} episodes need about {needed / 1e9:.1f} GB; "
                      f"{free / 1e9:.1f} GB are free where {args.dataset} goes")
    return len(rows)


def main(argv=None):
    args = build_parser().parse_args(argv)
    recording = check_arguments(args)
    sim = args.port == "sim"
    with contextlib.ExitStack() as cleanup:
        follower, virtual = open_arm(args.port, arm_id=args.id, max_relative_target=args.max_relative_target,
                                     verbose=False)
        cleanup.callback(lambda: virtual and virtual.close())  # closed after the arm: the stack unwinds
        cleanup.callback(follower.disconnect)
        hand = leader = None
        if args.leader_port:
            leader, leader_virtual = open_arm(args.leader_port, arm_id=args.leader_id, leader=True, verbose=False)
            cleanup.callback(lambda: leader_virtual and leader_virtual.close())
            cleanup.callback(leader.disconnect)
            if leader_virtual is not None:  # the toy world's scripted expert moves the virtual leader
                size = tuple(int(n) for n in args.sim_size.split("x"))
                hand = ScriptedHand(leader_virtual, hz=args.fps, image_size=size)
                cleanup.callback(hand.close)
        sources = {IMAGE_PREFIX + name: source for name, source in
                   parse_mapping(args.cameras or ("top=sim" if sim else ""), "--cameras").items()}
        cameras = open_cameras(sources, virtual, hand.scene if hand else None) if recording else {}
        cleanup.callback(lambda: [camera.close() for camera in cameras.values() if hasattr(camera, "close")])
        keys = Keys()
        cleanup.callback(keys.close)
        if args.replay:
            return replay(args, follower, keys)
        teleoperate = lambda tick, state: leader.get_state()  # noqa: E731 -- the leader's pose is the goal
        if not recording:
            while control_loop(follower, teleoperate, {}, args.fps, 3600, keys, progress("teleoperating", args.fps))[1] != "stop":
                pass
            return None
        done = check_dataset(args, cameras, {key: camera.read() for key, camera in cameras.items()}, 6)
        return record(args, follower, teleoperate, cameras, keys, hand, done)


def record(args, follower, teleoperate, cameras, keys, hand, done):
    """Episodes done..args.episodes: record one, then save it in the background while the scene is reset
    (teleoperated); the next one starts only once the last is completely written."""
    writer = cleanup = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    saving, late_total, ticks_total, episode = None, 0, 0, done
    try:
        while episode < args.episodes:
            if hand:
                hand.new_episode()
            kept, key, late = control_loop(follower, teleoperate, cameras, args.fps, args.episode_s, keys,
                                           progress(f"episode {episode + 1}/{args.episodes}", args.fps))
            ticks_total, late_total = ticks_total + len(kept[ACTION]), late_total + late
            if saving is not None:
                saving.result()  # (already written during the reset: this is a formality)
            if key == "redo":
                print(f"episode {episode + 1}: discarded, recording it again after the reset")
            else:
                episode_data = {STATE: np.stack(kept[STATE]), ACTION: np.stack(kept[ACTION]), "task": args.task,
                                "images": {name[len(IMAGE_PREFIX):]: np.stack(frames) for name, frames in kept["images"].items()}}
                saving = writer.submit(append_episode, args.dataset, episode_data, args.fps, args.codec)
                print(f"episode {episode + 1}: {len(kept[ACTION])} frames, {late} late ticks; saving")
                episode += 1
            if key == "stop" or episode == args.episodes:
                break
            if hand:
                hand.go_home()
            control_loop(follower, teleoperate, {}, args.fps, args.reset_s, keys, progress("reset", args.fps))
            saving.result() if saving is not None else None
    finally:
        cleanup.shutdown(wait=True)  # whatever happens, the episode being written is finished
    if saving is not None:
        saving.result()
    print(f"{episode} episodes in {args.dataset}; late ticks {late_total} of {ticks_total} "
          f"({100 * late_total / max(ticks_total, 1):.1f}%)")
    if args.push:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(args.repo_id, repo_type="dataset", exist_ok=True)
        api.upload_folder(folder_path=args.dataset, repo_id=args.repo_id, repo_type="dataset")
        api.create_tag(args.repo_id, tag="v3.0", repo_type="dataset", exist_ok=True)  # lerobot asks for it
    return {"episodes": episode, "late_ticks": late_total, "ticks": ticks_total}


def replay(args, follower, keys):
    """Drive the follower with the recorded actions of episode --episode of the dataset --replay."""
    info, rows = recorded_episodes(args.replay)
    if info is None or not 0 <= args.episode < len(rows):
        raise ValueError(f"{args.replay} has no episode {args.episode} (it has {len(rows)})")
    row = rows[args.episode]
    table = pq.read_table(os.path.join(args.replay, info["data_path"].format(
        chunk_index=row["data/chunk_index"], file_index=row["data/file_index"])), filters=[("episode_index", "=", args.episode)])
    actions = np.asarray(table.column(ACTION).to_pylist(), dtype=np.float32)
    control_loop(follower, lambda tick, state: actions[tick], {}, info["fps"], len(actions) / info["fps"], keys,
                 progress(f"replaying episode {args.episode}", info["fps"]))
    return actions


if __name__ == "__main__":
    # `kill` stops like Ctrl-C: the arms' torque goes off, the episode being written is finished
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        main()
    except KeyboardInterrupt:
        print("\nstopped: the episodes saved so far are in the dataset")
    except (FileNotFoundError, FileExistsError, ValueError, OSError, RuntimeError, FeetechError) as e:
        sys.exit(f"error: {e}")
