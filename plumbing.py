"""Files, videos and command lines: the input and output every other file shares (support tier).

Nothing here is SmolVLA. It is what the tutorial files and the tools need from the outside world, kept in one
place so that each of them reads as its own idea:

- where files come from: a local directory or the Hugging Face Hub (checkpoints, VLMs, datasets), JSON read
  with an error that names what was missing, files written atomically (a reader sees the old file or the
  whole new one: record.py's crash-safe datasets);
- videos: an mp4 encoder and per-channel statistics for recordings (record.py), pooled over episodes as
  the reader pools them (data.py), and the mp4 decoding of data.py's reader;
- the command lines' --help format (every default shown) and their name=value lists.
"""

import argparse
import collections
import json
import os
from fractions import Fraction
from pathlib import Path

import av  # (PyAV: FFmpeg's decoders and encoders; its wheel ships libdav1d for AV1)
import numpy as np

# ----------------------------------------------------------------------------------------------------
# Threads: OpenMP's wait, set before torch starts its thread pool (bench.py and infer_async.py call it first)

def spin_briefly_before_sleeping():
    """Let an idle OpenMP thread spin only briefly before it sleeps (GOMP_SPINCOUNT=10000), unless the user
    set OMP_WAIT_POLICY or GOMP_SPINCOUNT. On a machine shared with other work (a 2-core laptop running the
    control loop too), threads that spin long while waiting for a descheduled partner turn every parallel
    operator into a wait for the scheduler (measured: an expert step 12x slower with 2 threads at load 3 on
    2 cores). A short spin keeps the idle-machine speed (a chunk 2.07 s vs 2.08 s with libgomp's default
    spin, 2.31 s with OMP_WAIT_POLICY=PASSIVE) and most of passive waiting's robustness. Read by GNU
    OpenMP (torch's Linux builds, x86 and ARM); other OpenMP runtimes ignore it, so it is safe everywhere."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "10000")


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
# Videos and statistics of a recording.



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
