"""Speed: the steps that make SmolVLA fast on a CPU, applied from outside the model by `prepare`.

(The model files stay the plain path a student steps through; this file changes a built model in place.)
"""

import torch
import torch.nn.functional as F
from torch import nn

from smolvla import VisionMLP


def prepare(model: nn.Module, training: bool = False, pack: bool = True, compile: bool = False) -> nn.Module:
    """Apply the speed steps to a model whose weights, device and dtype are final; returns it.

    inference (training=False): linear layers pre-packed for oneDNN on the CPU (pack).
    compile: torch.compile the vision tower and the expert (inductor packs the weights itself: no pack).
    """
    if compile:
        torch._inductor.config.freezing = True  # weights as constants: pre-packed for oneDNN, folded
        model.vision.compile()
        model.expert.compile()
    elif pack and not training:
        pack_linear_layers(model)
    return model


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


