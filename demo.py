"""The offline demo: a tiny SmolVLA learns, from scratch, a task that can only be solved by looking.

`python train.py --demo` runs it, on a CPU, in a few minutes, with no network:

1. **Record** demonstrations in a toy world (below): an SO-100-like arm seen from above a table, a red
   target on the table, and a scripted expert that reaches it. The target is drawn in the camera image and
   appears nowhere else (the robot's state is just its six joint angles). The episodes are written as an
   ordinary LeRobot v3.0 dataset and read back like any dataset from the hub.
2. **Train** a tiny SmolVLA from scratch on it with train.py's loop: the full architecture (vision tower,
   pixel shuffle, text model cut to its first layers, action expert, flow matching) at toy widths, with a
   word-level tokenizer built offline.
3. **Save** the checkpoint in lerobot's format and **load** it back, the way a user would.
4. **Evaluate** it in closed loop twice: with the real images, and with images showing another episode's
   target. A policy that ignored the camera could not beat chance (8 target spots); one that reads it
   succeeds with the real images and reaches for the wrong spot with the shuffled ones. eval.json holds both.
   With two mirror-image targets (--demo-targets 2) or --rtc-max-delay, also the Real-Time Chunking lab
   (`rtc_lab`: asynchronous inference on a simulated clock, flow.py's RTC against today's merge).

The toy world's renderer is also the camera of the virtual arm (`SyntheticCamera`, for
`infer_async.py --port sim`), so the demo's checkpoint drives the virtual arm. This file does not import
train.py: train.py imports it (only for --demo) and hands it its `train` function.
"""

import json
import os
import time

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from data import LeRobotDataset
from plumbing import read_json
from policy import ACTION, STATE, features_from_dataset
from policy_server import PolicyRunner, Result
from record import write_lerobot_dataset
from smolvla import SmolVLA, SmolVLAConfig

DEMO_TASK = "reach the red target"
DEMO_FPS = 10


# ----------------------------------------------------------------------------------------------------
# The toy world: reach a target that only the camera can see
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
        self.success_radius, self.expert_speed_deg, self.num_targets = success_radius, expert_speed_deg, targets
        self.target, self.distractors = None, np.zeros((0, 2))  # the expert's choice, the other targets
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
        chosen = rng.integers(len(pan)) if len(pan) > 1 else 0
        self.target, self.distractors = targets[chosen], np.delete(targets, chosen, axis=0)
        return np.vstack([self.target, self.distractors])

    def success(self, joints_deg):
        """True when the gripper tip is within success_radius of a target, touching the table (3-D distance)."""
        tip = forward_kinematics(joints_deg)
        targets = np.pad(np.vstack([self.target, self.distractors]), ((0, 0), (0, 1)))  # (targets, 3) on the table
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
        for point in np.vstack([self.target, self.distractors]) if target is None else np.atleast_2d(target):
            disc(point, 0.02, (215, 30, 30))
        base, elbow, tip = np.zeros(3), elbow_position(joints_deg), forward_kinematics(joints_deg)
        disc(base, 0.025, (40, 40, 48))
        draw.line([to_pixels(base), to_pixels(elbow)], fill=(50, 60, 90), width=int(0.022 * pixels_per_metre))
        disc(elbow, 0.011, (50, 60, 90))
        draw.line([to_pixels(elbow), to_pixels(tip)], fill=(235, 150, 40), width=int(0.016 * pixels_per_metre))
        # The tip is drawn larger the higher it is (closer to the camera): the only cue of height from above.
        disc(tip, 0.010 + 0.04 * max(tip[2], 0.0), (250, 230, 90))
        image = image.resize((self.width, self.height), Image.Resampling.BOX)
        return np.array(image, dtype=np.uint8)

    def cameras(self, keys, pose_fn):
        """{key: SyntheticCamera named by the key's last part} filming this table with the arm at pose_fn()."""
        return {key: SyntheticCamera(self, pose_fn, name=key.split(".")[-1]) for key in keys}


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
    return {STATE: np.stack(states), ACTION: np.stack(actions), "images": {"top": np.stack(frames)}}


class SyntheticCamera:
    """A camera that films a ReachScene: read() renders the arm at the joints that state_fn() returns."""

    def __init__(self, scene, state_fn, name="top"):
        self.scene, self.state_fn, self.name = scene, state_fn, name
        self.height, self.width = scene.height, scene.width

    def read(self):
        """(H, W, 3) uint8 RGB, like OpenCVCamera.read()."""
        return self.scene.render(np.asarray(self.state_fn(), dtype=np.float64))


class ToyWorld:
    """A ReachScene around an arm whose pose() it reads, filmed for the policy's cameras; look(), after every
    action, notes the pose and when the tip first reached the target (`reached`: False, or seconds and action)."""

    def __init__(self, pose, camera_keys, seed=0):
        self.scene, self.pose, self.looks, self.start, self.reached = ReachScene(seed=seed), pose, [], None, False
        self.cameras = self.scene.cameras(camera_keys, pose)

    def look(self):
        now, joints = time.monotonic(), np.asarray(self.pose(), dtype=np.float64)
        self.start = self.start or now
        self.looks.append(joints)
        if not self.reached and self.scene.success(joints):
            self.reached = {"after_s": round(now - self.start, 2), "action": len(self.looks)}  # since the first

    def save_gif(self, path, fps=DEMO_FPS, before=()):
        """`before`, then per look the camera's view 4x larger with the tip's path so far (the last held)."""
        path_px = [(256 * (x - VIEW_X[0]) / (VIEW_X[1] - VIEW_X[0]), 256 * (VIEW_Y[1] - y) / (VIEW_Y[1] - VIEW_Y[0]))
                   for x, y, _ in map(forward_kinematics, self.looks)]  # the tip, in pixels as render() maps the table
        frames = list(before)
        for n, joints in enumerate(self.looks, 1):
            frames.append(Image.fromarray(self.scene.render(joints)).resize((256, 256)))
            ImageDraw.Draw(frames[-1]).line(path_px[:n], fill=(30, 90, 220), width=2)
            reached = self.reached and n >= self.reached["action"]
            ImageDraw.Draw(frames[-1]).text((4, 4), f"action {n}: {'REACHED' if reached else 'reaching'}", fill=0)
        frames[0].save(path, save_all=True, append_images=frames[1:] + frames[-1:] * 5, duration=round(1000 / fps), loop=0)
        return frames + frames[-1:] * 5  # the last one held


def animate_episodes(policy, path, episodes=4, length=20, seed=0):
    """`episodes` closed-loop episodes in new scenes, as evaluate_in_sim runs them (from home), as a GIF at `path`."""
    camera, steps, frames = policy.config.camera_keys[0], policy.config.n_action_steps, []
    for e in range(episodes):
        world, joints = ToyWorld(lambda: joints[0], [camera], seed=seed + e), [HOME_DEG]
        for k in range(length):
            if k % steps == 0:  # a new chunk, from what the camera sees now
                image = torch.from_numpy(world.cameras[camera].read()).permute(2, 0, 1)  # (3, H, W) uint8
                chunk = policy.predict_chunk({STATE: torch.from_numpy(joints[0]), camera: image, "task": DEMO_TASK})
            joints[0] = step_arm(joints[0], chunk[0, k % steps].float().cpu().numpy())
            world.look()
        frames = world.save_gif(path, before=frames)  # the GIF so far, rewritten after each episode
    return path


# ----------------------------------------------------------------------------------------------------
# The tiny SmolVLA: a word-level tokenizer, and SmolVLM2's architecture at toy widths
# ----------------------------------------------------------------------------------------------------

# SmolVLM2's special tokens (the tokenizer of a SmolVLM-format VLM carries them; the policy uses none)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>",
                  "<global-img>", "<end_of_utterance>", "[UNK]"]


def word_tokenizer(texts):
    """A word-level tokenizer for a handful of task strings, made offline with the `tokenizers` library.

    Same interface as SmolVLM2's tokenizer (a transformers fast tokenizer with its special tokens), but the
    vocabulary is just the words of the tasks plus the newline the policy appends to every task.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({word for text in texts for word in text.lower().split()})
    vocabulary = {token: i for i, token in enumerate(SPECIAL_TOKENS + words + ["\n"])}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    # split at spaces (dropping them) and keep each newline as a token of its own
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
                                                       pre_tokenizers.Split(Regex(" +"), behavior="removed")])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|endoftext|>", unk_token="[UNK]",
                                   bos_token="<|im_start|>", eos_token="<end_of_utterance>")


def tiny_vlm_config(vocab_size, image_size=64):
    """SmolVLM2's architecture (SigLIP vision tower, pixel-shuffle connector, SmolLM2 text model) at toy
    widths, in the Hugging Face config format: 64 patches of 8x8 pixels per 64x64 image, pixel-shuffled
    into 16 image tokens; an 8-layer, 64-wide text model (the expert is 0.75 x 64 = 48 wide)."""
    return {
        "model_type": "smolvlm",
        "scale_factor": 2,
        "vocab_size": vocab_size,
        "image_token_id": SPECIAL_TOKENS.index("<image>"),
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "vision_config": {
            "model_type": "smolvlm_vision", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_channels": 3, "image_size": image_size, "patch_size": 8,
            "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "attention_dropout": 0.0,
        },
        "text_config": {
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 8,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512, "vocab_size": vocab_size,
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        },
    }


def write_tiny_vlm(directory, tasks, image_size=64):
    """The demo's VLM description on disk, laid out like a SmolVLM2 repo on the hub (without weights: they
    start random): config.json, the tokenizer, and the image-processor configs that lerobot's SmolVLA
    reads when it builds the VLM. Saved checkpoints copy it into their vlm/. Returns (config, tokenizer)."""
    tokenizer = word_tokenizer(tasks)
    config = tiny_vlm_config(len(tokenizer), image_size)
    os.makedirs(directory, exist_ok=True)
    tokenizer.save_pretrained(directory)
    # transformers 5 names the tokenizer class "TokenizersBackend", unknown to the transformers 4.x that
    # lerobot runs on; "PreTrainedTokenizerFast" (what SmolVLM2's own repo says) loads in both.
    tokenizer_config = read_json(os.path.join(directory, "tokenizer_config.json"), "tokenizer config")
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    # ... and the named image tokens that SmolVLM's processor looks up on its tokenizer
    named = {"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
             "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}
    tokenizer_config.update(named, extra_special_tokens=named)
    vision = config["vision_config"]
    image_tokens = (image_size // vision["patch_size"]) ** 2 // config["scale_factor"] ** 2
    files = {
        "config.json": config,
        "tokenizer_config.json": tokenizer_config,
        "processor_config.json": {"image_seq_len": image_tokens, "processor_class": "SmolVLMProcessor"},
        "preprocessor_config.json": {
            "image_processor_type": "SmolVLMImageProcessor", "processor_class": "SmolVLMProcessor",
            "do_convert_rgb": True, "do_resize": True, "size": {"longest_edge": image_size},
            "max_image_size": {"longest_edge": image_size}, "do_image_splitting": False, "resample": 1,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3, "do_pad": True,
        },
    }
    for name, content in files.items():
        with open(os.path.join(directory, name), "w") as f:
            json.dump(content, f, indent=2)
    return config, tokenizer


# How the expert's layers talk to the VLM's (paper §3.2 and its ablation): alternate cross- and joint
# self-attention (SmolVLA's choice), cross-attention only, or self-attention only.
ATTENTION = {"interleaved": ("cross_attn", 2), "cross": ("cross_attn", 0), "self": ("self_attn", 0)}


def demo_policy_config(dataset, args, image_size=64):
    """SmolVLA's config for the demo: short chunks (the toy episodes are 20 steps long), the VLM cut to its
    first --demo-vlm-layers layers (SmolVLA keeps 16 of SmolVLM2's 32; here 4 of 8), everything trained
    (there are no pretrained weights to keep: the vision tower and the text model start random too)."""
    config = SmolVLAConfig()
    config.input_features, config.output_features = features_from_dataset(dataset)
    config.chunk_size, config.n_action_steps = args.demo_chunk_size, min(args.demo_action_steps, args.demo_chunk_size)
    config.max_state_dim = config.max_action_dim = 8
    config.resize_imgs_with_padding = (image_size, image_size)
    config.tokenizer_max_length, config.num_vlm_layers = 8, args.demo_vlm_layers
    config.attention_mode, config.self_attn_every_n_layers = ATTENTION[args.demo_attention]
    config.freeze_vision_encoder, config.train_expert_only = False, False
    return config


# ----------------------------------------------------------------------------------------------------
# Record, train, save, load, evaluate
# ----------------------------------------------------------------------------------------------------

def record_demonstrations(root, episodes, length, seed, targets=1):
    """Run the scripted expert and store what it saw and did as a LeRobot v3.0 dataset."""
    scene, rng = ReachScene(seed=seed, targets=targets), np.random.default_rng(seed)
    recorded = [{**expert_episode(scene, rng, length), "task": DEMO_TASK}
                for _ in tqdm(range(episodes), desc="recording demonstrations")]
    return write_lerobot_dataset(root, recorded, fps=DEMO_FPS, norm_mode="degrees")  # the toy arm's units


@torch.no_grad()
def evaluate_in_sim(policy, episodes, length, seed, shuffle_images=False, targets=1):
    """Closed-loop success rate of `policy` in the toy world, and its median seconds per chunk.

    Each episode: a new target, the arm near its home pose; every n_action_steps the policy sees the state
    and the camera image and returns a chunk, of which the first n_action_steps actions are executed.
    shuffle_images: the camera shows episode e+1's target instead of episode e's (the arm itself is drawn
    where it really is), so a policy that truly reads the image reaches for the wrong spot.
    """
    scene, rng = ReachScene(seed=seed, targets=targets), np.random.default_rng(seed)
    layouts = [scene.reset(rng) for _ in range(episodes)]  # each (targets, 2)
    camera, steps_per_chunk = policy.config.camera_keys[0], policy.config.n_action_steps
    successes, latencies = 0, []
    for e in range(episodes):
        scene.target, scene.distractors = layouts[e][0], layouts[e][1:]
        shown = layouts[(e + 1) % episodes] if shuffle_images else layouts[e]
        joints, queue = (HOME_DEG + rng.uniform(-5.0, 5.0, size=6)).astype(np.float32), []
        for _ in range(length):
            if not queue:
                image = torch.from_numpy(scene.render(joints, target=shown)).permute(2, 0, 1)  # (3, H, W) uint8
                observation = {STATE: torch.from_numpy(joints), camera: image, "task": DEMO_TASK}
                tick = time.perf_counter()
                queue = list(policy.predict_chunk(observation)[0, :steps_per_chunk].float().cpu().numpy())
                latencies.append(time.perf_counter() - tick)
            joints = step_arm(joints, queue.pop(0))
        successes += scene.success(joints)
    return successes / episodes, float(np.median(latencies))


# The RTC lab's modes: what each request asks of the policy (policy_server.PolicyRunner.rtc_options)
RTC_LAB = {"off": None, "guided": {"mode": "guided", "jacobian": False},
           "guided_jacobian": {"mode": "guided", "jacobian": True}, "trained": {"mode": "trained"}}


class ToyServos:
    """The toy arm as infer_async's control loop drives a robot: each action sent moves it by step_arm."""

    def __init__(self, joints):
        self.joints = joints

    def get_state(self):
        return self.joints

    def send_action(self, action):
        self.joints = step_arm(self.joints, action)


class DelayedWorker:
    """infer_async's InferenceWorker on a simulated clock: the chunk asked for at tick k is computed at once
    and handed back at tick k + 1 + delay, however long it took (.tick: set before each control tick)."""

    def __init__(self, compute, delay):
        self.compute, self.delay, self.tick, self.pending = compute, delay, 0, []

    def submit(self, request, observation):
        self.pending.append((self.tick + 1 + self.delay, Result.from_answer(request.id, self.compute(observation))))

    def poll(self):
        return [result for due, result in self.pending if due == self.tick]


def rtc_lab(policy, async_loop, episodes, length, seed, targets=2, delays=(0, 4, 8), threshold=0.7):
    """Real-Time Chunking under asynchronous inference, on a simulated clock: infer_async's control loop
    (async_loop: the infer_async module; it imports this one) with each chunk arriving `delay` ticks after
    its observation. One row per (mode, delay): success rate, switch_jump_mean (robot units, mean over all
    switches); `trained` if the policy was trained with RTC."""
    camera, rows = policy.config.camera_keys[0], []
    modes = [m for m in RTC_LAB if m != "trained" or policy.trained_on.get("rtc_max_delay")]
    for mode, delay in [(mode, delay) for mode in modes for delay in delays]:
        scene, rng = ReachScene(seed=seed, targets=targets), np.random.default_rng(seed)
        runner, successes, jumps = PolicyRunner(policy, seed), 0, []  # the same noise for every mode
        for _ in range(episodes):
            scene.reset(rng)
            arm = ToyServos((HOME_DEG + rng.uniform(-5.0, 5.0, size=6)).astype(np.float32))
            worker = DelayedWorker(runner, delay)
            scheduler = async_loop.AsyncScheduler(policy.config.chunk_size, threshold, rtc=RTC_LAB[mode],
                                                  clock=lambda: worker.tick / DEMO_FPS, fps=DEMO_FPS)
            for worker.tick in range(length):  # the simulated clock: the worker hands back what is due now
                async_loop.control_tick(arm, lambda joints: {STATE: joints, camera: scene.render(joints),
                                                             "task": DEMO_TASK}, worker, scheduler, log=print)
            successes += scene.success(arm.joints)
            jumps += [jump for _, jump in scheduler.metrics.switch_jumps()]
        rows.append({"mode": mode, "delay_ticks": delay, "success_rate": successes / episodes,
                     "switch_jump_mean": round(float(np.mean(jumps)), 3) if jumps else None})
        print(f"rtc lab: {rows[-1]}")
    return rows


def prepare_demo(args, processes):
    """The demo's own checks, before anything is written: one process, a known --demo-attention, and a new
    (or empty) output directory, by default outputs/demo/<date> (train.py links outputs/demo/latest to it)."""
    if processes.distributed:
        raise ValueError("--demo runs in one process; run torchrun on the demo's dataset with --repo.")
    if args.demo_attention not in ATTENTION:
        raise ValueError(f"--demo-attention {args.demo_attention!r} is not one of {sorted(ATTENTION)}.")
    args.output = args.output or os.path.join("outputs", "demo", time.strftime("%Y-%m-%d_%H-%M-%S"))
    if os.path.isdir(args.output) and os.listdir(args.output):
        raise FileExistsError(f"{args.output!r} is not empty; the demo writes a new run: choose another --output.")


def run_demo(args, processes, train, async_loop=None):
    """Record -> train from scratch -> save -> reload -> evaluate twice (and the RTC lab) -> eval.json.

    `train(policy, dataset, args, processes)` is train.py's training loop (passed in: this file does not
    import train.py); it writes the checkpoints under args.output. async_loop: infer_async, for rtc_lab."""
    started = time.perf_counter()
    # The demo's matrices are tiny: a second CPU thread gains little, and on a busy machine threads that
    # wait for each other cost a lot (measured on 2 shared cores: 0.3 s per step with 1 thread, 2.3 s with 2).
    torch.set_num_threads(1)
    dataset_root = record_demonstrations(os.path.join(args.output, "dataset"), args.demo_episodes,
                                         args.demo_length, seed=args.seed, targets=args.demo_targets)
    # from here on the demo data is an ordinary LeRobot dataset on disk
    dataset = LeRobotDataset(dataset_root)
    config = demo_policy_config(dataset, args)
    dataset.chunk_size = config.chunk_size
    vlm_dir = os.path.join(args.output, "vlm")
    torch.manual_seed(args.seed)  # the random initialization of the whole tiny model
    policy = SmolVLA(config, *write_tiny_vlm(vlm_dir, dataset.tasks))
    policy.vlm_dir = vlm_dir  # copied into every checkpoint's vlm/
    policy.set_normalization(dataset.stats)
    args.train_vlm = True
    training_started = time.perf_counter()
    train(policy, dataset, args, processes)
    training_time = time.perf_counter() - training_started

    checkpoint = os.path.join(args.output, "checkpoints", "last", "pretrained_model")
    # evaluate the checkpoint as written, the way a user would load it
    policy = SmolVLA.from_pretrained(checkpoint).to(processes.device)
    print(f"evaluating in the simulator: {args.demo_eval_episodes} episodes with the real images, "
          f"then {args.demo_eval_episodes} with images of other episodes' scenes")
    episodes, length, targets = args.demo_eval_episodes, args.demo_length, args.demo_targets
    x, seconds_per_chunk = evaluate_in_sim(policy, episodes, length, args.seed + 1, targets=targets)
    y, _ = evaluate_in_sim(policy, episodes, length, args.seed + 1, shuffle_images=True, targets=targets)
    result = {"success_rate": x, "success_rate_shuffled_images": y, "episodes": args.demo_eval_episodes,
              "uses_images": x >= 0.8 and y <= x / 2, "inference_ms_per_chunk": round(1000 * seconds_per_chunk, 1),
              "train_samples_per_s": round(args.steps * args.batch_size / training_time, 1),
              "train_steps": args.steps, "train_episodes": args.demo_episodes, "episode_length": args.demo_length,
              "chunk_size": config.chunk_size, "n_action_steps": config.n_action_steps,
              "vlm_layers": config.num_vlm_layers, "attention": args.demo_attention, "checkpoint": checkpoint,
              "wall_time_s": round(time.perf_counter() - started, 1),
              "animation": animate_episodes(policy, os.path.join(args.output, "episodes.gif"), 4, args.demo_length)}
    if async_loop is not None and (targets > 1 or args.rtc_max_delay):  # 2 x length: time for the delays
        result["rtc_lab"] = rtc_lab(policy, async_loop, episodes, 2 * length, args.seed + 1, targets)
    with open(os.path.join(args.output, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    print(f"\ncheckpoint: {checkpoint}\nrun it on the virtual arm:\n"
          f"  python infer_async.py --port sim --policy {checkpoint} --task \"{DEMO_TASK}\"")
    return result
