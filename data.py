"""A LeRobot dataset as SmolVLA's training samples: frame i -> state, camera images, the next actions.

SmolVLA (arXiv 2506.01844, §4) is trained on community datasets in the LeRobot format, recorded on
low-cost arms: one row per control step (joint state, commanded action, task string) in parquet files,
and one video stream per camera in mp4 files. A training sample for frame i of an episode is what the
policy sees at that step plus what it must predict: the next `chunk_size` actions (50 for SmolVLA) of
the same episode ("action chunking"):

    dataset[i] = {"observation.state": (S,) float32,
                  "observation.images.<camera>": (3, H, W) uint8, one per camera,
                  "action": (chunk_size, A) float32        actions i .. i + chunk_size - 1 of i's episode,
                  "action_is_pad": (chunk_size,) bool      True where that step lies past the episode's end,
                  "task": str, and the row's timestamp, episode_index, frame_index, index, task_index}

Near the end of an episode fewer than `chunk_size` actions remain; the missing steps repeat the episode's
last action and are flagged in `action_is_pad`, so the loss can ignore them.

Reading order: `LeRobotDataset` comes first, its items (`__getitem__`) before how it is built; the
machinery it uses follows it: the two on-disk layouts and normalization statistics (plumbing.py decodes
the videos).

Two on-disk layouts exist in the wild, and both are read here, every path coming from the templates in
`meta/info.json`:
  v3.0  many episodes per parquet/mp4 file; `meta/episodes/*.parquet` says where each episode lives
        (rows `dataset_from_index:dataset_to_index`, and per camera a `from_timestamp` into its mp4).
  v2.1  one parquet and one mp4 per episode; `meta/episodes.jsonl` lists the episodes in order.

Speed. Decoding video is what starves training: the reference reader opens the mp4, seeks and decodes
for every sample. Here every frame a dataset needs is decoded once, sequentially (the cheapest way to
decode), into a uint8 memory-mapped cache on disk (planar, (3, H, W) per frame); a sample then costs a
memory copy, and frames stay uint8 through the DataLoader (a quarter of float32's bytes between processes)
until the batch lands (SmolVLA.prepare_images converts them). Datasets whose frames would not fit
`max_cache_gb` (or half the free disk) are decoded on the fly, containers kept open per worker.

Video frames are looked up by time (`from_timestamp + timestamp`) and snapped to the nearest frame that
the mp4 really holds, so that the small drift of summed durations in long concatenated files cannot
make a lookup fail.

The writer of such datasets (`write_lerobot_dataset`, used by the tests and the demo) lives in record.py;
mp4 decoding in plumbing.py; the reader's benchmark (samples per second through a DataLoader) in bench.py.
Last here: the command line (`python data.py --help`): an episode's sheet (`--show DIR --episode N`), to
look at a recording before training on it, and the frame cache listed (`--cache`) or emptied
(`--clear-cache`).
"""

import argparse
import collections
import hashlib
import os
import shutil
import sys

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from plumbing import (HelpFormatter, StreamingDecoder, aggregate_stats, decode_all, frame_times, read_json,
                      read_jsonl, read_parquet, require_keys, resolve_dir, video_size)
from smolvla import IMAGE_PREFIX, STATE

SUPPORTED_VERSIONS = ("v2.1", "v3.0")
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "smolvla", "frames")
# set it to put the frame cache elsewhere (a bigger disk, a test's tmp)
CACHE_DIR_VARIABLE = "SMOLVLA_CACHE_DIR"
# what to do with a dataset file that is damaged or cut short (the error names the file)
DATASET_ADVICE = "download or write the dataset again"


# ----------------------------------------------------------------------------------------------------
# The dataset: items first (the idea), then how it is built
# ----------------------------------------------------------------------------------------------------

class LeRobotDataset(torch.utils.data.Dataset):
    """A LeRobot v2.1/v3.0 dataset as training samples with action chunks.

    repo_id_or_path: a local dataset directory, or a Hugging Face Hub dataset id (only the metadata and the
        files of the chosen episodes are downloaded).
    chunk_size: actions per sample (SmolVLA: 50).
    episodes: episode indices to use (default all); items are numbered 0..len-1 over those episodes.
    rename: camera renames, e.g. {"top": "camera1", "wrist": "camera2"} to match a checkpoint's names.
    revision: the hub dataset's branch, tag or commit (default: its main branch); ignored for a directory.
    max_cache_gb: pre-decode every video into a uint8 cache when the decoded frames fit in this many GB and
        in half the free disk (0 turns the cache off: frames are then decoded on the fly). 480x640 frames
        take 0.92 MB each: svla_so100_stacking (22,956 frames, 2 cameras) needs 42 GB.
    cache_dir: where that cache lives (default $SMOLVLA_CACHE_DIR, else ~/.cache/smolvla/frames). Cache files
        are named by the video's path, size and modification time, so an edited video is decoded again. The
        whole cache stays under max_cache_gb: the least recently used go first (`python data.py --cache`).

    Built once by `__init__` (below the items): the chosen episodes' rows as flat arrays with one entry per
    item, `state` (N, S), `action` (N, A), `_start`/`_end` (N,) the rows [start, end) of each item's
    episode; per camera the mp4 and frame position of each item; the frames themselves pre-decoded into a
    uint8 cache on disk, or decoded on demand.
    """

    # -- items ---------------------------------------------------------------------------------------

    def __len__(self):
        return len(self._index)

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} is out of range for a dataset of {len(self)} samples.")
        i = int(i) % len(self)
        start = self._start[i]  # the rows [start, end) of i's episode
        end = self._end[i]
        # the next chunk_size actions of this episode; past its end repeat the last one and flag it as padding
        steps = i + np.arange(self.chunk_size)
        item = {
            "observation.state": torch.from_numpy(self.state[i].copy()),  # (S,)
            "action": torch.from_numpy(self.action[np.clip(steps, start, end - 1)]),  # (chunk, A)
            "action_is_pad": torch.from_numpy(steps >= end),  # (chunk,)
        }
        for key, name in self._rename.items():
            item[name] = torch.from_numpy(np.array(self._image(key, i)))  # (3, H, W) uint8, a copy
        item["task"] = self.tasks[self._task_index[i]]
        item["timestamp"] = torch.tensor(self._timestamp[i], dtype=torch.float32)
        for name in ("episode_index", "frame_index", "index", "task_index"):
            item[name] = torch.tensor(getattr(self, "_" + name)[i], dtype=torch.int64)
        return item

    def _image(self, key, i):
        """(3, H, W) uint8 frame of camera `key` for row i."""
        if self._frames is None or self._frames[0] != os.getpid():  # first use in this process (worker)
            if self._cached:
                frames = [np.load(path, mmap_mode="r") for path in self._cache_files]
            else:
                frames = StreamingDecoder()
            self._frames = (os.getpid(), frames)
        file_id = self._file_of[key][i]
        position = self._position_of[key][i]
        if self._cached:
            return self._frames[1][file_id][position]  # a view into the mapped file
        frame = self._frames[1].frame(self._video_files[file_id], self._frame_times[file_id], position)
        return frame.transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W), a view

    def __getstate__(self):  # sent to DataLoader workers: without open containers or mapped files
        state = self.__dict__.copy()
        state["_frames"] = None
        return state

    # -- construction: locate, read the tables, find every frame, build the cache ----------------------

    def __init__(self, repo_id_or_path, chunk_size=50, episodes=None, rename=None, revision=None,
                 max_cache_gb=64.0, cache_dir=None):
        root, download = self._locate(str(repo_id_or_path), revision)
        self.chunk_size = chunk_size
        self.root = root
        info_path = _require(root, os.path.join("meta", "info.json"))
        info = read_json(info_path, "meta/info.json", advice=DATASET_ADVICE)
        require_keys(info, ["codebase_version", "fps", "features", "data_path"], info_path, DATASET_ADVICE)
        version = info.get("codebase_version")
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(f"{root} is a LeRobot {version} dataset; this reader supports "
                             f"{', '.join(SUPPORTED_VERSIONS)}. "
                             "Convert it with lerobot's dataset conversion script first.")
        missing = [name for name in ("observation.state", "action") if name not in info["features"]]
        if missing:
            raise ValueError(f"{root} has no {' or '.join(missing)} feature: SmolVLA trains on state and "
                             "action.")
        self.info = info
        self.fps = info["fps"]
        table = _episodes_v3(root, info) if version == "v3.0" else _episodes_v2(root, info)
        self.episodes = self._choose_episodes(table, episodes)
        video_keys = _video_keys(info)
        if download is not None:  # hub: fetch only the parquet and mp4 files of the chosen episodes
            needed = set()
            for episode in self.episodes:
                needed.add(_data_path(info, episode))
                for key in video_keys:
                    needed.add(_video_path(info, episode, key))
            download(sorted(needed))
        self.tasks = _read_tasks(root, info)
        self._load_rows()
        self._rename = self._camera_renames(video_keys, rename or {})
        self.camera_keys = [self._rename[key] for key in video_keys]
        self.stats = {self._rename.get(key, key): stats for key, stats in _read_stats(root, info).items()}
        self._locate_frames(video_keys, table)
        self._frames = None  # per process: cached frame arrays or a streaming decoder
        cache_dir = cache_dir or os.environ.get(CACHE_DIR_VARIABLE) or DEFAULT_CACHE_DIR
        self._cached = self._build_cache(max_cache_gb, cache_dir)

    @staticmethod
    def _locate(name, revision):
        """(local root, function downloading a list of files or None) for a directory or a hub id (whose
        metadata is downloaded here, the rest once the episodes are chosen)."""
        if os.path.isdir(name):
            return name, None

        def download(files):  # the metadata always, plus `files`: a hub dataset is fetched in two steps
            return resolve_dir(name, "dataset", ["meta/**"] + files, repo_type="dataset", revision=revision,
                               hint="Pass an existing dataset directory or a valid hub dataset id.")

        return download([]), download

    @staticmethod
    def _choose_episodes(table, episodes):
        if episodes is None:
            return [table[i] for i in sorted(table)]
        unknown = sorted(set(episodes) - set(table))
        if unknown:
            raise ValueError(f"episodes {unknown} are not in the dataset (it has episodes "
                             f"{min(table)}..{max(table)}).")
        return [table[i] for i in sorted(set(episodes))]

    def _load_rows(self):
        """Read the chosen episodes' rows into flat numpy arrays (one row per item), episode bounds per
        row."""
        wanted = {episode["episode_index"] for episode in self.episodes}
        columns = ["observation.state", "action", "timestamp", "frame_index", "episode_index", "index",
                   "task_index"]
        tables = []
        for path in sorted({_data_path(self.info, episode) for episode in self.episodes}):
            full = os.path.join(self.root, path)
            if not os.path.exists(full):
                raise FileNotFoundError(f"{self.root} is missing {path}, named by its episodes metadata.")
            table = read_parquet(full, "data file", DATASET_ADVICE, columns)
            mask = np.isin(table.column("episode_index").to_numpy(), list(wanted))
            tables.append(table.filter(pa.array(mask)))
        table = pa.concat_tables(tables)
        table = table.take(pa.array(np.argsort(table.column("index").to_numpy(), kind="stable")))

        def matrix(name):  # list<float> column -> (N, D) float32
            values = table.column(name).combine_chunks()
            return values.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(table), -1)

        self.state = matrix("observation.state")
        self.action = matrix("action")
        for name in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
            setattr(self, "_" + name, table.column(name).to_numpy())
        lengths = {episode["episode_index"]: episode["length"] for episode in self.episodes}
        found = collections.Counter(self._episode_index.tolist())
        short = {}  # episode index -> (rows found, expected length), where they differ
        for episode_index, length in lengths.items():
            if found.get(episode_index, 0) != length:
                short[episode_index] = (found.get(episode_index, 0), length)
        if short:
            raise ValueError(f"{self.root}: episodes {sorted(short)} have (rows, expected length) {short} "
                             "in the data files.")
        # rows are grouped by episode (sorted by global index): [start, end) of each row's episode
        change = np.flatnonzero(np.diff(self._episode_index)) + 1
        starts = np.r_[0, change]
        ends = np.r_[change, len(table)]
        self._start = np.repeat(starts, ends - starts)
        self._end = np.repeat(ends, ends - starts)
        self._rows_of = {}  # episode index -> its rows
        for start, end in zip(starts, ends):
            self._rows_of[int(self._episode_index[start])] = slice(start, end)

    @staticmethod
    def _camera_renames(video_keys, rename):
        """{dataset key: our key}; rename names may be short ("top") or full ("observation.images.top")."""

        def full(name):
            if name.startswith(IMAGE_PREFIX):
                return name
            return IMAGE_PREFIX + name

        mapping = {full(old): full(new) for old, new in rename.items()}
        unknown = sorted(set(mapping) - set(video_keys))
        if unknown:
            raise ValueError(f"cannot rename cameras {unknown}: the dataset's cameras are {video_keys}.")
        return {key: mapping.get(key, key) for key in video_keys}

    def _locate_frames(self, video_keys, table):
        """For every (camera, row): which mp4 holds its frame and at which position (nearest frame in
        time). table: every episode's row (chosen or not): how many frames each mp4 must hold."""
        # per file id: the mp4's path, its frames' times
        self._video_files = []
        self._frame_times = []
        # per camera key: (N,) arrays, the file id and frame position of each row
        self._file_of = {}
        self._position_of = {}
        file_ids = {}
        for key in video_keys:
            # the frames each mp4 of this camera holds, as the episodes metadata says: its episodes' lengths
            said = collections.Counter()
            for row in table.values():
                said[_video_path(self.info, row, key)] += row["length"]
            files = np.empty(len(self._index), dtype=np.int32)
            positions = np.empty(len(self._index), dtype=np.int64)
            for episode in self.episodes:
                episode_index = episode["episode_index"]
                path = os.path.join(self.root, _video_path(self.info, episode, key))
                if path not in file_ids:
                    if not os.path.exists(path):
                        raise FileNotFoundError(f"{self.root} is missing {os.path.relpath(path, self.root)}.")
                    file_ids[path] = len(self._video_files)
                    self._video_files.append(path)
                    frames_said = said[_video_path(self.info, episode, key)]
                    self._frame_times.append(frame_times(path, frames_said, "its episodes metadata"))
                rows = self._rows_of[episode_index]
                times = self._frame_times[file_ids[path]]
                wanted = _video_start(self.info, episode, key) + self._timestamp[rows].astype(np.float64)
                # nearest frame: compare the neighbours on both sides of the insertion point
                right = np.clip(np.searchsorted(times, wanted), 0, len(times) - 1)
                left = np.clip(right - 1, 0, len(times) - 1)
                nearest = np.where(np.abs(times[left] - wanted) <= np.abs(times[right] - wanted), left, right)
                miss = np.abs(times[nearest] - wanted) > 1.0 / self.fps
                if miss.any():
                    raise ValueError(f"video {path} has no frame near t={wanted[miss][0]:.3f}s "
                                     f"needed by episode {episode_index}: the file is damaged or shorter "
                                     "than its episode; delete it and download or write the dataset again.")
                files[rows] = file_ids[path]
                positions[rows] = nearest
            self._file_of[key] = files
            self._position_of[key] = positions

    def _build_cache(self, max_cache_gb, cache_dir):
        """Decode every needed mp4 once into `<cache_dir>/<hash>.npy` (uint8 frames), if they fit the
        budget."""
        if not self._video_files or max_cache_gb <= 0:
            return False
        # (frames, 3, H, W) of each video's cache
        shapes = [(len(times), 3) + video_size(path)
                  for path, times in zip(self._video_files, self._frame_times)]
        total_gb = sum(int(np.prod(shape)) for shape in shapes) / 1e9
        os.makedirs(cache_dir, exist_ok=True)
        free_gb = shutil.disk_usage(cache_dir).free / 1e9
        if total_gb > max_cache_gb or total_gb > free_gb / 2:
            print(f"{self.root}: decoding frames on the fly (decoded they take {total_gb:.1f} GB; "
                  f"max_cache_gb is {max_cache_gb}, {free_gb:.0f} GB free in {cache_dir})")
            return False
        self._cache_files = [os.path.join(cache_dir, self._cache_name(path)) for path in self._video_files]
        todo = [i for i, path in enumerate(self._cache_files) if not os.path.exists(path)]
        # <hash>.source names the dataset (for --cache); rewritten: last used now
        for path in self._cache_files:
            with open(path[:-4] + ".source", "w") as f:
                f.write(os.path.realpath(self.root))
        entries = cache_entries(cache_dir)
        todo_bytes = sum(int(np.prod(shapes[i])) for i in todo)
        while entries and sum(entry[1] for entry in entries) + todo_bytes > max_cache_gb * 1e9:
            os.remove(entries.pop(0)[0])  # the least recently used (ours, just marked, are the newest)
        if todo:
            total = sum(shapes[i][0] for i in todo)
            description = f"decoding videos into {cache_dir} ({total_gb:.2f} GB)"
            with tqdm(total=total, desc=description, unit="frame") as bar:
                for i in todo:
                    partial = f"{self._cache_files[i]}.{os.getpid()}.partial"
                    out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shapes[i])
                    try:
                        decode_all(self._video_files[i], out, bar)
                        out.flush()
                        del out
                        os.replace(partial, self._cache_files[i])  # atomic: readers never see half a cache
                    finally:
                        if os.path.exists(partial):
                            os.remove(partial)
        return True

    @staticmethod
    def _cache_name(path):
        stat = os.stat(path)
        # the layout is in the key too
        key = f"(N, 3, H, W) uint8|{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
        return hashlib.sha1(key.encode()).hexdigest() + ".npy"


def cache_entries(cache_dir):
    """The frame cache's files, least recently used first: [(path, bytes, dataset)], from their .source
    files."""
    names = os.listdir(cache_dir) if os.path.isdir(cache_dir) else []
    sources = [os.path.join(cache_dir, name) for name in names if name.endswith(".source")]
    pairs = [(source[:-7] + ".npy", source) for source in sorted(sources, key=os.path.getmtime)]
    return [(npy, os.path.getsize(npy), open(source).read()) for npy, source in pairs if os.path.exists(npy)]


# ----------------------------------------------------------------------------------------------------
# Machinery the dataset uses, 1/2: where everything lives in the v3.0 and v2.1 layouts (tables, paths, tasks)
# ----------------------------------------------------------------------------------------------------

def _read_jsonl(path):
    return read_jsonl(path, os.path.basename(path), DATASET_ADVICE)


def _require(root, relative):
    """The path of a metadata file that must exist, or an error naming it."""
    path = os.path.join(root, relative)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{root} is missing {relative}: not a complete LeRobot dataset.")
    return path


def recorded_episodes(root):
    """(info, all rows of meta/episodes) of the v3.0 dataset record.py appends to; (None, []) if none yet."""
    path = os.path.join(root, "meta", "info.json")
    info = read_json(path, "meta/info.json", advice=DATASET_ADVICE) if os.path.isfile(path) else None
    if info is not None and info.get("codebase_version") != "v3.0":
        raise ValueError(f"{root} is a {info.get('codebase_version')} dataset: recording appends to v3.0 "
                         "ones only")
    episodes = os.path.join(root, "meta", "episodes", "chunk-000", "file-000.parquet")
    if info is None or not os.path.isfile(episodes):
        return info, []
    return info, read_parquet(episodes, "episodes metadata", DATASET_ADVICE).to_pylist()


def _episodes_v3(root, info):
    """meta/episodes/chunk-*/file-*.parquet -> {episode_index: row dict} (data/video file of each episode)."""
    folder = _require(root, os.path.join("meta", "episodes"))
    files = []
    for dirpath, _, names in os.walk(folder):
        files += [os.path.join(dirpath, name) for name in names if name.endswith(".parquet")]
    files.sort()
    if not files:
        raise FileNotFoundError(f"{root} has no meta/episodes/*/*.parquet: not a complete LeRobot v3.0 "
                                "dataset.")
    wanted = ["episode_index", "tasks", "length", "data/chunk_index", "data/file_index",
              "dataset_from_index", "dataset_to_index"]
    for key in _video_keys(info):
        wanted += [f"videos/{key}/{field}" for field in ("chunk_index", "file_index", "from_timestamp")]
    rows = []
    for path in files:
        rows += read_parquet(path, "episodes metadata", DATASET_ADVICE, wanted).to_pylist()
    return {row["episode_index"]: row for row in rows}


def _episodes_v2(root, info):
    """meta/episodes.jsonl -> {episode_index: row dict}; rows by cumulative lengths, one file per episode."""
    rows = _read_jsonl(_require(root, os.path.join("meta", "episodes.jsonl")))
    episodes = {}
    start = 0  # the episode's first row in the whole dataset
    for row in sorted(rows, key=lambda r: r["episode_index"]):
        row["dataset_from_index"] = start
        row["dataset_to_index"] = start + row["length"]
        row["episode_chunk"] = row["episode_index"] // info["chunks_size"]
        episodes[row["episode_index"]] = row
        start += row["length"]
    return episodes


def _video_keys(info):
    return [key for key, feature in info["features"].items() if feature["dtype"] == "video"]


def _data_path(info, episode):
    if info["codebase_version"] == "v3.0":
        return info["data_path"].format(chunk_index=episode["data/chunk_index"],
                                        file_index=episode["data/file_index"])
    return info["data_path"].format(episode_chunk=episode["episode_chunk"],
                                    episode_index=episode["episode_index"])


def _video_path(info, episode, key):
    if info["codebase_version"] == "v3.0":
        return info["video_path"].format(video_key=key, chunk_index=episode[f"videos/{key}/chunk_index"],
                                         file_index=episode[f"videos/{key}/file_index"])
    return info["video_path"].format(video_key=key, episode_chunk=episode["episode_chunk"],
                                     episode_index=episode["episode_index"])


def _video_start(info, episode, key):
    """Time in its mp4 of an episode's first frame: v3.0 concatenates episodes, v2.1 starts each at 0."""
    return episode[f"videos/{key}/from_timestamp"] if info["codebase_version"] == "v3.0" else 0.0


def _read_tasks(root, info):
    """Task strings ordered by task_index (v3.0: meta/tasks.parquet, v2.1: meta/tasks.jsonl)."""
    if info["codebase_version"] == "v2.1":
        rows = _read_jsonl(_require(root, os.path.join("meta", "tasks.jsonl")))
        return [row["task"] for row in sorted(rows, key=lambda r: r["task_index"])]
    table = read_parquet(_require(root, os.path.join("meta", "tasks.parquet")), "tasks", DATASET_ADVICE)
    # lerobot writes the task strings as the pandas index of this table, whatever that column is called
    text_columns = []
    for name in table.column_names:
        column_type = table.schema.field(name).type
        if pa.types.is_string(column_type) or pa.types.is_large_string(column_type):
            text_columns.append(name)
    if "task_index" not in table.column_names or len(text_columns) != 1:
        raise ValueError(f"{root}/meta/tasks.parquet should hold task_index and one text column, has "
                         f"{table.column_names}.")
    pairs = sorted(zip(table.column("task_index").to_pylist(), table.column(text_columns[0]).to_pylist()))
    return [task for _, task in pairs]


# ----------------------------------------------------------------------------------------------------
# Machinery the dataset uses, 2/2: normalization statistics (v2.1 stores them per episode: pooled on load)
# ----------------------------------------------------------------------------------------------------

def _read_stats(root, info):
    """{feature: {stat: float32 tensor}} from meta/stats.json (v3.0) or merged episodes stats (v2.1)."""
    if info["codebase_version"] == "v3.0":
        stats_path = _require(root, os.path.join("meta", "stats.json"))
        raw = read_json(stats_path, "meta/stats.json", advice=DATASET_ADVICE)
    else:
        rows = _read_jsonl(_require(root, os.path.join("meta", "episodes_stats.jsonl")))
        raw = aggregate_stats([row["stats"] for row in rows])
    tensors = {}
    for feature, stats in raw.items():
        tensors[feature] = {name: torch.tensor(np.asarray(value, dtype=np.float32))
                            for name, value in stats.items()}
    return tensors


# ----------------------------------------------------------------------------------------------------
# Looking at an episode before training on it (its sheet: --show DIR --episode N), and the command line
# ----------------------------------------------------------------------------------------------------

def draw_episode(root, episode, path=None, frames=8):
    """An episode's sheet, to look at a recording before training on it: per camera a strip of `frames`
    frames spread over the episode, then per joint the follower's state and the action (the goal sent) over
    time. PNG at `path` (default: <root>/episode_<N>.png); returns it."""
    import matplotlib.pyplot as plt

    plt.switch_backend("Agg")  # (a file, no window)
    dataset = LeRobotDataset(root, episodes=[episode], max_cache_gb=0)
    path = path or f"{root}/episode_{episode}.png"
    names = dataset.info["features"][STATE]["names"]  # the joints
    cameras = dataset.camera_keys
    times = np.arange(len(dataset)) / dataset.fps  # (T,) seconds of each tick
    items = [dataset[int(i)] for i in np.linspace(0, len(dataset) - 1, frames).round()]
    # a verdict? record.py's v3.0 episodes may say whether the episode succeeded
    rows = []
    if dataset.info["codebase_version"] == "v3.0":
        rows = recorded_episodes(dataset.root)[1]
    success = rows[episode].get("success") if rows else None
    judged = {True: "; success", False: "; failure"}.get(success, "")  # nothing without a verdict
    fig = plt.figure(figsize=(14, 1.8 * len(cameras) + 5), layout="constrained")
    strips, plots = fig.subfigures(2, 1, height_ratios=[1.8 * len(cameras) + 0.01, 5])
    fig.suptitle(f"{root} episode {episode}: {len(dataset)} ticks at {dataset.fps} fps{judged}; "
                 f"task: {items[0]['task']!r}")
    for camera, axes in zip(cameras, strips.subplots(max(len(cameras), 1), frames, squeeze=False)):
        for ax, item in zip(axes, items):
            ax.imshow(item[camera].permute(1, 2, 0).numpy())  # (3, H, W) -> (H, W, 3)
            ax.set_title(f"{camera[len(IMAGE_PREFIX):]}, {item['timestamp']:.1f} s", fontsize=9)
            ax.axis("off")
    for j, ax in enumerate(plots.subplots(2, (len(names) + 1) // 2, squeeze=False).flat[:len(names)]):
        ax.plot(times, dataset.state[:, j], label="state (follower)")
        ax.plot(times, dataset.action[:, j], "--", label="action (goal sent)")
        ax.set(title=names[j], xlabel="time (s)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv=None):
    """The command line: an episode's sheet (--show), or the frame cache listed by dataset (and emptied)."""
    parser = argparse.ArgumentParser(prog="data.py", formatter_class=HelpFormatter, description=(
        "Look at a dataset's episode before training on it, or at the frame cache (videos decoded once, for "
        "every run).\n"
        "  python data.py --show DIR [--episode N] [--out PNG]   draw an episode's sheet (a PNG)\n"
        "  python data.py [--cache]                              list the frame cache by dataset\n"
        "  python data.py --clear-cache                          list it, then empty it"))
    sheet = parser.add_argument_group("an episode's sheet")
    sheet.add_argument("--show", metavar="DIR", help="the dataset (a directory or a hub id)")
    sheet.add_argument("--episode", type=int, metavar="N", help="the episode to draw (default: 0)")
    sheet.add_argument("--out", metavar="PNG", help="the PNG to write (default: DIR/episode_N.png)")
    cache = parser.add_argument_group(f"the frame cache (set {CACHE_DIR_VARIABLE} to put it elsewhere)")
    cache.add_argument("--cache", action="store_true", help="list it by dataset (also the default)")
    cache.add_argument("--clear-cache", action="store_true",
                       help="empty it (datasets decode their videos again)")
    args = parser.parse_args(argv)
    if args.show is None and (args.episode is not None or args.out is not None):
        parser.error("--episode and --out choose the sheet that --show DIR draws: give --show")
    if args.show is not None and (args.cache or args.clear_cache):
        parser.error("--show draws an episode's sheet, --cache and --clear-cache act on the frame cache: "
                     "one at a time")
    if args.show is not None:
        try:
            print(f"wrote {draw_episode(args.show, args.episode or 0, args.out)}")
        except (FileNotFoundError, ValueError, OSError) as e:
            sys.exit(f"error: {e}")
        return
    cache_dir = os.environ.get(CACHE_DIR_VARIABLE) or DEFAULT_CACHE_DIR
    sizes = collections.Counter()  # dataset -> bytes, least recently used first
    for _, size, dataset in cache_entries(cache_dir):
        sizes[dataset] += size
    listing = f"{cache_dir}: {sum(sizes.values()) / 1e9:.3f} GB"
    for dataset, size in sizes.items():
        listing += f"\n{size / 1e9:10.3f} GB  {dataset}"
    print(listing)
    if args.clear_cache:
        shutil.rmtree(cache_dir, ignore_errors=True)
        print(f"{cache_dir}: cleared")


if __name__ == "__main__":
    main()
