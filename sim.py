"""A toy SO-100 world: reach a target that only the camera can see.

SmolVLA is a vision-language-action policy (paper §3): it must read the scene from camera images. To show
offline, in minutes, that a policy really uses its images, this file builds the smallest world in which
the image is indispensable:

- a table seen from a camera straight above, with a red target disc at a random place (a coarse grid of
  reachable spots, jittered a little);
- an SO-100-like arm whose first three joints (shoulder_pan, shoulder_lift, elbow_flex, in degrees, as the
  arm reports them in `degrees` mode) set where the gripper tip is; the other three are carried along;
- the robot's state is only its joint angles, so the target's position is in the image and nowhere else;
- success: the tip touches the table within `success_radius` of the target;
- a scripted expert moves the joints toward the inverse-kinematics solution at a bounded speed, which
  gives the demonstrations that `train.py --demo` learns from.

The same renderer is the camera of the virtual arm (`SyntheticCamera`, used by `infer_async.py --port sim`),
so a policy trained by the demo drives the virtual arm. Everything is plain numpy + Pillow and is
deterministic under a seed.
"""

import numpy as np
from PIL import Image, ImageDraw

# The pose the arm starts from: every joint at the middle of its calibrated range (0 in degrees mode), the
# arm pointing straight up. The gripper (0..100 units) starts half open.
HOME_DEG = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 50.0], dtype=np.float32)

# Arm geometry in metres: shoulder height above the table, upper arm, forearm (up to the gripper tip).
SHOULDER_HEIGHT = 0.06
UPPER_ARM = 0.12
FOREARM = 0.15

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
    """A table with one target; renders the arm over it and tells whether the tip touches the target."""

    def __init__(self, seed=0, image_size=(64, 64), success_radius=0.03, expert_speed_deg=8.0):
        self.rng = np.random.default_rng(seed)
        self.height, self.width = image_size
        self.success_radius = success_radius
        self.expert_speed_deg = expert_speed_deg
        self.target = None
        self.reset()

    def reset(self, rng=None):
        """Place the target at a random grid spot (plus jitter); returns its (x, y) in metres."""
        rng = self.rng if rng is None else rng
        pan = np.radians(TARGET_PAN_DEG[rng.integers(len(TARGET_PAN_DEG))])
        reach = TARGET_REACH_M[rng.integers(len(TARGET_REACH_M))]
        jitter = rng.uniform(-TARGET_JITTER_M, TARGET_JITTER_M, size=2)
        self.target = np.array([-reach * np.sin(pan), reach * np.cos(pan)]) + jitter
        return self.target

    def success(self, joints_deg):
        """True when the gripper tip is within success_radius of the target, touching the table (3-D distance)."""
        tip = forward_kinematics(joints_deg)
        return bool(np.linalg.norm(tip - np.array([*self.target, 0.0])) < self.success_radius)

    def expert_action(self, joints_deg):
        """The scripted demonstrator: step all joints along a straight line (in joint space) toward the
        inverse-kinematics solution, at most expert_speed_deg per step; the wrist and gripper hold still."""
        joints = np.asarray(joints_deg, dtype=np.float64)
        goal = joints.copy()
        goal[:3] = inverse_kinematics(self.target)
        delta = goal - joints
        # Scale the whole move (not each joint) so that the joints arrive together.
        largest = np.abs(delta).max()
        if largest > self.expert_speed_deg:
            delta *= self.expert_speed_deg / largest
        return (joints + delta).astype(np.float32)

    def render(self, joints_deg, target=None):
        """The top camera: an (H, W, 3) uint8 RGB image of the table, the target and the arm.

        Drawn at 4x the resolution and averaged down, so that sub-pixel motions change the pixels smoothly.
        `target` overrides the scene's target (the demo's shuffled-image evaluation draws another scene).
        """
        scale = 4
        width, height = self.width * scale, self.height * scale
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
        disc(self.target if target is None else target, 0.02, (215, 30, 30))
        base, elbow, tip = np.zeros(3), elbow_position(joints_deg), forward_kinematics(joints_deg)
        disc(base, 0.025, (40, 40, 48))
        draw.line([to_pixels(base), to_pixels(elbow)], fill=(50, 60, 90), width=int(0.022 * pixels_per_metre))
        disc(elbow, 0.011, (50, 60, 90))
        draw.line([to_pixels(elbow), to_pixels(tip)], fill=(235, 150, 40), width=int(0.016 * pixels_per_metre))
        # The tip is drawn larger the higher it is (closer to the camera): the only cue of height from above.
        disc(tip, 0.010 + 0.04 * max(tip[2], 0.0), (250, 230, 90))
        image = image.resize((self.width, self.height), Image.Resampling.BOX)
        return np.array(image, dtype=np.uint8)


def expert_episode(scene, rng, length, action_noise_deg=1.5):
    """One demonstration: reset the target, start near HOME_DEG, follow the expert for `length` steps.

    The servos execute the expert's command plus a little noise while the clean command is recorded, so the
    data also shows how to recover from small errors (what the policy meets when it runs closed-loop).
    Returns {"observation.state": (T, 6), "action": (T, 6), "images": {"top": (T, H, W, 3)}} (degrees).
    """
    scene.reset(rng)
    joints = (HOME_DEG + rng.uniform(-5.0, 5.0, size=6)).astype(np.float32)
    states, actions, frames = [], [], []
    for _ in range(length):
        action = scene.expert_action(joints)
        states.append(joints)
        actions.append(action)
        frames.append(scene.render(joints))
        joints = step_arm(joints, action + rng.normal(0.0, action_noise_deg, size=6))
    return {"observation.state": np.stack(states), "action": np.stack(actions), "images": {"top": np.stack(frames)}}


class SyntheticCamera:
    """A camera that films a ReachScene: read() renders the arm at the joints that state_fn() returns."""

    def __init__(self, scene, state_fn, name="top"):
        self.scene = scene
        self.state_fn = state_fn
        self.name = name
        self.height, self.width = scene.height, scene.width

    def read(self):
        """(H, W, 3) uint8 RGB, like OpenCVCamera.read()."""
        return self.scene.render(np.asarray(self.state_fn(), dtype=np.float64))
