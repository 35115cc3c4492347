"""Measurement: how long SmolVLA takes for one action chunk and one training step, and how fast data loads.

Asynchronous inference (SmolVLA paper §3.3) only keeps the arm busy if a chunk is ready before the queue
runs dry: with a chunk of n = 50 actions at 30 fps and a trigger at g = 0.7 of a chunk, a chunk must take
less than 0.7 × 50 / 30 ≈ 1.17 s. This script measures it, at the size that matters (smolvla_base, two
640×480 cameras, batch 1, 10 flow steps), on whatever machine it runs on:

    python bench.py --dtype bf16 --cameras 2 --height 480 --width 640            # random smolvla_base weights
    python bench.py --checkpoint DIR --vlm DIR --dtype fp32 --json               # a real checkpoint
    python bench.py --train --batch 2 --dtype bf16                               # one training step
    python bench.py --profile                                                    # where the time goes
    python bench.py --write-dataset /tmp/ds --episodes 6 --frames 300            # two 480×640 AV1 cameras
    python bench.py --data /tmp/ds --workers 2 --batch 8                         # the dataset reader

It reports the median seconds per chunk after warm-up and the achieved GFLOP/s, against a FLOP count
worked out from the architecture (`chunk_flops`: ≈ 580 GFLOP for smolvla_base with two cameras, three
quarters of it in the vision tower). With --json the last line printed is a JSON object ("chunk_s", ...).

`--reference CMD` runs another command with the same shape arguments first (e.g. lerobot's SmolVLA in its
own environment) and reports our time as a fraction of its "chunk_s" / "train_step_s", measured in the
same sitting: on a shared machine, only timings taken together compare.

What makes it fast is speed.py's subject (the steps written into the model, and those `speed.prepare`
applies from outside); this file only measures. It also measures the dataset reader as training uses it
(`--data DIR`: samples/s through a shuffled DataLoader) and writes synthetic datasets to measure on
(`--write-dataset DIR`).
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

# On a machine shared with other work, OpenMP threads that spin long while waiting for a descheduled partner
# turn every parallel operator into a wait for the scheduler (measured here: an expert step 12x slower with
# 2 threads at load 3 on 2 cores). A short spin before sleeping keeps the idle-machine speed (a chunk 2.07 s
# vs 2.08 s with libgomp's default spin, 2.31 s with OMP_WAIT_POLICY=PASSIVE) and most of passive waiting's
# robustness. Set before torch starts its thread pool; OMP_WAIT_POLICY or GOMP_SPINCOUNT given by the user win.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import torch  # noqa: E402

import speed  # noqa: E402
from data import SUPPORTED_VERSIONS, LeRobotDataset  # noqa: E402
from policy import IMAGE_PREFIX  # noqa: E402
from record import CODECS, synthetic_episodes, write_lerobot_dataset  # noqa: E402
from smolvla import SmolVLA, SmolVLAConfig  # noqa: E402
from train import RECIPE  # noqa: E402
from vlm import SMOLVLM2_500M_VIDEO_INSTRUCT, parse_vlm_config  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LANG_TOKENS = 20  # a short task sentence ("pick up the red cube and put it in the box\n") in tokens


# ----------------------------------------------------------------------------------------------------
# The model and its inputs.


def base_config(num_cameras: int) -> SmolVLAConfig:
    """smolvla_base's configuration with `num_cameras` cameras (camera1 = top, camera2 = wrist, ...)."""
    features = {"observation.state": {"type": "STATE", "shape": [6]}}
    for i in range(num_cameras):
        features[f"{IMAGE_PREFIX}camera{i + 1}"] = {"type": "VISUAL", "shape": [3, 256, 256]}
    return SmolVLAConfig(input_features=features)


def build_model(checkpoint: str | None, vlm: str | None, num_cameras: int) -> SmolVLA:
    """A checkpoint's model reading its first `num_cameras` cameras, or smolvla_base's architecture with
    random weights (no download needed)."""
    if checkpoint is not None:
        model = SmolVLA.from_pretrained(checkpoint, vlm=vlm)
        cameras = model.config.camera_keys
        if num_cameras > len(cameras):
            raise ValueError(f"--cameras {num_cameras}: the checkpoint reads {len(cameras)} ({', '.join(cameras)})")
        # fewer cameras than the checkpoint has: benchmark it as if configured with its first num_cameras
        for key in cameras[num_cameras:]:
            del model.config.input_features[key]
            print(f"bench: camera {key} left out (--cameras {num_cameras})")
        return model
    torch.manual_seed(0)
    return SmolVLA(base_config(num_cameras), SMOLVLM2_500M_VIDEO_INSTRUCT).eval()


def make_inputs(model: SmolVLA, batch: int, height: int, width: int, lang_tokens: int = LANG_TOKENS) -> dict:
    """Random tensor-level inputs for one observation per batch row (normalized units), every camera the
    policy reads as a (B, 3, height, width) frame in [0, 1], all tokens real."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    vocab = model.text.embed_tokens.weight.shape[0]
    return {
        "images": [torch.rand(batch, 3, height, width, generator=g) for _ in cfg.camera_keys],
        "img_masks": [torch.ones(batch, dtype=torch.bool) for _ in cfg.camera_keys],
        "lang_tokens": torch.randint(0, vocab, (batch, lang_tokens), generator=g),
        "lang_masks": torch.ones(batch, lang_tokens, dtype=torch.bool),
        "state": torch.randn(batch, cfg.state_dim, generator=g),
        "noise": torch.randn(batch, cfg.chunk_size, cfg.max_action_dim, generator=g),
        "actions": torch.randn(batch, cfg.chunk_size, cfg.action_dim, generator=g),
    }


# ----------------------------------------------------------------------------------------------------
# FLOP count from the architecture (multiply-adds × 2; norms, softmax and other elementwise work left out).


def linear_flops(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def attention_flops(q_len: int, k_len: int, heads: int, head_dim: int) -> int:
    return 2 * 2 * q_len * k_len * heads * head_dim  # scores q·kᵀ, then probabilities · v


def chunk_flops(model: SmolVLA, height: int, width: int, lang_tokens: int = LANG_TOKENS) -> dict:
    """FLOPs of one chunk for one observation, by part: {"vision", "vlm_prefix", "expert_step", "expert",
    "total"}. Counts what the model computes: the vision tower per camera, the connector, the VLM over the
    prefix (the last layer only up to its keys/values), the cross-attention layers' k/v projections of the
    prefix (once per chunk), and per flow step the suffix embedding, the expert and the velocity projection."""
    cfg = model.config
    vision, text, factor, _ = parse_vlm_config(model.vlm_config)
    if cfg.resize_imgs_with_padding is not None:
        width, height = cfg.resize_imgs_with_padding
    patches = (height // vision.patch_size) * (width // vision.patch_size)
    d, mlp = vision.hidden_size, vision.intermediate_size
    per_layer = 4 * linear_flops(patches, d, d) + linear_flops(patches, d, mlp) + linear_flops(patches, mlp, d)
    per_layer += attention_flops(patches, patches, vision.num_heads, d // vision.num_heads)
    patch_embed = linear_flops(patches, vision.num_channels * vision.patch_size**2, d)
    image_tokens = patches // factor**2
    connector = linear_flops(image_tokens, d * factor**2, text.hidden_size)
    cameras = len(cfg.camera_keys) + cfg.empty_cameras
    vision_total = cameras * (patch_embed + vision.num_layers * per_layer + connector)

    # the prefix: 64 tokens per camera (+3 marker tokens each if configured), the words, the state token
    prefix = cameras * (image_tokens + 3 * cfg.add_image_special_tokens) + lang_tokens + 1
    prefix = max(prefix, cfg.prefix_length)
    w, heads, kv_heads, hd = text.hidden_size, text.num_heads, text.num_kv_heads, text.head_dim
    qkv = linear_flops(prefix, w, heads * hd) + 2 * linear_flops(prefix, w, kv_heads * hd)
    rest = attention_flops(prefix, prefix, heads, hd) + linear_flops(prefix, heads * hd, w)
    rest += 3 * linear_flops(prefix, w, text.intermediate_size)
    layers = len(model.text.layers)
    vlm_total = layers * qkv + (layers - 1) * rest  # the last layer's output is never used
    vlm_total += linear_flops(1, cfg.max_state_dim, w)  # the state token
    # expert: joint layers see prefix + suffix, cross layers the prefix through their own k/v projections
    expert = model.expert.layers[0]
    we, e_mlp = expert.self_attn.q_proj.in_features, expert.mlp.up_proj.out_features
    steps = cfg.chunk_size
    step_total = linear_flops(steps, cfg.max_action_dim, we) + linear_flops(steps, 2 * we, we)
    step_total += linear_flops(steps, we, we) + linear_flops(steps, we, cfg.max_action_dim)
    for j, cross in model.expert.plan:
        if j is None:
            continue
        step_total += 2 * linear_flops(steps, we, heads * hd) + 3 * linear_flops(steps, we, e_mlp)  # q, o, MLP
        if cross:
            vlm_total += 2 * linear_flops(prefix, kv_heads * hd, kv_heads * hd)  # once per chunk
            step_total += attention_flops(steps, prefix, heads, hd)
        else:
            step_total += 2 * linear_flops(steps, we, kv_heads * hd)
            step_total += attention_flops(steps, prefix + steps, heads, hd)
    expert_total = cfg.num_steps * step_total
    return {
        "vision": vision_total,
        "vlm_prefix": vlm_total,
        "expert_step": step_total,
        "expert": expert_total,
        "total": vision_total + vlm_total + expert_total,
    }


def train_step_flops(flops: dict, batch: int) -> int:
    """Approximate FLOPs of a training step (train_expert_only): the frozen vision tower and VLM forward
    (the VLM's backward covers only the state token, negligible); the expert forward, input and weight
    gradients (≈ 3× forward) for one flow time per sample."""
    return batch * (flops["vision"] + flops["vlm_prefix"] + 3 * flops["expert_step"])


# ----------------------------------------------------------------------------------------------------
# Timing.


def timed(fn, repeats: int, warmup: int) -> tuple[list, list]:
    """Run fn warmup + repeats times; wall and process CPU seconds of the timed runs."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def sample_chunk(model: SmolVLA, inputs: dict) -> torch.Tensor:
    """One chunk: VLM over the prefix once, then num_steps Euler steps of the expert."""
    return model.sample_actions(
        inputs["images"], inputs["img_masks"], inputs["lang_tokens"], inputs["lang_masks"], inputs["state"],
        noise=inputs["noise"],
    )


def time_guided_chunk(model: SmolVLA, inputs: dict, args) -> dict:
    """Real-Time Chunking (flow.py): the chunk guided toward a previous chunk's leftover (half a chunk, delay
    a tenth of it, the default horizon of 10 steps); with --rtc jacobian every flow step also runs a backward
    pass of the expert over the guided steps."""
    chunk = model.config.chunk_size
    leftover = torch.zeros(args.batch, chunk // 2, model.config.action_dim)
    run = lambda: model.sample_actions(  # noqa: E731
        inputs["images"], inputs["img_masks"], inputs["lang_tokens"], inputs["lang_masks"], inputs["state"],
        noise=inputs["noise"], leftover=leftover, inference_delay=chunk // 10, jacobian=args.rtc == "jacobian")
    wall, _ = timed(run, args.repeats, args.warmup)
    return {"rtc": args.rtc, "rtc_chunk_s": statistics.median(wall), "rtc_wall_s": wall}


def train_step(model: SmolVLA, optimizer, inputs: dict, autocast_dtype) -> float:
    """Forward, backward (gradients clipped as train.RECIPE says) and AdamW step of the flow-matching loss
    (mean over steps and action dims), as train.py does."""
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        losses = model.compute_loss(
            inputs["images"], inputs["img_masks"], inputs["lang_tokens"], inputs["lang_masks"], inputs["state"],
            inputs["actions"],
        )
    loss = losses[:, :, : model.config.action_dim].mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], RECIPE["grad_clip"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def stage_times(model: SmolVLA, inputs: dict, repeats: int) -> dict:
    """Median seconds of the stages of a chunk: all cameras through vision + connector, the whole prefix
    (vision included), one expert step (the velocity at one flow time)."""
    prepared, _ = model.prepare_images(inputs["images"], inputs["img_masks"])
    args = (inputs["images"], inputs["img_masks"], inputs["lang_tokens"], inputs["lang_masks"], inputs["state"])
    with torch.no_grad():
        ctx = model.encode_observation(*args)
        tau = torch.ones(inputs["noise"].shape[0])
        parts = {
            "vision_s": lambda: model.embed_images(prepared),
            "prefix_s": lambda: model.encode_observation(*args),
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
    """Run the reference timing command with our shape arguments; its last output line is a JSON object."""
    cmd = shlex.split(command) + [
        "--cameras", str(args.cameras), "--height", str(args.height), "--width", str(args.width),
        "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--threads", str(args.threads),
        "--batch", str(args.batch), "--json",
    ] + (["--train"] if args.train else [])
    print("reference:", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the reference command failed ({out.returncode}):\n{out.stderr[-3000:]}")
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"the reference command printed nothing; stderr:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------------
# The dataset reader, as training reads it.


def _cpu_seconds():
    """CPU time of this process and of its finished children (DataLoader workers, once shut down)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def data_benchmark(repo_or_dir, workers=2, batch_size=32, seconds=20.0, chunk_size=50, max_cache_gb=64.0):
    """Samples per second through a shuffled DataLoader, as training reads them.

    Also samples per CPU-second (main process and workers together), a figure that other programs
    running on the same machine disturb much less than the wall-clock rate.
    """
    start = time.perf_counter()
    dataset = LeRobotDataset(repo_or_dir, chunk_size=chunk_size, max_cache_gb=max_cache_gb)
    opened = time.perf_counter() - start
    mode = "pre-decoded cache" if dataset._cached else "on-the-fly decoding"
    print(f"{repo_or_dir}: {len(dataset)} samples, cameras {dataset.camera_keys}, opened in {opened:.1f} s ({mode})")
    if len(dataset) < 2 * batch_size:
        raise ValueError(f"the benchmark needs at least two batches: {len(dataset)} samples < 2 x batch size {batch_size}.")
    cpu_start = _cpu_seconds()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0, drop_last=True)
    samples, timed_from = 0, None
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
    print(f"{rate:.1f} samples/s, {per_cpu_second:.1f} samples per CPU-second  ({samples} samples, {workers} workers, "
          f"batch {batch_size}, chunk {chunk_size})")
    return rate


# ----------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--checkpoint", help="a SmolVLA checkpoint directory (default: smolvla_base, random weights)")
    ap.add_argument("--vlm", help="the VLM description directory for --checkpoint (default: <checkpoint>/vlm)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                    help="inference: weights and activations; --train: bf16 = autocast, fp32 = none")
    ap.add_argument("--cameras", type=int, default=2, help="cameras (with --checkpoint: its first N)")
    ap.add_argument("--height", type=int, default=480, help="camera frame height before resize-with-pad")
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--steps", type=int, default=10, help="flow (Euler) steps per chunk")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first (allocator, oneDNN kernels)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--train", action="store_true", help="time a training step instead of a chunk")
    ap.add_argument("--rtc", choices=("jacobian", "identity"), help="also time a chunk with RTC guidance (flow.py)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 1; --train: 2; --data: 32)")
    ap.add_argument("--no-pack", action="store_true", help="plain nn.Linear layers (see speed.pack_linear_layers)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the vision tower and the expert's step")
    ap.add_argument("--profile", action="store_true", help="print stage timings and the top operators")
    ap.add_argument("--reference", metavar="CMD", help="a command timing the reference on the same shapes first")
    ap.add_argument("--json", action="store_true", help="print the results as a JSON object on the last line")
    data = ap.add_argument_group("the dataset reader (--data) and synthetic datasets (--write-dataset)")
    data.add_argument("--data", metavar="REPO_OR_DIR", help="samples/s of a shuffled DataLoader over this dataset")
    data.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    data.add_argument("--seconds", type=float, default=20.0, help="how long to read")
    data.add_argument("--chunk-size", type=int, default=50, help="actions per sample")
    data.add_argument("--max-cache-gb", type=float, default=64.0, help="frame cache budget; 0 decodes on the fly")
    data.add_argument("--write-dataset", metavar="DIR", help="write a synthetic LeRobot dataset (--cameras of "
                      "--height x --width) to measure on")
    data.add_argument("--episodes", type=int, default=20, help="episodes of the synthetic dataset")
    data.add_argument("--frames", type=int, default=300, help="frames per synthetic episode")
    data.add_argument("--codec", default="libsvtav1", choices=sorted(CODECS))
    data.add_argument("--version", default="v3.0", choices=SUPPORTED_VERSIONS)
    args = ap.parse_args(argv)
    if args.batch is None:
        args.batch = 2 if args.train else 32 if args.data else 1
    for name in ("cameras", "height", "width", "steps", "repeats", "threads", "batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        ap.error("--warmup must be 0 or more")
    if args.vlm and not args.checkpoint:
        ap.error("--vlm goes with --checkpoint (the random model has SmolVLM2-500M's architecture built in)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.write_dataset or args.data:
        return dataset_main(args)
    torch.set_num_threads(args.threads)
    pack = not (args.no_pack or args.compile)  # compiled: inductor packs the weights itself ("freezing")
    result = {"threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
              "dtype": args.dtype, "batch": args.batch,
              "mode": "train" if args.train else "chunk", "packed": pack, "compiled": args.compile}
    if args.reference:
        reference = run_reference(args.reference, args)
        result["reference"] = reference

    model = build_model(args.checkpoint, args.vlm, args.cameras)
    model.config.num_steps = args.steps
    inputs = make_inputs(model, args.batch, args.height, args.width)
    flops = chunk_flops(model, args.height, args.width)
    cameras = len(model.config.camera_keys)
    print(f"bench: {'random smolvla_base' if args.checkpoint is None else args.checkpoint}, {cameras} cameras "
          f"{args.height}x{args.width}, batch {args.batch}, {args.steps} flow steps, {args.dtype}, "
          f"{torch.get_num_threads()} threads; FLOPs per chunk and observation: "
          + ", ".join(f"{k} {v / 1e9:.1f} G" for k, v in flops.items()), flush=True)

    result["load_before"] = os.getloadavg()[0]
    if args.train:
        model.train()
        trained = [p for p in model.parameters() if p.requires_grad]
        # the optimizer of train.py's recipe (fused: one kernel per parameter updates it and both moments)
        optimizer = torch.optim.AdamW(trained, lr=RECIPE["lr"], betas=RECIPE["betas"], eps=RECIPE["eps"],
                                      weight_decay=RECIPE["weight_decay"], fused=True)
        autocast = DTYPES[args.dtype] if args.dtype != "fp32" else None
        # the frozen parts (train_expert_only: vision, connector, text model) never change: under autocast keep
        # them in bf16, as lerobot keeps smolvla_base's VLM, so that autocast neither re-casts their weights nor
        # converts activations back and forth (the trained parts keep float32 master weights)
        for part in model.children():
            if autocast is not None and not any(p.requires_grad for p in part.parameters()):
                part.to(autocast)
        speed.prepare(model, training=True, pack=pack, compile=args.compile)
        run = lambda: train_step(model, optimizer, inputs, autocast)  # noqa: E731
        wall, cpu = timed(run, args.repeats, args.warmup)
        result["train_step_s"] = statistics.median(wall)
        result["train_gflops"] = train_step_flops(flops, args.batch) / result["train_step_s"] / 1e9
        result["trained_params"] = sum(p.numel() for p in trained)
    else:
        model.to(DTYPES[args.dtype])
        speed.prepare(model, pack=pack, compile=args.compile)
        run = lambda: sample_chunk(model, inputs)  # noqa: E731
        wall, cpu = timed(run, args.repeats, args.warmup)
        result["chunk_s"] = statistics.median(wall)
        result["gflops"] = args.batch * flops["total"] / result["chunk_s"] / 1e9
        result["gflop_per_chunk"] = flops["total"] / 1e9
        if args.rtc:
            result.update(time_guided_chunk(model, inputs, args))
            result["rtc_vs_plain"] = result["rtc_chunk_s"] / result["chunk_s"]
            print(f"bench: RTC-guided chunk ({args.rtc}) {result['rtc_chunk_s']:.3f} s = {result['rtc_vs_plain']:.2f}x")
        if args.profile:
            result.update(stage_times(model, inputs, args.repeats))
    if args.profile:
        profile_run(run)
    result["wall_s"] = wall
    result["cpu_s"] = cpu
    result["load_after"] = os.getloadavg()[0]

    key = "train_step_s" if args.train else "chunk_s"
    summary = f"{key} {result[key]:.3f} s (median of {args.repeats}; all {', '.join(f'{t:.3f}' for t in wall)}), " + (
        f"{result['train_gflops' if args.train else 'gflops']:.0f} GFLOP/s, load average {result['load_after']:.1f}"
    )
    if args.reference and key in result.get("reference", {}):
        result["vs_reference"] = result[key] / result["reference"][key]
        summary += f"; reference {result['reference'][key]:.3f} s -> {result['vs_reference']:.2f}x"
    print(f"bench: {summary}", flush=True)
    if args.json:
        print(json.dumps(result))
    return result


def dataset_main(args) -> dict:
    """--write-dataset and/or --data: write a synthetic dataset, then measure the reader."""
    result = {}
    if args.write_dataset:
        names = tuple(f"camera{i + 1}" for i in range(args.cameras))
        start = time.perf_counter()
        episodes = synthetic_episodes(args.episodes, args.frames, args.height, args.width, names)
        write_lerobot_dataset(args.write_dataset, episodes, codec=args.codec, version=args.version)
        print(f"wrote {args.write_dataset} in {time.perf_counter() - start:.1f} s")
    if args.data:
        result["samples_per_s"] = data_benchmark(args.data, args.workers, args.batch, args.seconds, args.chunk_size,
                                                 args.max_cache_gb)
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        sys.exit(1)
