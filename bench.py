"""Measurement: how long SmolVLA takes for one action chunk and one training step, and how fast data loads.

A chunk must be ready before the action queue runs dry (the latency budget speed.py's opening works out
from the paper's §3.3). This script measures how long one takes, at the size that matters (smolvla_base,
two 640×480 cameras, batch 1, 10 flow steps), on whatever machine it runs on:

    python bench.py --dtype bf16 --cameras 2 --height 480 --width 640            # random smolvla_base weights
    python bench.py --checkpoint DIR --vlm DIR --dtype fp32 --json               # a real checkpoint
    python bench.py --train --batch 2 --dtype bf16                               # one training step
    python bench.py --profile                                                    # where the time goes
    python bench.py --write-dataset /tmp/ds --episodes 6 --frames 300            # two 480×640 AV1 cameras
    python bench.py --data /tmp/ds --workers 2 --batch 8                         # the dataset reader

The README's table, against lerobot's SmolVLA timed on the same shapes (/path/to/lerobot-venv/bin/python
is a placeholder: replace it with the path of a python where lerobot 0.4.4 is installed, which runs this
same script for the reference timing):

    python bench.py --table --reference "/path/to/lerobot-venv/bin/python bench.py --lerobot"

It reports the median seconds per chunk after warm-up and the achieved GFLOP/s, against a FLOP count
worked out from the architecture (`speed.chunk_flops`: ≈ 580 GFLOP for smolvla_base with two cameras, three
quarters of it in the vision tower), and the fraction of this machine's matmul peak that is (the best rate of
the model's largest products, the vision MLP's, timed in the same run: `speed.matmul_peak`). With --json the
last line printed is a JSON object ("chunk_s" or "train_step_s", "gflops", "peak_gflops", "peak_fraction",
...).

`--reference CMD` runs another command with the same arguments first and reports our time as a fraction of
its: `bench.py --lerobot` run by a Python that has lerobot 0.4.4 times lerobot's SmolVLA (or its dataset
reader, with --data) on the same shapes. On a shared machine only timings taken together compare.

What makes it fast is speed.py's subject (the steps written into the model, and those `speed.prepare`
applies from outside); this file only measures. `--train` times train.py's own step (its preparation
`prepare_training`, its `training_step`) on a batch as its loop receives it.
"""

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types

import plumbing  # noqa: E402

plumbing.spin_briefly_before_sleeping()  # OpenMP's wait setting, before torch starts

import torch  # noqa: E402

import speed  # noqa: E402
from speed import LANG_TOKENS, chunk_flops, train_step_flops  # noqa: E402  (the FLOP count, beside the peak)
from data import SUPPORTED_VERSIONS, LeRobotDataset  # noqa: E402
from plumbing import CODECS, HelpFormatter, read_json, resolve_dir  # noqa: E402
from policy import SmolVLAPolicy  # noqa: E402
from record import synthetic_episodes, write_lerobot_dataset  # noqa: E402
from smolvla import ACTION, IMAGE_PREFIX, STATE, SmolVLAConfig  # noqa: E402
from train import RECIPE, TrainingLoss, prepare_training, training_step  # noqa: E402
from vlm import SMOLVLM2_500M_VIDEO_INSTRUCT, parse_vlm_config  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# LANG_TOKENS = 20 tokens, with its "\n", in SmolVLM2's tokenizer
TASK = "pick up the red cube and put it in the box"


# ----------------------------------------------------------------------------------------------------
# The model and its inputs.


def base_config(num_cameras: int) -> SmolVLAConfig:
    """smolvla_base's configuration with `num_cameras` cameras (camera1 = top, camera2 = wrist, ...)."""
    features = {"observation.state": {"type": "STATE", "shape": [6]}}
    for i in range(num_cameras):
        features[f"{IMAGE_PREFIX}camera{i + 1}"] = {"type": "VISUAL", "shape": [3, 256, 256]}
    return SmolVLAConfig(input_features=features)


def build_model(checkpoint: str | None, vlm: str | None, num_cameras: int) -> SmolVLAPolicy:
    """A checkpoint's model reading its first `num_cameras` cameras, or smolvla_base's architecture with
    random weights (no download needed)."""
    if checkpoint is not None:
        model = SmolVLAPolicy.from_pretrained(checkpoint, vlm=vlm)
        cameras = model.config.camera_keys
        if num_cameras > len(cameras):
            raise ValueError(f"--cameras {num_cameras}: the checkpoint reads {len(cameras)} "
                             f"({', '.join(cameras)})")
        # fewer cameras than the checkpoint has: benchmark it as if configured with its first num_cameras
        for key in cameras[num_cameras:]:
            del model.config.input_features[key]
            print(f"bench: camera {key} left out (--cameras {num_cameras})")
        return model
    torch.manual_seed(0)
    return SmolVLAPolicy(base_config(num_cameras), SMOLVLM2_500M_VIDEO_INSTRUCT).eval()


def make_inputs(model: SmolVLAPolicy, batch: int, height: int, width: int,
                lang_tokens: int = LANG_TOKENS) -> dict:
    """Random tensor-level inputs for one observation per batch row (normalized units), every camera the
    policy reads as a (B, 3, height, width) frame in [0, 1], all tokens real."""
    cfg = model.config
    generator = torch.Generator().manual_seed(0)
    vocab = model.text.embed_tokens.weight.shape[0]
    return {
        "images": [torch.rand(batch, 3, height, width, generator=generator) for _ in cfg.camera_keys],
        "img_masks": [torch.ones(batch, dtype=torch.bool) for _ in cfg.camera_keys],
        "lang_tokens": torch.randint(0, vocab, (batch, lang_tokens), generator=generator),
        "lang_masks": torch.ones(batch, lang_tokens, dtype=torch.bool),
        "state": torch.randn(batch, cfg.state_dim, generator=generator),
        "noise": torch.randn(batch, cfg.chunk_size, cfg.max_action_dim, generator=generator),
        "actions": torch.randn(batch, cfg.chunk_size, cfg.action_dim, generator=generator),
    }


# ----------------------------------------------------------------------------------------------------
# Timing.


def timed(fn, repeats: int, warmup: int) -> tuple[list, list]:
    """Run fn warmup + repeats times; wall and process CPU seconds of the timed runs."""
    for _ in range(warmup):
        fn()
    wall = []  # seconds per run, wall clock
    cpu = []  # seconds per run, CPU time of this process
    for _ in range(repeats):
        wall_start = time.perf_counter()
        cpu_start = time.process_time()
        fn()
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
    return wall, cpu


def sample_chunk(model: SmolVLAPolicy, inputs: dict) -> torch.Tensor:
    """One chunk: VLM over the prefix once, then num_steps Euler steps of the expert."""
    return model.sample_actions(
        inputs["images"], inputs["img_masks"], inputs["lang_tokens"], inputs["lang_masks"], inputs["state"],
        noise=inputs["noise"],
    )


def training_batch(model: SmolVLAPolicy, inputs: dict) -> dict:
    """The inputs as train.py's loop receives them: a collated batch of the dataset reader's samples (uint8
    frames, robot units; a random model gets unit statistics and a word tokenizer for the task)."""
    if model.tokenizer is None:
        from demo import word_tokenizer

        model.tokenizer = word_tokenizer([TASK])
    for key, dim in ((STATE, model.config.state_dim), (ACTION, model.config.action_dim)):
        unit_stats = {"mean": torch.zeros(dim), "std": torch.ones(dim), "min": -torch.ones(dim),
                      "max": torch.ones(dim)}
        model.stats.setdefault(key, unit_stats)
    frames = [(img * 255).round().to(torch.uint8) for img in inputs["images"]]  # uint8, as data.py reads them
    batch = dict(zip(model.config.camera_keys, frames))
    batch["task"] = [TASK] * len(inputs["state"])
    batch[STATE] = inputs["state"]
    batch[ACTION] = inputs["actions"]
    batch["action_is_pad"] = torch.zeros(inputs["actions"].shape[:2], dtype=torch.bool)
    return batch


def time_guided_chunk(model: SmolVLAPolicy, inputs: dict, args) -> dict:
    """Real-Time Chunking (flow.py): the chunk guided toward a previous chunk's leftover (half a chunk, delay
    a tenth of it, the default horizon of 10 steps); with --rtc jacobian every flow step also runs a backward
    pass of the expert over the guided steps."""
    chunk = model.config.chunk_size
    leftover = torch.zeros(args.batch, chunk // 2, model.config.action_dim)

    def guided_chunk():
        return model.sample_actions(
            inputs["images"], inputs["img_masks"], inputs["lang_tokens"], inputs["lang_masks"],
            inputs["state"], noise=inputs["noise"], leftover=leftover, inference_delay=chunk // 10,
            jacobian=args.rtc == "jacobian")

    wall, _ = timed(guided_chunk, args.repeats, args.warmup)
    return {"rtc": args.rtc, "rtc_chunk_s": statistics.median(wall), "rtc_wall_s": wall}


def stage_times(model: SmolVLAPolicy, inputs: dict, repeats: int) -> dict:
    """Median seconds of the stages of a chunk: all cameras through vision + connector, the whole prefix
    (vision included), one expert step (the velocity at one flow time)."""
    prepared, _ = model.prepare_images(inputs["images"], inputs["img_masks"])
    observation = (inputs["images"], inputs["img_masks"], inputs["lang_tokens"], inputs["lang_masks"],
                   inputs["state"])
    with torch.no_grad():
        ctx = model.encode_observation(*observation)
        tau = torch.ones(inputs["noise"].shape[0])
        parts = {
            "vision_s": lambda: model.embed_images(prepared),
            "prefix_s": lambda: model.encode_observation(*observation),
            "expert_step_s": lambda: model.velocity(ctx, inputs["noise"], tau),
        }
        return {name: statistics.median(timed(fn, repeats, 1)[0]) for name, fn in parts.items()}


def profile_run(fn, rows: int = 25):
    """torch.profiler over one run of fn (a chunk or a training step, after the timed runs): the operators
    that take the time, with their input shapes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    table = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows)
    print(table)


def run_reference(command: str, args) -> dict:
    """Run the reference timing command with our arguments; its last output line is a JSON object."""
    # the model's shapes, or with --data the reader's settings
    if args.data:
        ours = ["--data", args.data, "--workers", args.workers, "--seconds", args.seconds,
                "--chunk-size", args.chunk_size]
    else:
        ours = ["--cameras", args.cameras, "--height", args.height, "--width", args.width,
                "--steps", args.steps, "--repeats", args.repeats, "--warmup", args.warmup,
                "--threads", args.threads, "--dtype", args.dtype]
    ours += ["--batch", args.batch]
    cmd = shlex.split(command) + [str(argument) for argument in ours]
    cmd.append("--json")
    if args.train:
        cmd.append("--train")
    print("reference:", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the reference command failed ({out.returncode}):\n{out.stderr[-3000:]}")
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"the reference command printed nothing; stderr:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------------
# The reference, lerobot 0.4.4, timed by this same script (--lerobot, run by a Python where lerobot
# imports; our run calls it through --reference "PYTHON bench.py --lerobot").

# smolvla_base's projections that the published checkpoint stores in float32 (the rest is bfloat16)
LEROBOT_FP32 = ("state_proj", "action_in_proj", "action_out_proj", "action_time_mlp_in",
                "action_time_mlp_out")


def lerobot_run(inputs: dict, cameras: int, dtype: torch.dtype, train: bool):
    """lerobot's SmolVLA at smolvla_base's size with random weights, built offline from a VLM
    description in a temporary folder (SmolVLM2-500M's config, the demo's tokenizer); for inference in
    dtype as smolvla_base is stored, for training in float32 with autocast in bf16 (lerobot's use_amp).
    Returns a closure running one chunk or one training step (lerobot's optimizer preset, clipping)."""
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig as LerobotConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy as LerobotPolicy

    from demo import write_tiny_vlm

    directory = tempfile.mkdtemp()
    config, _ = write_tiny_vlm(directory, [TASK], image_size=512)
    for part in ("vision_config", "text_config"):
        config[part].update(SMOLVLM2_500M_VIDEO_INSTRUCT[part])
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    keys = [f"{IMAGE_PREFIX}camera{i + 1}" for i in range(cameras)]
    features = {STATE: PolicyFeature(FeatureType.STATE, (6,))}
    features.update({key: PolicyFeature(FeatureType.VISUAL, (3, 256, 256)) for key in keys})
    output_features = {ACTION: PolicyFeature(FeatureType.ACTION, (6,))}
    policy = LerobotPolicy(LerobotConfig(vlm_model_name=directory, load_vlm_weights=False,
                                         input_features=features, output_features=output_features))
    shutil.rmtree(directory)
    batch = {STATE: inputs["state"], ACTION: inputs["actions"]}
    for key, images in zip(keys, inputs["images"]):
        batch[key] = images
    batch["observation.language.tokens"] = inputs["lang_tokens"]
    batch["observation.language.attention_mask"] = inputs["lang_masks"]
    if not train:
        policy.eval().to(dtype)
        for name in LEROBOT_FP32:
            getattr(policy.model, name).float()

        def chunk():
            return policy.predict_action_chunk(dict(batch), noise=inputs["noise"])

        return chunk
    policy.train()
    optimizer = torch.optim.AdamW(policy.get_optim_params(), lr=RECIPE["lr"], betas=RECIPE["betas"],
                                  eps=RECIPE["eps"], weight_decay=RECIPE["weight_decay"])

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
            loss, _ = policy.forward(dict(batch))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), RECIPE["grad_clip"])
        optimizer.step()
        optimizer.zero_grad()

    return step


def lerobot_dataset(root: str, chunk_size: int):
    """lerobot's LeRobotDataset over a local dataset, with chunk_size-action chunks (delta_timestamps)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset as LerobotDataset

    with open(os.path.join(root, "meta", "info.json")) as f:
        fps = json.load(f)["fps"]
    action_times = [i / fps for i in range(chunk_size)]  # seconds after the sample's frame
    return LerobotDataset("local/bench", root=root, delta_timestamps={ACTION: action_times})


# ----------------------------------------------------------------------------------------------------
# The dataset reader, as training reads it.


def _cpu_seconds():
    """CPU time of this process and of its finished children (DataLoader workers, once shut down)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def data_benchmark(repo_or_dir, workers=2, batch_size=32, seconds=20.0, chunk_size=50, max_cache_gb=64.0,
                   lerobot=False):
    """Samples per second through a shuffled DataLoader, as training reads them (lerobot: lerobot's reader).

    Also samples per CPU-second (main process and workers together), a figure that other programs
    running on the same machine disturb much less than the wall-clock rate.
    """
    start = time.perf_counter()
    if lerobot:
        dataset = lerobot_dataset(repo_or_dir, chunk_size)
        mode = "lerobot's reader"
    else:
        dataset = LeRobotDataset(repo_or_dir, chunk_size=chunk_size, max_cache_gb=max_cache_gb)
        mode = "pre-decoded cache" if dataset._cached else "on-the-fly decoding"
    print(f"{repo_or_dir}: {len(dataset)} samples, opened in {time.perf_counter() - start:.1f} s ({mode})")
    if len(dataset) < 2 * batch_size:
        raise ValueError(f"the benchmark needs at least two batches: {len(dataset)} samples < 2 x batch size "
                         f"{batch_size}.")
    cpu_start = _cpu_seconds()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0, drop_last=True)
    samples = 0  # samples read since the timing started
    timed_from = None  # when the timing started: once the first batch is in
    while timed_from is None or time.perf_counter() - timed_from < seconds:
        for batch in loader:
            if timed_from is None:  # the first batch pays for starting the workers: not timed
                timed_from = time.perf_counter()
                continue
            samples += len(batch["index"])
            if time.perf_counter() - timed_from >= seconds:
                break
    rate = samples / (time.perf_counter() - timed_from)
    del loader, batch  # stops the workers, so that their CPU time is counted
    per_cpu_second = (samples + batch_size) / (_cpu_seconds() - cpu_start)
    print(f"{rate:.1f} samples/s, {per_cpu_second:.1f} samples per CPU-second  ({samples} samples, "
          f"{workers} workers, batch {batch_size}, chunk {chunk_size})")
    return {"samples_per_s": rate, "samples_per_cpu_s": per_cpu_second}


# ----------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--checkpoint",
                    help="a SmolVLA checkpoint directory (default: smolvla_base, random weights)")
    ap.add_argument("--vlm",
                    help="the VLM description directory for --checkpoint (default: <checkpoint>/vlm)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                    help="inference: weights and activations; --train: bf16 = autocast, fp32 = none")
    ap.add_argument("--cameras", type=int,
                    help="cameras (default: 2, or --checkpoint's; with it: its first N)")
    ap.add_argument("--height", type=int, default=480, help="camera frame height before resize-with-pad")
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--steps", type=int, default=10, help="flow (Euler) steps per chunk")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first (allocator, oneDNN kernels)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--train", action="store_true", help="time a training step instead of a chunk")
    ap.add_argument("--rtc", choices=("jacobian", "identity"),
                    help="also time a chunk with RTC guidance (flow.py)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 1; --train: 2; --data: 32)")
    ap.add_argument("--no-pack", action="store_true",
                    help="plain nn.Linear layers (see speed.pack_linear_layers)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the vision tower and the expert's step")
    ap.add_argument("--profile", action="store_true", help="print stage timings and the top operators")
    ap.add_argument("--reference", metavar="CMD",
                    help="a command timing the reference on the same shapes first")
    ap.add_argument("--lerobot", action="store_true",
                    help="time lerobot's SmolVLA or dataset reader instead of ours")
    ap.add_argument("--table", action="store_true",
                    help="the bf16 and fp32 chunks and train.py's step, one table")
    ap.add_argument("--json", action="store_true", help="print the results as a JSON object on the last line")
    data = ap.add_argument_group("the dataset reader (--data) and synthetic datasets (--write-dataset)")
    data.add_argument("--data", metavar="REPO_OR_DIR",
                      help="samples/s of a shuffled DataLoader over this dataset")
    data.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    data.add_argument("--seconds", type=float, default=20.0, help="how long to read")
    data.add_argument("--chunk-size", type=int, default=50, help="actions per sample")
    data.add_argument("--max-cache-gb", type=float, default=64.0,
                      help="frame cache budget; 0 decodes on the fly")
    data.add_argument("--write-dataset", metavar="DIR",
                      help="write a synthetic LeRobot dataset (--cameras of --height x --width) to measure "
                           "on")
    data.add_argument("--episodes", type=int, default=20, help="episodes of the synthetic dataset")
    data.add_argument("--frames", type=int, default=300, help="frames per synthetic episode")
    data.add_argument("--codec", default="libsvtav1", choices=sorted(CODECS))
    data.add_argument("--version", default="v3.0", choices=SUPPORTED_VERSIONS)
    args = ap.parse_args(argv)
    # the default batch, where one run decides it (a --table run of ours gives each measurement its own)
    one_lerobot_run = args.lerobot and not args.table
    if args.batch is None and (args.data or one_lerobot_run):
        if args.data:
            args.batch = 32
        elif args.train:
            args.batch = 2
        else:
            args.batch = 1
    if args.cameras is None and args.checkpoint:  # every camera the checkpoint reads
        directory = resolve_dir(args.checkpoint, "checkpoint", ["*.json"])
        config = read_json(os.path.join(directory, "config.json"), "config")
        args.cameras = len(SmolVLAConfig.from_json_dict(config).camera_keys)
    elif args.cameras is None:  # smolvla_base's two
        args.cameras = 2
    for name in ("cameras", "height", "width", "steps", "repeats", "threads", "batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        ap.error("--warmup must be 0 or more")
    if args.lerobot and args.checkpoint:
        ap.error("--lerobot times lerobot's SmolVLA at smolvla_base's size with random weights "
                 "(no --checkpoint)")
    if args.vlm and not args.checkpoint:
        ap.error("--vlm goes with --checkpoint (the random model has SmolVLM2-500M's architecture built in)")
    return args


def measure(args) -> dict:
    """One measurement, a chunk or a training step (--train), of our model or lerobot's (--lerobot), with the
    reference command's first (--reference) and this machine's matmul peak in the same dtype after it."""
    torch.set_num_threads(args.threads)
    pack = not (args.no_pack or args.compile)  # compiled: inductor packs itself
    dtype = DTYPES[args.dtype]
    result = {"threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"), "dtype": args.dtype, "batch": args.batch,
              "mode": "train" if args.train else "chunk", "packed": pack, "compiled": args.compile}
    if args.reference:
        result["reference"] = run_reference(args.reference, args)
    if args.lerobot:  # our model on the meta device: the inputs' and FLOP count's shapes only
        with torch.device("meta"):
            model = SmolVLAPolicy(base_config(args.cameras), SMOLVLM2_500M_VIDEO_INSTRUCT)
    else:
        model = build_model(args.checkpoint, args.vlm, args.cameras)
    model.config.num_steps = args.steps
    inputs = make_inputs(model, args.batch, args.height, args.width)
    flops = chunk_flops(model, args.height, args.width)
    cameras = len(model.config.camera_keys)
    print(f"bench: {'lerobot' if args.lerobot else 'ours'}, {args.checkpoint or 'random smolvla_base'}, "
          f"{cameras} cameras {args.height}x{args.width}, batch {args.batch}, {args.steps} flow steps, "
          f"{args.dtype}, {torch.get_num_threads()} threads; FLOPs per chunk and observation: "
          + ", ".join(f"{k} {v / 1e9:.1f} G" for k, v in flops.items()), flush=True)

    speed.PATHS.clear()  # the paths this measurement's model takes (a --table run measures three)
    result["load_before"] = os.getloadavg()[0]
    if args.lerobot:
        run = lerobot_run(inputs, cameras, dtype, args.train)
    elif args.train:  # exactly what train.py does: its preparation, its step, on a batch as its loop gets it
        recipe = types.SimpleNamespace(**RECIPE, train_vlm=False)
        autocast = args.dtype == "bf16"
        trainable, optimizer = prepare_training(model, recipe, torch.device("cpu"), autocast)
        loss = TrainingLoss(model)
        batch = training_batch(model, inputs)

        def run():
            return training_step(loss, optimizer, trainable, batch, RECIPE["grad_clip"], autocast)

        result["trained_params"] = sum(p.numel() for p in trainable)
    else:
        model.to(dtype)
        speed.prepare(model, pack=pack, compile=args.compile)
        if dtype == torch.bfloat16 and speed.bf16_emulated():
            result["bf16_emulated"] = True  # (still measured: the warning above says what to use instead)

        def run():
            return sample_chunk(model, inputs)

    wall, cpu = timed(run, args.repeats, args.warmup)
    key = "train_step_s" if args.train else "chunk_s"
    result[key] = statistics.median(wall)
    if args.train:
        measured_flops = train_step_flops(flops, args.batch)
    else:
        measured_flops = args.batch * flops["total"]
    result["gflops"] = measured_flops / result[key] / 1e9
    result["gflop_per_chunk"] = flops["total"] / 1e9
    if args.rtc and not args.train and not args.lerobot:
        result.update(time_guided_chunk(model, inputs, args))
        result["rtc_vs_plain"] = result["rtc_chunk_s"] / result["chunk_s"]
        print(f"bench: RTC-guided chunk ({args.rtc}) {result['rtc_chunk_s']:.3f} s = "
              f"{result['rtc_vs_plain']:.2f}x")
    if args.profile and not args.train and not args.lerobot:
        result.update(stage_times(model, inputs, args.repeats))
    if args.profile:
        profile_run(run)
    if not args.lerobot:
        # the machine's peak on the model's largest products: the vision MLP's, all frames at once
        vision = parse_vlm_config(model.vlm_config)[0]
        tokens = args.batch * cameras * (vision.image_size // vision.patch_size) ** 2
        width = vision.hidden_size
        mlp = vision.intermediate_size
        result["peak_gflops"] = speed.matmul_peak([(tokens, width, mlp), (tokens, mlp, width)], dtype)
        result["peak_fraction"] = result["gflops"] / result["peak_gflops"]
        result["choices"] = {" ".join(map(str, choice_key)): timings
                             for choice_key, timings in speed.CHOICES.items()}
        result["paths"] = dict(speed.PATHS)  # which path each part took, and why
    result.update(wall_s=wall, cpu_s=cpu, load_after=os.getloadavg()[0], machine=speed.machine())
    every_run = ", ".join(f"{seconds:.3f}" for seconds in wall)
    summary = f"{key} {result[key]:.3f} s (median of {args.repeats}; all {every_run}), "
    summary += f"{result['gflops']:.0f} GFLOP/s, load average {result['load_after']:.1f}"
    if key in result.get("reference", {}):
        result["vs_reference"] = result[key] / result["reference"][key]
        summary += f"; reference {result['reference'][key]:.3f} s -> {result['vs_reference']:.2f}x"
    print(f"bench: {summary}", flush=True)
    return result


def print_table(results: list):
    """The one table: per measurement our seconds and lerobot's, the ratio (and the ratio of CPU-seconds,
    which other programs on a shared machine disturb less), our GFLOP/s, the machine's matmul peak in the
    same dtype and the fraction of it we reach; then the machine and the choices made on it."""
    header = (f"{'':26}{'ours':>8}{'lerobot':>9}{'ratio':>7}{'CPU-s ratio':>12}"
              f"{'GFLOP/s':>8}{'peak':>6}{'of peak':>8}")
    print(f"\n{header}")
    for result in results:
        if result["mode"] == "train":
            key = "train_step_s"
            label = "train step"
        else:
            key = "chunk_s"
            label = "chunk"
        reference = result.get("reference", {})
        row = f"{label} {result['dtype']}, batch {result['batch']}"
        row = f"{row:26}{result[key]:7.2f}s"
        # lerobot's seconds and our ratio to them
        if key in reference:
            row += f"{reference[key]:8.2f}s{result[key] / reference[key]:6.2f}x"
        else:
            row += f"{'-':>9}{'-':>7}"
        # the ratio of CPU-seconds
        if "cpu_s" in reference:
            row += f"{statistics.median(result['cpu_s']) / statistics.median(reference['cpu_s']):11.2f}x"
        else:
            row += f"{'-':>12}"
        row += f"{result['gflops']:8.0f}"
        # the machine's peak and the fraction of it we reach
        if "peak_gflops" in result:
            row += f"{result['peak_gflops']:6.0f}{result['peak_fraction']:8.0%}"
        print(row)
    machine = results[0]["machine"]
    print(f"machine: {machine['cpu']}, {machine['threads']} threads, {machine['architecture']} "
          f"{machine['capability']}, AMX {'yes' if machine['amx'] else 'no'}, AVX-512 BF16 "
          f"{'yes' if machine['avx512_bf16'] else 'no'}, oneDNN bf16 "
          f"{'yes' if machine['onednn_bf16'] else 'no'}; load average {results[0]['load_before']:.1f} -> "
          f"{results[-1]['load_after']:.1f}")
    for result in results:
        run = f"{result['mode']} {result['dtype']}"
        for what, path in result.get("paths", {}).items():
            print(f"path ({run}) {what}: {path}")
    for what, choice in results[-1].get("choices", {}).items():
        timings = ", ".join(f"{candidate} {seconds * 1e3:.1f} ms"
                            for candidate, seconds in choice.items() if candidate != "choice")
        print(f"chose {what}: {choice['choice']} ({timings})")


def main(argv=None):
    """One measurement, or with --table the three of the README's table; returns the result(s)."""
    args = parse_args(argv)
    if args.write_dataset or args.data:
        return dataset_main(args)
    if args.table:  # (train?, dtype) of each measurement
        runs = [(False, "bf16"), (False, "fp32"), (True, "fp32")]
    else:
        runs = [(args.train, args.dtype)]
    results = [measure(run_arguments(args, train, dtype)) for train, dtype in runs]
    if not args.lerobot:  # (lerobot's run only reports to ours, in its JSON line)
        print_table(results)
    if args.json:
        print(json.dumps(results if args.table else results[0]))
    return results if args.table else results[0]


def run_arguments(args, train: bool, dtype: str) -> argparse.Namespace:
    """The arguments of one measurement in that mode (train or not) and dtype, the batch defaulting to 1 for a
    chunk and 2 for a training step."""
    run_args = argparse.Namespace(**vars(args))
    run_args.train = train
    run_args.dtype = dtype
    if args.batch:
        run_args.batch = args.batch
    elif train:
        run_args.batch = 2
    else:
        run_args.batch = 1
    return run_args


def dataset_main(args) -> dict:
    """--write-dataset and/or --data: write a synthetic dataset, then measure the reader."""
    result = {}
    if args.write_dataset:
        names = tuple(f"camera{i + 1}" for i in range(args.cameras))
        start = time.perf_counter()
        episodes = synthetic_episodes(args.episodes, args.frames, args.height, args.width, names)
        write_lerobot_dataset(args.write_dataset, episodes, codec=args.codec, version=args.version)
        print(f"wrote {args.write_dataset} in {time.perf_counter() - start:.1f} s")
    if args.data and args.reference:
        result["reference"] = run_reference(args.reference, args)
    if args.data:
        result.update(data_benchmark(args.data, args.workers, args.batch, args.seconds, args.chunk_size,
                                     args.max_cache_gb, args.lerobot))
        if "reference" in result:  # per CPU-second: what other programs on a shared machine disturb least
            reference = result["reference"]
            result["vs_reference"] = result["samples_per_s"] / reference["samples_per_s"]
            result["vs_reference_per_cpu_s"] = result["samples_per_cpu_s"] / reference["samples_per_cpu_s"]
            print(f"bench: {result['vs_reference']:.2f}x the reference's {reference['samples_per_s']:.1f} "
                  f"samples/s, {result['vs_reference_per_cpu_s']:.2f}x per CPU-second; load average "
                  f"{os.getloadavg()[0]:.1f}")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        sys.exit(1)
