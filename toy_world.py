"""The toy world: an SO-100-like arm seen from above a table, reaching a red target only the camera shows.

SmolVLA must read the scene from its camera images (paper §3); this is the smallest world in which the image
is indispensable. It is what the offline demo (demo.py) records, trains on and evaluates in, and what the
virtual arm's cameras film (`--port sim`: `toy_world_cameras`, and `ScriptedHand`, a scripted person moving
a virtual leader arm). Plain numpy and Pillow, deterministic under a seed; it imports no file of this
project (a ScriptedHand moves any arm with `joint_positions_deg()` and `move_joint()`, as virtual_arm.py's).
"""

import threading
import time

import numpy as np
from PIL import Image, ImageDraw

FPS = 10  # control steps per second in the toy world (the demo records at this rate)
TASK = "reach the red target"  # its one task

# ----------------------------------------------------------------------------------------------------
# The world: reach a target that only the camera can see
# ----------------------------------------------------------------------------------------------------
#
# SmolVLA must read the scene from its camera images (paper §3). The smallest world in which the image is
# indispensable:
# - a table seen from a camera straight above, with a red target disc at a random place (a coarse grid of
#   reachable spots, jittered a little);
# - an SO-100-like arm whose first three joints (shoulder_pan, shoulder_lift, elbow_flex, in degrees, as
#   the arm reports them in `degrees` mode) set where the gripper tip is; the other three are carried along;
# - the robot's state is only its joint angles, so the target's position is in the image and nowhere else;
# - success: the tip touches the table within `success_radius` of the target;
# - a scripted expert moves the joints toward the inverse-kinematics solution at a bounded speed.
# Everything is plain numpy + Pillow and deterministic under a seed.

# The pose the arm starts from: every joint at the middle of its calibrated range (0 in degrees mode), the
# arm pointing straight up. The gripper (0..100 units) starts half open.
HOME_DEG = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 50.0], dtype=np.float32)

# Arm geometry in metres: shoulder height above the table, upper arm, forearm (up to the gripper tip).
SHOULDER_HEIGHT, UPPER_ARM, FOREARM = 0.06, 0.12, 0.15

# Where the targets may be: polar coordinates around the arm's base (the pan axis). A coarse grid (8 spots,
# at least 6 cm apart) keeps the task learnable by a tiny model in a few minutes; the jitter keeps the
# images from repeating exactly. Every spot is reachable within the SO-100's joint ranges (the elbow
# needs at most ~95 degrees), so the virtual arm can follow a policy trained here.
TARGET_PAN_DEG = (-45.0, -15.0, 15.0, 45.0)
TARGET_REACH_M = (0.185, 0.245)
TARGET_JITTER_M = 0.008

# The patch of table the camera sees: x to the right, y away from the robot (metres).
VIEW_X = (-0.2, 0.2)
VIEW_Y = (-0.05, 0.35)


def forward_kinematics(joints_deg):
    """Gripper-tip position (x, y, z) in metres for joint angles in degrees (only the first three matter).

    shoulder_pan turns the arm about the vertical axis (0 = straight ahead, positive = to the left);
    shoulder_lift tilts the upper arm forward from vertical; elbow_flex bends the forearm further forward.
    """
    pan, lift, elbow = np.radians(np.asarray(joints_deg, dtype=np.float64)[:3])
    # The arm lives in a vertical plane: horizontal reach r and height z of the tip.
    reach = UPPER_ARM * np.sin(lift) + FOREARM * np.sin(lift + elbow)
    height = SHOULDER_HEIGHT + UPPER_ARM * np.cos(lift) + FOREARM * np.cos(lift + elbow)
    # The pan angle turns that plane about the base.
    return np.array([-reach * np.sin(pan), reach * np.cos(pan), height])


def elbow_position(joints_deg):
    """Elbow position (x, y, z) in metres: the end of the upper arm, for drawing."""
    pan, lift = np.radians(np.asarray(joints_deg, dtype=np.float64)[:2])
    reach = UPPER_ARM * np.sin(lift)
    return np.array([-reach * np.sin(pan), reach * np.cos(pan), SHOULDER_HEIGHT + UPPER_ARM * np.cos(lift)])


def inverse_kinematics(target_xy):
    """(shoulder_pan, shoulder_lift, elbow_flex) in degrees that put the tip on the table at target_xy.

    Two-link inverse kinematics in the arm's vertical plane, elbow up: the tip must reach the point at
    horizontal distance r and depth -SHOULDER_HEIGHT from the shoulder.
    """
    x, y = target_xy
    pan = np.degrees(np.arctan2(-x, y))
    reach = np.hypot(x, y)
    # Law of cosines for the elbow angle, measured from the horizontal (negative = elbow up).
    dx, dz = reach, -SHOULDER_HEIGHT
    cos_bend = (dx * dx + dz * dz - UPPER_ARM**2 - FOREARM**2) / (2 * UPPER_ARM * FOREARM)
    bend = -np.arccos(np.clip(cos_bend, -1.0, 1.0))
    elevation = np.arctan2(dz, dx) - np.arctan2(FOREARM * np.sin(bend), UPPER_ARM + FOREARM * np.cos(bend))
    # Convert to the arm's joint conventions: lift from vertical, elbow relative to the upper arm.
    return np.array([pan, 90.0 - np.degrees(elevation), -np.degrees(bend)])


def step_arm(joints_deg, action_deg, max_step_deg=15.0):
    """The servos: move every joint toward its commanded position, at most max_step_deg per control step."""
    joints = np.asarray(joints_deg, dtype=np.float64)
    move = np.clip(np.asarray(action_deg, dtype=np.float64) - joints, -max_step_deg, max_step_deg)
    return (joints + move).astype(np.float32)


class ReachScene:
    """A table with one target, or two mirror-image ones (left and right: the RTC lab's world, where a policy
    that does not commit dithers); renders the arm over them and tells whether the tip touches one."""

    def __init__(self, seed=0, image_size=(64, 64), success_radius=0.03, expert_speed_deg=8.0, targets=1):
        self.rng = np.random.default_rng(seed)
        self.height, self.width = image_size
        self.success_radius = success_radius
        self.expert_speed_deg = expert_speed_deg
        self.num_targets = targets
        self.target = None                    # (2,) the target the expert reaches for
        self.distractors = np.zeros((0, 2))   # (targets - 1, 2) the others
        self.reset()

    def reset(self, rng=None):
        """Place the target at a random grid spot (a second one at its mirror image across the arm's axis),
        plus jitter; the expert picks one at random. Returns all, (targets, 2) metres, its choice first."""
        rng = self.rng if rng is None else rng
        pan_deg = TARGET_PAN_DEG[rng.integers(len(TARGET_PAN_DEG))]
        pan = np.radians(np.array([pan_deg, -pan_deg][: self.num_targets]))  # (targets,)
        reach = TARGET_REACH_M[rng.integers(len(TARGET_REACH_M))]
        jitter = rng.uniform(-TARGET_JITTER_M, TARGET_JITTER_M, size=(len(pan), 2))
        targets = np.stack([-reach * np.sin(pan), reach * np.cos(pan)], 1) + jitter  # (targets, 2)
        chosen = 0
        if len(pan) > 1:
            chosen = rng.integers(len(pan))
        self.target = targets[chosen]
        self.distractors = np.delete(targets, chosen, axis=0)
        return self.all_targets()

    def all_targets(self):
        """(targets, 2) metres: the expert's choice first, then the others."""
        return np.vstack([self.target, self.distractors])

    def success(self, joints_deg):
        """True when the gripper tip is within success_radius of a target, touching the table (3-D
        distance)."""
        tip = forward_kinematics(joints_deg)
        targets = np.pad(self.all_targets(), ((0, 0), (0, 1)))  # (targets, 3): z = 0, on the table
        return bool(np.linalg.norm(tip - targets, axis=1).min() < self.success_radius)

    def expert_action(self, joints_deg):
        """The scripted demonstrator: step all joints along a straight line (in joint space) toward the
        inverse-kinematics solution, at most expert_speed_deg per step; the wrist and gripper hold still."""
        joints = np.asarray(joints_deg, dtype=np.float64)
        delta = np.concatenate([inverse_kinematics(self.target), joints[3:]]) - joints  # to the IK goal
        # Scale the whole move (not each joint) so that the joints arrive together.
        largest = np.abs(delta).max()
        if largest > self.expert_speed_deg:
            delta *= self.expert_speed_deg / largest
        return (joints + delta).astype(np.float32)

    def render(self, joints_deg, target=None):
        """The top camera: an (H, W, 3) uint8 RGB image of the table, the target and the arm.

        Drawn at 4x the resolution and averaged down, so that sub-pixel motions change the pixels smoothly.
        `target` (one (x, y) or several) overrides the scene's targets (the shuffled-image evaluation).
        """
        width, height = self.width * 4, self.height * 4
        image = Image.new("RGB", (width, height), (196, 186, 164))
        draw = ImageDraw.Draw(image)

        def to_pixels(point):
            column = (point[0] - VIEW_X[0]) / (VIEW_X[1] - VIEW_X[0]) * width
            row = (VIEW_Y[1] - point[1]) / (VIEW_Y[1] - VIEW_Y[0]) * height
            return column, row

        def disc(point, radius_m, color):
            column, row = to_pixels(point)
            radius = radius_m / (VIEW_X[1] - VIEW_X[0]) * width
            draw.ellipse([column - radius, row - radius, column + radius, row + radius], fill=color)

        pixels_per_metre = width / (VIEW_X[1] - VIEW_X[0])
        shown = self.all_targets()
        if target is not None:
            shown = np.atleast_2d(target)
        for point in shown:
            disc(point, 0.02, (215, 30, 30))
        base = np.zeros(3)
        elbow = elbow_position(joints_deg)
        tip = forward_kinematics(joints_deg)
        disc(base, 0.025, (40, 40, 48))
        upper_arm_px = int(0.022 * pixels_per_metre)
        forearm_px = int(0.016 * pixels_per_metre)
        draw.line([to_pixels(base), to_pixels(elbow)], fill=(50, 60, 90), width=upper_arm_px)
        disc(elbow, 0.011, (50, 60, 90))
        draw.line([to_pixels(elbow), to_pixels(tip)], fill=(235, 150, 40), width=forearm_px)
        # The tip is drawn larger the higher it is (closer to the camera): the only cue of height from above.
        disc(tip, 0.010 + 0.04 * max(tip[2], 0.0), (250, 230, 90))
        image = image.resize((self.width, self.height), Image.Resampling.BOX)
        return np.array(image, dtype=np.uint8)

    def cameras(self, keys, pose_fn):
        """{key: SyntheticCamera named by the key's last part}, filming this table with the arm at
        pose_fn()."""
        return {key: SyntheticCamera(self, pose_fn, name=key.split(".")[-1]) for key in keys}


class SyntheticCamera:
    """A camera that films a ReachScene: read() renders the arm at the joints that state_fn() returns."""

    def __init__(self, scene, state_fn, name="top"):
        self.scene = scene
        self.state_fn = state_fn
        self.name = name
        self.height = scene.height
        self.width = scene.width

    def read(self):
        """(H, W, 3) uint8 RGB, like OpenCVCamera.read()."""
        return self.scene.render(np.asarray(self.state_fn(), dtype=np.float64))


class ToyWorld:
    """A ReachScene around an arm whose pose() it reads, filmed for the policy's cameras. look(), after every
    action, notes the pose and when the tip first reached the target (`reached`: False, or
    {"after_s": seconds since the first look, "action": its number})."""

    def __init__(self, pose, camera_keys, seed=0):
        self.scene = ReachScene(seed=seed)
        self.pose = pose
        self.looks = []     # the joints after each action
        self.start = None   # when the first look was
        self.reached = False
        self.cameras = self.scene.cameras(camera_keys, pose)

    def look(self):
        now = time.monotonic()
        joints = np.asarray(self.pose(), dtype=np.float64)
        if self.start is None:
            self.start = now
        self.looks.append(joints)
        if not self.reached and self.scene.success(joints):
            self.reached = {"after_s": round(now - self.start, 2), "action": len(self.looks)}

    def save_gif(self, path, fps=FPS, before=()):
        """`before`, then per look the camera's view 4x larger with the tip's path so far (the last held)."""
        # the tip after each look, in the 256x256 frame's pixels (as render() maps the table)
        looks = self.looks
        if not looks:
            # no action was executed (a run shorter than the first chunk): one view of the arm where it is
            looks = [np.asarray(self.pose(), dtype=np.float64)]
        path_px = []
        for x, y, _ in map(forward_kinematics, looks):
            column = 256 * (x - VIEW_X[0]) / (VIEW_X[1] - VIEW_X[0])
            row = 256 * (VIEW_Y[1] - y) / (VIEW_Y[1] - VIEW_Y[0])
            path_px.append((column, row))
        frames = list(before)
        for n, joints in enumerate(looks, 1):
            frame = Image.fromarray(self.scene.render(joints)).resize((256, 256))
            ImageDraw.Draw(frame).line(path_px[:n], fill=(30, 90, 220), width=2)
            reached = self.reached and n >= self.reached["action"]
            label = "REACHED" if reached else "reaching"
            ImageDraw.Draw(frame).text((4, 4), f"action {n}: {label}", fill=0)
            frames.append(frame)
        held = frames + frames[-1:] * 5  # the last frame held for five more
        held[0].save(path, save_all=True, append_images=held[1:], duration=round(1000 / fps), loop=0)
        return held


# ----------------------------------------------------------------------------------------------------
# Without hardware: a scripted hand on a virtual leader arm, and cameras that film the world
# ----------------------------------------------------------------------------------------------------

class ScriptedHand:
    """A person's hand on a virtual leader arm, played by the toy world's scripted expert: `hz` times
    a second it moves the joints one expert step toward the red target (`new_episode()`: a new target) or
    toward home (`go_home()`: the reset between episodes). `toy_world_cameras` film its `scene`."""

    def __init__(self, arm, hz=30.0, seed=0, image_size=(64, 64)):
        self.arm = arm
        self.home = HOME_DEG.astype(np.float64)
        self.homing = True  # moving toward home (between episodes) rather than toward the target
        # the demo's expert moves 8° per step at 10 steps a second: the same speed at `hz`
        self.step_deg = 8.0 * 10 / hz
        self.scene = ReachScene(seed=seed, image_size=image_size, expert_speed_deg=self.step_deg)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._move, args=(1 / hz,), name="scripted-hand", daemon=True)
        self._thread.start()

    def new_episode(self):
        self.scene.reset()
        self.homing = False

    def go_home(self):
        self.homing = True

    def _move(self, period):
        while not self._stop.wait(period):
            pose = self.arm.joint_positions_deg()
            if self.homing:
                goal = self.home
            else:
                goal = self.scene.expert_action(pose)
            step = np.clip(goal - pose, -self.step_deg, self.step_deg)
            for name, value in zip(self.arm.calibration, pose + step):
                self.arm.move_joint(name, value)

    def close(self):
        self._stop.set()
        self._thread.join()


def toy_world_cameras(names, pose_fn, scene=None, image_size=(64, 64)):
    """{name: camera} filming the toy world (the table, its red target, and the arm whose true pose
    `pose_fn()` returns, in `joint_positions_deg` units); `scene`: a ScriptedHand's, or a new one."""
    if scene is None:
        scene = ReachScene(seed=0, image_size=image_size)
    return scene.cameras(names, pose_fn)
