"""Training SmolVLA: fine-tune a checkpoint, train from the VLM's weights, on one or many GPUs; plus a demo.

The paper's recipe (SmolVLA §4.2, and lerobot's defaults for smolvla): the VLM is frozen and only the
action expert and the small projections around it (state, action in/out, action-time MLP) learn, with
AdamW (betas 0.9/0.95, eps 1e-8, weight decay 1e-10), gradients clipped to norm 10, and a learning rate
that warms up linearly for 1,000 steps and then follows a cosine down to 2.5e-6 over 30,000 steps. The
loss is flow matching (§3.2, flow.py) on chunks of actions normalized with the dataset's mean/std; steps
of a chunk that run past the end of an episode are masked out.

    python train.py --repo lerobot/svla_so100_stacking --rename top=camera1,wrist=camera2
    python train.py --repo lerobot/svla_so100_stacking --from-scratch        # fresh expert on SmolVLM2
    torchrun --nproc_per_node=4 train.py --repo ...                           # data-parallel, 4 GPUs
    python train.py --demo                                                   # offline toy run, CPU, minutes

Multi-GPU: `torchrun` starts one process per GPU and tells each its RANK and WORLD_SIZE. Every process
holds a full copy of the model, reads its own shard of every epoch (DistributedSampler) and computes
gradients on it; DistributedDataParallel averages the gradients across processes during backward, so
every copy takes the same optimizer step and the weights stay identical. Only rank 0 writes files.

`--demo` runs the whole loop offline in a few minutes on a CPU: it records demonstrations in the toy world
of sim.py (reach a target that only the camera sees) as a LeRobot dataset, trains a tiny SmolVLA on it
from scratch, then drives the simulated arm with the trained policy twice — once with the real camera
images and once with images from other episodes' scenes. A policy that reads its images succeeds in the
first case and fails in the second.
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from data import IMAGE_PREFIX, LeRobotDataset, write_lerobot_dataset
from smolvla import SmolVLA, SmolVLAConfig, read_json

DEFAULT_POLICY = "lerobot/smolvla_base"
DEFAULT_VLM = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"


# ----------------------------------------------------------------------------------------------------
# Learning-rate schedule: linear warmup, then cosine decay (the reference's "cosine_decay_with_warmup")
# ----------------------------------------------------------------------------------------------------

def learning_rate(step, peak_lr, final_lr, warmup_steps, decay_steps):
    """The learning rate of optimizer step `step` (0 = the first update).

    Warmup climbs linearly from peak_lr / (warmup_steps + 1) at step 0 to peak_lr at step warmup_steps.
    The cosine then runs, as in the reference, on the absolute step (not on the steps since the warmup
    ended) from step 0 to decay_steps, and stays at final_lr afterwards.
    """
    if step < warmup_steps:
        start = peak_lr / (warmup_steps + 1)
        return start + (peak_lr - start) * step / warmup_steps
    progress = min(step, decay_steps) / decay_steps
    return final_lr + (peak_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def fit_schedule(warmup_steps, decay_steps, total_steps):
    """Shrink the schedule to a shorter run, as the reference does: warmup scaled by total/decay, and the
    cosine ends at the last step. Returns (warmup_steps, decay_steps)."""
    if total_steps < decay_steps:
        return int(warmup_steps * total_steps / decay_steps), total_steps
    return warmup_steps, decay_steps


def make_scheduler(optimizer, peak_lr, final_lr, warmup_steps, decay_steps):
    """A LambdaLR whose multiplier turns the optimizer's peak lr into learning_rate(step, ...)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate(step, peak_lr, final_lr, warmup_steps, decay_steps) / peak_lr)


# ----------------------------------------------------------------------------------------------------
# Processes: one, or one per GPU under torchrun
# ----------------------------------------------------------------------------------------------------

@dataclass
class Processes:
    rank: int  # this process's number, 0..world_size-1; rank 0 logs and writes files
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def start_processes(device_name):
    """Join torchrun's process group if we were started by it (WORLD_SIZE > 1), and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_name is None:
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if device.type == "cuda" and world_size > 1:
        # one GPU per process: the local rank says which one on this machine
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1:
        # NCCL moves gradients between GPUs; gloo does the same over CPU memory (and in the tests).
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(rank, world_size, device)


def check_ranks_agree(model, processes):
    """Under DDP, verify that every process holds the same trainable weights (they must after any step)."""
    params = [p.detach().double() for p in model.parameters() if p.requires_grad]
    # a cheap fingerprint of the weights: per tensor its sum and its sum of squares, (n_tensors, 2)
    fingerprint = torch.stack([torch.stack([p.sum(), (p * p).sum()]) for p in params])
    gathered = [torch.zeros_like(fingerprint) for _ in range(processes.world_size)]
    dist.all_gather(gathered, fingerprint)
    if any(not torch.equal(gathered[0], g) for g in gathered[1:]):
        raise RuntimeError("DDP processes disagree on the weights: the gradients were not synchronized.")
    return True


# ----------------------------------------------------------------------------------------------------
# Inputs: dataset and policy, checked against each other before anything trains
# ----------------------------------------------------------------------------------------------------

def parse_rename(text):
    """'top=camera1,wrist=camera2' -> {"top": "camera1", "wrist": "camera2"}."""
    if not text:
        return {}
    pairs = [item.split("=") for item in text.split(",") if item.strip()]
    if any(len(pair) != 2 or not pair[0].strip() or not pair[1].strip() for pair in pairs):
        raise ValueError(f"--rename {text!r}: expected comma-separated old=new camera names, e.g. top=camera1,wrist=camera2.")
    return {old.strip(): new.strip() for old, new in pairs}


def check_output(output, resume):
    """Make sure we may write `output` (without creating anything yet) and never train over an earlier run."""
    existing = os.path.abspath(output)
    while not os.path.exists(existing):  # the deepest part of the path that exists must be a writable dir
        existing = os.path.dirname(existing)
    try:  # the sure test of "writable" (permission bits say yes to root on read-only or virtual file systems)
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError:
        raise PermissionError(f"cannot write to the output directory {output!r} ({existing} is not a writable "
                              "directory); choose another with --output.") from None
    if not resume and os.path.isdir(os.path.join(output, "checkpoints")):
        raise FileExistsError(f"{output!r} already holds a training run; continue it with --resume, "
                              "or choose a new --output.")


def check_dataset_fits_policy(config, dataset, rename):
    """One clear error if the dataset cannot train this policy: cameras named differently, or state/action
    dims that differ. Policy cameras the dataset does not have at all (smolvla_base reads three, most
    datasets have two) are dropped from the policy's inputs, as the reference does silently; we say so."""
    short = lambda key: key[len(IMAGE_PREFIX):]
    # the dataset's own camera names (before --rename), for the hint
    original = {new: old for old, new in rename.items()}
    dataset_name = lambda key: original.get(short(key), short(key))
    policy_cameras = config.camera_keys
    missing = [key for key in policy_cameras if key not in dataset.camera_keys]
    unused = [key for key in dataset.camera_keys if key not in policy_cameras]
    if unused and (missing or not policy_cameras):
        pairs = [(dataset_name(old), short(new)) for old, new in zip(unused, missing)]
        hint = ",".join(f"{old}={new}" for old, new in pairs if old != new)
        renamed = f" (called {[short(k) for k in dataset.camera_keys]} after --rename)" if rename else ""
        raise ValueError(f"the dataset's cameras {[dataset_name(k) for k in dataset.camera_keys]}{renamed} are not "
                         f"the policy's {[short(k) for k in policy_cameras]}: map them with --rename"
                         + (f", e.g. --rename {hint}" if hint else ""))
    for key, kind in (("observation.state", "input_features"), ("action", "output_features")):
        wanted = int(getattr(config, kind)[key]["shape"][0])
        found = int(dataset.stats[key]["mean"].shape[0])
        if wanted != found:
            raise ValueError(f"the dataset's {key} has {found} dims but the policy's has {wanted}; fine-tuning "
                             "needs the same robot (or start a new policy with --from-scratch).")
    if missing:
        print(f"note: the dataset has no {[short(k) for k in missing]} camera(s); the policy is trained without "
              "them (they are removed from its input features).")
        for key in missing:
            del config.input_features[key]
    if unused:
        print(f"note: the policy does not read the dataset's {[dataset_name(k) for k in unused]} camera(s).")


def check_batch_size(samples, batch_size, world_size):
    """Every process needs at least one full batch per epoch."""
    if samples // world_size < batch_size:
        raise ValueError(f"the dataset has {samples} samples, fewer than one batch of {batch_size} per process "
                         f"({world_size} process{'es' if world_size > 1 else ''}): lower --batch-size.")


def features_from_dataset(dataset):
    """lerobot-style input/output feature dicts describing a dataset (for a policy trained from scratch)."""
    sample = dataset[0]
    inputs = {"observation.state": {"type": "STATE", "shape": list(sample["observation.state"].shape)}}
    for key in dataset.camera_keys:
        inputs[key] = {"type": "VISUAL", "shape": list(sample[key].shape)}
    outputs = {"action": {"type": "ACTION", "shape": [sample["action"].shape[-1]]}}
    return inputs, outputs


def load_policy(args, dataset):
    """The policy to train: a checkpoint to fine-tune, or a fresh expert on the SmolVLM2 weights."""
    if args.from_scratch:
        config = SmolVLAConfig()
        config.input_features, config.output_features = features_from_dataset(dataset)
        return SmolVLA.from_vlm(args.vlm or DEFAULT_VLM, config)
    return SmolVLA.from_pretrained(args.policy, vlm=args.vlm)


def choose_trainable(policy, train_vlm):
    """Freeze what the recipe freezes (the config says it: freeze_vision_encoder, train_expert_only) and
    return the parameters that learn: by default the expert and the projections (99.9M of 450M)."""
    policy.config.train_expert_only = not train_vlm
    policy.set_requires_grad()
    return [p for p in policy.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------------
# Checkpoints: <output>/checkpoints/<step>/{pretrained_model, training_state.pt}, written atomically
# ----------------------------------------------------------------------------------------------------

def save_checkpoint(output, step, policy, optimizer, scheduler, history, options):
    """Write the policy (SmolVLA.from_pretrained / lerobot format) and what --resume needs, then point
    `checkpoints/last` at it. Everything goes to a temporary directory first and is renamed into place,
    so a run killed mid-save never leaves a half-written checkpoint behind."""
    checkpoints = os.path.join(output, "checkpoints")
    final = os.path.join(checkpoints, f"{step:06d}")
    os.makedirs(checkpoints, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=f".{step:06d}-", dir=checkpoints)
    policy.save_pretrained(os.path.join(temporary, "pretrained_model"))
    torch.save({"step": step, "options": options, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "history": history},
               os.path.join(temporary, "training_state.pt"))
    if os.path.isdir(final):  # the same step saved again (a resumed run): replace it
        shutil.rmtree(final)
    os.replace(temporary, final)
    link = os.path.join(checkpoints, f".last-{os.getpid()}")
    os.symlink(f"{step:06d}", link)
    os.replace(link, os.path.join(checkpoints, "last"))
    plot_losses(history, os.path.join(output, "loss.png"))
    return final


def find_checkpoint(path):
    """--resume accepts a run's output dir (continue from its last checkpoint) or one checkpoint dir."""
    for candidate in (os.path.join(path, "checkpoints", "last"), path):
        if os.path.isfile(os.path.join(candidate, "training_state.pt")):
            return os.path.realpath(candidate)
    raise FileNotFoundError(f"--resume {path!r}: no checkpoint there (expected {path}/checkpoints/last/"
                            "training_state.pt or <checkpoint>/training_state.pt).")


def plot_losses(history, path):
    """The loss curve (per step, and a running mean) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    steps = np.array([h["step"] for h in history])
    losses = np.array([h["loss"] for h in history])
    window = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(steps, losses, alpha=0.3, label="loss")
    axis.plot(steps[window - 1:], smooth, label=f"mean of {window}")
    axis.set(xlabel="step", ylabel="flow-matching loss", yscale="log", title="SmolVLA training")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------

class TrainingLoss(nn.Module):
    """DDP synchronizes gradients of what runs through a module's forward(): route the policy's loss there."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, batch):
        return self.policy.training_loss(batch)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def batches(dataset, batch_size, processes, seed, num_workers, start_step):
    """Endless batches; epoch e is a permutation drawn from (seed, e) and split across processes.

    Everything that decides the order is a function of (seed, epoch), so a resumed run skips exactly the
    batches the first run consumed and then sees the same ones it would have.
    """
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=processes.world_size,
                                                  rank=processes.rank, shuffle=True, seed=seed, drop_last=True)
    per_epoch = len(sampler) // batch_size
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        indices = list(sampler)[skip * batch_size:]
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=indices, num_workers=num_workers, drop_last=True,
            pin_memory=processes.device.type == "cuda", persistent_workers=False,
            generator=torch.Generator().manual_seed(seed + epoch))
        yield from loader
        epoch, skip = epoch + 1, 0


def use_autocast(device):
    """bf16 autocast by default on GPUs that support it. On a CPU it is opt-in (--bf16): whether it pays
    depends on the CPU and the sizes (the demo's tiny model: 0.23 s per step with it, 0.14 s without)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def train(policy, dataset, args, processes, start=None):
    """Run the optimization; returns the history [{"step", "loss", "lr"}]. `start`: a loaded training state."""
    device = processes.device
    policy.to(device)
    trainable = choose_trainable(policy, args.train_vlm)
    policy.train()
    model = TrainingLoss(policy)
    if processes.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    # fused: one kernel updates each tensor and both its moments (instead of a dozen elementwise passes)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-10, fused=True)
    warmup, decay = fit_schedule(args.warmup_steps, args.decay_steps, args.steps)
    scheduler = make_scheduler(optimizer, args.lr, args.decay_lr, warmup, decay)
    step, history = 0, []
    if start is not None:
        optimizer.load_state_dict(start["optimizer"])
        scheduler.load_state_dict(start["scheduler"])
        step, history = start["step"], start["history"]
    autocast = use_autocast(device) if args.bf16 is None else args.bf16
    data = batches(dataset, args.batch_size, processes, args.seed, args.num_workers, step)
    samples_per_step = args.batch_size * processes.world_size
    if processes.is_main:
        count = sum(p.numel() for p in trainable)
        print(f"training {count:,} of {sum(p.numel() for p in policy.parameters()):,} parameters on "
              f"{processes.world_size} x {device} (bf16 autocast: {'on' if autocast else 'off'}), "
              f"{len(dataset):,} samples, steps {step} -> {args.steps}")
    bar = tqdm(total=args.steps, initial=step, disable=not processes.is_main, dynamic_ncols=True)
    tick, tick_step, loss_sum, loss_count = time.perf_counter(), step, 0.0, 0
    while step < args.steps:
        batch = to_device(next(data), device)
        # The flow-matching noise and time of step k depend only on (seed, k, rank): a resumed run
        # draws exactly what the first run would have drawn, without storing random-generator states.
        torch.manual_seed(args.seed * 1_000_003 + step * processes.world_size + processes.rank)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        step += 1
        # log the loss averaged over all processes (what the update used)
        value = loss.detach().float()
        if processes.distributed:
            dist.all_reduce(value)
            value /= processes.world_size
        history.append({"step": step, "loss": value.item(), "lr": lr})
        loss_sum, loss_count = loss_sum + history[-1]["loss"], loss_count + 1
        bar.update(1)
        if step % args.log_every == 0 or step == args.steps:
            now = time.perf_counter()
            rate = (step - tick_step) * samples_per_step / max(now - tick, 1e-9)
            bar.set_postfix(loss=f"{loss_sum / loss_count:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.0f}")
            tick, tick_step, loss_sum, loss_count = now, step, 0.0, 0
        if (args.save_every and step % args.save_every == 0) or step == args.steps:
            if processes.distributed:
                check_ranks_agree(policy, processes)
            if processes.is_main:
                save_checkpoint(args.output, step, policy, optimizer, scheduler, history,
                                {name: getattr(args, name) for name in RUN_OPTIONS})
    bar.close()
    if processes.distributed and check_ranks_agree(policy, processes) and processes.is_main:
        print(f"all {processes.world_size} processes hold identical weights after step {step}")
    return history


# ----------------------------------------------------------------------------------------------------
# The offline demo: toy data from sim.py, a tiny SmolVLA from scratch, closed-loop evaluation
# ----------------------------------------------------------------------------------------------------

DEMO_TASK = "reach the red target"
DEMO_FPS = 10
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
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
        pre_tokenizers.Split(Regex(" +"), behavior="removed"),
    ])
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
    config.tokenizer_max_length = 8
    config.num_vlm_layers = args.demo_vlm_layers
    config.attention_mode, config.self_attn_every_n_layers = ATTENTION[args.demo_attention]
    config.freeze_vision_encoder, config.train_expert_only = False, False
    return config


def record_demonstrations(root, episodes, length, seed):
    """Run the scripted expert of sim.py and store what it saw and did as a LeRobot v3.0 dataset."""
    from sim import ReachScene, expert_episode

    scene, rng = ReachScene(seed=seed), np.random.default_rng(seed)
    recorded = []
    for _ in tqdm(range(episodes), desc="recording demonstrations"):
        episode = expert_episode(scene, rng, length)
        episode["task"] = DEMO_TASK
        recorded.append(episode)
    return write_lerobot_dataset(root, recorded, fps=DEMO_FPS)


@torch.no_grad()
def evaluate_in_sim(policy, episodes, length, seed, shuffle_images=False):
    """Closed-loop success rate of `policy` in sim.py's world, and its median seconds per chunk.

    Each episode: a new target, the arm near its home pose; every n_action_steps the policy sees the state
    and the camera image and returns a chunk, of which the first n_action_steps actions are executed.
    shuffle_images: the camera shows episode e+1's target instead of episode e's (the arm itself is drawn
    where it really is), so a policy that truly reads the image reaches for the wrong spot.
    """
    from sim import HOME_DEG, ReachScene, step_arm

    scene, rng = ReachScene(seed=seed), np.random.default_rng(seed)
    targets = [scene.reset(rng).copy() for _ in range(episodes)]
    camera = policy.config.camera_keys[0]
    steps_per_chunk = policy.config.n_action_steps
    successes, latencies = 0, []
    for e in range(episodes):
        scene.target = targets[e]
        shown = targets[(e + 1) % episodes] if shuffle_images else targets[e]
        joints = (HOME_DEG + rng.uniform(-5.0, 5.0, size=6)).astype(np.float32)
        queue = []
        for _ in range(length):
            if not queue:
                image = torch.from_numpy(scene.render(joints, target=shown)).permute(2, 0, 1).float() / 255.0
                observation = {"observation.state": torch.from_numpy(joints), camera: image, "task": DEMO_TASK}
                tick = time.perf_counter()
                queue = list(policy.predict_chunk(observation)[0, :steps_per_chunk].float().cpu().numpy())
                latencies.append(time.perf_counter() - tick)
            joints = step_arm(joints, queue.pop(0))
        successes += scene.success(joints)
    return successes / episodes, float(np.median(latencies))


def run_demo(args, processes):
    """Record -> train from scratch -> save -> reload -> evaluate twice -> eval.json (in args.output)."""
    started = time.perf_counter()
    # The demo's matrices are tiny: a second CPU thread gains little, and on a busy machine threads that
    # wait for each other cost a lot (measured on 2 shared cores: 0.3 s per step with 1 thread, 2.3 s with 2).
    torch.set_num_threads(1)
    dataset_root = record_demonstrations(os.path.join(args.output, "dataset"), args.demo_episodes,
                                         args.demo_length, seed=args.seed)
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
    x, seconds_per_chunk = evaluate_in_sim(policy, args.demo_eval_episodes, args.demo_length, seed=args.seed + 1)
    y, _ = evaluate_in_sim(policy, args.demo_eval_episodes, args.demo_length, seed=args.seed + 1, shuffle_images=True)
    result = {"success_rate": x, "success_rate_shuffled_images": y, "episodes": args.demo_eval_episodes,
              "uses_images": x >= 0.8 and y <= x / 2, "inference_ms_per_chunk": round(1000 * seconds_per_chunk, 1),
              "train_samples_per_s": round(args.steps * args.batch_size / training_time, 1),
              "train_steps": args.steps, "train_episodes": args.demo_episodes, "episode_length": args.demo_length,
              "chunk_size": config.chunk_size, "n_action_steps": config.n_action_steps,
              "vlm_layers": config.num_vlm_layers, "attention": args.demo_attention, "checkpoint": checkpoint,
              "wall_time_s": round(time.perf_counter() - started, 1)}
    with open(os.path.join(args.output, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    print(f"\ncheckpoint: {checkpoint}\nrun it on the virtual arm:\n"
          f"  python infer_async.py --port sim --policy {checkpoint} --task \"{DEMO_TASK}\"")
    return result


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

# The paper's fine-tuning recipe, and the demo's (a tiny model from scratch: higher lr, short schedule).
# Command-line values win; a resumed run takes the values it was started with.
RECIPE = {"steps": 20_000, "batch_size": 64, "lr": 1e-4, "decay_lr": 2.5e-6, "warmup_steps": 1_000,
          "decay_steps": 30_000, "grad_clip": 10.0, "num_workers": 4, "save_every": 5_000, "log_every": 100,
          "seed": 1000}
DEMO = {**RECIPE, "steps": 1_500, "batch_size": 64, "lr": 1e-3, "decay_lr": 1e-5, "warmup_steps": 100,
        "decay_steps": None, "num_workers": 0, "save_every": 0, "log_every": 25}  # decay_steps None: = steps
RUN_OPTIONS = list(RECIPE) + ["repo", "rename", "train_vlm", "bf16"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", help="LeRobot dataset: hub id (owner/name) or local directory")
    parser.add_argument("--policy", default=DEFAULT_POLICY, help=f"checkpoint to fine-tune, hub id or directory ({DEFAULT_POLICY})")
    parser.add_argument("--from-scratch", action="store_true",
                        help="start from the SmolVLM2 weights (--vlm) with a freshly initialized action expert")
    parser.add_argument("--vlm", default=None,
                        help=f"VLM config/weights/tokenizer, dir or hub id (from scratch: {DEFAULT_VLM}; "
                             "fine-tuning: the checkpoint's own)")
    parser.add_argument("--steps", type=int, help=f"optimizer steps ({RECIPE['steps']})")
    parser.add_argument("--batch-size", type=int, help=f"samples per step and process ({RECIPE['batch_size']})")
    parser.add_argument("--lr", type=float, help=f"peak learning rate ({RECIPE['lr']})")
    parser.add_argument("--decay-lr", type=float, help=f"learning rate at the end of the cosine ({RECIPE['decay_lr']})")
    parser.add_argument("--warmup-steps", type=int, help=f"linear warmup ({RECIPE['warmup_steps']})")
    parser.add_argument("--decay-steps", type=int, help=f"cosine length ({RECIPE['decay_steps']}; shrunk to --steps if longer)")
    parser.add_argument("--grad-clip", type=float, help=f"max gradient norm ({RECIPE['grad_clip']})")
    parser.add_argument("--train-vlm", action="store_true", default=None,
                        help="also train the VLM (text layers and connector)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on GPUs that support it)")
    parser.add_argument("--output", help="run directory (default outputs/train/<date>_<dataset>)")
    parser.add_argument("--resume", help="continue a run: its output dir or one of its checkpoint dirs")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--num-workers", type=int, help=f"DataLoader worker processes ({RECIPE['num_workers']})")
    parser.add_argument("--rename", help="camera renames dataset=policy, e.g. top=camera1,wrist=camera2")
    parser.add_argument("--save-every", type=int, help=f"checkpoint period in steps, 0: only at the end ({RECIPE['save_every']})")
    parser.add_argument("--log-every", type=int, help=f"progress-bar refresh period ({RECIPE['log_every']})")
    parser.add_argument("--seed", type=int, help=f"data order and noise ({RECIPE['seed']})")
    parser.add_argument("--demo", action="store_true", help="the offline toy run (sim.py): CPU, a few minutes")
    parser.add_argument("--demo-episodes", type=int, default=160, help="demonstrations the demo records")
    parser.add_argument("--demo-length", type=int, default=20, help="steps per demo episode")
    parser.add_argument("--demo-eval-episodes", type=int, default=50, help="episodes per demo evaluation")
    parser.add_argument("--demo-chunk-size", type=int, default=10, help="actions per chunk (demo policy)")
    parser.add_argument("--demo-action-steps", type=int, default=5, help="actions executed per chunk, open loop")
    parser.add_argument("--demo-vlm-layers", type=int, default=4, help="VLM layers kept, of the tiny VLM's 8")
    parser.add_argument("--demo-attention", choices=sorted(ATTENTION), default="interleaved",
                        help="expert-VLM attention: interleaved cross/self (SmolVLA), cross only, self only")
    args = parser.parse_args(argv)
    if not (args.demo or args.repo or args.resume):
        parser.error("give a dataset with --repo (or --resume a run, or run --demo)")
    return args


def fill_options(args, saved=None):
    """Options not given on the command line: from the resumed run, else from the recipe (or the demo's)."""
    defaults = DEMO if args.demo else RECIPE
    for name in RUN_OPTIONS:
        if getattr(args, name) is None and saved is not None and name in saved:
            setattr(args, name, saved[name])
        if getattr(args, name) is None and name in defaults:
            setattr(args, name, defaults[name])
    if args.decay_steps is None:
        args.decay_steps = args.steps


def prepare(args, processes):
    """Everything that can fail on bad input, done before training: output, dataset, policy, their fit."""
    start = None
    if args.resume:
        checkpoint = find_checkpoint(args.resume)
        start = torch.load(os.path.join(checkpoint, "training_state.pt"), weights_only=True)
        args.output = args.output or os.path.dirname(os.path.dirname(checkpoint))
        args.policy, args.from_scratch = os.path.join(checkpoint, "pretrained_model"), False
    fill_options(args, start["options"] if start else None)
    if args.output is None:
        name = os.path.basename(os.path.normpath(args.repo))
        args.output = os.path.join("outputs", "train", f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{name}")
    if processes.is_main:
        check_output(args.output, args.resume)
    rename = parse_rename(args.rename)
    dataset = LeRobotDataset(args.repo, rename=rename)
    check_batch_size(len(dataset), args.batch_size, processes.world_size)
    torch.manual_seed(args.seed)  # a fresh expert's initialization (--from-scratch)
    policy = load_policy(args, dataset)
    check_dataset_fits_policy(policy.config, dataset, rename)
    dataset.chunk_size = policy.config.chunk_size
    # the policy learns in units normalized by this dataset's statistics (and saves them with itself)
    policy.set_normalization(dataset.stats)
    return dataset, policy, start


def prepare_demo(args, processes):
    """The demo's checks: one process, a new (or empty) output directory, enough samples for one batch."""
    if processes.distributed:
        raise ValueError("--demo runs in one process; run torchrun on the demo's dataset with --repo.")
    fill_options(args)
    args.output = args.output or os.path.join("outputs", f"demo_{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    check_output(args.output, resume=False)
    if os.path.isdir(args.output) and os.listdir(args.output):
        raise FileExistsError(f"{args.output!r} is not empty; the demo writes a new run: choose another --output.")
    check_batch_size(args.demo_episodes * args.demo_length, args.batch_size, 1)


def main(argv=None):
    args = parse_args(argv)
    processes = start_processes(args.device)
    try:
        if args.demo:
            prepare_demo(args, processes)
        else:
            dataset, policy, start = prepare(args, processes)
    except (FileNotFoundError, FileExistsError, PermissionError, ValueError) as error:
        sys.exit(f"train.py: error: {error}")
    if args.demo:
        run_demo(args, processes)
    else:
        train(policy, dataset, args, processes, start)
        if processes.is_main:
            print(f"checkpoint: {os.path.join(args.output, 'checkpoints', 'last', 'pretrained_model')}")
    if processes.distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
