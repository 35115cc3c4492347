"""Files, frames and command lines: the input and output every other file shares (support tier).

Nothing here is SmolVLA. It is what the tutorial files and the tools need from the outside world, kept in one
place so that each of them reads as its own idea:

- where files come from: a local directory or the Hugging Face Hub (checkpoints, VLMs, datasets), JSON read
  with an error that names what was missing, files written atomically (a reader sees the old file or the
  whole new one: record.py's crash-safe datasets);
- frames: a USB camera read in the background (or, with a virtual arm, the toy world's cameras), an mp4
  encoder and per-channel statistics for recordings (record.py), pooled over episodes as the reader pools
  them (data.py), and the mp4 decoding of data.py's reader;
- arms: a real SO-100 on its serial port, or a fresh virtual one (`open_arm`);
- the command lines' --help format (every default shown) and their name=value lists.
"""

import argparse
import collections
import json
import os
import threading
from fractions import Fraction
from pathlib import Path

import av  # (PyAV: FFmpeg's decoders and encoders; its wheel ships libdav1d for AV1)
import numpy as np

# ----------------------------------------------------------------------------------------------------
# Where files come from and how they are written.



def resolve_dir(source, what, allow_patterns, repo_type="model", revision=None, hint=None):
    """A local directory as it is; otherwise a Hugging Face Hub id (`owner/name`), whose files matching
    `allow_patterns` are downloaded into the local cache (huggingface_hub shows the progress). `what`
    ("checkpoint", "VLM", "dataset") names it in the errors; `hint` says what to do instead."""
    source = os.fspath(source)
    if os.path.isdir(source):
        return source
    parts = source.split("/")
    is_hub_id = len(parts) == 2 and all(parts) and not source.startswith((".", "~")) and not os.path.exists(source)
    if not is_hub_id:
        raise FileNotFoundError(f"{what} directory not found: there is no {what} directory {source!r}, and it is "
                                "not a Hugging Face Hub id of the form owner/name")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(source, repo_type=repo_type, revision=revision, allow_patterns=allow_patterns)
    except Exception as e:  # offline, unknown repo, no access: one message that says which and what to do
        reason = str(e).splitlines()[0] if str(e) else ""
        raise FileNotFoundError(
            f"{what} '{source}' is not a local directory and could not be fetched as a {what} from the Hugging "
            f"Face Hub ({type(e).__name__}: {reason}). {hint or f'Pass an existing {what} directory.'}"
        ) from None


def read_json(path, what):
    """The JSON file at `path`; `what` names it in the error when it is missing."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path) as f:
        return json.load(f)


def write_atomically(path, write):
    """write(temporary path), then rename it to `path`: readers see the old file or the whole new one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write(path + ".partial")
    os.replace(path + ".partial", path)


def write_json(path, value):
    """`value` as indented JSON at `path`, written atomically."""
    write_atomically(path, lambda p: Path(p).write_text(json.dumps(value, indent=4)))


# ----------------------------------------------------------------------------------------------------
# Frames: cameras, and the videos and statistics of a recording.



class OpenCVCamera:
    """A USB camera (device index) or a video file, read as (H, W, 3) uint8 RGB frames. A thread takes the
    frames as the camera delivers them and `read()` returns the latest at once: a control loop never waits
    up to a frame period for the next one."""

    def __init__(self, index_or_path, width=640, height=480):
        import cv2

        self._cv2, self.source, self._error, self._running = cv2, index_or_path, None, True
        self._capture = cv2.VideoCapture(index_or_path)
        if not self._capture.isOpened():
            raise FileNotFoundError(f"cannot open camera {index_or_path!r}: check `ls /dev/video*` or the path")
        self._capture.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        self._capture.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        self.width, self.height, self._latest = width, height, self._grab()
        (h, w) = self._latest.shape[:2]
        if (h, w) != (height, width):
            self.close()
            raise ValueError(f"camera {index_or_path!r} delivers {w}x{h} frames, not {width}x{height}: pass "
                             f"width={w}, height={h}")
        self._thread = threading.Thread(target=self._keep_grabbing, name=f"camera {index_or_path}", daemon=True)
        self._thread.start()

    def _grab(self):
        ok, bgr = self._capture.read()
        if not ok:
            raise RuntimeError(f"camera {self.source!r} returned no frame (unplugged, or end of the video)")
        return self._cv2.cvtColor(bgr, self._cv2.COLOR_BGR2RGB)  # OpenCV delivers BGR; datasets are RGB

    def _keep_grabbing(self):
        try:
            while self._running:  # a new array each time: frames already handed out never change
                self._latest = self._grab()
        except RuntimeError as e:
            self._error = None if os.path.isfile(str(self.source)) else e  # a video's last frame stays

    def read(self):
        if self._error:
            raise self._error
        return self._latest

    def close(self):
        self._running = False
        hasattr(self, "_thread") and self._thread.join()
        self._capture.release()


def open_cameras(sources, virtual_arm=None, scene=None, image_size=(64, 64)):
    """{key: device index, path or "sim"} (e.g. from infer_async.camera_sources) -> {key: camera}; "sim"
    cameras film the toy world (`scene`, or a new one of `image_size`) with `virtual_arm` in it."""
    simulated = [key for key, source in sources.items() if source == "sim"]
    if simulated and virtual_arm is None:
        raise ValueError("camera device 'sim' films the virtual arm: it needs --port sim")
    from virtual_arm import toy_world_cameras  # (here, not at the top: the servo simulator loads only with cameras)

    cameras = toy_world_cameras(simulated, virtual_arm.joint_positions_deg, scene, image_size) if simulated else {}
    return {key: cameras[key] if source == "sim" else OpenCVCamera(int(source) if source.isdigit() else source)
            for key, source in sources.items()}



# ----------------------------------------------------------------------------------------------------
# Arms: a real SO-100 on its serial port, or a fresh virtual one.
# ----------------------------------------------------------------------------------------------------

def open_arm(port, calibration=None, norm_mode="degrees", max_relative_target=None, arm_id="my_so100",
             verbose=True, leader=False, **sim_options):
    """(connected SO100Follower, or SO100Leader if `leader`; VirtualArm or None) on a real port (calibration:
    so100.py's <arm_id>.json by default) or on "sim", a fresh virtual arm (close it after the arm)."""
    from so100 import SO100Follower, SO100Leader, default_calibration  # (pyserial: only beside an arm)
    from virtual_arm import VirtualArm

    arm_class = SO100Leader if leader else SO100Follower
    if sim_options and port != "sim":
        raise ValueError(f"options {sorted(sim_options)} only apply to --port sim")
    virtual = VirtualArm(**sim_options) if port == "sim" else None
    calibration = default_calibration(calibration, arm_id, virtual, arm_class.calibration_dir)
    try:
        # (a thread plays the virtual servos: on a busy machine it may answer later than a real servo's 50 ms)
        return arm_class(virtual.port if virtual else port, calibration, norm_mode=norm_mode, verbose=verbose,
                         max_relative_target=max_relative_target, timeout=0.3 if virtual else 0.05).connect(), virtual
    except BaseException:
        virtual and virtual.close()
        raise

# the codecs a recording's videos may use: name -> (FFmpeg encoder, the codec name a dataset's info.json gives)
CODECS = {"libsvtav1": ("libsvtav1", "av1"), "av1": ("libsvtav1", "av1"), "h264": ("libx264", "h264"),
          "libx264": ("libx264", "h264")}


def encode_video(path, videos, fps, codec):
    """Encode (T, H, W, 3) uint8 videos one after the other into one mp4 (yuv420p, a keyframe every 2 frames
    like lerobot); frame k of the file is shown at k / fps. codec: a key of CODECS."""
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its settings for every stream it opens: errors only
    os.makedirs(os.path.dirname(path), exist_ok=True)
    encoder = CODECS[codec][0]
    if encoder not in av.codecs_available:  # PyAV's wheels differ by platform: say which encoders there are
        others = [name for name, (other, _) in CODECS.items() if other in av.codecs_available]
        raise ValueError(f"this PyAV build has no {encoder} encoder (for {codec}); codecs that encode here: "
                         f"{', '.join(others) or 'none'} (--codec)")
    options = {"crf": "30", "g": "2", "preset": "10"} if encoder == "libsvtav1" else {"crf": "23", "g": "2", "preset": "veryfast"}
    with av.open(path, "w", format="mp4") as container:  # (format: `path` may be a temporary name)
        stream = container.add_stream(encoder, rate=fps, options=options)
        stream.height, stream.width = np.shape(videos[0])[1:3]
        stream.pix_fmt = "yuv420p"
        for k, image in enumerate(image for video in videos for image in video):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts, frame.time_base = k, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def array_stats(values):
    """min/max/mean/std/count over axis 0 of a (T, ...) array."""
    values = np.asarray(values, dtype=np.float64).reshape(len(values), -1)  # scalars as (T, 1), stats as [x]
    return {"min": values.min(0).tolist(), "max": values.max(0).tolist(), "mean": values.mean(0).tolist(),
            "std": values.std(0).tolist(), "count": [len(values)]}


def video_stats(videos, max_frames=300):
    """Per-channel stats in [0, 1] of a camera's (T, H, W, 3) uint8 videos, shaped (3, 1, 1) as lerobot stores
    them: from at most ~max_frames evenly spaced frames, one frame at a time (images are big), pooled."""
    step = max(1, sum(len(video) for video in videos) // max_frames)
    frames = [{"image": array_stats(frame.reshape(-1, 3) / 255.0)} for video in videos for frame in video[::step]]
    stats = aggregate_stats(frames)["image"]
    return {**{name: np.reshape(stats[name], (3, 1, 1)).tolist() for name in ("min", "max", "mean", "std")},
            "count": [len(frames)]}


def aggregate_stats(per_episode):
    """Merge per-episode stats as if computed over all frames at once.

    count-weighted mean; pooled variance  var = sum n_i (std_i^2 + (mean_i - mean)^2) / N;
    min of mins; max of maxes.
    """
    merged = {}
    for feature in per_episode[0]:
        parts = [stats[feature] for stats in per_episode]
        counts = np.array([np.asarray(p["count"], dtype=np.float64).reshape(-1)[0] for p in parts])  # (E,)
        means = np.stack([np.asarray(p["mean"], dtype=np.float64) for p in parts])  # (E, ...)
        stds = np.stack([np.asarray(p["std"], dtype=np.float64) for p in parts])
        weights = (counts / counts.sum()).reshape((-1,) + (1,) * (means.ndim - 1))
        mean = (weights * means).sum(0)
        variance = (weights * (stds ** 2 + (means - mean) ** 2)).sum(0)
        merged[feature] = {
            "mean": mean, "std": np.sqrt(variance),
            "min": np.stack([np.asarray(p["min"], dtype=np.float64) for p in parts]).min(0),
            "max": np.stack([np.asarray(p["max"], dtype=np.float64) for p in parts]).max(0),
            "count": np.array([counts.sum()]),
        }
    return merged


# ----------------------------------------------------------------------------------------------------
# Videos read (data.py's reader): the frame times of an mp4, and two ways to its frames: all decoded once
# (into the reader's uint8 cache, (N, 3, H, W) per mp4), or one at a time by a streaming decoder ((H, W, 3))
# ----------------------------------------------------------------------------------------------------

def open_video(path):
    """Open an mp4 for decoding; the container picks the decoder (libdav1d for AV1)."""
    try:
        container = av.open(path)
        if not container.streams.video:
            raise ValueError("no video stream")
    except Exception as error:
        raise ValueError(f"cannot read video {path} ({error}): the file is damaged or incomplete; delete it and "
                         "download or write the dataset again.") from None
    return container, container.streams.video[0]


def frame_times(path):
    """Presentation time in seconds of every frame of an mp4, read from the packets (nothing decoded)."""
    container, stream = open_video(path)
    with container:
        seconds_per_tick = float(stream.time_base)
        try:
            pts = sorted(packet.pts for packet in container.demux(stream) if packet.pts is not None)
        except av.error.FFmpegError as error:
            raise ValueError(f"cannot read video {path} ({error}): the file is damaged or incomplete.") from None
    if not pts:
        raise ValueError(f"video {path} holds no frames: the file is damaged or incomplete; delete it and download "
                         "or write the dataset again.")
    return np.array(pts, dtype=np.float64) * seconds_per_tick


def video_size(path):
    """(height, width) of an mp4's frames."""
    container, stream = open_video(path)
    with container:
        return stream.codec_context.height, stream.codec_context.width


def decode_all(path, out, progress):
    """Decode every frame of an mp4 in order into `out` (N, 3, H, W) uint8 (planar: converts fastest later)."""
    container, stream = open_video(path)
    stream.thread_type = "AUTO"  # one stream decoded by the main process: let the decoder use threads
    count = 0
    with container:
        try:
            for frame in container.decode(stream):
                if count < len(out):
                    out[count] = frame.to_ndarray(format="rgb24").transpose(2, 0, 1)
                count += 1
                progress.update(1)
        except av.error.FFmpegError as error:
            raise ValueError(f"cannot decode video {path} ({error}): the file is damaged; delete it and download "
                             "or write the dataset again.") from None
    if count != len(out):
        raise ValueError(f"video {path} decodes to {count} frames but its packets say {len(out)}: the file is damaged.")


class StreamingDecoder:
    """Frames decoded on demand: containers stay open (a few per worker), reads in order need no seek."""

    def __init__(self, max_open=8):
        self.max_open = max_open
        self.open = collections.OrderedDict()  # path -> [container, stream, frame iterator, last position]

    def frame(self, path, times, position):
        state = self.open.pop(path, None)
        if state is None:
            container, stream = open_video(path)
            stream.codec_context.thread_count = 1  # parallelism comes from DataLoader workers
            state = [container, stream, None, None]
        self.open[path] = state  # most recently used last
        if len(self.open) > self.max_open:
            self.open.popitem(last=False)[1][0].close()
        container, stream, frames, last = state
        # a short step forward from the last decoded frame: keep decoding; anything else: seek to a keyframe
        target = int(round(times[position] / float(stream.time_base)))  # pts of the wanted frame
        if frames is None or last is None or not last < position <= last + 4:
            container.seek(target, stream=stream, backward=True)  # lands on the keyframe at or before it
            frames = container.decode(stream)
        try:
            for frame in frames:
                if frame.pts is not None and frame.pts >= target:
                    state[2], state[3] = frames, position
                    return frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as error:
            raise ValueError(f"cannot decode video {path} ({error}): the file is damaged; delete it and download "
                             "or write the dataset again.") from None
        raise ValueError(f"video {path} ended before frame {position}: the file is damaged or incomplete.")


# ----------------------------------------------------------------------------------------------------
# The command lines: --help with defaults, name=value lists.


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help as the command lines here print it: the description's line breaks kept, each option's default
    shown (but None and False: an option without a default value, or a switch)."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def parse_mapping(text, flag):
    """A command line's 'a=x,b=y' -> {"a": "x", "b": "y"} (camera renames, camera devices); `flag` names
    the option in the error."""
    mapping = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{flag} expects name=value pairs separated by commas (e.g. top=camera1,wrist=camera2), "
                             f"got {item!r}")
        mapping[key.strip()] = value.strip()
    return mapping
