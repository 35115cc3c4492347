"""Tests of train.py and demo.py: the toy world, the schedule, fine-tuning with save/resume, DDP, bad input."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import demo
import toy_world as sim
import train
from data import LeRobotDataset
from record import write_lerobot_dataset
from policy import SmolVLAPolicy

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKPOINT = os.path.join(HERE, "testdata", "smolvla_tiny", "checkpoint")
VLM = os.path.join(HERE, "testdata", "smolvla_tiny", "vlm")
DATASET = os.path.join(HERE, "testdata", "lerobot_dataset_tiny", "dataset")


@pytest.fixture(autouse=True, scope="module")
def frame_cache_in_tmp(tmp_path_factory):
    """Datasets decoded by these tests (in this process and in torchrun's) cache their frames in a temporary
    folder, not in the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SMOLVLA_CACHE_DIR", str(tmp_path_factory.mktemp("frames")))
        yield


# ----------------------------------------------------------------------------------------------------
# The toy world (toy_world.py, imported as `sim`, its old name, so the tests read as before)
# ----------------------------------------------------------------------------------------------------


def grid_targets():
    return [np.array([-r * math.sin(math.radians(p)), r * math.cos(math.radians(p))])
            for p in sim.TARGET_PAN_DEG for r in sim.TARGET_REACH_M]


def test_inverse_kinematics_puts_the_tip_on_the_target():
    for target in grid_targets():
        tip = sim.forward_kinematics(sim.inverse_kinematics(target))
        np.testing.assert_allclose(tip, [*target, 0.0], atol=1e-9)


def test_every_target_is_within_the_virtual_arms_joint_ranges():
    from so100 import MOTOR_NAMES
    from virtual_arm import TRUE_CALIBRATION

    for target in grid_targets():
        for corner in ([1, 1], [1, -1], [-1, 1], [-1, -1]):
            joints = sim.inverse_kinematics(target + sim.TARGET_JITTER_M * np.array(corner))
            for name, angle in zip(MOTOR_NAMES, joints):
                entry = TRUE_CALIBRATION[name]
                half_range = (entry["range_max"] - entry["range_min"]) / 2 * 360 / 4095  # degrees mode
                assert abs(angle) < half_range - 2, (name, angle, half_range)


def test_expert_reaches_every_target_and_success_needs_the_target():
    scene, rng = sim.ReachScene(seed=0), np.random.default_rng(0)
    for _ in range(40):
        episode = demo.expert_episode(scene, rng, length=20)
        assert not scene.success(episode["observation.state"][0])  # starts away from the target
        assert scene.success(episode["observation.state"][-1])  # ends on it
        # recorded actions are the expert's bounded steps, and the state follows them
        assert np.abs(episode["action"] - episode["observation.state"]).max() <= scene.expert_speed_deg + 1e-4
    # success is a 3-D radius: the IK pose succeeds, moving the pan by 15 degrees (>= 3.6 cm away) does not
    goal = np.zeros(6)
    goal[:3] = sim.inverse_kinematics(scene.target)
    assert scene.success(goal)
    goal[0] += 15
    assert not scene.success(goal)


def test_image_shows_the_target_and_the_arm_deterministically():
    scene = sim.ReachScene(seed=0, image_size=(64, 64))
    joints = sim.HOME_DEG.copy()
    a, b = scene.render(joints, target=np.array([0.1, 0.1])), scene.render(joints, target=np.array([-0.1, 0.2]))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, scene.render(joints, target=np.array([0.1, 0.1])))  # deterministic
    assert np.abs(a.astype(int) - b).sum() > 0  # the image changes with the target ...
    red = lambda img: np.argwhere((img[..., 0] > 150) & (img[..., 1] < 80))
    # ... and the red disc sits where the target is: right half for x > 0, left half for x < 0
    assert red(a)[:, 1].mean() > 32 and red(b)[:, 1].mean() < 32
    # the arm changes the image too, but not the state-free parts
    bent = joints.copy()
    bent[:3] = sim.inverse_kinematics(np.array([0.1, 0.1]))
    assert np.abs(scene.render(bent, target=np.array([-0.1, 0.2])).astype(int) - b).sum() > 0
    # same seed, same targets
    assert np.array_equal(sim.ReachScene(seed=5).target, sim.ReachScene(seed=5).target)


def test_synthetic_camera_films_the_current_joints():
    scene = sim.ReachScene(seed=1)
    joints = {"now": sim.HOME_DEG.copy()}
    camera = sim.SyntheticCamera(scene, lambda: joints["now"], name="top")
    first = camera.read()
    joints["now"] = np.array([30.0, 60.0, 60.0, 0, 0, 50])
    np.testing.assert_array_equal(camera.read(), scene.render(joints["now"]))
    assert np.abs(camera.read().astype(int) - first).sum() > 0


def test_a_world_that_saw_no_action_still_saves_a_gif_of_the_arm_where_it_stands(tmp_path):
    # a --duration shorter than the first chunk's arrival: no look was taken
    world = sim.ToyWorld(lambda: sim.HOME_DEG.copy(), camera_keys=())
    frames = world.save_gif(tmp_path / "v.gif")
    expected = Image.fromarray(world.scene.render(sim.HOME_DEG)).resize((256, 256))
    np.testing.assert_array_equal(np.asarray(frames[0])[20:], np.asarray(expected)[20:])  # below the label
    with Image.open(tmp_path / "v.gif") as gif:
        assert gif.size == (256, 256)  # (identical frames: PIL stores them as one)
    assert len(frames) == 6  # the one view, held for five more


class ImageReadingController:
    """A hand-written policy that finds the red disc in the image and steps toward its IK solution: it
    must pass the demo's evaluation with real images and fail with shuffled ones."""

    config = type("Config", (), {"camera_keys": ["observation.images.top"], "n_action_steps": 5})()

    def predict_chunk(self, observation):
        image = observation["observation.images.top"].permute(1, 2, 0).numpy().astype(int)  # uint8 pixels, as given
        state = observation["observation.state"].numpy()
        red = np.argwhere((image[..., 0] > 150) & (image[..., 1] < 90) & (image[..., 2] < 90))
        if len(red) == 0:  # target hidden under the arm: stay
            return torch.from_numpy(np.tile(state, (1, 10, 1)))
        row, column = red.mean(axis=0) + 0.5
        x = sim.VIEW_X[0] + column / 64 * (sim.VIEW_X[1] - sim.VIEW_X[0])
        y = sim.VIEW_Y[1] - row / 64 * (sim.VIEW_Y[1] - sim.VIEW_Y[0])
        scene = sim.ReachScene(seed=0)
        scene.target = np.array([x, y])
        chunk, joints = [], state
        for _ in range(10):
            joints = scene.expert_action(joints)
            chunk.append(joints)
        return torch.from_numpy(np.stack(chunk)[None])


def test_demo_evaluation_tells_image_use_from_blindness():
    controller = ImageReadingController()
    x, seconds_per_chunk = demo.evaluate_in_sim(controller, episodes=20, length=20, seed=3)
    y, _ = demo.evaluate_in_sim(controller, episodes=20, length=20, seed=3, shuffle_images=True)
    assert x >= 0.8 and y <= x / 2


def test_demo_pipeline_end_to_end_in_miniature(tmp_path):
    """demo.py with a few episodes and steps: dataset on disk, checkpoint with its VLM dir, eval.json."""
    output = tmp_path / "demo"
    demo.main(["--steps", "3", "--batch-size", "8", "--episodes", "4", "--length", "12",
                "--eval-episodes", "2", "--output", str(output)])
    saved = json.load(open(output / "eval.json"))
    assert saved["episodes"] == 2 and 0 <= saved["success_rate"] <= 1 and saved["train_steps"] == 3
    dataset = LeRobotDataset(str(output / "dataset"))
    assert len(dataset) == 4 * 12 and dataset.camera_keys == ["observation.images.top"]
    checkpoint = output / "checkpoints" / "last" / "pretrained_model"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert (checkpoint / "vlm" / name).is_file(), name
    tokenizer_config = json.load(open(checkpoint / "vlm" / "tokenizer_config.json"))
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"  # loads in transformers 4 and 5
    policy = SmolVLAPolicy.from_pretrained(str(checkpoint))
    assert policy.config.chunk_size == 10 and policy.config.num_vlm_layers == 4


def test_a_demo_run_remembers_its_data_resumes_and_drives_the_sim_at_its_fps(tmp_path, monkeypatch, capsys):
    """A demo in its default place: outputs/demo/latest points to it, its checkpoint knows the data's fps, units
    and task (infer_async takes them as defaults), its evaluation episodes are a GIF, and it resumes."""
    import infer_async

    monkeypatch.chdir(tmp_path)
    demo.main(["--steps", "2", "--batch-size", "8", "--episodes", "2", "--length", "10",
                "--eval-episodes", "1"])
    run = tmp_path / "outputs" / "demo" / "latest"
    assert run.is_symlink() and (run / "eval.json").is_file()
    checkpoint = str(run / "checkpoints" / "last" / "pretrained_model")
    facts = json.load(open(os.path.join(checkpoint, "trained_on.json")))
    assert facts == {"fps": sim.FPS, "norm_mode": "degrees", "tasks": [sim.TASK]}
    with Image.open(run / "episodes.gif") as gif:
        assert gif.n_frames > 4 and gif.size == (256, 256)
    # --resume of a demo run trains on the dataset it recorded; demo.py --resume does the same
    train.main(["--resume", str(run), "--steps", "3"])
    demo.main(["--resume", str(run), "--steps", "4"])
    state = torch.load(run / "checkpoints" / "000004" / "training_state.pt", weights_only=True)
    assert [h["step"] for h in state["history"]] == [1, 2, 3, 4]
    message = error_of(["--resume", str(run), "--steps", "4"])
    assert "already at step 4 of 4" in message
    assert "this run has none" in error_of(["--resume", str(run), "--steps", "6", "--rtc-prefix-offset", "0.2"])
    # the virtual arm, driven at the policy's 10 fps with its task; told otherwise, it warns or refuses
    capsys.readouterr()
    infer_async.main(["--port", "sim", "--policy", checkpoint, "--duration", "1", "--metrics", "m.json"])
    metrics, out = json.load(open("m.json")), capsys.readouterr().out
    assert metrics["config"]["fps"] == 10 and metrics["config"]["task"] == sim.TASK and metrics["ticks"] == 10
    assert f'task: "{sim.TASK}"' in out and "target reached: " in out and "target_reached" in metrics
    infer_async.main(["--port", "sim", "--policy", checkpoint, "--duration", "0.1", "--fps", "30", "--task", "x",
                      "--record-video", "v.gif"])
    assert "trained on 10 fps data" in capsys.readouterr().out and os.path.isfile("v.gif")
    with pytest.raises(ValueError, match="trained on joints in degrees.*--norm-mode degrees"):
        infer_async.main(["--port", "sim", "--policy", checkpoint, "--norm-mode", "range_m100_100"])


# ----------------------------------------------------------------------------------------------------
# Schedule, tokenizer
# ----------------------------------------------------------------------------------------------------

def test_learning_rate_schedule_matches_hand_computed_values():
    lr = lambda step: train.learning_rate(step, 1e-4, 2.5e-6, 1000, 30000)
    assert lr(0) == pytest.approx(1e-4 / 1001, rel=1e-9)  # warmup starts at peak / (warmup + 1)
    assert lr(500) == pytest.approx(1e-4 / 1001 + (1e-4 - 1e-4 / 1001) * 0.5, rel=1e-9)
    # the cosine runs on the absolute step: at the end of warmup it is already slightly below the peak
    assert lr(1000) == pytest.approx(2.5e-6 + 97.5e-6 * 0.5 * (1 + math.cos(math.pi / 30)), rel=1e-9)
    assert lr(15000) == pytest.approx(5.125e-5, rel=1e-9)
    assert lr(30000) == pytest.approx(2.5e-6) and lr(45000) == pytest.approx(2.5e-6)
    # short runs squeeze the schedule (warmup scaled, cosine ends at the last step)
    assert train.fit_schedule(1000, 30000, 3000) == (100, 3000)
    assert train.fit_schedule(1000, 30000, 50000) == (1000, 30000)
    # the LambdaLR applies it step by step
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    scheduler = train.make_lr_scheduler(optimizer, 1e-4, 2.5e-6, 10, 100)
    for step in range(120):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(train.learning_rate(step, 1e-4, 2.5e-6, 10, 100))
        optimizer.step()
        scheduler.step()


def test_word_tokenizer_knows_the_task_and_the_newline():
    tokenizer = demo.word_tokenizer(["Reach the red target"])
    ids = tokenizer(["reach the red target\n", "reach"], padding="longest")["input_ids"]
    vocabulary = tokenizer.get_vocab()
    assert ids[0] == [vocabulary[w] for w in ["reach", "the", "red", "target", "\n"]]
    assert ids[1][1:] == [tokenizer.pad_token_id] * 4 and tokenizer.pad_token_id == 0
    assert vocabulary["[UNK]"] not in ids[0]


# ----------------------------------------------------------------------------------------------------
# Fine-tuning on the fixtures: run, save, resume, load back
# ----------------------------------------------------------------------------------------------------

FINE_TUNE = ["--repo", DATASET, "--policy", CHECKPOINT, "--vlm", VLM, "--batch-size", "4", "--num-workers", "0",
             "--device", "cpu", "--lr", "1e-3", "--warmup-steps", "2", "--log-every", "1"]


def training_state(run, step):
    return torch.load(os.path.join(run, "checkpoints", f"{step:06d}", "training_state.pt"), weights_only=True)


def test_fine_tune_save_resume_and_load(tmp_path):
    first, resumed = str(tmp_path / "first"), str(tmp_path / "resumed")
    train.main(FINE_TUNE + ["--steps", "4", "--save-every", "2", "--output", first])
    assert os.path.islink(os.path.join(first, "checkpoints", "last"))
    assert os.readlink(os.path.join(first, "checkpoints", "last")) == "000004"
    assert os.path.isfile(os.path.join(first, "loss.png"))
    # resume from step 2 into another directory: same steps 3 and 4 (data order, noise, lr, weights)
    train.main(["--resume", os.path.join(first, "checkpoints", "000002"), "--output", resumed])
    a, b = training_state(first, 4), training_state(resumed, 4)
    assert b["step"] == 4 and b["options"]["repo"] == DATASET
    assert [h["step"] for h in b["history"]] == [1, 2, 3, 4]
    for h1, h2 in zip(a["history"], b["history"]):
        assert h1["lr"] == pytest.approx(h2["lr"], rel=1e-12)
        assert h1["loss"] == pytest.approx(h2["loss"], rel=1e-6, abs=1e-7)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 4
    w1 = load_file(os.path.join(first, "checkpoints", "000004", "pretrained_model", "model.safetensors"))
    w2 = load_file(os.path.join(resumed, "checkpoints", "000004", "pretrained_model", "model.safetensors"))
    start = load_file(os.path.join(CHECKPOINT, "model.safetensors"))
    changed = [k for k in w1 if not torch.equal(w1[k], start[k])]
    assert changed and all("lm_expert" in k or "model.state_proj" in k or "model.action_" in k for k in changed)
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1)
    # the checkpoint loads back (its own vlm/ inside), in lerobot's layout, with the dataset's stats
    saved = os.path.join(first, "checkpoints", "last", "pretrained_model")
    policy = SmolVLAPolicy.from_pretrained(saved)
    assert sum(v.numel() for v in policy.state_dict().values()) == sum(v.numel() for v in w1.values())
    config = json.load(open(os.path.join(saved, "config.json")))
    assert config["type"] == "smolvla"
    for name in ("policy_preprocessor.json", "policy_postprocessor.json", "vlm/config.json", "vlm/tokenizer.json"):
        assert os.path.isfile(os.path.join(saved, name)), name
    stats = LeRobotDataset(DATASET).stats
    torch.testing.assert_close(policy.stats["action"]["mean"], stats["action"]["mean"])


def test_ddp_two_processes_agree_on_the_weights(tmp_path):
    """torchrun with 2 CPU processes (gloo): the run checks that all ranks hold identical weights."""
    output = str(tmp_path / "ddp")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(HERE, "train.py")] + FINE_TUNE + ["--steps", "2", "--save-every", "0", "--output", output]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=HERE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "all 2 processes hold identical weights after step 2" in result.stdout
    assert result.stdout.count("normalization stats from") == 1  # the checkpoint's load lines: rank 0 only
    state = training_state(output, 2)
    assert state["step"] == 2 and len(state["history"]) == 2  # only rank 0 wrote, once
    assert sorted(os.listdir(os.path.join(output, "checkpoints"))) == ["000002", "last"]


# ----------------------------------------------------------------------------------------------------
# Bad input: one clear message before any training
# ----------------------------------------------------------------------------------------------------

def error_of(argv, command=train):
    with pytest.raises(SystemExit) as exit_info:
        command.main(argv)
    message = str(exit_info.value.code)
    assert message.startswith(f"{command.__name__}.py: error: ") and "Traceback" not in message
    return message


def test_unknown_dataset(tmp_path):
    message = error_of(FINE_TUNE + ["--repo", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")])
    assert "nowhere" in message
    assert not os.path.exists(tmp_path / "o")  # nothing written


def small_dataset(root, cameras=("top", "wrist"), state_dim=6):
    """A 6-frame dataset with the given cameras and state width (actions stay 6-D)."""
    frames = np.zeros((6, 48, 64, 3), dtype=np.uint8)
    episode = {"observation.state": np.zeros((6, state_dim)), "action": np.zeros((6, 6)), "task": "pick the cube",
               "images": {name: frames for name in cameras}}
    return write_lerobot_dataset(root, [episode], fps=30, codec="h264")


def test_cameras_named_differently_suggest_rename(tmp_path):
    root = small_dataset(str(tmp_path / "front"), cameras=("front", "wrist"))
    message = error_of(FINE_TUNE + ["--repo", root, "--output", str(tmp_path / "o")])
    assert "['front', 'wrist']" in message and "--rename front=top" in message
    # a rename to a name the policy does not read: the message shows the names after the rename
    message = error_of(FINE_TUNE + ["--repo", root, "--rename", "front=camera9", "--output", str(tmp_path / "o")])
    assert "(called ['camera9', 'wrist'] after --rename)" in message and "--rename front=top" in message
    # with the rename it is accepted (and fails later only for the reason given here: the state width)
    message = error_of(FINE_TUNE + ["--repo", small_dataset(str(tmp_path / "f7"), ("front", "wrist"), 7),
                                    "--rename", "front=top", "--output", str(tmp_path / "o")])
    assert "observation.state has 7 dims" in message


def test_state_dims_that_do_not_match_the_checkpoint(tmp_path):
    root = small_dataset(str(tmp_path / "seven"), state_dim=7)
    message = error_of(FINE_TUNE + ["--repo", root, "--output", str(tmp_path / "o")])
    assert "observation.state has 7 dims but the policy's has 6" in message
    assert not os.path.exists(tmp_path / "o")


def test_policy_cameras_the_dataset_lacks_are_dropped(tmp_path, capsys):
    """smolvla_base reads three cameras, most datasets have two: train on those (and say so)."""
    root = small_dataset(str(tmp_path / "top_only"), cameras=("top",))
    train.main(FINE_TUNE + ["--repo", root, "--steps", "1", "--output", str(tmp_path / "o")])
    assert "no ['wrist'] camera(s)" in capsys.readouterr().out
    config = json.load(open(tmp_path / "o" / "checkpoints" / "last" / "pretrained_model" / "config.json"))
    assert [k for k in config["input_features"] if k.startswith("observation.images.")] == ["observation.images.top"]


def test_unwritable_output_existing_run_and_too_small_dataset(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    message = error_of(FINE_TUNE + ["--output", str(blocker / "run")])
    assert "cannot write to the output directory" in message
    if os.path.isdir("/proc"):  # Linux: not writable even by root, although its permission bits say so
        assert "cannot write to the output directory" in error_of(FINE_TUNE + ["--output", "/proc/smolvla_run"])
    os.makedirs(tmp_path / "run" / "checkpoints")
    message = error_of(FINE_TUNE + ["--output", str(tmp_path / "run")])
    assert "--resume" in message
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "eval.json").write_text("{}")
    message = error_of(["--output", str(tmp_path / "demo")], demo)
    assert "is not empty" in message and (tmp_path / "demo" / "eval.json").read_text() == "{}"
    message = error_of(FINE_TUNE + ["--batch-size", "64", "--output", str(tmp_path / "o")])
    assert "63 samples, fewer than one batch of 64" in message


def test_numbers_that_cannot_run_are_one_message(tmp_path):
    message = error_of(FINE_TUNE + ["--batch-size", "0", "--log-every", "0", "--lr", "-1", "--output", str(tmp_path / "o")])
    assert "--batch-size 0, --log-every 0, --lr -1.0: counts must be at least 1" in message
    assert "--action-steps 0" in error_of(["--action-steps", "0", "--output", str(tmp_path / "d")], demo)
    assert 1 <= train.RECIPE["num_workers"] <= min(4, os.cpu_count())  # never more workers than cores


def test_a_prefix_offset_needs_rtc_prefixes_and_a_size(tmp_path, capsys):
    for rtc in (["--rtc-prefix-offset", "0.2"], ["--rtc-max-delay", "4", "--rtc-prefix-offset", "-1"]):
        with pytest.raises(SystemExit):
            demo.main([*rtc, "--output", str(tmp_path / "d")])
        assert "error: --rtc-prefix-offset must be >= 0, and shifts the prefixes of --rtc-max-delay" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "d")
