"""Meta-World as a robot (metaworld_env.py): lerobot's conventions, checked against lerobot 0.4.4's source.

The expected values are copied from huggingface/lerobot at tag v0.4.4; each test cites the file and lines.
Tests that need the simulator skip (or, with CI set, fail) with the install line when it is missing.
"""

import importlib.util
import os
import sys

import numpy as np
import pytest

import metaworld_env
from data import LeRobotDataset, recorded_episodes
from policy_server import PolicyRunner, PolicyServer, load_policy
from metaworld_env import (
    ACTION_KEY, ACTION_SCALE, DIFFICULTY_TO_TASKS, EPISODE_LIMIT, IMAGE_KEY, INSTALL_LINE, LANGUAGE_PAIRS,
    MT50, STATE_KEY, MetaWorldRobot, check_task, policy_inputs, record_demonstrations, scripted_action,
    scripted_episode, tasks_for,
)

# Small images keep the file fast on 2 cores (the conventions do not depend on the size).
SIZE = 64


@pytest.fixture(scope="module")
def simulator():
    """The metaworld module; skipped (failed under CI) with the install line when it is not installed."""
    packages = ("metaworld", "mujoco", "gymnasium")
    missing = [package for package in packages if importlib.util.find_spec(package) is None]
    if missing:
        message = f"Meta-World is not installed ({', '.join(missing)} missing): {INSTALL_LINE}"
        # A CI machine is meant to have it: a skip there would hide the whole file.
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return metaworld_env.import_simulator()


@pytest.fixture(scope="module")
def reach(simulator):
    """One small reach-v3 robot shared by the tests that only reset and step it."""
    robot = MetaWorldRobot("reach-v3", seed=0, camera_size=SIZE)
    yield robot
    robot.close()


def test_constants_are_lerobots():
    """The numbers and names lerobot 0.4.4 uses for Meta-World."""
    # camera_name="corner2" (src/lerobot/envs/metaworld.py:82), moved to [0.75, 0.075, 0.7]
    # (metaworld.py:157-161)
    assert metaworld_env.CAMERA_NAME == "corner2"
    assert metaworld_env.CORNER2_POSITION == (0.75, 0.075, 0.7)
    # features "pixels/top": (480, 480, 3) (src/lerobot/envs/configs.py:378); "agent_pos": (4,)
    # (configs.py:377)
    assert metaworld_env.IMAGE_SIZE == 480
    assert metaworld_env.STATE_SIZE == 4
    # ACTION_DIM = 4 (metaworld.py:72); Box(low=-1, high=1, shape=(4,)) (metaworld.py:137)
    assert metaworld_env.ACTION_SIZE == 4
    # features_map: agent_pos -> OBS_STATE, pixels/top -> OBS_IMAGE (configs.py:363-370);
    # OBS_STATE = "observation.state", OBS_IMAGE = "observation.image" (src/lerobot/utils/constants.py:23-24)
    assert (STATE_KEY, IMAGE_KEY, ACTION_KEY) == ("observation.state", "observation.image", "action")
    # _max_episode_steps = max_path_length (metaworld.py:101) = 500 (metaworld's sawyer_xyz_env.py:153)
    assert EPISODE_LIMIT == 500
    # fps: int = 80 (configs.py:353); MT1(env_name, seed=42) (metaworld.py:153)
    assert metaworld_env.FPS == 80
    assert metaworld_env.LEROBOT_MT1_SEED == 42


def test_instructions_are_lerobots():
    """A few task descriptions, verbatim (src/lerobot/envs/metaworld_config.json; metaworld.py:102)."""
    # metaworld_config.json:34, 37, 21, 22, 18
    assert check_task("reach-v3") == "reach-v3"
    assert metaworld_env.TASK_DESCRIPTIONS["reach-v3"] == "Reach a goal position"
    assert metaworld_env.TASK_DESCRIPTIONS["pick-place-v3"] == "Pick and place a puck to a goal"
    assert metaworld_env.TASK_DESCRIPTIONS["drawer-close-v3"] == "Push and close a drawer"
    assert metaworld_env.TASK_DESCRIPTIONS["drawer-open-v3"] == "Open a drawer"
    assert metaworld_env.TASK_DESCRIPTIONS["door-open-v3"] == "Open a door with a revolving joint"
    # metaworld_config.json:32: the only description with a comma
    wall_description = "Pick a puck, bypass a wall and place the puck"
    assert metaworld_env.TASK_DESCRIPTIONS["pick-place-wall-v3"] == wall_description
    # lerobot strips a "metaworld-" prefix from the task name (metaworld.py:91)
    assert check_task("metaworld-drawer-open-v3") == "drawer-open-v3"


def test_splits_are_lerobots():
    """The difficulty groups (metaworld_config.json:70-90): 28 + 11 + 6 + 5 = 50, disjoint, all of MT50."""
    counts = {split: len(tasks) for split, tasks in DIFFICULTY_TO_TASKS.items()}
    assert counts == {"easy": 28, "medium": 11, "hard": 6, "very_hard": 5}
    assert sum(counts.values()) == 50
    every_task = [task for tasks in DIFFICULTY_TO_TASKS.values() for task in tasks]
    assert sorted(every_task) == sorted(MT50) and len(set(every_task)) == 50
    # metaworld_config.json:85 (hard) and 88 (very_hard)
    assert tasks_for("hard") == [
        "assembly-v3", "hand-insert-v3", "pick-out-of-hole-v3", "pick-place-v3", "push-v3", "push-back-v3"]
    assert tasks_for("very_hard") == [
        "shelf-place-v3", "disassemble-v3", "stick-pull-v3", "stick-push-v3", "pick-place-wall-v3"]
    assert len(tasks_for("easy")) == 28 and len(tasks_for("medium")) == 11 and len(tasks_for("mt50")) == 50
    # TASK_NAME_TO_ID: "assembly-v3": 0, "reach-v3": 40, "window-close-v3": 49
    # (metaworld_config.json:55, 65, 68)
    assert MT50.index("assembly-v3") == 0 and MT50.index("reach-v3") == 40
    assert MT50.index("window-close-v3") == 49
    # lerobot's --env.task: a comma-separated list of groups and tasks (metaworld.py:294, 304); repeats
    # dropped
    assert tasks_for("reach-v3, hard,push-v3") == ["reach-v3", *tasks_for("hard")]


def test_unknown_names_list_close_matches():
    """A typo is a ValueError naming what was probably meant (before any simulator is imported)."""
    expected = "unknown Meta-World task 'drawer-opn-v3'; did you mean drawer-open-v3"
    with pytest.raises(ValueError, match=expected):
        MetaWorldRobot("drawer-opn-v3")
    with pytest.raises(ValueError, match="did you mean medium"):
        tasks_for("medum")
    with pytest.raises(ValueError, match="did you mean pick-place-v3"):
        tasks_for("easy,pick-plase-v3")


def test_missing_simulator_is_one_line(monkeypatch):
    """No metaworld: SystemExit with the install line (not an ImportError traceback)."""
    # Pretend metaworld was never imported and is not installed.
    monkeypatch.delitem(sys.modules, "metaworld.policies", raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "metaworld" else real_find_spec(name, *args))
    with pytest.raises(SystemExit, match="error: the Meta-World simulator needs the metaworld package: "
                                         "pip install -r requirements-sim.txt"):
        metaworld_env.import_simulator()


def test_missing_gl_is_one_line(monkeypatch):
    """No working OpenGL: SystemExit naming the Debian packages and the MUJOCO_GL values."""
    monkeypatch.setattr(metaworld_env, "gl_backend_works", lambda backend: False)
    with pytest.raises(SystemExit) as exit_info:
        metaworld_env.first_working_gl_backend()
    message = str(exit_info.value)
    assert message.startswith("error: MuJoCo found no offscreen OpenGL (egl, osmesa tried): ")
    assert "apt-get install libegl1 libegl-mesa0 libopengl0 and set MUJOCO_GL=egl" in message
    assert "apt-get install libosmesa6 and set MUJOCO_GL=osmesa" in message
    assert "\n" not in message


def test_tasks_and_experts_are_metaworlds(simulator):
    """The 50 names are Meta-World's v3 tasks, and the experts are the classes lerobot maps them to."""
    assert sorted(MT50) == sorted(simulator.ALL_V3_ENVIRONMENTS)
    # TASK_POLICY_MAPPING (metaworld_config.json:107, 114, 117)
    experts = simulator.policies.ENV_POLICY_MAP
    assert experts["peg-insert-side-v3"].__name__ == "SawyerPegInsertionSideV3Policy"
    assert experts["reach-v3"].__name__ == "SawyerReachV3Policy"
    assert experts["stick-push-v3"].__name__ == "SawyerStickPushV3Policy"


def test_image_is_the_raw_render_flipped_on_both_axes(reach):
    """lerobot flips corner2's image with np.flip(image, (0, 1)) (metaworld.py:147-149, 170-172)."""
    observation = reach.reset()
    image = observation[IMAGE_KEY]
    raw = reach.render_raw()
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8 and image.flags.c_contiguous
    np.testing.assert_array_equal(image, raw[::-1, ::-1])
    # The picture is not symmetric, so the flip is not a no-op.
    assert not np.array_equal(image, raw)
    # The renderer films camera 2, corner2, where lerobot moved it (metaworld.py:157-161).
    assert reach.simulator.mujoco_renderer.camera_id == 2
    np.testing.assert_allclose(reach.simulator.model.cam_pos[2], [0.75, 0.075, 0.7])


def test_default_size_and_policy_layout(simulator):
    """480x480 by default (configs.py:378); the policy gets 1x3x480x480 in [0, 1] (envs/utils.py:67-98)."""
    with MetaWorldRobot("drawer-open-v3", seed=0) as robot:
        observation = robot.reset()
        inputs = policy_inputs(observation, robot.instruction)
    assert observation[IMAGE_KEY].shape == (480, 480, 3) and observation[IMAGE_KEY].dtype == np.uint8
    assert inputs[IMAGE_KEY].shape == (1, 3, 480, 480) and inputs[IMAGE_KEY].dtype == np.float32
    assert 0.0 <= inputs[IMAGE_KEY].min() and inputs[IMAGE_KEY].max() <= 1.0
    np.testing.assert_array_equal(inputs[IMAGE_KEY][0, 1] * 255.0, observation[IMAGE_KEY][:, :, 1])
    assert inputs[STATE_KEY].shape == (1, 4) and inputs[STATE_KEY].dtype == np.float32
    # add_envs_task: observation["task"] = the descriptions, one per env (utils.py:156-169)
    assert inputs["task"] == ["Open a drawer"]


def test_state_is_hand_position_and_finger_opening(reach):
    """observation.state = raw_obs[:4] (metaworld.py:173): hand xyz, fingers apart (0 closed .. 1 open)."""
    observation = reach.reset()
    state = observation[STATE_KEY]
    assert state.shape == (4,) and state.dtype == np.float32
    np.testing.assert_array_equal(state, reach.simulator_state[:4].astype(np.float32))
    np.testing.assert_allclose(state[:3], reach.simulator.get_endeff_pos(), atol=1e-6)
    assert state[3] > 0.9
    # Closing the gripper (+1) brings the fingers together.
    for _ in range(20):
        observation, success, done = reach.step([0.0, 0.0, 0.0, 1.0])
    assert observation[STATE_KEY][3] < 0.5


def test_action_scale_and_clipping(reach):
    """One action unit moves the hand target 1 cm (sawyer_xyz_env.py:182, 327-328); beyond [-1, 1] clips."""
    reach.reset()
    moves = []
    for action in ([1.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0], [-0.5, 0.0, 0.0, 0.0], [0.0, 0.0, -3.0, 0.0]):
        before = reach.simulator.data.mocap_pos[0].copy()
        reach.step(action)
        moves.append(reach.simulator.data.mocap_pos[0] - before)
    np.testing.assert_allclose(moves, [[ACTION_SCALE, 0, 0], [ACTION_SCALE, 0, 0], [-0.005, 0, 0],
                                       [0, 0, -ACTION_SCALE]], atol=1e-9)
    with pytest.raises(ValueError, match=r"action must have shape \(4,\)"):
        reach.step([0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="action must be finite"):
        reach.step([np.nan, 0.0, 0.0, 0.0])


def test_scripted_expert_solves_reach(reach):
    """Meta-World's expert reaches the goal within the episode limit; success is its info["success"]."""
    frames, success = scripted_episode(reach, seed=0)
    assert success and len(frames) < EPISODE_LIMIT
    # The robot's success is Meta-World's own flag, and it ended the episode (metaworld.py:243-244).
    assert reach.last_info["success"] == 1.0 and reach.done
    with pytest.raises(RuntimeError, match="call reset"):
        reach.step(np.zeros(4))
    # Frames are plain numpy arrays, ready for a dataset writer.
    first = frames[0]
    assert first[STATE_KEY].shape == (4,) and first[STATE_KEY].dtype == np.float32
    assert first[IMAGE_KEY].shape == (SIZE, SIZE, 3) and first[IMAGE_KEY].dtype == np.uint8
    actions = np.stack([frame[ACTION_KEY] for frame in frames])
    assert actions.shape == (len(frames), 4) and actions.dtype == np.float32
    assert np.abs(actions).max() <= 1.0
    # The expert's action for the state it saw is what the frame recorded (the same seed: the same scene).
    reach.reset(seed=0)
    np.testing.assert_array_equal(scripted_action("reach-v3", reach.simulator_state), frames[0][ACTION_KEY])


def test_same_seed_same_scenes(reach):
    """Seeded: the same seed gives identical observations; each reset draws a new scene."""
    first = reach.reset(seed=7)
    first_state = reach.simulator_state.copy()
    second = reach.reset()
    assert not np.array_equal(first_state, reach.simulator_state)
    with MetaWorldRobot("reach-v3", seed=7, camera_size=SIZE) as twin:
        twin_first = twin.reset()
        np.testing.assert_array_equal(twin.simulator_state, first_state)
        np.testing.assert_array_equal(twin_first[IMAGE_KEY], first[IMAGE_KEY])
        np.testing.assert_array_equal(twin_first[STATE_KEY], first[STATE_KEY])
        twin_second = twin.reset()
        np.testing.assert_array_equal(twin_second[IMAGE_KEY], second[IMAGE_KEY])
    # Reseeding replays the sequence.
    again = reach.reset(seed=7)
    np.testing.assert_array_equal(again[IMAGE_KEY], first[IMAGE_KEY])


def test_language_pairs_share_a_scene(simulator):
    """Each pair loads one scene file and has two instructions (the lab's premise; start states differ)."""
    for open_task, close_task in LANGUAGE_PAIRS:
        scenes = [os.path.basename(simulator.ALL_V3_ENVIRONMENTS[task]().model_name)
                  for task in (open_task, close_task)]
        assert scenes[0] == scenes[1], (open_task, close_task, scenes)
        assert metaworld_env.TASK_DESCRIPTIONS[open_task] != metaworld_env.TASK_DESCRIPTIONS[close_task]


def test_pixels_match_lerobots_recipe(simulator):
    """With fast_render=False the image is pixel for pixel what lerobot's recipe renders for the same scene.

    lerobot's recipe (src/lerobot/envs/metaworld.py:153-162, 170-172): MT1(task, seed=42), the env made with
    camera corner2, the first train task set, cam_pos[2] moved, reset, render, np.flip(image, (0, 1)).
    """
    benchmark = simulator.MT1("drawer-close-v3", seed=42)
    reference = benchmark.train_classes["drawer-close-v3"](render_mode="rgb_array", camera_name="corner2",
                                                            width=SIZE, height=SIZE)
    reference.set_task(benchmark.train_tasks[0])
    reference.model.cam_pos[2] = [0.75, 0.075, 0.7]
    reference.reset()
    expected = np.flip(reference.render(), (0, 1))
    reference.close()
    with MetaWorldRobot("drawer-close-v3", seed=0, camera_size=SIZE, fast_render=False) as robot:
        # lerobot's first scene is the train task's own (frozen) position: set it again to get that scene.
        robot.simulator.set_task(benchmark.train_tasks[0])
        observation = robot.reset()
        np.testing.assert_array_equal(observation[IMAGE_KEY], expected)
        np.testing.assert_array_equal(observation[STATE_KEY], robot.simulator_state[:4].astype(np.float32))


def test_recorded_expert_episodes_read_back_through_data_py(simulator, tmp_path):
    """The scripted expert, recorded with record.py's writer, reads back through data.py as it was played."""
    root = str(tmp_path / "reach")
    counts = record_demonstrations(root, ["reach-v3"], 2, seed=0, camera_size=SIZE)
    assert counts == {"reach-v3": (2, 2)}
    dataset = LeRobotDataset(root, chunk_size=5, max_cache_gb=0)
    assert dataset.fps == metaworld_env.FPS
    assert dataset.camera_keys == ["observation.images.corner2"]
    assert dataset.tasks == ["Reach a goal position"]
    item = dataset[0]
    assert item[STATE_KEY].shape == (4,) and item[ACTION_KEY].shape == (5, 4)
    assert item["observation.images.corner2"].shape == (3, SIZE, SIZE)
    assert item["task"] == "Reach a goal position"
    # The first episode, played again from the same seed: the same states and actions, nearly the same
    # image (the video is lossy).
    with MetaWorldRobot("reach-v3", seed=0, camera_size=SIZE) as robot:
        frames, success = scripted_episode(robot)
    assert success
    length = len(frames)
    states = np.stack([frame[STATE_KEY] for frame in frames])
    actions = np.stack([frame[ACTION_KEY] for frame in frames])
    np.testing.assert_array_equal(dataset.state[:length], states)
    np.testing.assert_array_equal(dataset.action[:length], actions)
    decoded = item["observation.images.corner2"].permute(1, 2, 0).numpy().astype(float)
    assert np.abs(decoded - frames[0][IMAGE_KEY]).mean() < 8.0
    # Each episode's row says it succeeded.
    _, rows = recorded_episodes(root)
    assert [row["success"] for row in rows] == [True, True]
    assert rows[0]["length"] == length


def test_failed_episodes_are_left_out_unless_asked_for(simulator, tmp_path):
    """3 steps are too few to reach: the episode is dropped, or kept with success False."""
    dropped = str(tmp_path / "dropped")
    counts = record_demonstrations(dropped, ["reach-v3"], 1, camera_size=SIZE, max_steps=3)
    assert counts == {"reach-v3": (0, 1)}
    assert not os.path.exists(os.path.join(dropped, "meta"))
    kept = str(tmp_path / "kept")
    counts = record_demonstrations(kept, ["reach-v3"], 1, camera_size=SIZE, max_steps=3, keep_failures=True)
    assert counts == {"reach-v3": (1, 1)}
    _, rows = recorded_episodes(kept)
    assert [row["success"] for row in rows] == [False]
    assert rows[0]["length"] == 3


class CountedRobot(MetaWorldRobot):
    """A MetaWorldRobot that keeps a list of those made, so a fake policy can read the simulator's state."""

    made = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        CountedRobot.made.append(self)


@pytest.fixture
def counted_robots(simulator, monkeypatch):
    CountedRobot.made = []
    monkeypatch.setattr(metaworld_env, "MetaWorldRobot", CountedRobot)
    return CountedRobot.made


def test_evaluation_counts_success_as_metaworld_reports_it(counted_robots):
    """Driven by the scripted expert, every episode succeeds; holding still, none does; per split too."""
    info = {"chunk_size": 1, "cameras": ["observation.images.corner2"]}

    def expert(observation):
        # (The first call, before any robot, checks the sizes.)
        if not counted_robots or counted_robots[-1].simulator_state is None:
            return {"actions": np.zeros((1, 4), np.float32)}
        robot = counted_robots[-1]
        return {"actions": scripted_action(robot.task, robot.simulator_state)[None]}

    results = metaworld_env.evaluate(expert, info, ["reach-v3"], 2, 1, camera_size=SIZE, progress=False)
    assert [episode["success"] for episode in results["reach-v3"]] == [True, True]
    # It stopped where Meta-World said success, as in lerobot (metaworld.py:243-244).
    assert counted_robots[-1].last_info["success"] == 1.0
    assert results["reach-v3"][-1]["steps"] < EPISODE_LIMIT

    def still(observation):
        return {"actions": np.zeros((1, 4), np.float32)}

    results = metaworld_env.evaluate(still, info, ["reach-v3", "drawer-open-v3"], 1, 1, camera_size=SIZE,
                                     max_steps=10, progress=False)
    assert counted_robots[-1].last_info["success"] == 0.0
    assert [results[task][0]["steps"] for task in results] == [10, 10]
    summary = metaworld_env.summarize({"reach-v3": [{"success": True}, {"success": False}],
                                       "drawer-open-v3": [{"success": True}, {"success": True}],
                                       "push-v3": [{"success": False}, {"success": False}]})
    assert summary["tasks"] == {"reach-v3": 0.5, "drawer-open-v3": 1.0, "push-v3": 0.0}
    assert summary["splits"] == {"easy": 0.75, "hard": 0.0}
    assert summary["mean"] == pytest.approx(0.5)


def test_a_policy_that_does_not_fit_is_refused_before_an_episode(counted_robots, tiny):
    """Two cameras, a state of 6, actions of 6, too many action steps: one message, no robot made."""
    runner = PolicyRunner(tiny)
    with pytest.raises(ValueError, match="reads 2 cameras"):
        metaworld_env.evaluate(runner, runner.info, ["reach-v3"], 1, 5, camera_size=SIZE)
    one_camera = {"chunk_size": 50, "cameras": ["observation.images.top"]}

    def six_entries(observation):
        return {"actions": np.zeros((50, 6), np.float32)}

    with pytest.raises(ValueError, match="actions have 6 entries; Meta-World's have 4"):
        metaworld_env.evaluate(six_entries, one_camera, ["reach-v3"], 1, 5, camera_size=SIZE)

    def wrong_state(observation):
        return tiny.predict_chunk(observation)

    with pytest.raises(ValueError, match="does not take Meta-World's observation"):
        metaworld_env.evaluate(wrong_state, one_camera, ["reach-v3"], 1, 5, camera_size=SIZE)
    with pytest.raises(ValueError, match="action steps must be in 1..50"):
        metaworld_env.evaluate(six_entries, one_camera, ["reach-v3"], 1, 51, camera_size=SIZE)
    assert counted_robots == []


@pytest.fixture(scope="module")
def tiny_checkpoint(simulator, tmp_path_factory):
    """A tiny SmolVLA for Meta-World (random weights, statistics of one recorded reach episode), saved."""
    root = tmp_path_factory.mktemp("tiny_metaworld")
    record_demonstrations(str(root / "dataset"), ["reach-v3"], 1, camera_size=SIZE)
    dataset = LeRobotDataset(str(root / "dataset"), chunk_size=10, max_cache_gb=0)
    policy = metaworld_env.tiny_smolvla(dataset, str(root / "vlm"), SIZE, 10, 5, vlm_layers=2)
    checkpoint = str(root / "checkpoint")
    policy.save_pretrained(checkpoint)
    return checkpoint


def evaluate_in_process_and_through_a_server(checkpoint, tasks, episodes, action_steps, **options):
    """(in-process results, results through a PolicyServer) of the same checkpoint, noise seed 3 and scene
    seed 1, 12 steps at most per episode."""
    compute, info = metaworld_env.open_evaluated_policy(checkpoint, seed=3)
    in_process = metaworld_env.evaluate(compute, info, tasks, episodes, action_steps, seed=1,
                                        camera_size=SIZE, max_steps=12, progress=False, **options)
    server = PolicyServer(("127.0.0.1", 0), {"tiny": PolicyRunner(load_policy(checkpoint), 3)}).start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        client, info = metaworld_env.open_evaluated_policy("tiny", server=address)
        remote = metaworld_env.evaluate(client, info, tasks, episodes, action_steps, seed=1,
                                        camera_size=SIZE, max_steps=12, progress=False, **options)
        client.close()
    finally:
        server.close_all()
    return in_process, remote


def test_in_process_and_through_the_server_give_the_same_results(tiny_checkpoint):
    """The same checkpoint and seed: the same episodes, in this process and through policy_server."""
    tasks = ["reach-v3", "drawer-open-v3"]
    in_process, remote = evaluate_in_process_and_through_a_server(tiny_checkpoint, tasks, 2, 5)
    assert remote == in_process
    # The hand moved: the episodes are the policy's, not a standstill that any two runs share.
    start = MetaWorldRobot("reach-v3", seed=1, camera_size=SIZE)
    first_state = start.reset()[STATE_KEY]
    start.close()
    assert not np.allclose(in_process["reach-v3"][0]["final_state"], first_state, atol=1e-3)


def test_eval_command_line_errors_are_one_line(tiny_checkpoint):
    """An unknown task lists close matches; a policy that does not fit is refused; no traceback."""
    with pytest.raises(SystemExit, match="did you mean drawer-open-v3"):
        metaworld_env.main(["eval", "--policy", tiny_checkpoint, "--tasks", "drawr-open-v3",
                            "--action-steps", "5"])
    tiny_reference = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata", "smolvla_tiny")
    with pytest.raises(SystemExit, match="error: the policy reads 2 cameras"):
        metaworld_env.main(["eval", "--policy", os.path.join(tiny_reference, "checkpoint"), "--vlm",
                            os.path.join(tiny_reference, "vlm"), "--tasks", "reach-v3", "--action-steps", "5",
                            "--camera-size", str(SIZE)])


def test_the_lab_swaps_instructions_within_each_pair():
    """The swapped condition tells each task its partner's instruction, and only that."""
    swapped = metaworld_env.swapped_instructions(LANGUAGE_PAIRS)
    assert swapped["drawer-open-v3"] == "Push and close a drawer"
    assert swapped["drawer-close-v3"] == "Open a drawer"
    assert swapped["faucet-open-v3"] == metaworld_env.TASK_DESCRIPTIONS["faucet-close-v3"]
    assert sorted(swapped) == sorted(task for pair in LANGUAGE_PAIRS for task in pair)
    for task, told in swapped.items():
        assert told != metaworld_env.TASK_DESCRIPTIONS[task]


class CountingRobot:
    """A stand-in robot (no simulator): its observation is the step count, and it keeps every action run."""

    instruction = "count"

    def __init__(self):
        self.actions_run = []

    def reset(self):
        self.actions_run = []
        return self.observation()

    def observation(self):
        state = np.full(4, len(self.actions_run), np.float32)
        return {STATE_KEY: state, IMAGE_KEY: np.zeros((8, 8, 3), np.uint8)}

    def step(self, action):
        self.actions_run.append(np.asarray(action))
        return self.observation(), False, False


class NumberedChunks:
    """A stand-in policy: chunk k holds actions 100k + i (i = 0..9) and their "normalized" twins −(100k + i);
    it keeps every request."""

    def __init__(self):
        self.requests = []

    def __call__(self, request):
        number = len(self.requests)
        self.requests.append(request)
        actions = np.repeat(100.0 * number + np.arange(10.0)[:, None], 4, axis=1)
        return {"actions": actions, "normalized": -actions}


def test_rtc_in_the_evaluation_sends_the_leftover_and_plays_out_the_delay():
    """10-action chunks, 4 run per chunk, delay d = 2: after a request the leftover's first 2 actions run,
    then the new chunk from its action 2 on; each request after the first carries the last chunk's
    actions 4..9 (normalized) and d."""
    robot = CountingRobot()
    policy = NumberedChunks()
    rtc = {"mode": "guided", "execution_horizon": 10}
    metaworld_env.policy_episode(robot, policy, "observation.images.cam", 4, 12, rtc=rtc, rtc_delay=2)
    run = [int(action[0]) for action in robot.actions_run]
    assert run == [0, 1, 2, 3, 4, 5, 102, 103, 104, 105, 202, 203]
    assert "rtc_leftover" not in policy.requests[0] and policy.requests[0]["rtc"]["inference_delay"] == 0
    for number in (1, 2):
        request = policy.requests[number]
        assert request["rtc"] == {"mode": "guided", "execution_horizon": 10, "inference_delay": 2}
        expected = -(100.0 * (number - 1) + np.arange(4.0, 10.0))
        np.testing.assert_array_equal(request["rtc_leftover"][:, 0], expected)
    # Without RTC: each chunk's first 4 actions, and the requests carry nothing of RTC.
    plain = NumberedChunks()
    metaworld_env.policy_episode(robot, plain, "observation.images.cam", 4, 12)
    run = [int(action[0]) for action in robot.actions_run]
    assert run == [0, 1, 2, 3, 100, 101, 102, 103, 200, 201, 202, 203]
    assert all("rtc" not in request for request in plain.requests)


def test_rtc_in_process_and_through_the_server_give_the_same_results(tiny_checkpoint):
    """Guided RTC with a delay: the same episodes in this process and through policy_server, and not the
    episodes without RTC (the leftover changes the chunks)."""
    tasks = ["reach-v3"]
    rtc = {"mode": "guided", "execution_horizon": 5, "schedule": "linear", "max_guidance_weight": 10.0,
           "jacobian": False}
    with_rtc, remote = evaluate_in_process_and_through_a_server(tiny_checkpoint, tasks, 1, 4, rtc=rtc,
                                                                rtc_delay=2)
    compute, info = metaworld_env.open_evaluated_policy(tiny_checkpoint, seed=3)
    without = metaworld_env.evaluate(compute, info, tasks, 1, 4, seed=1, camera_size=SIZE, max_steps=12,
                                     progress=False)
    assert remote == with_rtc
    assert with_rtc != without
    with pytest.raises(ValueError, match="RTC delay must be in 0..4"):
        metaworld_env.evaluate(compute, info, tasks, 1, 4, camera_size=SIZE, rtc=rtc, rtc_delay=5)
