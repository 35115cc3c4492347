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
  fused into its first product;
- training with a frozen VLM: the images and words of the prefix depend on no trained weight, so the VLM
  runs over them without gradient tracking; only the state token is tracked and backpropagated through
  the VLM (`untracked_prefix_keys_values`): 1 token per sample instead of P, same loss and gradients;
- optionally torch.compile of the vision tower and the expert (bench.py --compile).

bench.py measures the result (seconds per chunk and per training step, GFLOP/s against the architecture's
FLOP count).
"""

import types

import torch
import torch.nn.functional as F
from torch import nn

from vlm import TextModel, VisionMLP


def prepare(model: nn.Module, training: bool = False, pack: bool | None = None, compile: bool = False) -> nn.Module:
    """Apply the speed steps to a SmolVLA whose weights, device and dtype are final; returns it.

    training=False (inference): pack the linear layers for oneDNN (pack defaults to True; a no-op off
    the CPU). training=True: run a frozen VLM over the prefix's images and words untracked; pack defaults
    to False there (packed, the parts that get no gradient still run packed, the others take the plain path).
    compile: torch.compile the vision tower and the expert (inductor packs the weights itself).
    """
    pack = not training if pack is None else pack
    if training:
        text = model.text
        text.keys_values = types.MethodType(
            lambda self, x, mask, rope: untracked_prefix_keys_values(model, x, mask, rope), text
        )
    if compile:
        torch._inductor.config.freezing = True  # weights as constants: pre-packed for oneDNN, folded
        model.vision.compile()
        model.expert.compile()
    elif pack:
        # in training only the parts that get no gradient: a trained weight's packed copy would go stale
        frozen = [part for part in model.children() if not any(p.requires_grad for p in part.parameters())]
        for part in frozen if training else [model]:
            pack_linear_layers(part)
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
    u = int(mask[0].diagonal().nonzero().max())  # the state token: the last real token of the prefix
    assert not mask[:, :u, u:].any(), "the tokens before the state token must not attend to it or later"
    with torch.no_grad():
        past = TextModel.keys_values(model.text, x[:, :u], mask[:, :u, :u], tuple(r[:, :u] for r in rope))
    return TextModel.keys_values(model.text, x[:, u:], mask[:, u:], tuple(r[:, u:] for r in rope), past)


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
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
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


def pack_linear_layers(model: nn.Module) -> nn.Module:
    """speed (CPU inference): replace every nn.Linear of the model (or of a frozen part of it) by a
    PackedLinear, in place, once the weights and dtype are final (load, .to(torch.bfloat16) if wanted,
    then pack); the vision MLP's GELU is fused into its first product. Costs a second copy of those
    weights in memory. A no-op where oneDNN is unavailable or the model is not on the CPU."""
    if not torch.backends.mkldnn.is_available():
        return model
    for mlp in [m for m in model.modules() if isinstance(m, VisionMLP)]:
        # the vision MLP's GELU moves into its packed first product (an identity takes its place)
        if type(mlp.fc1) is nn.Linear and mlp.fc1.weight.device.type == "cpu":
            mlp.fc1, mlp.activation = PackedLinear(mlp.fc1, gelu_tanh=True), nn.Identity()
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear and child.weight.device.type == "cpu":
                setattr(parent, name, PackedLinear(child))
    return model


