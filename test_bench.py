"""Tests of the speed work: the fused attention computes the plain formula, bfloat16 stays faithful to the
reference's float32 actions, the FLOP count is what the model really multiplies, and bench.py keeps its
command-line contract (last line a JSON object with "chunk_s")."""

import json
import shutil
import subprocess
import sys
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import bench
import speed
from expert import attention
from policy import SmolVLAPolicy
from smolvla import SmolVLA
from speed import PackedLinear, pack_linear_layers
from vlm import SMOLVLM2_500M_VIDEO_INSTRUCT

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "testdata", "smolvla_tiny")
CKPT, VLM = os.path.join(TINY, "checkpoint"), os.path.join(TINY, "vlm")


def plain_sdpa(q, k, v, attn_mask=None, enable_gqa=False):
    """softmax(q·kᵀ/√d + mask)·v written out with matmuls, float32 scores, kv heads repeated per group;
    a fully masked row gives zeros, as the fused kernel does. q (B, H, Lq, d), k/v (B, Hkv, Lk, d)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(2, 3)) * q.shape[-1] ** -0.5  # (B, H, Lq, Lk)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.matmul(probs.to(v.dtype), v)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_attention_is_the_plain_formula(dtype, tol):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 9, 6, 16, generator=g).to(dtype)  # 6 query heads
    k = torch.randn(2, 13, 2, 16, generator=g).to(dtype)  # 2 kv heads: groups of 3
    v = torch.randn(2, 13, 2, 16, generator=g).to(dtype)
    mask = torch.rand(2, 9, 13, generator=g) > 0.4
    mask[0, 3] = False  # a query that may attend to nothing (a padding token)
    out = attention(q, k, v, mask)  # (B, Lq, H·d)
    expected = plain_sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask[:, None])
    expected = expected.transpose(1, 2).flatten(2)
    assert out.shape == (2, 9, 6 * 16) and out.dtype == dtype
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)
    assert out[0, 3].abs().max() == 0
    # without a mask (the vision tower) and without grouping
    torch.testing.assert_close(
        attention(q, q, q, None).float(),
        plain_sdpa(*(q.transpose(1, 2),) * 3).transpose(1, 2).flatten(2).float(), atol=tol, rtol=tol,
    )


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_attention_written_out_is_the_fused_call(dtype, tol):
    """expert.attention's two branches: the formula written out (fused=False) and the fused kernel."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 7, 6, 8, generator=g).to(dtype)  # 6 query heads
    k, v = torch.randn(2, 2, 11, 2, 8, generator=g).to(dtype)  # 2 kv heads: groups of 3
    mask = torch.rand(2, 7, 11, generator=g) > 0.5
    mask[1, 2] = False  # a query that may attend to nothing: zeros in both
    for m in (mask, None):
        written_out, fused = attention(q, k, v, m, fused=False), attention(q, k, v, m)
        assert written_out.shape == fused.shape == (2, 7, 6 * 8) and written_out.dtype == fused.dtype == dtype
        torch.testing.assert_close(written_out.float(), fused.float(), atol=tol, rtol=tol)


def sample(model, io):
    images, masks = [io["image0"], io["image1"]], [torch.ones(2, dtype=torch.bool)] * 2
    return model.sample_actions(images, masks, io["lang_tokens"], io["lang_masks"], io["state"], io["sample_noise"])


@pytest.mark.parametrize("packed", [False, True])
def test_bf16_sampled_actions_within_0_05_of_the_fp32_reference(io, packed):
    """bench.py's bf16 model (weights and activations bf16; RMSNorm, RoPE, softmax and the velocity
    projection in fp32), with and without packed weights, against the reference's fp32 actions."""
    model = SmolVLAPolicy.from_pretrained(CKPT, vlm=VLM).to(torch.bfloat16)
    if packed:
        pack_linear_layers(model)
        # packed where this CPU runs oneDNN's bf16 kernel; elsewhere (AVX2 only, some ARM) the plain path
        runs_packed = speed.packing_unsupported(torch.bfloat16) is None
        assert isinstance(model.expert.layers[0].mlp.up_proj, PackedLinear) == runs_packed
    assert model.expert.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    chunk = sample(model, io)
    assert chunk.dtype == torch.float32
    error = (chunk - io["expected_sampled"]).abs().max().item()
    assert 1e-5 < error < 0.05  # really computed in bf16, and close to the reference


@pytest.mark.parametrize("fused", [True, False])
def test_packed_fp32_model_is_the_reference_to_1e_5(io, fused, monkeypatch):
    """Either choice of the vision MLP's GELU (fused into the packed product or a separate pass, which
    speed.fuse_gelu makes by timing both on the machine) computes the reference's actions."""
    monkeypatch.setattr(speed, "fuse_gelu", lambda *shape: fused)
    model = pack_linear_layers(SmolVLAPolicy.from_pretrained(CKPT, vlm=VLM))
    mlp = model.vision.encoder["layers"][0].mlp
    assert isinstance(mlp.fc1, PackedLinear) and mlp.fc1.gelu_tanh == fused
    assert isinstance(mlp.activation, torch.nn.Identity) == fused  # the GELU moved into the product, or not
    torch.testing.assert_close(sample(model, io), io["expected_sampled"], atol=1e-5, rtol=0)
    # same names and tensors in the state dict: a packed model saves like any other
    assert model.state_dict().keys() == SmolVLAPolicy.from_pretrained(CKPT, vlm=VLM).state_dict().keys()
    # gradient-tracking calls take the plain (differentiable) path
    images, masks = [io["image0"], io["image1"]], [torch.ones(2, dtype=torch.bool)] * 2
    tokens, token_masks = io["lang_tokens"], io["lang_masks"]
    losses = model.compute_loss(images, masks, tokens, token_masks, io["state"], io["actions"], io["noise"], io["time"])
    torch.testing.assert_close(losses, io["expected_losses"], atol=1e-5, rtol=0)
    losses.mean().backward()
    assert model.expert.layers[0].mlp.up_proj.weight.grad is not None


def test_flop_count_is_what_the_model_multiplies(tiny, monkeypatch):
    """chunk_flops (from the architecture) equals the FLOPs PyTorch counts in the matrix products of one
    chunk, with attention written out as matmuls so that the counter sees it."""
    monkeypatch.setattr(F, "scaled_dot_product_attention", plain_sdpa)
    inputs = bench.make_inputs(tiny, batch=1, height=48, width=64, lang_tokens=7)
    with FlopCounterMode(display=False) as counter:
        bench.sample_chunk(tiny, inputs)
    assert bench.chunk_flops(tiny, 48, 64, lang_tokens=7)["total"] == counter.get_total_flops()


def test_smolvla_base_chunk_is_about_580_gflop():
    with torch.device("meta"):  # the architecture only, no memory
        model = SmolVLA(bench.base_config(2), SMOLVLM2_500M_VIDEO_INSTRUCT)
    flops = bench.chunk_flops(model, 480, 640)
    assert 425e9 < flops["vision"] < 435e9  # 2 × SigLIP at 512×512 (1024 patches)
    assert 45e9 < flops["vlm_prefix"] < 55e9  # 16 layers over 128 image + 20 word + 1 state tokens
    assert flops["expert"] == 10 * flops["expert_step"] and 95e9 < flops["expert"] < 110e9
    assert 570e9 < flops["total"] < 590e9


def test_bench_contract_last_line_is_json_with_chunk_s(capsys):
    bench.main(["--checkpoint", CKPT, "--vlm", VLM, "--dtype", "bf16", "--cameras", "2", "--height", "48",
                "--width", "64", "--repeats", "2", "--warmup", "0", "--threads", "1", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["chunk_s"] > 0 and result["gflops"] > 0 and len(result["wall_s"]) == 2
    assert result["threads"] == 1 and result["dtype"] == "bf16" and result["batch"] == 1


def test_fuse_gelu_is_timed_once_and_remembered(monkeypatch):
    """The choice is the faster candidate, measured on the first call for a shape and dtype only."""
    timings = []
    fake = {"fused": 0.2, "separate": 0.1}
    monkeypatch.setattr(speed, "linear_candidates", lambda *shape, gelu: timings.append(shape) or dict(fake))
    monkeypatch.setattr(speed, "CHOICES", {})
    assert not speed.fuse_gelu(8, 4, 16, torch.float32) and not speed.fuse_gelu(8, 4, 16, torch.float32)
    fake["fused"] = 0.05
    assert speed.fuse_gelu(8, 4, 16, torch.bfloat16) and len(timings) == 2
    assert speed.CHOICES[("vision MLP GELU", "bfloat16", (8, 4, 16))]["choice"] == "fused"


def test_bench_times_train_py_s_step_and_reports_errors(monkeypatch):
    """--train runs train.py's own preparation and step (a spy counts them) on a batch as its loop gets it."""
    import train

    calls = []
    monkeypatch.setattr(bench, "training_step", lambda *a: calls.append(a[3]) or train.training_step(*a))
    common = ["--checkpoint", CKPT, "--vlm", VLM, "--height", "48", "--width", "64", "--threads", "1"]
    result = bench.main(common + ["--train", "--dtype", "bf16", "--repeats", "1", "--warmup", "0"])
    assert result["train_step_s"] > 0 and result["batch"] == 2 and result["trained_params"] > 0
    assert len(calls) == 1 and calls[0]["task"] == [bench.TASK] * 2 and calls[0]["action_is_pad"].shape == (2, 50)
    assert all(calls[0][k].dtype == torch.uint8 for k in ("observation.images.top", "observation.images.wrist"))
    assert 0 < result["peak_fraction"] and result["peak_gflops"] > 0
    assert result["packed"] and not result["compiled"]
    with pytest.raises(ValueError, match="the checkpoint reads 2"):
        bench.main(common + ["--cameras", "3"])


def test_table_has_both_dtypes_the_training_step_the_reference_and_the_machine(capsys):
    """--table with a reference command (a stand-in for `bench.py --lerobot` that echoes its arguments and
    reports 2 s a chunk and 4 s a training step)."""
    common = ["--checkpoint", CKPT, "--vlm", VLM, "--height", "48", "--width", "64", "--threads", "1",
              "--repeats", "1", "--warmup", "0"]
    echo = "import json, sys; print(json.dumps({'chunk_s': 2.0, 'train_step_s': 4.0, 'cpu_s': [4.0], 'argv': sys.argv[1:]}))"
    results = bench.main(common + ["--table", "--json", "--reference", f"{sys.executable} -c \"{echo}\""])
    out = capsys.readouterr().out.splitlines()
    assert [(r["mode"], r["dtype"]) for r in results] == [("chunk", "bf16"), ("chunk", "fp32"), ("train", "fp32")]
    assert json.loads(out[-1])[0]["chunk_s"] == results[0]["chunk_s"]
    for r in results:  # the reference ran with the same shapes, dtype and mode
        argv = r["reference"]["argv"]
        assert argv[argv.index("--dtype") + 1] == r["dtype"] and ("--train" in argv) == (r["mode"] == "train")
        assert argv[argv.index("--height") + 1] == "48" and argv[argv.index("--batch") + 1] == str(r["batch"])
        assert r["vs_reference"] == r["train_step_s" if r["mode"] == "train" else "chunk_s"] / (4 if r["mode"] == "train" else 2)
        assert r["peak_gflops"] > 0 and r["peak_fraction"] == r["gflops"] / r["peak_gflops"]
    rows = [line for line in out if line.startswith(("chunk bf16", "chunk fp32", "train step fp32"))]
    assert len(rows) == 3 and all(line.count("s") >= 2 and line.count("x") == 2 and "%" in line for line in rows)
    machine = speed.machine()
    assert any(line.startswith(f"machine: {machine['cpu']}") and "AMX" in line for line in out)


def test_untracked_prefix_gives_the_same_loss_and_gradients(io):
    """Training with the frozen VLM tracks only the state token through the VLM; unfreezing the text model
    turns that off. Same loss, same gradients of the trained weights either way (the text model's own
    gradients left aside)."""
    model = speed.prepare(SmolVLAPolicy.from_pretrained(CKPT, vlm=VLM), training=True)
    images, masks = [io["image0"], io["image1"]], [torch.ones(2, dtype=torch.bool)] * 2
    args = (images, masks, io["lang_tokens"], io["lang_masks"], io["state"], io["actions"], io["noise"], io["time"])
    grads = []
    for text_trained in (False, True):
        model.text.requires_grad_(text_trained)
        model.zero_grad(set_to_none=True)
        losses = model.compute_loss(*args)
        torch.testing.assert_close(losses, io["expected_losses"], atol=1e-5, rtol=0)
        losses.mean().backward()
        grads.append([p.grad.clone() for p in (model.state_proj.weight, model.expert.layers[1].self_attn.k_proj.weight,
                                               model.expert.layers[0].mlp.up_proj.weight)])
    for tracked_all, state_only in zip(*grads):
        torch.testing.assert_close(state_only, tracked_all, atol=1e-6, rtol=1e-4)
    assert grads[0][0].abs().max() > 0  # the state projection does get a gradient through the VLM


def test_bench_reads_every_camera_of_a_checkpoint_by_default(tmp_path, capsys):
    """Without --cameras a checkpoint is benchmarked with its own cameras (here one), not smolvla_base's two."""
    one_camera = tmp_path / "one_camera"
    shutil.copytree(CKPT, one_camera)
    config = json.loads((one_camera / "config.json").read_text())
    del config["input_features"]["observation.images.wrist"]
    (one_camera / "config.json").write_text(json.dumps(config))
    bench.main(["--checkpoint", str(one_camera), "--vlm", VLM, "--dtype", "fp32", "--height", "48", "--width", "64",
                "--repeats", "1", "--warmup", "0", "--threads", "1"])
    assert f"bench: ours, {one_camera}, 1 cameras 48x64" in capsys.readouterr().out


def test_data_benchmark_on_a_folder_that_is_no_dataset_is_one_error_line(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py"),
                             "--data", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"bench: error: {tmp_path} is missing meta/info.json: not a complete LeRobot dataset."]


def test_bf16_training_keeps_the_frozen_vlm_in_bf16_and_stays_near_the_fp32_reference(io):
    """train.py --bf16: speed.prepare(training=True, autocast=True) casts the frozen parts to bf16 once (what
    autocast multiplies with anyway; smolvla_base stores its VLM in bf16) and keeps the trained ones in
    float32 for the optimizer. Losses stay within bf16 rounding of the reference's float32 losses."""
    model = speed.prepare(SmolVLAPolicy.from_pretrained(CKPT, vlm=VLM), training=True, autocast=True).train()
    assert model.vision.encoder["layers"][0].mlp.fc1.weight.dtype == torch.bfloat16
    assert model.text.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert model.expert.layers[0].mlp.up_proj.weight.dtype == model.state_proj.weight.dtype == torch.float32
    images, masks = [io["image0"], io["image1"]], [torch.ones(2, dtype=torch.bool)] * 2
    args = (images, masks, io["lang_tokens"], io["lang_masks"], io["state"], io["actions"], io["noise"], io["time"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.compute_loss(*args)
    expected = io["expected_losses"]
    error = (losses.float() - expected).abs().max().item()
    assert 1e-5 < error < 0.01 * expected.abs().max().item()  # really bf16, within 1% of the largest loss
    assert abs(losses.float().mean() - expected.mean()) < 1e-3 * expected.mean()
    losses.mean().backward()
    assert model.expert.layers[0].mlp.up_proj.weight.grad.dtype == torch.float32
    assert model.text.layers[0].mlp.up_proj.weight.grad is None


# ----------------------------------------------------------------------------------------------------
# Every CPU a student brings: each capability check forced to "unsupported" (the other machines simulated
# here), and the model still gives the reference's numbers through the plain path, with bench saying so.


def refuse_to_pack(weight, *args):
    raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or avx512bw, "
                       "avx512vl and avx512dq")


UNSUPPORTED = {
    # torch built without oneDNN
    "no oneDNN": (torch.backends.mkldnn, "is_available", lambda: False, "oneDNN is not in this torch build"),
    # an x86 CPU without AVX-512 (AMD Zen 2/3, Intel consumer chips): oneDNN has no bf16 kernel
    "no oneDNN bf16": (torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False, "bf16 packing unsupported"),
    # torch's checks pass but the kernel itself refuses (what the AVX2 machine raised before this guard)
    "packing fails": (torch.ops.mkldnn, "_reorder_linear_weight", refuse_to_pack, "packed kernel failed"),
}


@pytest.fixture
def fresh_speed_records(monkeypatch):
    """speed's per-process records (packing trials, timing choices, paths) empty for this test alone."""
    monkeypatch.setattr(speed, "PACKING_TRIALS", {})
    monkeypatch.setattr(speed, "CHOICES", {})
    monkeypatch.setattr(speed, "PATHS", {})


@pytest.mark.parametrize("forced", sorted(UNSUPPORTED))
def test_forced_unsupported_packing_takes_the_plain_path_with_the_reference_s_numbers(io, forced, monkeypatch,
                                                                                       fresh_speed_records):
    namespace, name, answer, reason = UNSUPPORTED[forced]
    if forced == "packing fails":  # torch's checks pass, whatever this machine's own answer
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(namespace, name, answer)
    dtypes = [torch.bfloat16] if forced == "no oneDNN bf16" else [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        model = speed.prepare(SmolVLAPolicy.from_pretrained(CKPT, vlm=VLM).to(dtype))
        assert not any(isinstance(m, PackedLinear) for m in model.modules())
        mlp = model.vision.encoder["layers"][0].mlp
        assert isinstance(mlp.activation, torch.nn.Module) and not isinstance(mlp.activation, torch.nn.Identity)
        what = f"linear layers, {str(dtype).removeprefix('torch.')}"
        assert speed.PATHS[what].startswith(f"plain: {reason}")
        chunk = sample(model, io)
        error = (chunk - io["expected_sampled"]).abs().max().item()
        if dtype == torch.float32:
            assert error < 1e-5  # the reference's numbers
        else:
            assert 1e-5 < error < 0.05  # really bf16, close to the reference
    assert speed.CHOICES == {}  # nothing timed that cannot run (the fused GELU needs the packed kernel)


def test_forced_unsupported_bf16_warns_once_and_bench_reports_the_path(monkeypatch, capsys, fresh_speed_records):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    result = bench.main(["--checkpoint", CKPT, "--vlm", VLM, "--dtype", "bf16", "--height", "48", "--width", "64",
                         "--repeats", "1", "--warmup", "0", "--threads", "1", "--json"])
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "emulated and slower than float32" in warnings[0] and "float32" in warnings[0]
    assert result["bf16_emulated"] and result["chunk_s"] > 0  # still measured
    assert result["paths"]["linear layers, bfloat16"] == "plain: bf16 packing unsupported on this CPU"
    assert result["peak_gflops"] > 0  # the plain kernel's peak: the packed one is not timed
    assert json.loads(out.splitlines()[-1])["paths"] == result["paths"]
    assert "path (chunk bf16) linear layers, bfloat16: plain: bf16 packing unsupported on this CPU" in out
    assert not speed.warn_if_bf16_emulated(torch.float32, "--dtype float32")  # float32: nothing to say


def test_forced_missing_compiler_runs_uncompiled_with_the_reference_s_numbers(io, monkeypatch, capsys,
                                                                               fresh_speed_records):
    import torch._inductor.cpp_builder as cpp_builder

    def no_compiler():
        raise RuntimeError("Unsupported: no C++ compiler found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    model = speed.prepare(SmolVLAPolicy.from_pretrained(CKPT, vlm=VLM), compile=True)
    assert speed.PATHS["torch.compile"].startswith("not compiled: torch.compile needs a C++ compiler")
    assert "warning: --compile:" in capsys.readouterr().err
    assert not hasattr(model.vision, "_compiled_call_impl") or model.vision._compiled_call_impl is None
    torch.testing.assert_close(sample(model, io), io["expected_sampled"], atol=1e-5, rtol=0)


def test_machine_is_what_torch_says_the_cpu_can_do(monkeypatch):
    """No choice reads the CPU's name: machine()'s flags are torch's own answers (here forced)."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "NO AVX")
    found = speed.machine()
    assert found["amx"] and not found["onednn_bf16"] and found["capability"] == "NO AVX"
    assert speed.bf16_emulated()
