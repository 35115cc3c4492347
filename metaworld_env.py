"""Meta-World as a robot: the paper's simulated benchmark, seen as the official SmolVLA fine-tunes see it.

The SmolVLA paper reports success rates on Meta-World's MT50 (50 tabletop tasks for one Sawyer arm), grouped
into easy / medium / hard / very hard. The official fine-tunes were trained and evaluated through lerobot, so
a policy only scores what it should if every detail of the observation matches lerobot's Meta-World
environment. `MetaWorldRobot` reproduces lerobot 0.4.4 (huggingface/lerobot, tag v0.4.4); each convention
below names the file and the lines it comes from:

- camera `corner2`, moved to (0.75, 0.075, 0.7)          src/lerobot/envs/metaworld.py:82, 156-161
- the image flipped on both axes (a 180° rotation)        src/lerobot/envs/metaworld.py:147-149, 170-172
- 480x480 RGB uint8, channels last                        src/lerobot/envs/configs.py:374, 378 (the size is
                                                          Meta-World's default: sawyer_xyz_env.py:188-189)
- `observation.state` = the first 4 of Meta-World's 39 floats: hand x, y, z (metres) and how far the two
  fingers are apart (0 closed .. 1 open)                  src/lerobot/envs/metaworld.py:73, 173;
                                                          configs.py:363-370, 377 (agent_pos -> state)
- `observation.image`                                     configs.py:367-368; utils/constants.py:23-24
- action: 4 floats in [-1, 1] = hand xyz delta (x 1 cm) + gripper effort (+1 closes)
                                                          src/lerobot/envs/metaworld.py:72, 137, 240
- instruction = the task's description string            src/lerobot/envs/metaworld.py:102;
                                                          metaworld_config.json:2-53; envs/utils.py:156-169
- success = Meta-World's info["success"]; it ends the episode
                                                          src/lerobot/envs/metaworld.py:243-244
- at most 500 steps (Meta-World's max_path_length)        src/lerobot/envs/metaworld.py:101;
                                                          scripts/lerobot_eval.py:154, 162
- the task set: MT1(task, seed=42), its first train task  src/lerobot/envs/metaworld.py:153-155, 163
- the difficulty splits                                   src/lerobot/envs/metaworld_config.json:70-90

Meta-World paths below are inside the installed package (metaworld 3.0.0, site-packages/metaworld/).

Two choices here differ from lerobot, on purpose:
- seeding: lerobot 0.4.4 passes `seed` to Meta-World's reset, which ignores it (sawyer_xyz_env.py:664-680),
  so object positions come from numpy's global generator. Here `seed` drives Meta-World's own seeded
  generator (sawyer_xyz_env.py:697-711), as lerobot's later main branch does: same seed, same scene.
- rendering: by default without multisampling, shadows and reflections (`fast_render=True`), 5x faster
  on a CPU. The picture differs slightly from lerobot's (README.md has the numbers); pass
  `fast_render=False` for lerobot's exact pixels, e.g. to evaluate an official fine-tune.

Below the robot: recording the scripted experts as a LeRobot v3.0 dataset (record.py's writer), with each
episode's success, and evaluating any checkpoint the way the paper does (success per task, per split):

    python metaworld_env.py record --tasks drawer-open-v3 --episodes 10 --dataset DIR
    python metaworld_env.py eval --policy DIR --tasks easy --episodes 10 --action-steps 10 [--server H:P]

and a language lab, offline on a CPU: a tiny SmolVLA trained from scratch on task pairs that share a scene
and differ by the instruction, evaluated with each task's own instruction and with the pair's swapped:

    python metaworld_env.py lab

The simulator is imported at the first robot (not at import time), after an OpenGL backend is chosen:
MuJoCo fixes its backend when it is first imported. If MUJOCO_GL is unset, the first backend that can
open an offscreen context (egl, then osmesa) is tried in a subprocess and written to os.environ["MUJOCO_GL"].
"""

import argparse
import difflib
import importlib.util
import json
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import torch
from tqdm import tqdm

import demo
import train
from data import LeRobotDataset
from infer_async import rtc_options
from plumbing import encode_video, write_json
from policy import SmolVLAPolicy
from policy_server import PolicyRunner, RemoteError, add_rtc_arguments, load_policy, open_policy
from record import append_episode
from smolvla import STATE

# The one line that installs the simulator (metaworld, and the mujoco / gymnasium versions that work with it).
INSTALL_LINE = "pip install -r requirements-sim.txt"
# What to install when no offscreen OpenGL works (Debian / Ubuntu package names).
GL_INSTALL_LINE = ("apt-get install libegl1 libegl-mesa0 libopengl0 and set MUJOCO_GL=egl, "
                   "or apt-get install libosmesa6 and set MUJOCO_GL=osmesa")
# The backends tried, in order, when MUJOCO_GL is unset: EGL (also GPUs), then OSMesa (software, slower).
GL_BACKENDS = ("egl", "osmesa")

# The observation keys, as lerobot's policies read them (utils/constants.py:23-24; configs.py:363-370).
IMAGE_KEY = "observation.image"
STATE_KEY = "observation.state"
ACTION_KEY = "action"
# The camera lerobot films with (src/lerobot/envs/metaworld.py:82) ...
CAMERA_NAME = "corner2"
# ... after moving it here (metaworld.py:157-161; "similar to arXiv 2206.14244", the comment there says).
CORNER2_POSITION = (0.75, 0.075, 0.7)
# The image lerobot gives: 480x480 (configs.py:374, 378), which is Meta-World's default render size.
IMAGE_SIZE = 480
# The state: hand xyz + finger opening (metaworld.py:73, 173).
STATE_SIZE = 4
# The action: hand xyz delta + gripper effort, each in [-1, 1] (metaworld.py:72, 137).
ACTION_SIZE = 4
# One action unit moves the hand target this far, in metres (sawyer_xyz_env.py:182, 327-328).
ACTION_SCALE = 0.01
# The episode limit: Meta-World's max_path_length (sawyer_xyz_env.py:153), which lerobot uses as its
# `_max_episode_steps` (metaworld.py:101; lerobot_eval.py:154). lerobot's config says episode_length=400
# (configs.py:354), but that field never reaches the Meta-World env (factory.py:190-195 passes only
# gym_kwargs, configs.py:384-388).
EPISODE_LIMIT = 500
# Control rate: 5 physics steps of 2.5 ms per action = 80 Hz (configs.py:353; the robot asserts it).
FPS = 80
# The task set lerobot draws from (metaworld.py:153): MT1's tasks for this seed; the first is used.
LEROBOT_MT1_SEED = 42

# The instruction the policy reads for each task (metaworld_config.json:2-53; metaworld.py:102), in
# lerobot's task-id order (metaworld_config.json:54-69: the id of a task is its index here).
TASK_DESCRIPTIONS = {
    "assembly-v3": "Pick up a nut and place it onto a peg",
    "basketball-v3": "Dunk the basketball into the basket",
    "bin-picking-v3": "Grasp the puck from one bin and place it into another bin",
    "box-close-v3": "Grasp the cover and close the box with it",
    "button-press-topdown-v3": "Press a button from the top",
    "button-press-topdown-wall-v3": "Bypass a wall and press a button from the top",
    "button-press-v3": "Press a button",
    "button-press-wall-v3": "Bypass a wall and press a button",
    "coffee-button-v3": "Push a button on the coffee machine",
    "coffee-pull-v3": "Pull a mug from a coffee machine",
    "coffee-push-v3": "Push a mug under a coffee machine",
    "dial-turn-v3": "Rotate a dial 180 degrees",
    "disassemble-v3": "Pick a nut out of a peg",
    "door-close-v3": "Close a door with a revolving joint",
    "door-lock-v3": "Lock the door by rotating the lock clockwise",
    "door-open-v3": "Open a door with a revolving joint",
    "door-unlock-v3": "Unlock the door by rotating the lock counter-clockwise",
    "drawer-close-v3": "Push and close a drawer",
    "drawer-open-v3": "Open a drawer",
    "faucet-close-v3": "Rotate the faucet clockwise",
    "faucet-open-v3": "Rotate the faucet counter-clockwise",
    "hammer-v3": "Hammer a screw on the wall",
    "hand-insert-v3": "Insert the gripper into a hole",
    "handle-press-side-v3": "Press a handle down sideways",
    "handle-press-v3": "Press a handle down",
    "handle-pull-side-v3": "Pull a handle up sideways",
    "handle-pull-v3": "Pull a handle up",
    "lever-pull-v3": "Pull a lever down 90 degrees",
    "peg-insert-side-v3": "Insert a peg sideways",
    "peg-unplug-side-v3": "Unplug a peg sideways",
    "pick-out-of-hole-v3": "Pick up a puck from a hole",
    "pick-place-v3": "Pick and place a puck to a goal",
    "pick-place-wall-v3": "Pick a puck, bypass a wall and place the puck",
    "plate-slide-back-side-v3": "Get a plate from the cabinet sideways",
    "plate-slide-back-v3": "Get a plate from the cabinet",
    "plate-slide-side-v3": "Slide a plate into a cabinet sideways",
    "plate-slide-v3": "Slide a plate into a cabinet",
    "push-back-v3": "Push the puck to a goal",
    "push-v3": "Push the puck to a goal",
    "push-wall-v3": "Bypass a wall and push a puck to a goal",
    "reach-v3": "Reach a goal position",
    "reach-wall-v3": "Bypass a wall and reach a goal",
    "shelf-place-v3": "Pick and place a puck onto a shelf",
    "soccer-v3": "Kick a soccer into the goal",
    "stick-pull-v3": "Grasp a stick and pull a box with the stick",
    "stick-push-v3": "Grasp a stick and push a box using the stick",
    "sweep-into-v3": "Sweep a puck into a hole",
    "sweep-v3": "Sweep a puck off the table",
    "window-open-v3": "Push and open a window",
    "window-close-v3": "Push and close a window",
}

# All 50 tasks, in lerobot's task-id order.
MT50 = list(TASK_DESCRIPTIONS)

# The difficulty groups the paper's Meta-World table reports, as lerobot defines them
# (metaworld_config.json:70-90): 28 + 11 + 6 + 5 = 50 tasks.
DIFFICULTY_TO_TASKS = {
    "easy": [
        "button-press-v3", "button-press-topdown-v3", "button-press-topdown-wall-v3", "button-press-wall-v3",
        "coffee-button-v3", "dial-turn-v3", "door-close-v3", "door-lock-v3", "door-open-v3", "door-unlock-v3",
        "drawer-close-v3", "drawer-open-v3", "faucet-close-v3", "faucet-open-v3", "handle-press-v3",
        "handle-press-side-v3", "handle-pull-v3", "handle-pull-side-v3", "lever-pull-v3", "plate-slide-v3",
        "plate-slide-back-v3", "plate-slide-back-side-v3", "plate-slide-side-v3", "reach-v3", "reach-wall-v3",
        "window-close-v3", "window-open-v3", "peg-unplug-side-v3",
    ],
    "medium": [
        "basketball-v3", "bin-picking-v3", "box-close-v3", "coffee-pull-v3", "coffee-push-v3", "hammer-v3",
        "peg-insert-side-v3", "push-wall-v3", "soccer-v3", "sweep-v3", "sweep-into-v3",
    ],
    "hard": [
        "assembly-v3", "hand-insert-v3", "pick-out-of-hole-v3", "pick-place-v3", "push-v3", "push-back-v3",
    ],
    "very_hard": ["shelf-place-v3", "disassemble-v3", "stick-pull-v3", "stick-push-v3", "pick-place-wall-v3"],
}
# The split names tasks_for accepts: the four groups, and all 50.
SPLITS = [*DIFFICULTY_TO_TASKS, "mt50"]

# Task pairs for a language lab: each pair loads the same scene file (measured: sawyer_drawer.xml,
# sawyer_window_horizontal.xml, sawyer_door_pull.xml, sawyer_faucet.xml) and has its own instruction. The
# first frames are NOT identical, though: the close tasks start with the drawer / window / door open, and
# the faucet handle starts turned the other way, so the image alone already tells the pair apart
# (README.md has the measured differences).
LANGUAGE_PAIRS = [
    ("drawer-open-v3", "drawer-close-v3"),
    ("window-open-v3", "window-close-v3"),
    ("door-open-v3", "door-close-v3"),
    ("faucet-open-v3", "faucet-close-v3"),
]


def close_matches(name, choices):
    """The choices that look like `name` (for an error message that says what was probably meant)."""
    # difflib ranks by similarity; four suggestions are plenty, 0.5 keeps unrelated names out.
    matches = difflib.get_close_matches(name, choices, n=4, cutoff=0.5)
    return matches


def check_task(task):
    """The task's canonical name (lerobot's `metaworld-` prefix removed, metaworld.py:91), or ValueError."""
    # lerobot accepts "metaworld-reach-v3" as well as "reach-v3".
    name = task.strip().removeprefix("metaworld-")
    if name in TASK_DESCRIPTIONS:
        return name
    # Suggest the names that look alike, so a typo is a one-line fix.
    suggestions = close_matches(name, MT50)
    hint = "; tasks_for('mt50') lists them all"
    if suggestions:
        hint = f"; did you mean {', '.join(suggestions)}?"
    raise ValueError(f"unknown Meta-World task {task!r}{hint}")


def tasks_for(name_or_split):
    """The tasks named by a task, a split (easy|medium|hard|very_hard|mt50), or a comma-separated list.

    The comma-separated form is lerobot's `--env.task` (metaworld.py:294, 304). Order kept, repeats dropped.
    """
    tasks = []
    # Each comma-separated item is a split or a task.
    for item in name_or_split.split(","):
        name = item.strip()
        if name == "":
            continue
        if name == "mt50":
            named = MT50
        elif name in DIFFICULTY_TO_TASKS:
            named = DIFFICULTY_TO_TASKS[name]
        elif name.removeprefix("metaworld-") in TASK_DESCRIPTIONS:
            named = [name.removeprefix("metaworld-")]
        else:
            # Neither: suggest from splits and tasks together.
            suggestions = close_matches(name, SPLITS + MT50)
            hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else ""
            raise ValueError(f"unknown Meta-World task or split {name!r} (splits: {', '.join(SPLITS)}){hint}")
        # Keep the first occurrence of each task.
        for task in named:
            if task not in tasks:
                tasks.append(task)
    if not tasks:
        raise ValueError(f"no Meta-World task in {name_or_split!r}")
    return tasks


def gl_backend_works(backend):
    """Whether MuJoCo can open an offscreen OpenGL context with this backend (tried in a fresh Python)."""
    # A subprocess, because MuJoCo and PyOpenGL fix their backend at the first import in a process.
    probe = "import mujoco; context = mujoco.GLContext(8, 8); context.make_current(); context.free()"
    # The child chooses its PyOpenGL platform from MUJOCO_GL alone.
    environment = dict(os.environ, MUJOCO_GL=backend)
    environment.pop("PYOPENGL_PLATFORM", None)
    result = subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, timeout=120)
    return result.returncode == 0


def first_working_gl_backend(backends=GL_BACKENDS):
    """The first backend that renders offscreen here; SystemExit naming the packages when none does."""
    for backend in backends:
        if gl_backend_works(backend):
            return backend
    tried = ", ".join(backends)
    raise SystemExit(f"error: MuJoCo found no offscreen OpenGL ({tried} tried): {GL_INSTALL_LINE}")


def choose_gl_backend():
    """MUJOCO_GL if set; otherwise the first working backend, written to os.environ before MuJoCo loads."""
    chosen = os.environ.get("MUJOCO_GL", "")
    if chosen != "":
        return chosen
    # Once imported, MuJoCo has picked its backend (glfw, when MUJOCO_GL was unset): too late to choose.
    if "mujoco" in sys.modules:
        raise SystemExit("error: mujoco was imported before a GL backend was chosen: "
                         "set MUJOCO_GL=egl (or osmesa) before starting Python")
    chosen = first_working_gl_backend()
    os.environ["MUJOCO_GL"] = chosen
    return chosen


def import_simulator():
    """metaworld (mujoco under it), imported after choosing the GL backend; SystemExit if not installed."""
    # Already imported (a robot exists): nothing to choose or check again.
    if "metaworld.policies" in sys.modules:
        return sys.modules["metaworld"]
    # Look for the packages before importing them: a missing package must not pass for a missing GL.
    for package in ("metaworld", "mujoco", "gymnasium"):
        if importlib.util.find_spec(package) is None:
            raise SystemExit(f"error: the Meta-World simulator needs the {package} package: {INSTALL_LINE}")
    choose_gl_backend()
    import metaworld
    import metaworld.policies
    return metaworld


class MetaWorldRobot:
    """One Meta-World task as a robot: reset() and step() give lerobot's observations; success ends episodes.

    robot = MetaWorldRobot("drawer-open-v3", seed=0)
    observation = robot.reset()        # {"observation.image": (480, 480, 3) uint8, "observation.state": (4,)}
    observation, success, done = robot.step(np.zeros(4))
    robot.instruction                  # "Open a drawer"
    robot.close()

    `policy_inputs(observation, robot.instruction)` turns an observation into what lerobot hands the policy.
    `robot.simulator` is the Meta-World env itself; `robot.simulator_state` its 39 floats (the scripted
    experts read them, the policy never does).
    """

    def __init__(self, task, seed=0, camera_size=IMAGE_SIZE, fast_render=True):
        # The boundary: a task name and a size come from the user.
        self.task = check_task(task)
        if not isinstance(camera_size, int) or camera_size < 8 or camera_size > 2048:
            raise ValueError(f"camera_size must be an int pixel count in 8..2048, got {camera_size!r}")
        self.seed = seed
        self.camera_size = camera_size
        self.fast_render = fast_render
        self.instruction = TASK_DESCRIPTIONS[self.task]
        metaworld = import_simulator()
        import mujoco
        # lerobot's task set (metaworld.py:153-155): MT1 for this task with seed 42, its first train task.
        benchmark = metaworld.MT1(self.task, seed=LEROBOT_MT1_SEED)
        environment_class = benchmark.train_classes[self.task]
        self.simulator = environment_class(render_mode="rgb_array", camera_name=CAMERA_NAME,
                                           width=camera_size, height=camera_size)
        self.simulator.set_task(benchmark.train_tasks[0])
        # Move corner2 where lerobot puts it (metaworld.py:156-161).
        camera_id = mujoco.mj_name2id(self.simulator.model, mujoco.mjtObj.mjOBJ_CAMERA, CAMERA_NAME)
        self.simulator.model.cam_pos[camera_id] = CORNER2_POSITION
        assert camera_id == 2, "lerobot writes cam_pos[2]: corner2 must be camera 2"
        # The control rate lerobot records at (configs.py:353): dt = frame_skip x timestep.
        assert round(1.0 / self.simulator.dt) == FPS, f"Meta-World steps at {1.0 / self.simulator.dt} Hz"
        if fast_render:
            # No multisampling and no shadow map: read when the offscreen buffer is made, i.e. before the
            # first render.
            self.simulator.model.vis.quality.offsamples = 0
            self.simulator.model.vis.quality.shadowsize = 0
        # A new position at every reset (lerobot: metaworld.py:163), drawn from the env's own generator,
        # which `seed` sets (sawyer_xyz_env.py:697-711), so that the same seed gives the same scenes.
        self.simulator._freeze_rand_vec = False
        self.simulator.seeded_rand_vec = True
        self.simulator.seed(seed)
        # Render once now: the GL context opens here, so a broken GL fails at construction, in one line.
        try:
            self.simulator.render()
        except Exception as error:
            message = f"{type(error).__name__}: {error}".replace("\n", " ")
            backend = os.environ.get("MUJOCO_GL")
            raise SystemExit(f"error: MuJoCo cannot render offscreen with MUJOCO_GL={backend} ({message}): "
                             f"{GL_INSTALL_LINE}") from error
        if fast_render:
            # The scene's shadow and reflection passes off (the viewer exists after the first render).
            scene = self.simulator.mujoco_renderer.viewer.scn
            scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
            scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        # No episode yet: step() needs a reset() first.
        self.steps = 0
        self.done = True
        self.last_info = {}
        self.simulator_state = None

    def render_raw(self):
        """The camera image as Meta-World renders it, before lerobot's flip (upside down and mirrored)."""
        # Each robot has its own GL context, and only one is current per thread: another robot made (or
        # closed) since our last frame leaves ours not current, and the frame would come out black (measured).
        self.simulator.mujoco_renderer.viewer.make_context_current()
        image = self.simulator.render()
        return image

    def render(self):
        """The camera image as lerobot gives it: flipped on both axes (metaworld.py:147-149, 170-172)."""
        raw = self.render_raw()
        # A copy with positive strides, as lerobot's .copy() (metaworld.py:190): torch.from_numpy needs it.
        image = np.ascontiguousarray(np.flip(raw, (0, 1)))
        return image

    def observation(self):
        """The current observation, keyed as lerobot's policies read it (configs.py:363-370).

        observation.image: (H, W, 3) uint8, channels last, as the env gives it (metaworld.py:190).
        observation.state: (4,) float32: hand x, y, z and finger opening: the env's agent_pos
        (metaworld.py:173) cast to float32 the way lerobot's preprocess_observation does (utils.py:95).
        """
        state = self.simulator_state[:STATE_SIZE].astype(np.float32)
        observation = {IMAGE_KEY: self.render(), STATE_KEY: state}
        return observation

    def reset(self, seed=None):
        """Start an episode (a new object / goal position from the seeded generator); its first observation.

        seed: reseed first, e.g. to replay an episode; None continues the robot's sequence of scenes.
        """
        if seed is not None:
            self.seed = seed
            self.simulator.seed(seed)
        # Meta-World's reset ignores a seed argument (sawyer_xyz_env.py:664-680); the generator is seeded.
        raw_observation, info = self.simulator.reset()
        self.simulator_state = raw_observation.copy()
        self.steps = 0
        self.done = False
        self.last_info = info
        return self.observation()

    def step(self, action):
        """Apply one action; (observation, success, done).

        action: 4 floats: hand x, y, z delta (1 = 1 cm, ACTION_SCALE), gripper effort (+1 closes, -1 opens).
        Values outside [-1, 1] are clipped, which is what Meta-World and MuJoCo do anyway (xyz:
        sawyer_xyz_env.py:327; gripper: the actuators' ctrlrange [-1, 1]); lerobot passes actions unchanged
        (metaworld.py:240). success is Meta-World's info["success"]; done = success or the 500-step limit
        (metaworld.py:243-244; sawyer_xyz_env.py:634).
        """
        # The boundary: the action comes from a policy or a user.
        action = np.asarray(action, dtype=np.float32)
        if action.shape != (ACTION_SIZE,):
            raise ValueError(f"action must have shape ({ACTION_SIZE},) (xyz delta, gripper), "
                             f"got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action must be finite, got {action.tolist()}")
        if self.done:
            raise RuntimeError("the episode is over (or never started): call reset() first")
        clipped = np.clip(action, -1.0, 1.0)
        raw_observation, reward, terminated, truncated, info = self.simulator.step(clipped)
        self.simulator_state = raw_observation.copy()
        self.steps += 1
        self.last_info = info
        # Success is Meta-World's own judgement of the state (each task's evaluate_state).
        success = bool(info["success"])
        # Meta-World flags the limit itself (truncated at max_path_length); the count is asserted against it.
        assert truncated == (self.steps == EPISODE_LIMIT), (truncated, self.steps)
        self.done = success or truncated or terminated
        return self.observation(), success, self.done

    def close(self):
        """Release the OpenGL context now (a robot holds one; each is a few MB of buffers)."""
        self.simulator.close()
        # Drop the closed viewer too, so it is collected now. Measured under EGL: a viewer closed but still
        # referenced at interpreter exit frees its context a second time there and prints an EGLError
        # traceback from OffScreenViewer.__del__ (gymnasium 1.2.2 mujoco_rendering.py:233-234).
        renderer = self.simulator.mujoco_renderer
        renderer._viewers.clear()
        renderer.viewer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def policy_inputs(observation, instruction):
    """What lerobot_eval hands the policy for this observation, as numpy (torch.from_numpy makes tensors).

    preprocess_observation (src/lerobot/envs/utils.py:59-98): the image becomes float32 in [0, 1], channels
    first, with a batch dimension, (1, 3, H, W); the state float32 (1, 4). add_envs_task (utils.py:156-169)
    adds the instruction as a list of one string.
    """
    image = observation[IMAGE_KEY]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, image.shape
    # HWC uint8 -> 1CHW float32 / 255 (utils.py:81-83).
    image_chw = np.ascontiguousarray(image.transpose(2, 0, 1)[None]).astype(np.float32) / 255.0
    # (4,) -> (1, 4) float32 (utils.py:95-98).
    state = observation[STATE_KEY].astype(np.float32)[None]
    inputs = {IMAGE_KEY: image_chw, STATE_KEY: state, "task": [instruction]}
    return inputs


# One scripted expert per task, made on first use (the experts keep no state between calls).
EXPERTS = {}


def scripted_action(task, simulator_state):
    """Meta-World's hand-written expert for the task (metaworld.policies.ENV_POLICY_MAP): the action for this
    state, in the policy's convention: (4,) float32 in [-1, 1].

    simulator_state: the env's 39 floats (`robot.simulator_state`): the expert reads object and goal positions
    that the policy's observation does not have. lerobot maps each task to the same expert class
    (metaworld_config.json:91-120).
    """
    task = check_task(task)
    metaworld = import_simulator()
    if task not in EXPERTS:
        EXPERTS[task] = metaworld.policies.ENV_POLICY_MAP[task]()
    # The experts warn when their gain asks for more than [-1, 1] ("Environments clip response"): clipped
    # below.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        action = EXPERTS[task].get_action(np.asarray(simulator_state, dtype=np.float64))
    # The same clip the robot applies, so a recorded action is the action that moved the arm.
    clipped = np.clip(action, -1.0, 1.0).astype(np.float32)
    return clipped


def scripted_episode(robot, max_steps=EPISODE_LIMIT, seed=None):
    """One episode of the scripted expert on `robot`: (frames, success).

    frames: one dict per step, the observation the action was chosen from and the action:
    {"observation.state": (4,) float32, "observation.image": (H, W, 3) uint8, "action": (4,) float32}.
    success: whether Meta-World judged the task done (the episode stops there, as lerobot's does).
    """
    if not isinstance(max_steps, int) or max_steps < 1 or max_steps > EPISODE_LIMIT:
        raise ValueError(f"max_steps must be an int in 1..{EPISODE_LIMIT}, got {max_steps!r}")
    observation = robot.reset(seed)
    frames = []
    success = False
    for _ in range(max_steps):
        action = scripted_action(robot.task, robot.simulator_state)
        frame = {STATE_KEY: observation[STATE_KEY], IMAGE_KEY: observation[IMAGE_KEY], ACTION_KEY: action}
        frames.append(frame)
        observation, success, done = robot.step(action)
        if done:
            break
    return frames, success


# ----------------------------------------------------------------------------------------------------
# Demonstrations: the scripted experts, recorded as a LeRobot v3.0 dataset
# ----------------------------------------------------------------------------------------------------

# The dataset's camera: record.py's writer names each camera observation.images.<name>, so the image is
# observation.images.corner2 there (lerobot's own Meta-World dataset says observation.image; a policy
# reads one camera, whatever its name: the evaluation hands the robot's image to it).
DATASET_CAMERA = CAMERA_NAME
# The entries of both vectors: the state's hand position and finger opening, the action's hand delta and
# gripper effort (the writer names state and action entries alike).
DATASET_ENTRY_NAMES = ["x", "y", "z", "gripper"]
# The robot type written into meta/info.json.
ROBOT_TYPE = "sawyer"


def episode_for_dataset(frames, instruction, success):
    """An episode as record.py's writer takes it: stacked states, actions and images, task, success."""
    states = np.stack([frame[STATE_KEY] for frame in frames])
    actions = np.stack([frame[ACTION_KEY] for frame in frames])
    images = np.stack([frame[IMAGE_KEY] for frame in frames])
    episode = {
        STATE_KEY: states,
        ACTION_KEY: actions,
        "images": {DATASET_CAMERA: images},
        "task": instruction,
        # append_episode keeps it in the episode's row of meta/episodes ("success" column).
        "success": bool(success),
    }
    return episode


def record_demonstrations(root, tasks, episodes, seed=0, camera_size=128, max_steps=EPISODE_LIMIT,
                          keep_failures=False, codec="libsvtav1", fast_render=True):
    """Record `episodes` scripted-expert episodes of each task into the LeRobot v3.0 dataset at `root`.

    Each episode's row in meta/episodes has a "success" column: Meta-World's info["success"] at the end.
    Failed episodes are left out unless keep_failures. The task string of each episode is the instruction.
    Returns {task: (episodes kept, episodes recorded)}.
    """
    if not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes must be an int >= 1, got {episodes!r}")
    if os.path.isdir(root) and os.listdir(root):
        raise FileExistsError(f"{root} exists and is not empty; choose a new directory for the dataset")
    counts = {}
    progress = tqdm(total=len(tasks) * episodes, desc="recording the scripted experts")
    for task in tasks:
        kept = 0
        robot = MetaWorldRobot(task, seed=seed, camera_size=camera_size, fast_render=fast_render)
        try:
            for _ in range(episodes):
                # Each reset draws the next scene of the robot's seeded sequence.
                frames, success = scripted_episode(robot, max_steps)
                progress.update(1)
                if not success and not keep_failures:
                    continue
                episode = episode_for_dataset(frames, robot.instruction, success)
                append_episode(root, episode, fps=FPS, codec=codec, robot_type=ROBOT_TYPE,
                               joint_names=DATASET_ENTRY_NAMES)
                kept += 1
        finally:
            robot.close()
        counts[task] = (kept, episodes)
    progress.close()
    return counts


# ----------------------------------------------------------------------------------------------------
# Evaluation: a policy in closed loop, success as Meta-World reports it
# ----------------------------------------------------------------------------------------------------

def policy_observation(observation, camera, instruction):
    """What a policy (in-process runner or server client) is handed: the state, its one camera, the task.

    The image stays (H, W, 3) uint8: policy_server's PolicyRunner turns frames into (3, H, W) itself.
    """
    request = {STATE: observation[STATE_KEY], camera: observation[IMAGE_KEY], "task": instruction}
    return request


def check_policy_fits(compute, info, camera_size):
    """The policy's camera; ValueError, before any episode, if the policy cannot drive Meta-World.

    Meta-World films one camera and has a state and an action of 4 floats. The number of cameras is in the
    policy's info; the sizes are checked with one request (a blank image, a zero state), which works the
    same in-process and through a server: a state of the wrong size is refused by the policy itself.
    """
    cameras = info["cameras"]
    if len(cameras) != 1:
        raise ValueError(f"the policy reads {len(cameras)} cameras ({', '.join(cameras)}); "
                         f"Meta-World films one ({CAMERA_NAME})")
    camera = cameras[0]
    blank = {STATE_KEY: np.zeros(STATE_SIZE, np.float32),
             IMAGE_KEY: np.zeros((camera_size, camera_size, 3), np.uint8)}
    try:
        answer = compute(policy_observation(blank, camera, "probe"))
    except (ValueError, RemoteError) as error:
        raise ValueError(f"the policy does not take Meta-World's observation (a state of {STATE_SIZE} "
                         f"floats: hand xyz, finger opening): {error}") from None
    action_size = answer["actions"].shape[-1]
    if action_size != ACTION_SIZE:
        raise ValueError(f"the policy's actions have {action_size} entries; Meta-World's have "
                         f"{ACTION_SIZE} (hand xyz delta, gripper)")
    return camera


def policy_episode(robot, compute, camera, action_steps, max_steps, instruction=None, keep_frames=False,
                   rtc=None, rtc_delay=0):
    """One closed-loop episode: (success, steps, frames).

    Every `action_steps` steps the policy sees the current observation and returns a chunk, whose first
    `action_steps` actions run open loop (the paper's replanning period). success is Meta-World's
    info["success"] (robot.step), which also ends the episode. instruction: what the policy is told
    (default the task's own). frames: the images seen, if keep_frames (for a video).

    rtc: Real-Time Chunking's options (infer_async.rtc_options: mode, execution_horizon, ...), or None. With
    them, a request after the first carries the leftover — the last chunk's actions not yet run, in the
    policy's normalized units — and a simulated inference delay d = `rtc_delay`: the simulator does not run
    while the policy thinks, so the delay is played out as it would be on a robot. The first d actions after
    a request are the leftover's (they run while the next chunk is computed, and the new chunk is sampled to
    continue them), then the new chunk from its action d on: still `action_steps` actions per chunk.
    """
    if instruction is None:
        instruction = robot.instruction
    observation = robot.reset()
    frames = []
    if keep_frames:
        frames.append(observation[IMAGE_KEY])
    queue = []
    # RTC: the rest of the last chunk, (T, A): in robot units (what runs) and normalized (what is sent)
    leftover_actions = None
    leftover_normalized = None
    success = False
    steps = 0
    while steps < max_steps:
        if not queue:
            request = policy_observation(observation, camera, instruction)
            delay = 0
            if rtc is not None:
                if leftover_normalized is not None:
                    delay = rtc_delay
                    request["rtc_leftover"] = leftover_normalized
                request["rtc"] = {**rtc, "inference_delay": delay}
            answer = compute(request)
            chunk = answer["actions"]  # (chunk_size, A) in robot units
            queue = []
            if delay:
                queue += list(leftover_actions[:delay])  # run while the chunk was computed
            queue += list(chunk[delay:action_steps])
            if rtc is not None:
                leftover_actions = chunk[action_steps:]
                leftover_normalized = answer["normalized"][action_steps:]
        action = queue.pop(0)
        observation, success, done = robot.step(action)
        steps += 1
        if keep_frames:
            frames.append(observation[IMAGE_KEY])
        if done:
            break
    return success, steps, frames


def evaluate(compute, info, tasks, episodes, action_steps, seed=0, camera_size=IMAGE_SIZE, fast_render=True,
             max_steps=EPISODE_LIMIT, instructions=None, video_dir=None, progress=True, rtc=None,
             rtc_delay=0):
    """Closed-loop success of a policy on `tasks`: {task: [{"success", "steps", "final_state"}, ...]}.

    Each task's robot is seeded with `seed`, so the same seed gives the same scenes whatever runs the policy.
    instructions: {task: what the policy is told instead of the task's own instruction} (the language lab).
    video_dir: each episode as <task>_<episode>.mp4 there. rtc, rtc_delay: Real-Time Chunking
    (policy_episode).
    """
    if not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes must be an int >= 1, got {episodes!r}")
    if not isinstance(max_steps, int) or max_steps < 1 or max_steps > EPISODE_LIMIT:
        raise ValueError(f"max_steps must be an int in 1..{EPISODE_LIMIT}, got {max_steps!r}")
    chunk_size = info["chunk_size"]
    if not isinstance(action_steps, int) or action_steps < 1 or action_steps > chunk_size:
        raise ValueError(f"action steps must be in 1..{chunk_size} (the policy's chunk size), "
                         f"got {action_steps!r}")
    if rtc is not None:
        leftover_size = chunk_size - action_steps
        if not isinstance(rtc_delay, int) or rtc_delay < 0 or rtc_delay > min(action_steps, leftover_size):
            raise ValueError(f"the RTC delay must be in 0..{min(action_steps, leftover_size)} (at most the "
                             f"action steps, {action_steps}, and the chunk's leftover, {leftover_size}), "
                             f"got {rtc_delay!r}")
    if instructions is None:
        instructions = {}
    camera = check_policy_fits(compute, info, camera_size)
    results = {}
    bar = tqdm(total=len(tasks) * episodes, desc="evaluating", disable=not progress)
    for task in tasks:
        results[task] = []
        robot = MetaWorldRobot(task, seed=seed, camera_size=camera_size, fast_render=fast_render)
        instruction = instructions.get(task, robot.instruction)
        try:
            for episode in range(episodes):
                keep_frames = video_dir is not None
                success, steps, frames = policy_episode(robot, compute, camera, action_steps, max_steps,
                                                        instruction, keep_frames, rtc, rtc_delay)
                final_state = robot.simulator_state[:STATE_SIZE].tolist()
                results[task].append({"success": bool(success), "steps": steps, "final_state": final_state})
                if keep_frames:
                    path = os.path.join(video_dir, f"{task}_{episode}.mp4")
                    encode_video(path, [np.stack(frames)], FPS, "h264")
                bar.update(1)
                bar.set_postfix(task=task, success=f"{success_rate(results[task]):.2f}")
        finally:
            robot.close()
    bar.close()
    return results


def success_rate(episode_results):
    """The fraction of episodes that succeeded."""
    successes = [result["success"] for result in episode_results]
    rate = float(np.mean(successes))
    return rate


def summarize(results):
    """{"tasks": {task: success rate}, "splits": {split: mean over its evaluated tasks}, "mean": all}.

    A split's average is over the tasks of it that were evaluated (the paper's table averages each split's
    tasks); a split with none evaluated is left out.
    """
    per_task = {task: success_rate(episode_results) for task, episode_results in results.items()}
    per_split = {}
    for split, split_tasks in DIFFICULTY_TO_TASKS.items():
        evaluated = [per_task[task] for task in split_tasks if task in per_task]
        if evaluated:
            per_split[split] = float(np.mean(evaluated))
    summary = {"tasks": per_task, "splits": per_split, "mean": float(np.mean(list(per_task.values())))}
    return summary


def open_evaluated_policy(policy, server=None, seed=None, vlm=None, device="cpu", timeout=10.0):
    """(compute, info) for a checkpoint dir or hub id in this process, or a policy on a server.

    policy_server.open_policy does it (as for record.py and infer_async.py): in-process a PolicyRunner whose
    sampling noise `seed` fixes; through a server its client (the server's own --seed fixes the noise).
    """
    policies = None
    if policy:
        policies = [policy]
    options = argparse.Namespace(policy=policies, server=server, seed=seed, vlm=vlm, device=device,
                                 dtype="float32", timeout=timeout, max_message_mb=64.0)
    compute, info = open_policy(options)
    return compute, info


# ----------------------------------------------------------------------------------------------------
# A tiny SmolVLA for Meta-World, from scratch (demo.py's architecture at toy widths)
# ----------------------------------------------------------------------------------------------------

# Instructions are up to 12 words (bin-picking); demo.py's 8 tokens cover its one task only.
TOKENIZER_MAX_LENGTH = 16


def tiny_smolvla(dataset, vlm_dir, image_size, chunk_size, action_steps, vlm_layers=4, seed=0):
    """A tiny SmolVLA, randomly initialized, for `dataset` (its features, tasks and statistics).

    demo.py's config and tiny VLM (word-level tokenizer over the dataset's instructions, SigLIP and SmolLM2
    at toy widths), with the images resized to image_size.
    """
    settings = argparse.Namespace(chunk_size=chunk_size, action_steps=action_steps, vlm_layers=vlm_layers,
                                  attention="interleaved")
    config = demo.demo_policy_config(dataset, settings, image_size)
    config.tokenizer_max_length = TOKENIZER_MAX_LENGTH
    # The random initialization of the whole model.
    torch.manual_seed(seed)
    vlm_config, tokenizer = demo.write_tiny_vlm(vlm_dir, dataset.tasks, image_size)
    policy = SmolVLAPolicy(config, vlm_config, tokenizer)
    # Copied into every checkpoint's vlm/.
    policy.vlm_dir = vlm_dir
    policy.set_normalization(dataset.stats)
    return policy


# ----------------------------------------------------------------------------------------------------
# The language lab: does the policy read the instruction?
# ----------------------------------------------------------------------------------------------------

# The lab's own settings (its flags, without the `--`): few demonstrations, small images, short episodes.
LAB_SETTINGS = {
    "demos": 20,           # scripted demonstrations per task (8 tasks)
    "camera_size": 64,     # image side in pixels (recorded and fed to the policy)
    "eval_episodes": 5,    # closed-loop episodes per task, per condition
    "max_steps": 150,      # steps per evaluation episode (the experts need 59-93)
    "chunk_size": 10,      # actions per chunk
    "action_steps": 5,     # actions executed per chunk, open loop
    "vlm_layers": 4,       # VLM layers kept, of the tiny VLM's 8
}
# The lab's training recipe: demo.py's (a tiny model from scratch, higher lr, short schedule).
LAB_RECIPE = {**demo.DEMO_RECIPE, "steps": 3_000, "batch_size": 32}
# What the lab has in place of train.py's data and starting-point flags (as demo.py's DEMO_RUN).
LAB_RUN = {**demo.DEMO_RUN}


def swapped_instructions(pairs):
    """{task: the other task of its pair's instruction}: what a policy that reads language gets wrong."""
    swapped = {}
    for first, second in pairs:
        swapped[first] = TASK_DESCRIPTIONS[second]
        swapped[second] = TASK_DESCRIPTIONS[first]
    return swapped


def lab_table(own, swapped, episodes):
    """The lab's result as a Markdown table: per task, success with its own and the swapped instruction."""
    lines = [f"| task | own instruction | swapped instruction | ({episodes} episodes each) |",
             "|---|---|---|---|"]
    for task in own["tasks"]:
        told = TASK_DESCRIPTIONS[task]
        lines.append(f"| {task} | {own['tasks'][task]:.2f} | {swapped['tasks'][task]:.2f} | \"{told}\" |")
    lines.append(f"| **mean** | **{own['mean']:.2f}** | **{swapped['mean']:.2f}** | |")
    table = "\n".join(lines)
    return table


def lab_gif(compute, camera, path, tasks, seed, camera_size, action_steps, max_steps):
    """One episode per task with its own instruction, then with the swapped one, as a GIF (2x, captioned)."""
    from PIL import Image, ImageDraw

    swapped = swapped_instructions(LANGUAGE_PAIRS)
    pictures = []
    for task in tasks:
        for instruction in (TASK_DESCRIPTIONS[task], swapped[task]):
            robot = MetaWorldRobot(task, seed=seed, camera_size=camera_size)
            try:
                success, _, frames = policy_episode(robot, compute, camera, action_steps, max_steps,
                                                    instruction, keep_frames=True)
            finally:
                robot.close()
            verdict = "success" if success else "failure"
            # Every other frame (40 per second of the 80 Hz episode), twice as large, with a caption.
            for frame in frames[::2]:
                picture = Image.new("RGB", (2 * camera_size, 2 * camera_size + 24), "white")
                picture.paste(Image.fromarray(frame).resize((2 * camera_size, 2 * camera_size)), (0, 24))
                caption = ImageDraw.Draw(picture)
                caption.text((2, 1), f"{task}: {verdict}", fill="black")
                caption.text((2, 12), f"told: {instruction}", fill="black")
                pictures.append(picture)
    # 25 ms a frame: the episodes' real speed (2 frames of 12.5 ms each).
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=25, loop=0)
    return path


def add_lab_arguments(subcommands):
    parser = subcommands.add_parser("lab", help="the language lab: train a tiny SmolVLA on task pairs, "
                                                "evaluate with own and swapped instructions")
    setting = LAB_SETTINGS
    parser.add_argument("--demos", type=int, help=f"demonstrations per task ({setting['demos']})")
    parser.add_argument("--camera-size", type=int, help=f"image side in pixels ({setting['camera_size']})")
    parser.add_argument("--eval-episodes", type=int,
                        help=f"episodes per task and condition ({setting['eval_episodes']})")
    parser.add_argument("--max-steps", type=int,
                        help=f"steps per evaluation episode ({setting['max_steps']})")
    parser.add_argument("--chunk-size", type=int, help=f"actions per chunk ({setting['chunk_size']})")
    parser.add_argument("--action-steps", type=int,
                        help=f"actions executed per chunk, open loop ({setting['action_steps']})")
    parser.add_argument("--vlm-layers", type=int, help=f"VLM layers kept, of 8 ({setting['vlm_layers']})")
    # train.py's run flags (--steps, --batch-size, --lr, --output, --seed, ...).
    train.add_run_arguments(parser)


def prepare_lab(args):
    """The lab's settings where the command line left them out, and a new, empty output directory."""
    if args.resume:
        raise ValueError("the lab runs from scratch; continue its training with train.py --resume")
    for name, value in LAB_SETTINGS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name, value in LAB_RUN.items():
        setattr(args, name, value)
    at_least = {name: 1 for name in LAB_SETTINGS}
    at_least["camera_size"] = 16
    train.fill_options(args, defaults=LAB_RECIPE, at_least=at_least)
    if args.action_steps > args.chunk_size:
        raise ValueError(f"--action-steps {args.action_steps} is more than a chunk ({args.chunk_size})")
    # 8-pixel patches, pixel-shuffled 2x2: the side must hold an even number of patches.
    if args.camera_size % 16:
        raise ValueError(f"--camera-size {args.camera_size}: the tiny VLM needs a multiple of 16 pixels")
    default_output = args.output is None
    if default_output:
        args.output = os.path.join("outputs", "metaworld_lab", time.strftime("%Y-%m-%d_%H-%M-%S"))
    if os.path.isdir(args.output) and os.listdir(args.output):
        raise FileExistsError(f"{args.output!r} is not empty; the lab writes a new run: "
                              "choose another --output")
    if default_output:
        # outputs/metaworld_lab/latest: the newest run, as for demo.py and train.py
        os.makedirs(args.output, exist_ok=True)
        train.replace_link(os.path.dirname(args.output), "latest", os.path.basename(args.output))


def run_lab(args):
    """Record -> train from scratch -> evaluate with own and swapped instructions -> table, GIF, lab.json."""
    prepare_lab(args)
    started = time.perf_counter()
    # Tiny matrices: one thread (demo.py measured 2 shared cores: 0.3 s a step with 1 thread, 2.3 s with 2).
    torch.set_num_threads(1)
    tasks = [task for pair in LANGUAGE_PAIRS for task in pair]
    dataset_root = os.path.join(args.output, "dataset")
    counts = record_demonstrations(dataset_root, tasks, args.demos, seed=args.seed,
                                   camera_size=args.camera_size)
    recorded = time.perf_counter()
    dataset = LeRobotDataset(dataset_root, chunk_size=args.chunk_size)
    policy = tiny_smolvla(dataset, os.path.join(args.output, "vlm"), args.camera_size, args.chunk_size,
                          args.action_steps, args.vlm_layers, args.seed)
    processes = train.start_processes("cpu")
    train.check_batch_size(len(dataset), args.batch_size, 1)
    train.train(policy, dataset, args, processes)
    trained = time.perf_counter()
    checkpoint = os.path.join(args.output, "checkpoints", "last", "pretrained_model")
    # The checkpoint as written, loaded the way `eval --policy` loads it.
    runner = PolicyRunner(load_policy(checkpoint), args.seed)
    # New scenes: the evaluation's seed is not the recording's.
    evaluation_seed = args.seed + 1
    evaluated = {}
    for condition, instructions in (("own", None), ("swapped", swapped_instructions(LANGUAGE_PAIRS))):
        print(f"evaluating with the {condition} instructions")
        results = evaluate(runner, runner.info, tasks, args.eval_episodes, args.action_steps, evaluation_seed,
                           args.camera_size, max_steps=args.max_steps, instructions=instructions)
        evaluated[condition] = {"summary": summarize(results), "episodes": results}
    evaluation_done = time.perf_counter()
    camera = runner.info["cameras"][0]
    animation = lab_gif(runner, camera, os.path.join(args.output, "episodes.gif"), tasks[:4:2],
                        evaluation_seed, args.camera_size, args.action_steps, args.max_steps)
    table = lab_table(evaluated["own"]["summary"], evaluated["swapped"]["summary"], args.eval_episodes)
    result = {
        "own_instruction_mean": evaluated["own"]["summary"]["mean"],
        "swapped_instruction_mean": evaluated["swapped"]["summary"]["mean"],
        "own": evaluated["own"],
        "swapped": evaluated["swapped"],
        "demonstrations": {task: kept for task, (kept, _) in counts.items()},
        "settings": {name: getattr(args, name) for name in LAB_SETTINGS},
        "train_steps": args.steps,
        "batch_size": args.batch_size,
        "seconds": {"record": round(recorded - started, 1), "train": round(trained - recorded, 1),
                    "evaluate": round(evaluation_done - trained, 1),
                    "total": round(time.perf_counter() - started, 1)},
        "checkpoint": checkpoint,
        "animation": animation,
    }
    with open(os.path.join(args.output, "lab.json"), "w") as file:
        json.dump(result, file, indent=2)
    print(table)
    print(json.dumps(result["seconds"]))
    print(f"checkpoint: {checkpoint}\nGIF: {animation}\nevaluate it again:\n"
          f"  python metaworld_env.py eval --policy {checkpoint} --tasks {tasks[0]} {tasks[1]} --episodes 3 "
          f"--action-steps {args.action_steps} --camera-size {args.camera_size}")
    return result


# ----------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------

def add_record_arguments(subcommands):
    parser = subcommands.add_parser("record", help="record the scripted experts as a LeRobot v3.0 dataset")
    parser.add_argument("--tasks", nargs="+", required=True, help="task names or splits (easy|...|mt50)")
    parser.add_argument("--episodes", type=int, default=10, help="episodes per task (%(default)s)")
    parser.add_argument("--dataset", required=True, help="a new (or empty) directory for the dataset")
    parser.add_argument("--camera-size", type=int, default=128, help="image side in pixels (%(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the scenes' seed (%(default)s)")
    parser.add_argument("--max-steps", type=int, default=EPISODE_LIMIT, help="steps per episode at most")
    parser.add_argument("--keep-failures", action="store_true",
                        help="keep failed episodes too (with success=False)")
    parser.add_argument("--codec", default="libsvtav1", help="libsvtav1 (as on the hub) or h264")


def run_record(args):
    tasks = tasks_for(",".join(args.tasks))
    counts = record_demonstrations(args.dataset, tasks, args.episodes, args.seed, args.camera_size,
                                   args.max_steps, args.keep_failures, args.codec)
    for task, (kept, recorded) in counts.items():
        print(f"{task}: {kept} of {recorded} episodes kept")
    print(f"dataset: {args.dataset}")


def add_eval_arguments(subcommands):
    parser = subcommands.add_parser("eval", help="success rates of a policy, per task and per split")
    parser.add_argument("--policy", help="checkpoint dir or hub id (with --server: the name it is served as)")
    parser.add_argument("--vlm", help="VLM dir or hub id (default: <checkpoint>/vlm or the config's)")
    parser.add_argument("--server", help="HOST:PORT of a policy server (infer_async.py --serve)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", nargs="+", required=True, help="task names or splits (easy|...|mt50)")
    parser.add_argument("--episodes", type=int, default=10, help="episodes per task (%(default)s)")
    parser.add_argument("--action-steps", type=int, required=True,
                        help="actions executed open loop per chunk, before the policy looks again")
    parser.add_argument("--seed", type=int, default=0,
                        help="the scenes' seed, and in-process the sampling noise's (%(default)s)")
    parser.add_argument("--camera-size", type=int, default=IMAGE_SIZE, help="image side (lerobot: 480)")
    parser.add_argument("--lerobot-render", action="store_true",
                        help="lerobot's exact pixels (multisampling, shadows; 5x slower), "
                             "for the official fine-tunes")
    parser.add_argument("--max-steps", type=int, default=EPISODE_LIMIT, help="steps per episode at most")
    parser.add_argument("--video", help="directory for each episode as an mp4")
    parser.add_argument("--json", help="write the results (per episode, per task, per split) to this file")
    # Real-Time Chunking: infer_async's options (--rtc, --execution-horizon, ...), and the delay to simulate
    add_rtc_arguments(parser)
    parser.add_argument("--rtc-delay", type=int, default=0,
                        help="RTC: actions of the last chunk that run while the next is computed "
                             "(%(default)s)")


def run_eval(args):
    """Open the policy, check it fits, run the episodes, print the table (and write --json)."""
    tasks = tasks_for(",".join(args.tasks))
    if not args.policy and not args.server:
        raise ValueError("give --policy (a checkpoint dir or hub id), or --server HOST:PORT")
    compute, info = open_evaluated_policy(args.policy, args.server, args.seed, args.vlm, args.device)
    results = evaluate(compute, info, tasks, args.episodes, args.action_steps, args.seed, args.camera_size,
                       not args.lerobot_render, args.max_steps, video_dir=args.video, rtc=rtc_options(args),
                       rtc_delay=args.rtc_delay)
    summary = summarize(results)
    print(summary_table(summary, args.episodes))
    if args.json:
        write_json(args.json, {**summary, "episodes": results, "action_steps": args.action_steps,
                               "seed": args.seed})
    return summary


def summary_table(summary, episodes):
    """The results as a Markdown table: one row per task, then per split, then the mean."""
    lines = [f"| task | success ({episodes} episodes) |", "|---|---|"]
    for task, rate in summary["tasks"].items():
        lines.append(f"| {task} | {rate:.2f} |")
    for split, rate in summary["splits"].items():
        lines.append(f"| **{split}** (mean) | {rate:.2f} |")
    lines.append(f"| **all** (mean) | {summary['mean']:.2f} |")
    table = "\n".join(lines)
    return table


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    subcommands = parser.add_subparsers(dest="command", required=True)
    add_record_arguments(subcommands)
    add_eval_arguments(subcommands)
    add_lab_arguments(subcommands)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    # The boundary: names, sizes and paths from the command line fail here, in one line.
    try:
        if args.command == "record":
            run_record(args)
        if args.command == "eval":
            run_eval(args)
        if args.command == "lab":
            run_lab(args)
    except (ValueError, FileExistsError, FileNotFoundError, ConnectionError) as error:
        sys.exit(f"metaworld_env.py: error: {error}")


if __name__ == "__main__":
    main()
