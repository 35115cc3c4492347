"""The offline demo: a tiny SmolVLA learns, from scratch, a task that can only be solved by looking.

`python demo.py` runs it, on a CPU, in a few minutes, with no network:

1. **Record** demonstrations in the toy world (toy_world.py): an SO-100-like arm seen from above a table, a
   red target on the table, and a scripted expert that reaches it. The target is drawn in the camera image
   and appears nowhere else (the robot's state is just its six joint angles). The episodes are written as an
   ordinary LeRobot v3.0 dataset (record.py's writer) and read back like any dataset from the hub.
2. **Train** a tiny SmolVLA from scratch on it with train.py's loop: the full architecture (vision tower,
   pixel shuffle, text model cut to its first layers, action expert, flow matching) at toy widths, with a
   word-level tokenizer built offline.
3. **Save** the checkpoint in lerobot's format and **load** it back, the way a user would.
4. **Evaluate** it in closed loop twice: with the real images, and with images showing another episode's
   target. A policy that ignored the camera could not beat chance (8 target spots); one that reads it
   succeeds with the real images and reaches for the wrong spot with the shuffled ones. eval.json holds both.
   With two mirror-image targets (--targets 2) or --rtc-max-delay, also the Real-Time Chunking lab
   (`rtc_lab`: infer_async's control loop on a simulated clock, flow.py's RTC against today's merge).

    python demo.py                                        # record, train, evaluate: outputs/demo/<date>
    python demo.py --targets 2 --rtc-max-delay 8          # the RTC lab (README lab 6), as measured there
    python demo.py --resume outputs/demo/latest --steps 2000   # a demo run continues like any run

The flags are train.py's run flags (--steps, --output, --resume, --rtc-max-delay, ...) and the demo's own
(--targets, --episodes, --length, --eval-episodes, --chunk-size, --action-steps, --vlm-layers, --attention).
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import train
from data import LeRobotDataset
from infer_async import AsyncScheduler, Result, control_tick
from plumbing import read_json
from policy import SmolVLAPolicy
from policy_server import PolicyRunner
from record import write_lerobot_dataset
from smolvla import ACTION, STATE, SmolVLAConfig
from toy_world import FPS, HOME_DEG, TASK, ReachScene, ToyWorld, step_arm

# ----------------------------------------------------------------------------------------------------
# The toy world's expert, recorded; the policy, filmed
# ----------------------------------------------------------------------------------------------------

def expert_episode(scene, rng, length, action_noise_deg=1.5):
    """One demonstration: reset the target, start near HOME_DEG, follow the expert for `length` steps.

    The servos execute the expert's command plus a little noise while the clean command is recorded, so the
    data also shows how to recover from small errors (what the policy meets when it runs closed-loop).
    Returns {"observation.state": (T, 6), "action": (T, 6), "images": {"top": (T, H, W, 3)}} (degrees).
    """
    scene.reset(rng)
    joints = start_pose(rng)
    states = []
    actions = []
    frames = []
    for _ in range(length):
        action = scene.expert_action(joints)
        states.append(joints)
        actions.append(action)
        frames.append(scene.render(joints))
        joints = step_arm(joints, action + rng.normal(0.0, action_noise_deg, size=6))
    return {STATE: np.stack(states), ACTION: np.stack(actions), "images": {"top": np.stack(frames)}}


def start_pose(rng):
    """Where every episode starts: near the home pose, each joint off by up to 5 degrees."""
    return (HOME_DEG + rng.uniform(-5.0, 5.0, size=6)).astype(np.float32)


def observe(joints, camera, image):
    """What the policy is given in the toy world: the joints, one camera image (H, W, 3) uint8, the task."""
    return {STATE: torch.from_numpy(joints), camera: torch.from_numpy(image).permute(2, 0, 1), "task": TASK}


def animate_episodes(policy, path, episodes=4, length=20, seed=0):
    """`episodes` closed-loop episodes in new scenes, from home, as a GIF at `path` (rewritten after each)."""
    camera = policy.config.camera_keys[0]
    steps_per_chunk = policy.config.n_action_steps
    frames = []
    for episode in range(episodes):
        joints = HOME_DEG.copy()
        # the world films whatever pose its `pose` function returns: the arm's current joints
        world = ToyWorld(lambda: joints, [camera], seed=seed + episode)
        for k in range(length):
            if k % steps_per_chunk == 0:  # a new chunk, from what the camera sees now
                chunk = policy.predict_chunk(observe(joints, camera, world.cameras[camera].read()))
            joints = step_arm(joints, chunk[0, k % steps_per_chunk].float().cpu().numpy())
            world.look()
        frames = world.save_gif(path, before=frames)
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
            "model_type": "smolvlm_vision",
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_channels": 3,
            "image_size": image_size,
            "patch_size": 8,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
            "attention_dropout": 0.0,
        },
        "text_config": {
            "model_type": "llama",
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 8,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 512,
            "vocab_size": vocab_size,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
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
    named = {
        "fake_image_token": "<fake_token_around_image>",
        "image_token": "<image>",
        "global_image_token": "<global-img>",
        "end_of_utterance_token": "<end_of_utterance>",
    }
    tokenizer_config.update(named, extra_special_tokens=named)
    vision = config["vision_config"]
    image_tokens = (image_size // vision["patch_size"]) ** 2 // config["scale_factor"] ** 2
    files = {
        "config.json": config,
        "tokenizer_config.json": tokenizer_config,
        "processor_config.json": {"image_seq_len": image_tokens, "processor_class": "SmolVLMProcessor"},
        "preprocessor_config.json": {
            "image_processor_type": "SmolVLMImageProcessor",
            "processor_class": "SmolVLMProcessor",
            "do_convert_rgb": True,
            "do_resize": True,
            "size": {"longest_edge": image_size},
            "max_image_size": {"longest_edge": image_size},
            "do_image_splitting": False,
            "resample": 1,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3,
            "do_pad": True,
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
    first --vlm-layers layers (SmolVLA keeps 16 of SmolVLM2's 32; here 4 of 8), everything trained
    (there are no pretrained weights to keep: the vision tower and the text model start random too)."""
    config = SmolVLAConfig()
    config.input_features, config.output_features = train.features_from_dataset(dataset)
    config.chunk_size = args.chunk_size
    config.n_action_steps = min(args.action_steps, args.chunk_size)
    config.max_state_dim = 8
    config.max_action_dim = 8
    config.resize_imgs_with_padding = (image_size, image_size)
    config.tokenizer_max_length = 8
    config.num_vlm_layers = args.vlm_layers
    config.attention_mode, config.self_attn_every_n_layers = ATTENTION[args.attention]
    config.freeze_vision_encoder = False
    config.train_expert_only = False
    return config


# ----------------------------------------------------------------------------------------------------
# Record, evaluate
# ----------------------------------------------------------------------------------------------------

def record_demonstrations(root, episodes, length, seed, targets=1):
    """Run the scripted expert and store what it saw and did as a LeRobot v3.0 dataset."""
    scene = ReachScene(seed=seed, targets=targets)
    rng = np.random.default_rng(seed)
    recorded = []
    for _ in tqdm(range(episodes), desc="recording demonstrations"):
        episode = expert_episode(scene, rng, length)
        episode["task"] = TASK
        recorded.append(episode)
    # the toy arm's joints are in degrees, as a real SO-100's in lerobot's `degrees` mode
    return write_lerobot_dataset(root, recorded, fps=FPS, norm_mode="degrees")


@torch.no_grad()
def evaluate_in_sim(policy, episodes, length, seed, shuffle_images=False, targets=1):
    """Closed-loop success rate of `policy` in the toy world, and its median seconds per chunk.

    Each episode: a new target, the arm near its home pose; every n_action_steps the policy sees the state
    and the camera image and returns a chunk, of which the first n_action_steps actions are executed.
    shuffle_images: the camera shows episode e+1's target instead of episode e's (the arm itself is drawn
    where it really is), so a policy that truly reads the image reaches for the wrong spot.
    """
    scene = ReachScene(seed=seed, targets=targets)
    rng = np.random.default_rng(seed)
    layouts = [scene.reset(rng) for _ in range(episodes)]  # each (targets, 2): the target, then the others
    camera = policy.config.camera_keys[0]
    steps_per_chunk = policy.config.n_action_steps
    successes = 0
    latencies = []
    for episode in range(episodes):
        scene.target = layouts[episode][0]
        scene.distractors = layouts[episode][1:]
        if shuffle_images:
            shown = layouts[(episode + 1) % episodes]
        else:
            shown = layouts[episode]
        joints = start_pose(rng)
        queue = []
        for _ in range(length):
            if not queue:
                image = scene.render(joints, target=shown)
                started = time.perf_counter()
                chunk = policy.predict_chunk(observe(joints, camera, image))  # (1, chunk_size, 6)
                queue = list(chunk[0, :steps_per_chunk].float().cpu().numpy())
                latencies.append(time.perf_counter() - started)
            joints = step_arm(joints, queue.pop(0))
        successes += scene.success(joints)
    return successes / episodes, float(np.median(latencies))


# ----------------------------------------------------------------------------------------------------
# The Real-Time Chunking lab: asynchronous inference on a simulated clock (README lab 6)
# ----------------------------------------------------------------------------------------------------

# The lab's modes: what each request asks of the policy (policy_server.PolicyRunner.rtc_options). Each mode
# is named here in full, whatever the library's defaults (the lab measures them side by side).
RTC_LAB = {
    "off": None,
    "guided": {"mode": "guided", "jacobian": False},
    "guided_jacobian": {"mode": "guided", "jacobian": True},
    "trained": {"mode": "trained"},
}


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
    and handed back at tick k + 1 + delay, however long it took. The lab sets .tick before each control
    tick."""

    def __init__(self, compute, delay):
        self.compute = compute
        self.delay = delay
        self.tick = 0
        self.pending = []  # (tick due, Result)

    def now(self):
        """The simulated clock, in seconds (the scheduler's clock: it measures latencies with it)."""
        return self.tick / FPS

    def submit(self, request, observation):
        result = Result.from_answer(request.id, self.compute(observation))
        self.pending.append((self.tick + 1 + self.delay, result))

    def poll(self):
        return [result for due, result in self.pending if due == self.tick]


def rtc_lab(policy, episodes, length, seed, targets=2, delays=(0, 4, 8), threshold=0.7):
    """Real-Time Chunking under asynchronous inference, on a simulated clock: infer_async's control loop
    with each chunk arriving `delay` ticks after its observation. One row per (mode, delay): success rate,
    switch_jump_mean (robot units, mean over all switches); `trained` if the policy was trained with RTC."""
    camera = policy.config.camera_keys[0]
    modes = list(RTC_LAB)
    if not policy.trained_on.get("rtc_max_delay"):
        modes.remove("trained")
    rows = []
    for mode in modes:
        for delay in delays:
            rows.append(rtc_lab_row(policy, camera, mode, delay, episodes, length, seed, targets, threshold))
            print(f"rtc lab: {rows[-1]}")
    return rows


def rtc_lab_row(policy, camera, mode, delay, episodes, length, seed, targets, threshold):
    """One row of the RTC lab: `episodes` episodes of `length` ticks in one mode at one delay."""
    scene = ReachScene(seed=seed, targets=targets)
    rng = np.random.default_rng(seed)
    runner = PolicyRunner(policy, seed)  # the same noise for every mode
    successes = 0
    jumps = []

    def capture(joints):
        return {STATE: joints, camera: scene.render(joints), "task": TASK}

    for _ in range(episodes):
        scene.reset(rng)
        arm = ToyServos(start_pose(rng))
        worker = DelayedWorker(runner, delay)
        scheduler = AsyncScheduler(policy.config.chunk_size, threshold, rtc=RTC_LAB[mode], clock=worker.now,
                                   fps=FPS)
        for tick in range(length):
            worker.tick = tick  # the worker hands back what is due at this tick
            control_tick(arm, capture, worker, scheduler, log=print)
        successes += scene.success(arm.joints)
        for _, jump in scheduler.metrics.switch_jumps():
            jumps.append(jump)
    jump_mean = None
    if jumps:
        jump_mean = round(float(np.mean(jumps)), 3)
    return {
        "mode": mode,
        "delay_ticks": delay,
        "success_rate": successes / episodes,
        "switch_jump_mean": jump_mean,
    }


# ----------------------------------------------------------------------------------------------------
# The demo: record -> train from scratch -> save -> reload -> evaluate
# ----------------------------------------------------------------------------------------------------

# The demo's training recipe: train.py's, but a tiny model from scratch learns fast with a higher lr and a
# short schedule, in one process, saving only at the end.
DEMO_RECIPE = {
    **train.RECIPE,
    "steps": 1_500,
    "lr": 1e-3,
    "decay_lr": 1e-5,
    "warmup_steps": 100,
    "decay_steps": None,  # None: the run's steps
    "num_workers": 0,
    "save_every": 0,
    "log_every": 25,
}

# The demo's own settings (its flags, without the `--`).
DEMO_SETTINGS = {
    "targets": 1,          # 1, or 2 mirror-image targets (the expert picks one)
    "episodes": 160,       # demonstrations recorded
    "length": 20,          # steps per episode
    "eval_episodes": 50,   # episodes per evaluation
    "chunk_size": 10,      # actions per chunk
    "action_steps": 5,     # actions executed per chunk, open loop
    "vlm_layers": 4,       # VLM layers kept, of the tiny VLM's 8
    "attention": "interleaved",  # ATTENTION's key
}

# With two targets: the settings README lab 6 (Real-Time Chunking) was measured with, so that its bare
# command, `python demo.py --targets 2 --rtc-max-delay 8`, reproduces the table. A chunk of 20 spans the
# whole delay range; 3000 steps and 200 evaluation episodes (success ±0.03). With --rtc-max-delay, prefixes
# shifted by N(0, 0.2²) (the lab's finding: clean prefixes teach the policy that a still prefix means
# "arrived"); train.py's own default stays the paper's clean prefixes.
TWO_TARGET_SETTINGS = {"steps": 3_000, "chunk_size": 20, "eval_episodes": 200}
TWO_TARGET_PREFIX_OFFSET = 0.2

# What the demo has in place of train.py's data and starting-point flags (the run saves them for --resume).
DEMO_RUN = {
    "repo": None,          # the dataset it records (--resume: the run's dataset/)
    "policy": None,        # a tiny SmolVLA from scratch
    "from_scratch": False,
    "vlm": None,           # its VLM description is written into the run (vlm/)
    "rename": None,
    "train_vlm": True,     # everything learns: nothing is pretrained
}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    setting = DEMO_SETTINGS
    parser.add_argument("--targets", type=int, help=f"1, or 2 mirror-image targets ({setting['targets']})")
    parser.add_argument("--episodes", type=int, help=f"demonstrations recorded ({setting['episodes']})")
    parser.add_argument("--length", type=int, help=f"steps per episode ({setting['length']})")
    parser.add_argument("--eval-episodes", type=int,
                        help=f"episodes per evaluation ({setting['eval_episodes']}; 2 targets: 200)")
    parser.add_argument("--chunk-size", type=int,
                        help=f"actions per chunk ({setting['chunk_size']}; 2 targets: 20)")
    parser.add_argument("--action-steps", type=int,
                        help=f"actions executed per chunk, open loop ({setting['action_steps']})")
    parser.add_argument("--vlm-layers", type=int,
                        help=f"VLM layers kept, of the tiny VLM's 8 ({setting['vlm_layers']})")
    parser.add_argument("--attention",
                        help="expert-VLM attention: interleaved cross/self (SmolVLA), cross only, self only "
                             f"(demo.ATTENTION; {setting['attention']})")
    train.add_run_arguments(parser)
    parser.set_defaults(output=None)
    return parser


def fill_demo_options(args):
    """The demo's settings and recipe where the command line left them out (two targets: lab 6's)."""
    settings = dict(DEMO_SETTINGS)
    recipe = dict(DEMO_RECIPE)
    if args.targets == 2:
        settings.update(TWO_TARGET_SETTINGS)
        recipe["steps"] = TWO_TARGET_SETTINGS["steps"]
        if args.rtc_max_delay and args.rtc_prefix_offset is None:
            args.rtc_prefix_offset = TWO_TARGET_PREFIX_OFFSET
    for name, value in settings.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    at_least = {name: 1 for name in DEMO_SETTINGS if name not in ("targets", "attention")}
    train.fill_options(args, defaults=recipe, at_least=at_least)
    if args.targets not in (1, 2):
        raise ValueError(f"--targets {args.targets}: the toy world has 1 target or 2 mirror-image ones")
    if args.attention not in ATTENTION:
        raise ValueError(f"--attention {args.attention!r} is not one of {sorted(ATTENTION)}.")


def prepare_demo(args, processes):
    """The demo's checks, before anything is written: one process, its settings, and a new (or empty)
    output directory, by default outputs/demo/<date> (outputs/demo/latest is linked to the newest)."""
    if processes.distributed:
        raise ValueError("demo.py runs in one process; "
                         "run torchrun train.py on the demo's dataset with --repo.")
    fill_demo_options(args)
    default_output = args.output is None
    if default_output:
        args.output = os.path.join("outputs", "demo", time.strftime("%Y-%m-%d_%H-%M-%S"))
    if os.path.isdir(args.output) and os.listdir(args.output):
        raise FileExistsError(f"{args.output!r} is not empty; the demo writes a new run: "
                              "choose another --output.")
    train.check_output(args.output, resume=False)
    train.check_batch_size(args.episodes * args.length, args.batch_size, 1)
    if default_output:
        os.makedirs(args.output, exist_ok=True)
        train.replace_link(os.path.dirname(args.output), "latest", os.path.basename(args.output))


def run_demo(args, processes):
    """Record -> train from scratch -> save -> reload -> evaluate twice (and the RTC lab) -> eval.json."""
    started = time.perf_counter()
    # The demo's matrices are tiny: a second CPU thread gains little, and on a busy machine threads that
    # wait for each other cost a lot (measured on 2 shared cores: 0.3 s per step with 1 thread, 2.3 s with 2).
    torch.set_num_threads(1)
    dataset_root = record_demonstrations(os.path.join(args.output, "dataset"), args.episodes, args.length,
                                         seed=args.seed, targets=args.targets)
    # from here on the demo data is an ordinary LeRobot dataset on disk
    dataset = LeRobotDataset(dataset_root)
    config = demo_policy_config(dataset, args)
    dataset.chunk_size = config.chunk_size
    vlm_dir = os.path.join(args.output, "vlm")
    torch.manual_seed(args.seed)  # the random initialization of the whole tiny model
    policy = SmolVLAPolicy(config, *write_tiny_vlm(vlm_dir, dataset.tasks))
    policy.vlm_dir = vlm_dir  # copied into every checkpoint's vlm/
    policy.set_normalization(dataset.stats)
    training_started = time.perf_counter()
    train.train(policy, dataset, args, processes)
    training_time = time.perf_counter() - training_started

    checkpoint = os.path.join(args.output, "checkpoints", "last", "pretrained_model")
    # evaluate the checkpoint as written, the way a user would load it
    policy = SmolVLAPolicy.from_pretrained(checkpoint).to(processes.device)
    print(f"evaluating in the simulator: {args.eval_episodes} episodes with the real images, "
          f"then {args.eval_episodes} with images of other episodes' scenes")
    evaluation_seed = args.seed + 1
    episodes = args.eval_episodes
    success_rate, seconds_per_chunk = evaluate_in_sim(policy, episodes, args.length, evaluation_seed,
                                                      targets=args.targets)
    success_rate_shuffled, _ = evaluate_in_sim(policy, episodes, args.length, evaluation_seed,
                                               shuffle_images=True, targets=args.targets)
    animation = animate_episodes(policy, os.path.join(args.output, "episodes.gif"), 4, args.length)
    result = {
        "success_rate": success_rate,
        "success_rate_shuffled_images": success_rate_shuffled,
        "episodes": args.eval_episodes,
        "uses_images": success_rate >= 0.8 and success_rate_shuffled <= success_rate / 2,
        "inference_ms_per_chunk": round(1000 * seconds_per_chunk, 1),
        "train_samples_per_s": round(args.steps * args.batch_size / training_time, 1),
        "train_steps": args.steps,
        "train_episodes": args.episodes,
        "episode_length": args.length,
        "chunk_size": config.chunk_size,
        "n_action_steps": config.n_action_steps,
        "vlm_layers": config.num_vlm_layers,
        "attention": args.attention,
        "checkpoint": checkpoint,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "animation": animation,
    }
    if args.targets > 1 or args.rtc_max_delay:
        # episodes twice as long: time for the delays
        result["rtc_lab"] = rtc_lab(policy, episodes, 2 * args.length, evaluation_seed, args.targets)
    with open(os.path.join(args.output, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    print(f"\ncheckpoint: {checkpoint}\nrun it on the virtual arm:\n"
          f"  python infer_async.py --port sim --policy {checkpoint} --task \"{TASK}\"")
    return result


def check_resume(args):
    """A demo run continues like any training run: on the dataset it recorded, with the settings it saved."""
    given = [name for name in DEMO_SETTINGS if getattr(args, name) is not None]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(f"{flags}: a resumed run keeps the settings it was recorded and trained with")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    train.check_rtc_flags(parser, args)
    for name, value in DEMO_RUN.items():
        setattr(args, name, value)
    processes = train.start_processes(args.device)
    try:
        if args.resume:
            check_resume(args)
            dataset, policy, start = train.prepare(args, processes)
        else:
            prepare_demo(args, processes)
    except (FileNotFoundError, FileExistsError, PermissionError, ValueError) as error:
        sys.exit(f"demo.py: error: {error}")
    if args.resume:
        train.train(policy, dataset, args, processes, start)
        print(f"checkpoint: {os.path.join(args.output, 'checkpoints', 'last', 'pretrained_model')}")
        return None
    return run_demo(args, processes)


if __name__ == "__main__":
    main()
