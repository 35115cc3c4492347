"""Tests of data.py: the reference reader's samples on its own dataset, and datasets our writer makes."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from data import LeRobotDataset
from record import synthetic_episodes, write_lerobot_dataset
from so100 import MOTOR_NAMES

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "testdata", "lerobot_dataset_tiny")


# --------------------------------------------------------------------------------------------------------
# The reference fixture: a v3.0 dataset written by lerobot and what lerobot's reader returns for it
# --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def expected():
    with open(os.path.join(FIXTURE, "expected.json")) as f:
        meta = json.load(f)
    return meta, load_file(os.path.join(FIXTURE, "expected_samples.safetensors"))


@pytest.mark.parametrize("max_cache_gb", [16.0, 0.0], ids=["pre-decoded", "on-the-fly"])
def test_fixture_samples_match_reference(expected, max_cache_gb, tmp_path):
    meta, samples = expected
    ds = LeRobotDataset(os.path.join(FIXTURE, "dataset"), chunk_size=meta["chunk_size"],
                        max_cache_gb=max_cache_gb, cache_dir=str(tmp_path))
    assert len(ds) == meta["len"] and ds.fps == meta["fps"] and ds.tasks == meta["tasks"]
    assert ds.camera_keys == ["observation.images." + c for c in meta["cameras"]]
    for j, i in enumerate(meta["indices"]):
        item = ds[i]
        assert torch.equal(item["action"], torch.from_numpy(samples[f"{j}.action"]))
        assert torch.equal(item["action_is_pad"], torch.from_numpy(samples[f"{j}.action_is_pad"]))
        assert torch.equal(item["observation.state"], torch.from_numpy(samples[f"{j}.state"][0]))
        for name in ("episode_index", "frame_index", "index"):
            assert item[name].dtype == torch.int64 and int(item[name]) == int(samples[f"{j}.{name}"][0])
        assert item["task"] == meta["tasks"][int(samples[f"{j}.task_id"][0])]
        for camera in meta["cameras"]:
            image = item["observation.images." + camera]
            # uint8 as read (the model converts them where the batch lands), the reference's floats × 255
            assert image.dtype == torch.uint8 and image.shape == samples[f"{j}.image.{camera}"].shape
            assert (image / 255 - torch.from_numpy(samples[f"{j}.image.{camera}"])).abs().mean() < 2 / 255


def test_fixture_stats_are_float32_tensors_of_stats_json(expected, tmp_path):
    ds = LeRobotDataset(os.path.join(FIXTURE, "dataset"), cache_dir=str(tmp_path))
    with open(os.path.join(FIXTURE, "dataset", "meta", "stats.json")) as f:
        raw = json.load(f)
    assert sorted(ds.stats) == expected[0]["stats_keys"]
    for feature in ("observation.state", "action", "observation.images.top"):
        for name in ("mean", "std", "min", "max"):
            value = ds.stats[feature][name]
            assert value.dtype == torch.float32
            assert torch.equal(value, torch.tensor(raw[feature][name], dtype=torch.float32))
    assert ds.stats["observation.images.top"]["mean"].shape == (3, 1, 1)


def test_dataloader_workers_give_the_same_samples(tmp_path):
    ds = LeRobotDataset(os.path.join(FIXTURE, "dataset"), chunk_size=10, max_cache_gb=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, num_workers=2)
    seen = set()
    for batch in loader:
        assert isinstance(batch["task"], list) and batch["observation.images.top"].shape[1:] == (3, 48, 64)
        for b, i in enumerate(batch["index"].tolist()):
            item = ds[i]
            assert torch.equal(batch["action"][b], item["action"])
            assert torch.equal(batch["observation.images.wrist"][b], item["observation.images.wrist"])
            seen.add(i)
    assert seen == set(range(len(ds)))


# --------------------------------------------------------------------------------------------------------
# Datasets from our writer: three cameras, 15 fps, episodes of a few frames, v3.0 and v2.1
# --------------------------------------------------------------------------------------------------------

LENGTHS = [5, 1, 12, 3]
CAMERAS = ("top", "wrist", "side")


def distinct_frames(episodes, seed=1):
    """Give every frame a bright square at a random place, so that neighbouring frames differ a lot."""
    rng = np.random.default_rng(seed)
    for episode in episodes:
        for frames in episode["images"].values():
            height, width = frames.shape[1:3]
            for frame in frames:
                y, x = rng.integers(0, height - 12), rng.integers(0, width - 12)
                frame[y:y + 12, x:x + 12] = (250, 250, 250)
    return episodes


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The same episodes written as v3.0 (AV1) and as v2.1 (H.264)."""
    episodes = distinct_frames(synthetic_episodes(len(LENGTHS), LENGTHS, 48, 64, CAMERAS, seed=3, noise=False))
    root = tmp_path_factory.mktemp("written")
    v3 = write_lerobot_dataset(str(root / "v3"), episodes, fps=15, codec="libsvtav1")
    v2 = write_lerobot_dataset(str(root / "v2"), episodes, fps=15, codec="h264", version="v2.1")
    return episodes, v3, v2, str(root / "cache")


def test_the_episode_sheet_draws_a_v21_dataset_too(written, tmp_path):
    """data.py --show on a v2.1 dataset (no meta/episodes table, so no verdict to show)."""
    import data

    sheet = data.draw_episode(written[2], 2, str(tmp_path / "sheet.png"))
    assert sheet == str(tmp_path / "sheet.png") and open(sheet, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def check_against_episodes(ds, episodes, chunk_size):
    """Every item equals what the episodes say: state, chunked actions with padding, frames, task."""
    for i in range(len(ds)):
        item = ds[i]
        episode = episodes[int(item["episode_index"])]
        frame, length = int(item["frame_index"]), len(episode["action"])
        steps = np.arange(frame, frame + chunk_size)
        assert torch.equal(item["observation.state"], torch.from_numpy(episode["observation.state"][frame]))
        assert torch.equal(item["action"], torch.from_numpy(episode["action"][np.minimum(steps, length - 1)]))
        assert torch.equal(item["action_is_pad"], torch.from_numpy(steps >= length))
        assert item["task"] == episode["task"]
        for camera in CAMERAS:
            decoded = item["observation.images." + camera].permute(1, 2, 0).numpy().astype(float)  # (H, W, 3)
            errors = [np.abs(decoded - f).mean() if 0 <= t < length else np.inf
                      for t, f in ((t, episode["images"][camera][min(max(t, 0), length - 1)]) for t in (frame - 1, frame, frame + 1))]
            # within compression error of the frame written there, and nearer to it than to its neighbours
            assert errors[1] < 6 and errors[1] < min(errors[0], errors[2])


@pytest.mark.parametrize("version", ["v3", "v2"])
def test_written_dataset_reads_back(written, version):
    episodes, v3, v2, cache = written
    ds = LeRobotDataset(v3 if version == "v3" else v2, chunk_size=4, cache_dir=cache)
    assert len(ds) == sum(LENGTHS) and ds.fps == 15
    assert ds.camera_keys == ["observation.images." + c for c in CAMERAS]
    assert ds.tasks == list(dict.fromkeys(e["task"] for e in episodes))
    assert [int(ds[i]["index"]) for i in range(len(ds))] == list(range(sum(LENGTHS)))
    # 6-wide vectors are named like the SO-100's (what so100.py and lerobot's so100 robot call them)
    assert ds.info["features"]["action"]["names"] == [f"{name}.pos" for name in MOTOR_NAMES]
    check_against_episodes(ds, episodes, chunk_size=4)


def test_v21_stats_aggregate_to_the_v30_stats(written):
    """v2.1 keeps stats per episode; merged they must equal the stats over all frames (v3.0 stats.json)."""
    _, v3, v2, cache = written
    whole, merged = LeRobotDataset(v3, cache_dir=cache).stats, LeRobotDataset(v2, cache_dir=cache).stats
    for feature in ("observation.state", "action", "timestamp", "index", "observation.images.side"):
        for name in ("mean", "std", "min", "max", "count"):
            torch.testing.assert_close(merged[feature][name], whole[feature][name], rtol=1e-5, atol=1e-4)
    assert merged["observation.images.top"]["mean"].shape == (3, 1, 1)
    assert ((whole["observation.images.top"]["mean"] > 0) & (whole["observation.images.top"]["max"] <= 1)).all()


def test_on_the_fly_decoding_equals_the_cache(written):
    _, v3, _, cache = written
    cached = LeRobotDataset(v3, chunk_size=4, cache_dir=cache)
    streamed = LeRobotDataset(v3, chunk_size=4, max_cache_gb=0)
    order = list(range(len(cached))) + list(np.random.default_rng(0).permutation(len(cached)))  # in order, then shuffled
    for i in order:
        for key in cached.camera_keys:
            assert torch.equal(streamed[i][key], cached[i][key])


def test_without_cache_no_video_is_probed_for_its_size(written, monkeypatch):
    """max_cache_gb=0 decodes on the fly: opening the dataset needs no frame sizes (no extra mp4 opens)."""
    _, v3, _, _ = written
    monkeypatch.setattr("data.video_size", lambda path: pytest.fail(f"{path} opened for its size"))
    assert not LeRobotDataset(v3, chunk_size=4, max_cache_gb=0)._cached


def test_timestamp_drift_snaps_to_the_nearest_frame(written, tmp_path):
    """Summed durations in long concatenated videos drift off the frame grid: lookups must still land."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    episodes, v3, _, cache = written
    drifted = tmp_path / "drifted"
    shutil.copytree(v3, drifted)
    path = drifted / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(path)
    for camera in CAMERAS:  # episode e starts 0.15·e frames late (5 ms and more: far beyond a 1e-4 s tolerance)
        name = f"videos/observation.images.{camera}/from_timestamp"
        late = np.asarray(table.column(name).to_pylist()) + 0.15 / 15 * np.arange(len(table))
        table = table.set_column(table.column_names.index(name), name, pa.array(late))
    pq.write_table(table, path)
    check_against_episodes(LeRobotDataset(str(drifted), chunk_size=4, cache_dir=cache), episodes, chunk_size=4)


def test_episode_subset_keeps_original_indices(written):
    episodes, v3, _, cache = written
    ds = LeRobotDataset(v3, chunk_size=6, episodes=[3, 0], cache_dir=cache)
    assert len(ds) == LENGTHS[0] + LENGTHS[3]
    assert [int(ds[i]["episode_index"]) for i in range(len(ds))] == [0] * LENGTHS[0] + [3] * LENGTHS[3]
    assert int(ds[LENGTHS[0]]["index"]) == sum(LENGTHS[:3])  # the first row of episode 3, numbered as in the file
    check_against_episodes(ds, episodes, chunk_size=6)
    with pytest.raises(ValueError, match=r"episodes \[7\] are not in the dataset"):
        LeRobotDataset(v3, episodes=[0, 7], cache_dir=cache)


def test_hub_id_downloads_only_the_chosen_episodes(written, tmp_path, monkeypatch):
    """A hub id goes through huggingface_hub.snapshot_download: metadata first, then only the needed files.

    The hub is out of reach here, so snapshot_download is replaced by a copy from a local folder that
    filters paths the way the hub client does (fnmatch on allow_patterns).
    """
    import fnmatch

    import huggingface_hub

    episodes, _, v2, cache = written
    remote, local, requests = v2, tmp_path / "snapshot", []

    def snapshot_download(repo_id, repo_type, revision, allow_patterns):
        requests.append((repo_id, repo_type, list(allow_patterns)))
        for folder, _, names in os.walk(remote):
            for name in names:
                relative = os.path.relpath(os.path.join(folder, name), remote)
                if any(fnmatch.fnmatch(relative, pattern) for pattern in allow_patterns):
                    os.makedirs(local / os.path.dirname(relative), exist_ok=True)
                    shutil.copy(os.path.join(folder, name), local / relative)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    ds = LeRobotDataset("someone/so100-test", chunk_size=4, episodes=[2], cache_dir=cache)
    assert [r[:2] for r in requests] == [("someone/so100-test", "dataset")] * 2 and requests[0][2] == ["meta/**"]
    fetched = sorted(p for p in requests[1][2] if not p.startswith("meta/"))
    assert fetched == ["data/chunk-000/episode_000002.parquet"] + [
        f"videos/chunk-000/observation.images.{c}/episode_000002.mp4" for c in sorted(CAMERAS)]
    assert not os.path.exists(local / "data" / "chunk-000" / "episode_000000.parquet")
    check_against_episodes(ds, episodes, chunk_size=4)


def test_rename_cameras(written):
    _, v3, _, cache = written
    ds = LeRobotDataset(v3, rename={"top": "camera1", "observation.images.wrist": "camera2"}, cache_dir=cache)
    assert ds.camera_keys == ["observation.images.camera1", "observation.images.camera2", "observation.images.side"]
    assert set(ds.camera_keys) <= set(ds[0]) and "observation.images.top" not in ds[0]
    assert ds.stats["observation.images.camera1"]["mean"].shape == (3, 1, 1)
    with pytest.raises(ValueError, match="cannot rename cameras .*observation.images.front.*cameras are"):
        LeRobotDataset(v3, rename={"front": "camera1"}, cache_dir=cache)


def test_writer_rejects_bad_episodes(tmp_path):
    good = synthetic_episodes(1, 3, 16, 16, ("top",))
    with pytest.raises(ValueError, match="same T"):
        write_lerobot_dataset(str(tmp_path / "a"), [{**good[0], "action": good[0]["action"][:2]}])
    with pytest.raises(ValueError, match="even height and width"):
        write_lerobot_dataset(str(tmp_path / "b"), synthetic_episodes(1, 3, 15, 16, ("top",)))
    with pytest.raises(ValueError, match="joint_names has 2 names for vectors of 6 entries"):
        write_lerobot_dataset(str(tmp_path / "d"), good, joint_names=["a", "b"])
    with pytest.raises(ValueError, match="codec"):
        write_lerobot_dataset(str(tmp_path / "c"), good, codec="mpeg2")


# --------------------------------------------------------------------------------------------------------
# Bad input: one clear error each
# --------------------------------------------------------------------------------------------------------

@pytest.fixture
def fixture_copy(tmp_path):
    root = tmp_path / "dataset"
    shutil.copytree(os.path.join(FIXTURE, "dataset"), root)
    return root


def test_unknown_directory_or_repo():
    with pytest.raises(FileNotFoundError, match="no dataset directory"):
        LeRobotDataset("/no/such/dataset/dir")
    with pytest.raises(FileNotFoundError, match="could not be fetched as a dataset from the Hugging Face Hub"):
        LeRobotDataset("nobody-smolvla-test/no-such-dataset")


@pytest.mark.parametrize("missing", ["meta/info.json", "meta/stats.json", "meta/tasks.parquet", "meta/episodes"])
def test_missing_meta_file(fixture_copy, missing, tmp_path):
    path = fixture_copy / missing
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(FileNotFoundError, match=f"is missing {missing}"):
        LeRobotDataset(str(fixture_copy), cache_dir=str(tmp_path / "cache"))


def test_unsupported_version(fixture_copy):
    info_path = fixture_copy / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    info["codebase_version"] = "v1.6"
    info_path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match="v1.6 dataset; this reader supports v2.1, v3.0"):
        LeRobotDataset(str(fixture_copy))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_video(fixture_copy, damage, tmp_path):
    video = fixture_copy / "videos" / "observation.images.wrist" / "chunk-000" / "file-000.mp4"
    data = video.read_bytes()
    video.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\0" * len(data))
    with pytest.raises(ValueError, match="damaged"):
        LeRobotDataset(str(fixture_copy), cache_dir=str(tmp_path / "cache"))


def test_index_out_of_range(tmp_path):
    ds = LeRobotDataset(os.path.join(FIXTURE, "dataset"), cache_dir=str(tmp_path))
    assert int(ds[-1]["index"]) == 62
    with pytest.raises(IndexError, match="index 63 is out of range for a dataset of 63 samples"):
        ds[63]


def test_frame_cache_keeps_under_its_cap_listing_and_clearing(tmp_path):
    """The least recently used files of other datasets go when a dataset needs room; `python data.py --cache`
    lists the cache by dataset and `--clear-cache` empties it."""
    cache, dataset = tmp_path / "frames", os.path.join(FIXTURE, "dataset")
    LeRobotDataset(dataset, cache_dir=str(cache))
    ours = sum(os.path.getsize(cache / name) for name in os.listdir(cache) if name.endswith(".npy"))
    for age, name in ((300, "old"), (200, "newer")):  # two other datasets' videos of 1 MB, used some time ago
        (cache / f"{name}.npy").write_bytes(b"\0" * 10**6)
        (cache / f"{name}.source").write_text(f"/datasets/{name}")
        os.utime(cache / f"{name}.source", (time.time() - age,) * 2)
    LeRobotDataset(dataset, cache_dir=str(cache), max_cache_gb=(ours + 1.5e6) / 1e9)
    assert not (cache / "old.npy").exists() and (cache / "newer.npy").exists()
    env = {**os.environ, "SMOLVLA_CACHE_DIR": str(cache)}
    listing = subprocess.run([sys.executable, os.path.join(HERE, "data.py"), "--cache"], env=env, capture_output=True,
                             text=True, timeout=60, check=True).stdout.splitlines()
    assert listing[0] == f"{cache}: {(ours + 1e6) / 1e9:.3f} GB" and listing[1].endswith("GB  /datasets/newer")
    assert listing[2] == f"{ours / 1e9:10.3f} GB  {os.path.realpath(dataset)}" and len(listing) == 3
    subprocess.run([sys.executable, os.path.join(HERE, "data.py"), "--clear-cache"], env=env, check=True, timeout=60)
    assert not cache.exists()


def test_one_command_line_refuses_the_flags_of_the_other_command(monkeypatch, tmp_path, capsys):
    """data.py has one parser for its two commands: the sheet's flags without --show, or --show beside the
    cache's flags, are one usage error (exit 2) that touches nothing, not a flag silently dropped."""
    import data

    cache = tmp_path / "frames"
    cache.mkdir()
    monkeypatch.setenv("SMOLVLA_CACHE_DIR", str(cache))
    for argv, says in ((["--episode", "3"], "give --show"), (["--show", str(tmp_path), "--clear-cache"], "one at a time")):
        with pytest.raises(SystemExit) as refused:
            data.main(argv)
        assert refused.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(says)
    assert cache.exists()  # not cleared


def test_uint8_frames_reach_the_model_as_the_floats_they_stand_for(tiny, io):
    """The reader's uint8 frames are converted where the batch lands (SmolVLA.prepare_images): the same
    pixels as float32 / 255, so the training loss is the same either way."""
    frames = [(img * 255).round().to(torch.uint8) for img in (io["image0"], io["image1"])]
    masks = [torch.ones(2, dtype=torch.bool)] * 2
    as_float = [torch.from_numpy(np.divide(f.numpy(), np.float32(255), dtype=np.float32)) for f in frames]
    for converted, expected in zip(tiny.prepare_images(frames, masks)[0], tiny.prepare_images(as_float, masks)[0]):
        assert torch.equal(converted, expected)
    batch = {"observation.state": io["state"], "action": io["actions"], "task": ["pick", "place"],
             "observation.images.top": frames[0], "observation.images.wrist": frames[1]}
    losses = [tiny.training_loss(b, noise=io["noise"], time=io["time"]) for b in
              (batch, {**batch, "observation.images.top": as_float[0], "observation.images.wrist": as_float[1]})]
    assert torch.equal(*losses)
