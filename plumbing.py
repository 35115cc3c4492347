"""Files, videos and command lines: the input and output every other file shares (support tier).

Nothing here is SmolVLA. It is what the tutorial files and the tools need from the outside world, kept in one
place so that each of them reads as its own idea:

- where files come from: a local directory or the Hugging Face Hub (checkpoints, VLMs, datasets); one reader
  per kind of file (JSON, JSON Lines, safetensors, parquet, torch.save), each turning a missing, cut-short
  or wrong-typed file into one line (`DamagedFile`) that names it, says what is wrong and what to do; files
  written atomically (a reader sees the old file or the whole new one: record.py's crash-safe datasets);
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
    looks_like_a_path = source.startswith((".", "~")) or os.path.exists(source)
    is_hub_id = len(parts) == 2 and all(parts) and not looks_like_a_path
    if not is_hub_id:
        raise FileNotFoundError(f"{what} directory not found: there is no {what} directory {source!r}, "
                                "and it is not a Hugging Face Hub id of the form owner/name")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(source, repo_type=repo_type, revision=revision,
                                 allow_patterns=allow_patterns)
    except Exception as e:  # offline, unknown repo, no access: one message that says which and what to do
        reason = str(e).splitlines()[0] if str(e) else ""
        raise FileNotFoundError(
            f"{what} '{source}' is not a local directory and could not be fetched as a {what} from the "
            f"Hugging Face Hub ({type(e).__name__}: {reason}). "
            f"{hint or f'Pass an existing {what} directory.'}"
        ) from None


# ----------------------------------------------------------------------------------------------------
# Files that enter: one reader per kind of file (JSON, safetensors, parquet, torch), each turning a missing,
# cut-short, wrong-typed or incomplete file into one line that names it, says what is wrong and what to do.

class DamagedFile(ValueError):
    """A file that is there but cannot be used: cut short (an interrupted copy or download), not in its
    format, of the wrong type, a required entry or tensor missing or misshaped. str(error) is one line:
    `<path> <what is wrong>: <what to do>`, and the command lines print it after "error: " (a ValueError:
    every command already reports those in one line, no traceback)."""

    def __init__(self, path, problem, advice=None):
        self.path = os.fspath(path)
        # one line, whatever the library that found the problem wrote
        self.problem = " ".join(str(problem).split())
        self.advice = advice
        message = f"{self.path} {self.problem}"
        if advice:
            message += f": {advice}"
        super().__init__(message)

    def __reduce__(self):  # (pickled as its parts: a DataLoader worker's error crosses processes)
        return (DamagedFile, (self.path, self.problem, self.advice))


def _first_line(error):
    """The first line of a library's error message, or its type's name when it has none."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    return text.splitlines()[0]


def _json_type(value):
    """The JSON name of a parsed value's type (for messages: "a list where an object belongs")."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "true or false", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def require_file(path, what, advice=None):
    """`path` itself, or FileNotFoundError naming it (`what`: what the file is, e.g. "checkpoint config")."""
    if not os.path.isfile(path):
        message = f"{what} not found: {path} is missing"
        if advice:
            message += f"; {advice}"
        raise FileNotFoundError(message)
    return path


def read_json(path, what, kind=dict, advice=None):
    """The JSON value of the file at `path`, which must be a `kind` (dict: a JSON object; list; None: any).
    `what` names the file when it is missing; `advice` says what to do when it is missing or damaged."""
    require_file(path, what, advice)
    try:
        with open(path, encoding="utf-8") as file:
            value = json.load(file)
    except json.JSONDecodeError as error:  # cut short or hand-edited: say where the syntax breaks
        where = f"line {error.lineno}, column {error.colno}"
        raise DamagedFile(path, f"is not valid JSON ({error.msg} at {where})", advice) from None
    except UnicodeDecodeError:
        raise DamagedFile(path, "is not a text file (not UTF-8), so not JSON", advice) from None
    if kind is not None and not isinstance(value, kind):
        raise DamagedFile(path, f"holds {_json_type(value)} where {what} is {_json_type(kind())}", advice)
    return value


def read_jsonl(path, what, advice=None):
    """The JSON objects of a JSON Lines file (one per non-empty line), the line named when one is damaged."""
    require_file(path, what, advice)
    rows = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DamagedFile(path, f"line {number} is not valid JSON ({error.msg})", advice) from None
            if not isinstance(row, dict):
                raise DamagedFile(path, f"line {number} holds {_json_type(row)} where a JSON object belongs",
                                  advice)
            rows.append(row)
    return rows


def require_keys(mapping, keys, path, advice=None):
    """`mapping` (read from the file at `path`) if it has every key of `keys`, else DamagedFile naming the
    first one missing."""
    missing = [key for key in keys if key not in mapping]
    if missing:
        has = ", ".join(str(key) for key in list(mapping)[:12])
        raise DamagedFile(path, f"has no {missing[0]!r} entry (it has {has or 'none'})", advice)
    return mapping


def read_safetensors(path, what, advice=None):
    """{name: tensor} of a safetensors file; a cut-short or foreign file is DamagedFile naming it.
    (safetensors and torch are imported here, not above: bench.py sets OpenMP's wait before torch starts.)"""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    require_file(path, what, advice)
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:  # "incomplete metadata, file not fully covered", ...
        raise DamagedFile(path, f"cannot be read as safetensors ({_first_line(error)}): the file is cut "
                          "short or damaged", advice) from None


def read_parquet(path, what, advice=None, columns=None):
    """The pyarrow table of a parquet file (only `columns`, if given); a cut-short file or a missing column
    is DamagedFile naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    require_file(path, what, advice)
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as error:  # "Parquet magic bytes not found in footer", ...
        raise DamagedFile(path, f"cannot be read as parquet ({_first_line(error)}): the file is cut short or "
                          "damaged", advice) from None
    missing = [name for name in columns or [] if name not in schema.names]
    if missing:
        raise DamagedFile(path, f"has no column {missing[0]!r} (it has {', '.join(schema.names)})", advice)
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as error:  # a footer that reads, pages that do not
        raise DamagedFile(path, f"cannot be read as parquet ({_first_line(error)}): the file is damaged",
                          advice) from None


def read_torch_dict(path, what, advice=None):
    """The dict a torch.save file holds, loaded with weights_only (tensors, numbers, strings: never code);
    a cut-short file, another format or another type is DamagedFile naming it."""
    import pickle

    import torch

    require_file(path, what, advice)
    try:
        value = torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:  # "failed finding central
        # directory" (a cut zip), "Weights only load failed" (a pickle of other objects), ...
        raise DamagedFile(path, f"cannot be read as {what} ({_first_line(error)}): the file is cut short or "
                          "damaged", advice) from None
    if not isinstance(value, dict):
        raise DamagedFile(path, f"holds a {type(value).__name__} where {what} is a dict", advice)
    return value


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



# the codecs a recording's videos may use:
# name -> (FFmpeg encoder, the codec name a dataset's info.json gives)
CODECS = {"libsvtav1": ("libsvtav1", "av1"), "av1": ("libsvtav1", "av1"), "h264": ("libx264", "h264"),
          "libx264": ("libx264", "h264")}


def encode_video(path, videos, fps, codec):
    """Encode (T, H, W, 3) uint8 videos one after the other into one mp4 (yuv420p, a keyframe every 2 frames
    like lerobot); frame k of the file is shown at k / fps. codec: a key of CODECS."""
    # SVT-AV1 prints its settings for every stream it opens: errors only
    os.environ.setdefault("SVT_LOG", "1")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    encoder = CODECS[codec][0]
    if encoder not in av.codecs_available:  # PyAV's wheels differ by platform: say which encoders there are
        others = [name for name, (other, _) in CODECS.items() if other in av.codecs_available]
        raise ValueError(f"this PyAV build has no {encoder} encoder (for {codec}); codecs that encode here: "
                         f"{', '.join(others) or 'none'} (--codec)")
    if encoder == "libsvtav1":
        options = {"crf": "30", "g": "2", "preset": "10"}
    else:
        options = {"crf": "23", "g": "2", "preset": "veryfast"}
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
    frames = []
    for video in videos:
        for frame in video[::step]:
            frames.append({"image": array_stats(frame.reshape(-1, 3) / 255.0)})
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

VIDEO_ADVICE = "delete it and download or write the dataset again"


def open_video(path):
    """Open an mp4 for decoding; the container picks the decoder (libdav1d for AV1)."""
    try:
        container = av.open(path)
    except Exception as error:  # (FFmpeg's errors, and OSError: cut short, not an mp4, unreadable)
        reason = _first_line(error)
        raise DamagedFile(path, f"cannot be read as a video ({reason}): the file is damaged or incomplete",
                          VIDEO_ADVICE) from None
    if not container.streams.video:
        container.close()
        raise DamagedFile(path, "holds no video stream: the file is damaged or incomplete", VIDEO_ADVICE)
    return container, container.streams.video[0]


def frame_times(path, expected_frames=None, says=None):
    """Presentation time in seconds of every frame of an mp4, read from the packets (nothing decoded).
    expected_frames: the frames its dataset says it holds (`says` tells whose word that is): a video with
    fewer is cut short, an error naming both counts, never a lookup snapped to other frames."""
    container, stream = open_video(path)
    with container:
        seconds_per_tick = float(stream.time_base)
        try:
            pts = sorted(packet.pts for packet in container.demux(stream) if packet.pts is not None)
        except av.error.FFmpegError as error:
            reason = _first_line(error)
            raise DamagedFile(path, f"cannot be read as a video ({reason}): the file is damaged or "
                              "incomplete", VIDEO_ADVICE) from None
    if not pts:
        raise DamagedFile(path, "holds no frames: the file is damaged or incomplete", VIDEO_ADVICE)
    if expected_frames is not None and len(pts) < expected_frames:
        raise DamagedFile(path, f"holds {len(pts)} frames, but {says or 'its dataset'} says it has "
                          f"{expected_frames}: the video is cut short or damaged", VIDEO_ADVICE)
    return np.array(pts, dtype=np.float64) * seconds_per_tick


def video_size(path):
    """(height, width) of an mp4's frames."""
    container, stream = open_video(path)
    with container:
        return stream.codec_context.height, stream.codec_context.width


def decode_all(path, out, progress):
    """Decode every frame of an mp4 in order into `out` (N, 3, H, W) uint8 (planar: converts fastest
    later)."""
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
            raise DamagedFile(path, f"cannot be decoded ({_first_line(error)}): the video is damaged",
                              VIDEO_ADVICE) from None
    if count != len(out):
        raise DamagedFile(path, f"decodes to {count} frames, but its packets say {len(out)}: the video is "
                          "damaged", VIDEO_ADVICE)


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
            raise DamagedFile(path, f"cannot be decoded ({_first_line(error)}): the video is damaged",
                              VIDEO_ADVICE) from None
        raise DamagedFile(path, f"ends before frame {position}: the video is damaged or incomplete",
                          VIDEO_ADVICE)


# ----------------------------------------------------------------------------------------------------
# The command lines: --help with defaults, name=value lists.


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help as the command lines here print it: the description's line breaks kept, each option's default
    shown (but None and False: an option without a default value, or a switch)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parse_mapping(text, flag):
    """A command line's 'a=x,b=y' -> {"a": "x", "b": "y"} (camera renames, camera devices); `flag` names
    the option in the error."""
    mapping = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{flag} expects name=value pairs separated by commas (e.g. "
                             f"top=camera1,wrist=camera2), got {item!r}")
        mapping[key.strip()] = value.strip()
    return mapping
