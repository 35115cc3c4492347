"""Speed: the steps that make SmolVLA fast on a CPU, applied to a built model from outside by `prepare`.

Asynchronous inference (SmolVLA paper §3.3) keeps the arm busy only if a chunk is ready before the queue
runs dry: with n = 50 actions at 30 fps and a trigger at g = 0.7, a chunk must take less than
0.7 × 50 / 30 ≈ 1.17 s. The model files are the plain path a student steps through; the speed comes from
two kinds of steps.

Written into the model, because they are how SmolVLA is meant to run: the VLM runs once per chunk and
leaves a key/value cache, with the cross-attention layers' expert k/v projections applied once
(SmolVLA.encode_observation, ActionExpert.cache_prefix). And the implementation choices, each marked
"speed:" where it is made: all cameras go through the vision tower as one batch (SmolVLA.embed_images);
attention is one fused kernel with grouped-query heads read in place (expert.attention, the formula
written out beside it); RoPE angles and flow times are made once per chunk, not per layer or step
(rope_angles, flow.euler_sample); RMSNorm is one fused kernel. In bf16, norms, RoPE, softmax and the
velocity projection stay in float32.

Applied here, from outside, by `prepare(model, ...)` (infer_async.py/policy_server.py, train.py and
bench.py call it):
- inference on a CPU: every linear layer pre-packed for oneDNN (`PackedLinear`), the vision MLP's GELU
  fused into its first product where that measures faster on the machine (`fuse_gelu`);
- training with a frozen VLM: the images and words of the prefix depend on no trained weight, so the VLM
  runs over them without gradient tracking; only the state token is tracked and backpropagated through
  the VLM (`untracked_prefix_keys_values`): 1 token per sample instead of P, same loss and gradients;
  under bf16 autocast (train.py --bf16) the frozen parts are cast to bf16 once;
- optionally torch.compile of the vision tower and the expert (bench.py --compile).

bench.py measures the result (seconds per chunk and per training step, GFLOP/s against the architecture's
FLOP count `chunk_flops`, and the fraction of this machine's matmul peak `matmul_peak`, measured in the run).
"""

import platform
import sys
import time
import types

import torch
import torch.nn.functional as F
from torch import nn

from vlm import TextModel, VisionMLP, parse_vlm_config


def prepare(model: nn.Module, training: bool = False, pack: bool | None = None, compile: bool = False,
            autocast: bool = False) -> nn.Module:
    """Apply the speed steps to a SmolVLA whose weights, device and dtype are final; returns it.

    training=False (inference): pack the linear layers for oneDNN (pack defaults to True; a no-op off
    the CPU). training=True (train.py's prepare_training): run a frozen VLM over the prefix's images and
    words untracked, and pack only the parts that get no gradient (a trained weight's packed copy would go
    stale); under bf16 autocast pack defaults to False there. autocast (training under bf16 autocast): the
    parts that get no gradient are cast to bf16 once. compile: torch.compile the vision tower and the expert
    (inductor packs the weights itself).
    """
    # training in fp32: the frozen parts packed measured faster (train.py's step, smolvla_base, batch 2,
    # 2 EPYC cores, quiet machine (load 0.2-1.7), interleaved: 6.50 and 6.23 s packed against 6.98 and
    # 7.58 s plain; under heavy contention (load 5-6) the order had come out the other way: 40.7 s against
    # 34.1 s median)
    if pack is None:
        pack = not (training and autocast)
    # bf16 where the CPU has no bf16 kernels runs emulated, slower than float32: say so once
    weight = next(model.parameters())
    if autocast:
        warn_if_bf16_emulated(torch.bfloat16, "--bf16", weight.device.type)
    else:
        warn_if_bf16_emulated(weight.dtype, "--dtype bfloat16", weight.device.type)
    # the parts that get no gradient (in training: the frozen VLM)
    frozen = [part for part in model.children() if not any(p.requires_grad for p in part.parameters())]
    if training and autocast:
        # autocast re-casts a weight to bf16 at every use unless it is a trained leaf (those casts are cached
        # per step): a frozen VLM's 350M weights would be converted every step. Cast once, as smolvla_base
        # stores its VLM anyway; the trained parts keep float32 for the optimizer. Measured (train.py's step,
        # smolvla_base, batch 2, interleaved on 2 shared EPYC cores at load 5-7): 19.7 s median, 8.9 s best
        # per step, against 22.2 s and 18.4 s with the frozen parts left in float32.
        for part in frozen:
            part.to(torch.bfloat16)
    if training:
        text = model.text

        def keys_values_with_untracked_prefix(self, x, mask, rope):
            return untracked_prefix_keys_values(model, x, mask, rope)

        text.keys_values = types.MethodType(keys_values_with_untracked_prefix, text)
    if compile:
        reason = compile_unsupported()
        if reason is not None:
            # the plain path instead, said once and reported by bench.py
            PATHS["torch.compile"] = f"not compiled: {reason}"
            print(f"warning: --compile: {reason}; running uncompiled", file=sys.stderr)
            compile = False
    if compile:
        torch._inductor.config.freezing = True  # weights as constants: pre-packed for oneDNN, folded
        model.vision.compile()
        model.expert.compile()
        PATHS["torch.compile"] = "compiled (vision tower, expert)"
    elif pack:
        # in training only the frozen parts: a trained weight's packed copy would go stale
        for part in frozen if training else [model]:
            pack_linear_layers(part)
    else:
        PATHS["linear layers"] = "plain: not packed (asked so, or training under bf16 autocast)"
    return model


def untracked_prefix_keys_values(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, rope: tuple) -> list:
    """TextModel.keys_values over the prefix x (B, P, D), with the tokens that depend on no trained weight
    run without gradient tracking: when the vision tower, connector and text model are all frozen, that is
    every token before the state token (the last real one: its projection is trained). Results and gradients
    are the same as the plain call's; only the state token is backpropagated through the VLM."""
    vlm_parts = (model.vision, model.connector, model.text)
    frozen = not any(p.requires_grad for part in vlm_parts for p in part.parameters())
    if not (torch.is_grad_enabled() and frozen):
        return TextModel.keys_values(model.text, x, mask, rope)
    # the state token: the last real token of the prefix
    state_token_index = int(mask[0].diagonal().nonzero().max())
    before = slice(None, state_token_index)  # the tokens before the state token
    onward = slice(state_token_index, None)  # the state token and any padding after it
    assert not mask[:, before, onward].any(), (
        "the tokens before the state token must not attend to it or later")
    with torch.no_grad():
        rope_before = tuple(angles[:, before] for angles in rope)
        past = TextModel.keys_values(model.text, x[:, before], mask[:, before, before], rope_before)
    rope_onward = tuple(angles[:, onward] for angles in rope)
    return TextModel.keys_values(model.text, x[:, onward], mask[:, onward], rope_onward, past)


# ----------------------------------------------------------------------------------------------------
# What this CPU and this torch build can do, asked of torch itself, never guessed from the CPU's name. A
# step that cannot run takes the plain path, and PATHS remembers which path each part took and why, for
# bench.py to report. A classroom brings every kind of CPU: x86 with AMX or AVX-512 BF16, x86 with AVX2
# only (no bf16 instructions: oneDNN refuses to pack bf16 weights there), ARM laptops and boards (oneDNN
# with other kernels, or none).

PATHS = {}  # what (e.g. "linear layers, bfloat16") -> the path it took and why
PACKING_TRIALS = {}  # dtype -> None (the packed kernel ran) or why it did not


def packing_unsupported(dtype: torch.dtype) -> str | None:
    """Why oneDNN's packed linear kernel cannot run in dtype on this CPU and torch build, or None if it can.

    torch's own checks first (oneDNN built in; bf16 and fp16 kernels for this CPU), then one tiny product
    packed and run, once per process: a build whose kernel is missing anyway (seen on ARM) says so there."""
    if not torch.backends.mkldnn.is_available():
        return "oneDNN is not in this torch build"
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bf16 packing unsupported on this CPU"
    if dtype == torch.float16 and not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        return "fp16 packing unsupported on this CPU"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"no packed kernel for {dtype}"
    if dtype not in PACKING_TRIALS:
        PACKING_TRIALS[dtype] = packing_trial(dtype)
    return PACKING_TRIALS[dtype]


def packing_trial(dtype: torch.dtype) -> str | None:
    """Pack a (16, 8) weight and run it on a (4, 8) input: None if the result is F.linear's, else why not."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=generator).to(dtype)
    weight = torch.randn(16, 8, generator=generator).to(dtype)
    bias = torch.zeros(16, dtype=dtype)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    except RuntimeError as error:
        return f"packed kernel failed on this CPU ({str(error).splitlines()[0]})"
    if not torch.allclose(y.float(), F.linear(x, weight, bias).float(), atol=1e-2, rtol=1e-2):
        return "packed kernel gave other numbers than F.linear on this CPU"
    return None


def bf16_emulated() -> bool:
    """Whether bfloat16 products on this CPU run without bf16 kernels (converted to and from float32 around
    float32 arithmetic: measured 20 GFLOP/s against float32's 160 on 2 cores of an AVX2-only AMD EPYC)."""
    return not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def warn_if_bf16_emulated(dtype: torch.dtype, option: str, device: str = "cpu") -> bool:
    """One warning line where a user asked for bf16 on a CPU that can only emulate it; True if it warned."""
    if dtype != torch.bfloat16 or device != "cpu" or not bf16_emulated():
        return False
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"warning: {option}: this CPU has no bfloat16 kernels (torch reports {capability}), so bf16 runs "
          "emulated and slower than float32; use float32 here (--dtype float32, or train without --bf16)",
          file=sys.stderr)
    return True


def compile_unsupported() -> str | None:
    """Why torch.compile cannot run here, or None: on a CPU, inductor writes C++ and needs a compiler."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as error:  # (which one depends on the platform: a missing compiler, no inductor)
        return f"torch.compile needs a C++ compiler for inductor on the CPU ({str(error).splitlines()[0]})"
    return None


class PackedLinear(nn.Module):
    """speed (CPU inference): an nn.Linear whose weight is also kept in oneDNN's blocked layout.

    F.linear hands float32 products to MKL and rearranges the weight for the kernel at every call; oneDNN
    with the weight rearranged once ("packed") reached ~110 instead of ~90 GFLOP/s per core in float32
    and ~215 instead of ~195 in bfloat16 on the AVX-512 (AMD Zen 4) machine bench.py was developed on,
    and computes the same sums in the same precision (float32 stays float32). gelu_tanh: the GELU that
    follows the product (the vision MLP's) is applied by the same kernel.

    The module keeps the original weight and bias (same names in state_dict, so saving works); the packed
    copy is made when packing and would not follow later changes of the weight. The packed kernel has no
    gradient: calls that autograd must track (a trainable weight, or an input that needs a gradient) take
    the plain path, so a frozen part of a model being trained (the vision tower under train_expert_only)
    still runs packed.
    """

    def __init__(self, linear: nn.Linear, gelu_tanh: bool = False):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        assert packing_unsupported(linear.weight.dtype) is None, "pack only where the kernel runs"
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.gelu_tanh = gelu_tanh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """F.linear(x, weight, bias), then F.gelu(·, approximate="tanh") if gelu_tanh: the packed kernel
        applies the GELU to each block of results while they are still in cache (one pass less)."""
        tracked = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if tracked or x.dtype != self.packed.dtype:
            y = F.linear(x, self.weight, self.bias)
            return F.gelu(y, approximate="tanh") if self.gelu_tanh else y
        if self.gelu_tanh:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "gelu", [], "tanh")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


# ----------------------------------------------------------------------------------------------------
# What is fastest depends on the CPU (AMX or not, AVX-512 BF16 or not): the few choices that do are made by
# timing the shapes that matter on the machine itself, once per process, and remembered here for bench.py
# to report. The same timings give the machine's matmul peak that bench.py compares a chunk against.

CHOICES = {}  # (what, dtype name, shape) -> {"choice": ..., the seconds each candidate took}
VISION_TOKENS = 1024  # one 512×512 frame's patches: the shape the vision MLP's choice is timed at


def machine() -> dict:
    """The CPU bench.py measured on: its name (for the reader only: no choice is made from it), what torch
    says it can do (the vector instructions torch's kernels use, AMX tiles, AVX-512 BF16, oneDNN's bf16),
    and torch's threads."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":  # the first processor's name
                    name = value.strip()
                    break
    except OSError:
        pass
    return {
        "cpu": name or "unknown CPU",
        "architecture": platform.machine(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "amx": torch.cpu._is_amx_tile_supported(),
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
        "onednn_bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
        "threads": torch.get_num_threads(),
    }


def fastest_seconds(candidates: dict, repeats: int = 5) -> dict:
    """{name: the fastest of `repeats` timed calls of that candidate}, after one untimed call of each (oneDNN
    builds its kernel then). The candidates take turns, so that other programs on a shared machine disturb
    them alike; the fastest call is what the machine can do, slower ones were disturbed."""
    for fn in candidates.values():
        fn()
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def linear_candidates(tokens: int, fan_in: int, fan_out: int, dtype: torch.dtype, gelu: bool = False) -> dict:
    """Seconds of y = x·Wᵀ + b, (tokens, fan_in) -> (tokens, fan_out) in dtype, by each kernel: "plain"
    (F.linear), "packed" (oneDNN, weight packed once), and with gelu the tanh GELU after it "fused" into the
    packed kernel or as a "separate" pass."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, fan_in, generator=generator).to(dtype)
    w = (torch.randn(fan_out, fan_in, generator=generator) / fan_in**0.5).to(dtype)
    b = torch.zeros(fan_out, dtype=dtype)

    def plain():
        return F.linear(x, w, b)

    if packing_unsupported(dtype) is not None:
        # only the plain kernel runs here (and with gelu there is nothing to choose: the GELU is a pass of
        # its own)
        assert not gelu, "the fused GELU needs the packed kernel"
        return fastest_seconds({"plain": plain})
    packed = torch.ops.mkldnn._reorder_linear_weight(w, None)

    def packed_product(post_op):
        algorithm = "tanh" if post_op == "gelu" else ""
        return torch.ops.mkldnn._linear_pointwise(x, packed, b, post_op, [], algorithm)

    def packed_alone():
        return packed_product("none")

    def fused():
        return packed_product("gelu")

    def separate():
        return F.gelu(packed_product("none"), approximate="tanh")

    if gelu:
        return fastest_seconds({"fused": fused, "separate": separate})
    return fastest_seconds({"plain": plain, "packed": packed_alone})


def matmul_peak(shapes: list, dtype: torch.dtype) -> float:
    """This machine's matmul peak in GFLOP/s for dtype, measured now on the model's own largest products
    (shapes: (tokens, fan_in, fan_out)): the best rate of the plain and the packed kernel over them."""
    best = 0.0
    for tokens, fan_in, fan_out in shapes:
        seconds = linear_candidates(tokens, fan_in, fan_out, dtype)
        best = max(best, 2 * tokens * fan_in * fan_out / min(seconds.values()) / 1e9)
    return best


def fuse_gelu(tokens: int, fan_in: int, fan_out: int, dtype: torch.dtype) -> bool:
    """Whether the GELU after a packed product of this shape is faster fused into it (oneDNN's post-op) than
    applied as a separate pass, timed once per process (CHOICES). The fused kernel is 2.8x slower than the
    plain product on AMX (the issue's profile); on AVX-512 without AMX it may win."""
    key = ("vision MLP GELU", str(dtype).removeprefix("torch."), (tokens, fan_in, fan_out))
    if key not in CHOICES:
        seconds = linear_candidates(tokens, fan_in, fan_out, dtype, gelu=True)
        CHOICES[key] = {"choice": min(seconds, key=seconds.get), **seconds}
    return CHOICES[key]["choice"] == "fused"


def pack_linear_layers(model: nn.Module) -> nn.Module:
    """speed (CPU inference): replace every nn.Linear of the model (or of a frozen part of it) by a
    PackedLinear, in place, once the weights and dtype are final (load, .to(torch.bfloat16) if wanted,
    then pack); the vision MLP's GELU is fused into its first product where that measures faster. Costs a
    second copy of those weights in memory. Layers off the CPU, or in a dtype whose packed kernel this CPU
    cannot run (packing_unsupported), stay plain nn.Linear, and PATHS says why."""
    for mlp in [module for module in model.modules() if isinstance(module, VisionMLP)]:
        # the vision MLP's GELU moves into its packed first product (an identity takes its place) where
        # that measures faster on this machine, for one frame's tokens
        fc1 = mlp.fc1
        if type(fc1) is not nn.Linear or fc1.weight.device.type != "cpu":
            continue
        if packing_unsupported(fc1.weight.dtype) is not None:
            continue
        if fuse_gelu(VISION_TOKENS, fc1.in_features, fc1.out_features, fc1.weight.dtype):
            mlp.fc1 = PackedLinear(fc1, gelu_tanh=True)
            mlp.activation = nn.Identity()
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is not nn.Linear or child.weight.device.type != "cpu":
                continue
            dtype = child.weight.dtype
            what = f"linear layers, {str(dtype).removeprefix('torch.')}"
            reason = packing_unsupported(dtype)
            if reason is not None:
                PATHS[what] = f"plain: {reason}"  # F.linear, as without packing
                continue
            PATHS[what] = "packed (oneDNN)"
            setattr(parent, name, PackedLinear(child))
    return model


# ----------------------------------------------------------------------------------------------------
# FLOP count from the architecture (multiply-adds × 2; norms, softmax and other elementwise work left out):
# what bench.py divides by a chunk's seconds and compares with matmul_peak.

LANG_TOKENS = 20  # a short task sentence ("pick up the red cube and put it in the box\n") in tokens


def linear_flops(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def attention_flops(q_len: int, k_len: int, heads: int, head_dim: int) -> int:
    return 2 * 2 * q_len * k_len * heads * head_dim  # scores q·kᵀ, then probabilities · v


def chunk_flops(model: nn.Module, height: int, width: int, lang_tokens: int = LANG_TOKENS) -> dict:
    """FLOPs of one chunk for one observation, by part: {"vision", "vlm_prefix", "expert_step", "expert",
    "total"}. Counts what the model computes: the vision tower per camera, the connector, the VLM over the
    prefix (the last layer only up to its keys/values), the cross-attention layers' k/v projections of the
    prefix (once per chunk), and per flow step the suffix embedding, the expert and the velocity
    projection."""
    cfg = model.config
    vision, text, factor, _ = parse_vlm_config(model.vlm_config)
    if cfg.resize_imgs_with_padding is not None:
        width, height = cfg.resize_imgs_with_padding
    patches = (height // vision.patch_size) * (width // vision.patch_size)
    vision_width = vision.hidden_size
    vision_mlp = vision.intermediate_size
    # per vision layer: q, k, v, o; the MLP's two products; attention
    per_layer = 4 * linear_flops(patches, vision_width, vision_width)
    per_layer += linear_flops(patches, vision_width, vision_mlp)
    per_layer += linear_flops(patches, vision_mlp, vision_width)
    per_layer += attention_flops(patches, patches, vision.num_heads, vision_width // vision.num_heads)
    patch_embed = linear_flops(patches, vision.num_channels * vision.patch_size**2, vision_width)
    image_tokens = patches // factor**2
    connector = linear_flops(image_tokens, vision_width * factor**2, text.hidden_size)
    cameras = len(cfg.camera_keys) + cfg.empty_cameras
    vision_total = cameras * (patch_embed + vision.num_layers * per_layer + connector)

    # the prefix: 64 tokens per camera (+3 marker tokens each if configured), the words, the state token
    prefix = cameras * (image_tokens + 3 * cfg.add_image_special_tokens) + lang_tokens + 1
    prefix = max(prefix, cfg.prefix_length)
    text_width = text.hidden_size
    heads = text.num_heads
    kv_heads = text.num_kv_heads
    head_dim = text.head_dim
    # per VLM layer: q, k, v (k and v with fewer, grouped heads); then attention, o and the MLP's three
    qkv = linear_flops(prefix, text_width, heads * head_dim)
    qkv += 2 * linear_flops(prefix, text_width, kv_heads * head_dim)
    rest = attention_flops(prefix, prefix, heads, head_dim)
    rest += linear_flops(prefix, heads * head_dim, text_width)
    rest += 3 * linear_flops(prefix, text_width, text.intermediate_size)
    layers = len(model.text.layers)
    vlm_total = layers * qkv + (layers - 1) * rest  # the last layer's output is never used
    vlm_total += linear_flops(1, cfg.max_state_dim, text_width)  # the state token
    # expert: joint layers see prefix + suffix, cross layers the prefix through their own k/v projections
    expert = model.expert.layers[0]
    expert_width = expert.self_attn.q_proj.in_features
    expert_mlp = expert.mlp.up_proj.out_features
    steps = cfg.chunk_size
    step_total = linear_flops(steps, cfg.max_action_dim, expert_width)
    step_total += linear_flops(steps, 2 * expert_width, expert_width)
    step_total += linear_flops(steps, expert_width, expert_width)
    step_total += linear_flops(steps, expert_width, cfg.max_action_dim)
    for expert_layer, cross in model.expert.plan:
        if expert_layer is None:
            continue
        step_total += 2 * linear_flops(steps, expert_width, heads * head_dim)  # q, o
        step_total += 3 * linear_flops(steps, expert_width, expert_mlp)  # the MLP
        if cross:
            vlm_total += 2 * linear_flops(prefix, kv_heads * head_dim, kv_heads * head_dim)  # once per chunk
            step_total += attention_flops(steps, prefix, heads, head_dim)
        else:
            step_total += 2 * linear_flops(steps, expert_width, kv_heads * head_dim)
            step_total += attention_flops(steps, prefix + steps, heads, head_dim)
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
