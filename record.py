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

import json
import os
from fractions import Fraction

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data import SUPPORTED_VERSIONS
from policy import IMAGE_PREFIX, parse_mapping
from so100 import STATE_NAMES, SO100Follower, SO100Leader, default_calibration
from virtual_arm import ScriptedHand, VirtualArm, toy_world_cameras

# SVT-AV1 prints its configuration to stderr for every stream it opens; keep only its errors.
os.environ.setdefault("SVT_LOG", "1")


# ----------------------------------------------------------------------------------------------------
# Cameras
# ----------------------------------------------------------------------------------------------------

class OpenCVCamera:
    """A USB camera (device index) or a video file, read as (H, W, 3) uint8 RGB frames."""

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
        frame = self.read()
        if frame.shape[:2] != (height, width):
            self.close()
            raise ValueError(f"camera {index_or_path!r} delivers {frame.shape[1]}x{frame.shape[0]} frames, not "
                             f"{width}x{height}: pass width={frame.shape[1]}, height={frame.shape[0]}")

    def read(self):
        ok, bgr = self._capture.read()
        if not ok:
            raise RuntimeError(f"camera {self.source!r} returned no frame (unplugged, or end of the video)")
        return self._cv2.cvtColor(bgr, self._cv2.COLOR_BGR2RGB)  # OpenCV delivers BGR; datasets are RGB

    def close(self):
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
    codec: "libsvtav1" (AV1, as on the hub) or "h264".  version: "v3.0" (default) or "v2.1".
    """
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r} is not one of {sorted(CODECS)}.")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"version {version!r} is not one of {SUPPORTED_VERSIONS}.")
    if os.path.isdir(root) and os.listdir(root):
        raise FileExistsError(f"{root} exists and is not empty; choose a new directory for the dataset.")
    cameras = _check_episodes(episodes)
    tasks, lengths, columns = _episode_columns(episodes, fps)
    bounds = np.r_[0, np.cumsum(lengths)]
    info = {
        "codebase_version": version, "robot_type": robot_type, "total_episodes": len(episodes),
        "total_frames": int(bounds[-1]), "total_tasks": len(tasks), "chunks_size": 1000, "fps": fps,
        "splits": {"train": f"0:{len(episodes)}"},
        "features": _features(episodes, cameras, fps, codec, joint_names),
    }
    os.makedirs(os.path.join(root, "meta"), exist_ok=True)
    if version == "v3.0":
        _write_v3(root, info, episodes, cameras, tasks, lengths, columns, bounds, fps, codec)
    else:
        _write_v2(root, info, episodes, cameras, tasks, lengths, columns, bounds, fps, codec)
    return root


def _write_v3(root, info, episodes, cameras, tasks, lengths, columns, bounds, fps, codec):
    """All episodes in one parquet file and, per camera, one mp4; meta/episodes says where each one is."""
    info.update({"data_files_size_in_mb": 100, "video_files_size_in_mb": 200,
                 "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                 "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"})
    data_path = info["data_path"].format(chunk_index=0, file_index=0)
    os.makedirs(os.path.dirname(os.path.join(root, data_path)), exist_ok=True)
    pq.write_table(_data_table(columns), os.path.join(root, data_path))
    rows = {"episode_index": list(range(len(episodes))), "tasks": [[e["task"]] for e in episodes],
            "length": lengths, "data/chunk_index": [0] * len(episodes), "data/file_index": [0] * len(episodes),
            "dataset_from_index": bounds[:-1].tolist(), "dataset_to_index": bounds[1:].tolist()}
    for name in cameras:
        key = IMAGE_PREFIX + name
        _encode_video(os.path.join(root, info["video_path"].format(video_key=key, chunk_index=0, file_index=0)),
                      [e["images"][name] for e in episodes], fps, codec)
        rows.update({f"videos/{key}/chunk_index": [0] * len(episodes), f"videos/{key}/file_index": [0] * len(episodes),
                     f"videos/{key}/from_timestamp": (bounds[:-1] / fps).tolist(),
                     f"videos/{key}/to_timestamp": (bounds[1:] / fps).tolist()})
    rows.update({"meta/episodes/chunk_index": [0] * len(episodes), "meta/episodes/file_index": [0] * len(episodes)})
    os.makedirs(os.path.join(root, "meta", "episodes", "chunk-000"))
    pq.write_table(pa.table(rows), os.path.join(root, "meta", "episodes", "chunk-000", "file-000.parquet"))
    pq.write_table(_tasks_table(tasks), os.path.join(root, "meta", "tasks.parquet"))
    with open(os.path.join(root, "meta", "stats.json"), "w") as f:
        json.dump(_all_stats(columns, episodes, cameras), f, indent=2)
    info["total_videos"] = len(cameras)
    with open(os.path.join(root, "meta", "info.json"), "w") as f:
        json.dump(info, f, indent=4)


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
    with av.open(path, "w") as container:
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
