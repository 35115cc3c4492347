"""Training SmolVLA: the paper's recipe, in one process or one per GPU, with checkpoints that resume exactly.

The recipe (SmolVLA §4.2, arXiv:2506.01844, and lerobot's defaults for smolvla; every number is in RECIPE
below): the VLM is frozen and only the action expert and the small projections around it (state, action
in/out, action-time MLP) learn, with AdamW, gradients clipped by their norm, and a learning rate that warms
up linearly and then follows a cosine down to a floor. The loss is flow matching (§3.2, flow.py) on chunks
of actions normalized with the dataset's mean/std; the steps of a chunk that run past the end of its
episode (data.py flags them in `action_is_pad`) are masked out of the loss.

    python train.py --repo lerobot/svla_so100_stacking --rename top=camera1,wrist=camera2
    python train.py --repo lerobot/svla_so100_stacking --from-scratch        # fresh expert on SmolVLM2
    python train.py --resume outputs/train/latest --steps 30000              # continue where it stopped
    torchrun --nproc_per_node=4 train.py --repo ...                           # data-parallel, 4 GPUs

One process, or several: `torchrun` starts one process per GPU and tells each its RANK and WORLD_SIZE.
Every process holds a full copy of the model, reads its own shard of every epoch (DistributedSampler) and
computes gradients on it; DistributedDataParallel averages the gradients across processes during
backward, so every copy takes the same optimizer step and the weights stay identical. Only rank 0 writes.

Checkpoints are written to a temporary directory and renamed into place, so a run killed while saving
never leaves a half-written one. A resumed run continues exactly: it reloads the optimizer and scheduler,
and the data order and the flow-matching noise of every step are functions of (seed, step).
"""

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

# torchrun: only rank 0 shows progress bars (tqdm reads this on import)
if os.environ.get("RANK", "0") != "0":
    os.environ["TQDM_DISABLE"] = "1"

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import speed
from data import LeRobotDataset
from flow import prefix_offsets
from plumbing import parse_mapping, read_torch_dict, require_keys
from policy import SmolVLAPolicy
from smolvla import ACTION, IMAGE_PREFIX, STATE, SmolVLAConfig

DEFAULT_POLICY = "lerobot/smolvla_base"


def _usable_cores():
    """The CPU cores this process may run on (its affinity where the OS says, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------------
# The recipe: every default of a training run. Command-line values win; a resumed run takes the values
# it was started with. (Every checkpoint's config.json records the run's optimizer and scheduler numbers in
# lerobot's field names: lerobot_optimizer_fields.)
# ----------------------------------------------------------------------------------------------------

RECIPE = {
    "steps": 20_000,         # optimizer steps
    "batch_size": 64,        # samples per step and process (torchrun: the effective batch is N times this)
    "lr": 1e-4,              # peak learning rate, reached at the end of the warmup
    "betas": (0.9, 0.95),    # AdamW's moment decay rates
    "eps": 1e-8,             # AdamW's denominator guard
    "weight_decay": 1e-10,   # AdamW's decoupled weight decay: next to nothing
    "grad_clip": 10.0,       # the gradient's global norm is clipped to this
    "warmup_steps": 1_000,   # linear warmup from lr / (warmup_steps + 1) to lr
    "decay_steps": 30_000,   # the cosine reaches decay_lr at this step (both shrunk for shorter runs)
    "decay_lr": 2.5e-6,      # the final learning rate
    # DataLoader worker processes (video decoding): 4, or fewer on a machine with fewer usable cores
    "num_workers": min(4, _usable_cores()),
    "save_every": 5_000,     # checkpoint period in steps (0: only at the end)
    "log_every": 100,        # progress-bar refresh period in steps
    "seed": 1000,            # data order, flow-matching noise and time, a fresh expert's initialization
}
# what a checkpoint stores for --resume: the recipe as run, and the inputs
RUN_OPTIONS = list(RECIPE) + ["repo", "rename", "train_vlm", "bf16", "rtc_max_delay", "rtc_prefix_offset"]

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


def make_lr_scheduler(optimizer, peak_lr, final_lr, warmup_steps, decay_steps):
    """A LambdaLR whose multiplier turns the optimizer's peak lr into learning_rate(step, ...)."""

    def fraction_of_peak(step):
        return learning_rate(step, peak_lr, final_lr, warmup_steps, decay_steps) / peak_lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fraction_of_peak)


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
    """Join torchrun's process group if we were started by it (WORLD_SIZE > 1), and pick this process's
    device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))  # among all processes
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # among this machine's processes
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

def check_output(output, resume):
    """Make sure we may write `output` (without creating anything yet) and never train over an earlier run."""
    existing = os.path.abspath(output)
    while not os.path.exists(existing):  # the deepest part of the path that exists must be a writable dir
        existing = os.path.dirname(existing)
    try:  # the sure test of "writable" (permission bits say yes to root on read-only or virtual file systems)
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError:
        raise PermissionError(f"cannot write to the output directory {output!r} ({existing} is not a "
                              "writable directory); choose another with --output.") from None
    if not resume and os.path.isdir(os.path.join(output, "checkpoints")):
        raise FileExistsError(f"{output!r} already holds a training run; continue it with "
                              f"`python train.py --resume {output}` (and more --steps), or choose a new "
                              "--output.")


def check_batch_size(samples, batch_size, world_size):
    """Every process needs at least one full batch per epoch."""
    if samples // world_size < batch_size:
        processes = "process"
        if world_size > 1:
            processes = "processes"
        raise ValueError(f"the dataset has {samples} samples, fewer than one batch of {batch_size} per "
                         f"process ({world_size} {processes}): lower --batch-size.")


def features_from_dataset(dataset):
    """lerobot's input/output feature dicts describing a dataset's state, cameras and actions (the
    config of a policy trained from scratch on it)."""
    sample = dataset[0]
    inputs = {STATE: {"type": "STATE", "shape": list(sample[STATE].shape)}}
    for key in dataset.camera_keys:
        inputs[key] = {"type": "VISUAL", "shape": list(sample[key].shape)}
    outputs = {ACTION: {"type": "ACTION", "shape": [sample[ACTION].shape[-1]]}}
    return inputs, outputs


def check_dataset_fits_policy(config, dataset, rename):
    """One clear error if the dataset cannot train this policy: cameras named differently, or state/action
    dims that differ. Policy cameras the dataset does not have at all (smolvla_base reads three, most
    datasets have two) are dropped from the policy's inputs, as the reference does silently; we say so."""
    # the dataset's own camera names (before --rename), for the hint
    original = {new: old for old, new in rename.items()}

    def short(key):
        """A camera's key without the observation.images. prefix: the name the flags use."""
        return key[len(IMAGE_PREFIX):]

    def dataset_name(key):
        """A camera's name as the dataset itself calls it (before --rename)."""
        return original.get(short(key), short(key))

    policy_cameras = config.camera_keys
    missing = [key for key in policy_cameras if key not in dataset.camera_keys]
    unused = [key for key in dataset.camera_keys if key not in policy_cameras]
    if unused and (missing or not policy_cameras):
        # the renames that would pair the dataset's unused cameras with the policy's missing ones
        pairs = [(dataset_name(old), short(new)) for old, new in zip(unused, missing)]
        hint = ",".join(f"{old}={new}" for old, new in pairs if old != new)
        dataset_cameras = [dataset_name(key) for key in dataset.camera_keys]
        renamed = ""
        if rename:
            renamed = f" (called {[short(key) for key in dataset.camera_keys]} after --rename)"
        message = (f"the dataset's cameras {dataset_cameras}{renamed} are not "
                   f"the policy's {[short(key) for key in policy_cameras]}: map them with --rename")
        if hint:
            message += f", e.g. --rename {hint}"
        raise ValueError(message)
    for key, kind in ((STATE, "input_features"), (ACTION, "output_features")):
        wanted = int(getattr(config, kind)[key]["shape"][0])
        found = int(dataset.stats[key]["mean"].shape[0])
        if wanted != found:
            raise ValueError(f"the dataset's {key} has {found} dims but the policy's has {wanted}; "
                             "fine-tuning needs the same robot (or start a new policy with --from-scratch).")
    if missing:
        print(f"note: the dataset has no {[short(key) for key in missing]} camera(s); the policy is trained "
              "without them (they are removed from its input features).")
        for key in missing:
            del config.input_features[key]
    if unused:
        print(f"note: the policy does not read the dataset's {[dataset_name(key) for key in unused]} "
              "camera(s).")


def policy_to_train(args, dataset):
    """The policy to train: a checkpoint to fine-tune, or a fresh expert on the SmolVLM2 weights."""
    if args.from_scratch:
        config = SmolVLAConfig()
        config.input_features, config.output_features = features_from_dataset(dataset)
        return SmolVLAPolicy.from_vlm(args.vlm or config.vlm_model_name, config)
    return SmolVLAPolicy.from_pretrained(args.policy, vlm=args.vlm)


def prepare_training(policy, args, device, autocast):
    """The policy as training runs it (bench.py --train times the same): on its device, frozen where the
    recipe freezes (the config says it: freeze_vision_encoder, train_expert_only), the speed steps applied
    from outside the model (speed.py). Returns the parameters that learn (by default the expert and the
    projections, 99.9M of 450M) and their optimizer."""
    policy.to(device)
    policy.config.train_expert_only = not args.train_vlm
    policy.set_requires_grad()
    speed.prepare(policy, training=True, autocast=autocast)
    policy.train()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    # fused: one kernel updates each tensor and both its moments (instead of a dozen elementwise passes)
    return trainable, torch.optim.AdamW(trainable, lr=args.lr, betas=args.betas, eps=args.eps,
                                        weight_decay=args.weight_decay, fused=True)


# ----------------------------------------------------------------------------------------------------
# Checkpoints: <output>/checkpoints/<step>/{pretrained_model, training_state.pt}, written atomically
# ----------------------------------------------------------------------------------------------------

def lerobot_optimizer_fields(options):
    """The run's optimizer and scheduler numbers under lerobot's config.json names (what lerobot reads back
    to continue training): a checkpoint says how it was trained, from the one home of those numbers."""
    return {
        "optimizer_lr": options["lr"],
        "optimizer_betas": list(options["betas"]),
        "optimizer_eps": options["eps"],
        "optimizer_weight_decay": options["weight_decay"],
        "optimizer_grad_clip_norm": options["grad_clip"],
        "scheduler_warmup_steps": options["warmup_steps"],
        "scheduler_decay_steps": options["decay_steps"],
        "scheduler_decay_lr": options["decay_lr"],
    }


def save_checkpoint(output, step, policy, optimizer, scheduler, history, options):
    """Write the policy (SmolVLAPolicy.from_pretrained / lerobot format) and what --resume needs, then point
    `checkpoints/last` at it. Everything goes to a temporary directory first and is renamed into place,
    so a run killed mid-save never leaves a half-written checkpoint behind."""
    checkpoints = os.path.join(output, "checkpoints")
    final = os.path.join(checkpoints, f"{step:06d}")
    os.makedirs(checkpoints, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=f".{step:06d}-", dir=checkpoints)
    policy.config.extra.update(lerobot_optimizer_fields(options))
    policy.save_pretrained(os.path.join(temporary, "pretrained_model"))
    training_state = {
        "step": step,
        "options": options,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "history": history,
    }
    torch.save(training_state, os.path.join(temporary, "training_state.pt"))
    if os.path.isdir(final):  # the same step saved again (a resumed run): replace it
        shutil.rmtree(final)
    os.replace(temporary, final)
    replace_link(checkpoints, "last", f"{step:06d}")
    plot_losses(history, os.path.join(output, "loss.png"))
    return final


def replace_link(directory, name, target):
    """directory/name -> target (relative to directory), replaced atomically: a reader never finds it
    missing."""
    temporary = os.path.join(directory, f".{name}-{os.getpid()}")
    os.symlink(target, temporary)
    os.replace(temporary, os.path.join(directory, name))


def find_checkpoint(path):
    """--resume accepts a run's output dir (continue from its last checkpoint) or one checkpoint dir."""
    for candidate in (os.path.join(path, "checkpoints", "last"), path):
        if os.path.isfile(os.path.join(candidate, "training_state.pt")):
            return os.path.realpath(candidate)
    for candidate in (os.path.join(path, "checkpoints", "last"), path):
        if os.path.isdir(os.path.join(candidate, "pretrained_model")):  # a checkpoint without its state
            checkpoint = os.path.realpath(candidate)
            state_path = os.path.join(checkpoint, "training_state.pt")
            raise FileNotFoundError(f"{state_path} is missing: the checkpoint is incomplete; "
                                    f"{complete_checkpoint_advice(checkpoint)}")
    raise FileNotFoundError(f"--resume {path!r}: no checkpoint there (expected {path}/checkpoints/last/"
                            "training_state.pt or <checkpoint>/training_state.pt).")


def complete_checkpoint_advice(checkpoint):
    """What to do when `checkpoint`'s training state is missing or damaged: --resume from the newest other
    checkpoint of its run that has one, or train again."""
    checkpoints = os.path.dirname(checkpoint)
    for name in sorted(os.listdir(checkpoints), reverse=True):  # (<step>: six digits, newest first)
        other = os.path.join(checkpoints, name)
        complete = os.path.isfile(os.path.join(other, "training_state.pt"))
        if name.isdigit() and other != checkpoint and complete:
            return f"resume from the last complete checkpoint: --resume {other}"
    return "resume from the last complete checkpoint (this run has no other: train again without --resume)"


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
    """The batch's tensors moved to the device (its task strings as they are)."""
    moved = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            value = value.to(device, non_blocking=True)
        moved[key] = value
    return moved


def batches(dataset, batch_size, processes, seed, num_workers, start_step):
    """Endless batches; epoch e is a permutation drawn from (seed, e) and split across processes.

    Everything that decides the order is a function of (seed, epoch), so a resumed run skips exactly the
    batches the first run consumed and then sees the same ones it would have.
    """
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=processes.world_size,
                                                  rank=processes.rank, shuffle=True, seed=seed,
                                                  drop_last=True)
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
        epoch += 1
        skip = 0  # only the resumed epoch starts part-way


def use_autocast(device):
    """bf16 autocast by default on GPUs that support it. On a CPU it is opt-in (--bf16): whether it pays
    depends on the CPU and the sizes (the demo's tiny model: 0.23 s per step with it, 0.14 s without)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def training_step(model, optimizer, trainable, batch, grad_clip, autocast):
    """One optimizer step (bench.py --train times it): the loss (bf16 autocast if on), clipped gradients."""
    with torch.autocast(trainable[0].device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    optimizer.step()
    return loss


def train(policy, dataset, args, processes, start=None):
    """Run the optimization; returns the history [{"step", "loss", "lr"}]. `start`: a loaded training
    state."""
    device = processes.device
    autocast = args.bf16
    if autocast is None:
        autocast = use_autocast(device)
    trainable, optimizer = prepare_training(policy, args, device, autocast)
    model = TrainingLoss(policy)
    if processes.distributed:
        device_ids = None  # gloo on CPUs
        if device.type == "cuda":
            device_ids = [device.index]
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    warmup, decay = fit_schedule(args.warmup_steps, args.decay_steps, args.steps)
    scheduler = make_lr_scheduler(optimizer, args.lr, args.decay_lr, warmup, decay)
    step = 0  # optimizer steps taken
    history = []  # one {"step", "loss", "lr"} per step
    if args.rtc_max_delay:  # the checkpoint says so (policy.TRAINED_ON_FILE): its sampler may use it
        policy.trained_on["rtc_max_delay"] = args.rtc_max_delay
    if start is not None:
        optimizer.load_state_dict(start["optimizer"])
        scheduler.load_state_dict(start["scheduler"])
        step = start["step"]
        history = start["history"]
    data = batches(dataset, args.batch_size, processes, args.seed, args.num_workers, step)
    samples_per_step = args.batch_size * processes.world_size
    if processes.is_main:
        count = sum(p.numel() for p in trainable)
        total = sum(p.numel() for p in policy.parameters())
        print(f"training {count:,} of {total:,} parameters on "
              f"{processes.world_size} x {device} (bf16 autocast: {'on' if autocast else 'off'}), "
              f"{len(dataset):,} samples, steps {step} -> {args.steps}")
    # what it learns from, saved beside it (policy.TRAINED_ON_FILE): the defaults and checks of its drivers
    info = getattr(dataset, "info", {})  # "norm_mode": the joints' units, where the dataset says (record.py)
    policy.trained_on = {
        **policy.trained_on,
        "fps": dataset.fps,
        "norm_mode": info.get("norm_mode"),
        "tasks": list(dataset.tasks),
    }
    bar = tqdm(total=args.steps, initial=step, disable=not processes.is_main, dynamic_ncols=True)
    # the progress bar's window: since when, from which step, and the losses summed in it
    tick = time.perf_counter()
    tick_step = step
    loss_sum = 0.0
    loss_count = 0
    while step < args.steps:
        batch = to_device(next(data), device)
        # The flow-matching noise and time of step k depend only on (seed, k, rank): a resumed run
        # draws exactly what the first run would have drawn, without storing random-generator states.
        torch.manual_seed(args.seed * 1_000_003 + step * processes.world_size + processes.rank)
        # training-time RTC (flow.py): each sample's first d ~ U{0..D} actions are given
        if args.rtc_max_delay:
            batch_size = len(batch["task"])
            batch["rtc_delay"] = torch.randint(0, args.rtc_max_delay + 1, (batch_size,), device=device)
        # ... shifted by a random offset the continuation recovers from
        if args.rtc_prefix_offset:
            chunk_size, action_dim = batch[ACTION].shape[1:]
            batch["rtc_offset"] = prefix_offsets(batch["rtc_delay"], chunk_size, action_dim,
                                                 args.rtc_prefix_offset)
        lr = optimizer.param_groups[0]["lr"]
        loss = training_step(model, optimizer, trainable, batch, args.grad_clip, autocast)
        scheduler.step()
        step += 1
        # log the loss averaged over all processes (what the update used)
        value = loss.detach().float()
        if processes.distributed:
            dist.all_reduce(value)
            value /= processes.world_size
        history.append({"step": step, "loss": value.item(), "lr": lr})
        loss_sum += history[-1]["loss"]
        loss_count += 1
        bar.update(1)
        if step % args.log_every == 0 or step == args.steps:
            now = time.perf_counter()
            rate = (step - tick_step) * samples_per_step / max(now - tick, 1e-9)
            bar.set_postfix(loss=f"{loss_sum / loss_count:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.0f}")
            # a new window starts here
            tick = now
            tick_step = step
            loss_sum = 0.0
            loss_count = 0
        if (args.save_every and step % args.save_every == 0) or step == args.steps:
            if processes.distributed:
                check_ranks_agree(policy, processes)
            if processes.is_main:
                options = {name: getattr(args, name) for name in RUN_OPTIONS}
                save_checkpoint(args.output, step, policy, optimizer, scheduler, history, options)
    bar.close()
    if processes.distributed:
        check_ranks_agree(policy, processes)  # raises if they differ
        if processes.is_main:
            print(f"all {processes.world_size} processes hold identical weights after step {step}")
    return history


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

def add_run_arguments(parser):
    """The flags of a training run, whatever it learns from (demo.py adds them to its own)."""
    parser.add_argument("--steps", type=int, help=f"optimizer steps ({RECIPE['steps']})")
    parser.add_argument("--batch-size", type=int,
                        help=f"samples per step and process ({RECIPE['batch_size']})")
    parser.add_argument("--lr", type=float, help=f"peak learning rate ({RECIPE['lr']})")
    parser.add_argument("--decay-lr", type=float,
                        help=f"learning rate at the end of the cosine ({RECIPE['decay_lr']})")
    parser.add_argument("--warmup-steps", type=int, help=f"linear warmup ({RECIPE['warmup_steps']})")
    parser.add_argument("--decay-steps", type=int,
                        help=f"cosine length ({RECIPE['decay_steps']}; shrunk to --steps if longer)")
    parser.add_argument("--grad-clip", type=float, help=f"max gradient norm ({RECIPE['grad_clip']})")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on GPUs that support it)")
    parser.add_argument("--output", help="run directory (default outputs/train/<date>_<dataset>)")
    parser.add_argument("--resume", help="continue a run: its output dir or one of its checkpoint dirs")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--num-workers", type=int,
                        help=f"DataLoader worker processes ({RECIPE['num_workers']})")
    parser.add_argument("--save-every", type=int,
                        help=f"checkpoint period in steps, 0: only at the end ({RECIPE['save_every']})")
    parser.add_argument("--log-every", type=int, help=f"progress-bar refresh period ({RECIPE['log_every']})")
    parser.add_argument("--seed", type=int, help=f"data order and noise ({RECIPE['seed']})")
    parser.add_argument("--rtc-max-delay", type=int,
                        help="training-time Real-Time Chunking: up to D given actions")
    parser.add_argument("--rtc-prefix-offset", type=float,
                        help="with --rtc-max-delay: std of a random shift of the given actions, "
                             "normalized (0: none)")


def build_parser():
    """train.py's flags: what to learn from and what to start from, then the run's own."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", help="LeRobot dataset: hub id (owner/name) or local directory")
    parser.add_argument("--policy", default=DEFAULT_POLICY,
                        help=f"checkpoint to fine-tune, hub id or directory ({DEFAULT_POLICY})")
    parser.add_argument("--from-scratch", action="store_true",
                        help="start from the SmolVLM2 weights (--vlm) with a freshly initialized "
                             "action expert")
    parser.add_argument("--vlm", default=None,
                        help="VLM config/weights/tokenizer, dir or hub id "
                             f"(from scratch: {SmolVLAConfig.vlm_model_name}; "
                             "fine-tuning: the checkpoint's own)")
    parser.add_argument("--train-vlm", action="store_true", default=None,
                        help="also train the VLM (text layers and connector)")
    parser.add_argument("--rename", help="camera renames dataset=policy, e.g. top=camera1,wrist=camera2")
    add_run_arguments(parser)
    return parser


def check_rtc_flags(parser, args):
    """Training-time RTC's flags: a delay of 0 or more, and an offset only where there are prefixes."""
    if (args.rtc_max_delay or 0) < 0:
        parser.error("--rtc-max-delay must be >= 0")
    offset_without_prefixes = args.rtc_prefix_offset and not (args.rtc_max_delay or args.resume)
    if (args.rtc_prefix_offset or 0) < 0 or offset_without_prefixes:
        parser.error("--rtc-prefix-offset must be >= 0, and shifts the prefixes of --rtc-max-delay: "
                     "give both")


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.repo or args.resume):
        parser.error("give a dataset with --repo (or --resume a run; the offline demo is python demo.py)")
    check_rtc_flags(parser, args)
    return args


def fill_options(args, saved=None, defaults=RECIPE, at_least=None):
    """Options not given on the command line: from the resumed run, else from the recipe (`defaults`: the
    demo passes its own). at_least: more {option: lowest value} to check (the demo's counts)."""
    for name in RUN_OPTIONS:  # the recipe's AdamW constants have no flag: args gets them here
        if getattr(args, name, None) is None and saved is not None and name in saved:
            setattr(args, name, saved[name])
        if getattr(args, name, None) is None and name in defaults:
            setattr(args, name, defaults[name])
    if args.decay_steps is None:
        args.decay_steps = args.steps
    # numbers that cannot run, all named in one message before anything loads
    lowest = {
        "steps": 1,
        "batch_size": 1,
        "log_every": 1,
        "decay_steps": 1,
        "num_workers": 0,
        "save_every": 0,
        "warmup_steps": 0,
        "lr": 1e-30,
        "decay_lr": 0,
        "grad_clip": 1e-30,
    }
    lowest.update(at_least or {})
    wrong = []
    for name, low in lowest.items():
        if getattr(args, name) < low:
            wrong.append(f"--{name.replace('_', '-')} {getattr(args, name)}")
    if wrong:
        raise ValueError(f"{', '.join(wrong)}: counts must be at least 1 (workers, periods, warmup: 0), "
                         "rates positive")
    if args.rtc_prefix_offset and not args.rtc_max_delay:  # a resumed run without RTC prefixes
        raise ValueError("--rtc-prefix-offset shifts the prefixes of --rtc-max-delay, and this run has none")


def prepare(args, processes):
    """Everything that can fail on bad input, done before training: output, dataset, policy, their fit."""
    start = None
    if args.resume:
        checkpoint = find_checkpoint(args.resume)
        state_path = os.path.join(checkpoint, "training_state.pt")
        advice = complete_checkpoint_advice(checkpoint)
        start = read_torch_dict(state_path, "a training state", advice)
        require_keys(start, ["step", "options", "optimizer", "scheduler", "history"], state_path, advice)
        run = os.path.dirname(os.path.dirname(checkpoint))
        args.output = args.output or run
        args.policy = os.path.join(checkpoint, "pretrained_model")
        args.from_scratch = False  # the checkpoint has the expert it trained
    fill_options(args, start["options"] if start else None)
    if args.repo is None and args.resume:  # a demo's run (demo.py): it recorded its dataset into the run
        args.repo = os.path.join(run, "dataset")
    if start and start["step"] >= args.steps:
        raise ValueError(f"the run is already at step {start['step']} of {args.steps}: "
                         "give more --steps to continue it")
    if args.output is None:
        name = os.path.basename(os.path.normpath(args.repo))
        args.output = os.path.join("outputs", "train", f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{name}")
    if processes.is_main:
        check_output(args.output, args.resume)
    rename = parse_mapping(args.rename, "--rename")
    dataset = LeRobotDataset(args.repo, rename=rename)
    check_batch_size(len(dataset), args.batch_size, processes.world_size)
    torch.manual_seed(args.seed)  # a fresh expert's initialization (--from-scratch)
    policy = policy_to_train(args, dataset)
    check_dataset_fits_policy(policy.config, dataset, rename)
    dataset.chunk_size = policy.config.chunk_size
    # the policy learns in units normalized by this dataset's statistics (and saves them with itself)
    policy.set_normalization(dataset.stats)
    return dataset, policy, start


def main(argv=None):
    args = parse_args(argv)
    processes = start_processes(args.device)
    if not processes.is_main:  # under torchrun only rank 0 prints (errors still go to stderr)
        sys.stdout = open(os.devnull, "w")
    default_output = args.output is None and not args.resume
    try:
        dataset, policy, start = prepare(args, processes)
        if default_output and processes.is_main:  # outputs/train/latest: the newest run
            os.makedirs(args.output, exist_ok=True)
            replace_link(os.path.dirname(args.output), "latest", os.path.basename(args.output))
    except (FileNotFoundError, FileExistsError, PermissionError, ValueError) as error:
        sys.exit(f"train.py: error: {error}")
    train(policy, dataset, args, processes, start)
    if processes.is_main:
        print(f"checkpoint: {os.path.join(args.output, 'checkpoints', 'last', 'pretrained_model')}")
    if processes.distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
