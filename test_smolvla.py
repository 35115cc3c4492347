"""Tests of the model against the reference implementation's outputs (testdata/, see its README)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from smolvla import SmolVLA

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "testdata", "smolvla_tiny")
TOL = 1e-5  # fp32 on CPU: a faithful reimplementation agrees to this


@pytest.fixture(scope="module")
def tiny():
    return SmolVLA.from_pretrained(os.path.join(TINY, "checkpoint"), vlm=os.path.join(TINY, "vlm"))


@pytest.fixture(scope="module")
def io():
    return load_file(os.path.join(TINY, "io.safetensors"))


def tensor_inputs(io):
    batch = io["state"].shape[0]
    images = [io["image0"], io["image1"]]
    return images, [torch.ones(batch, dtype=torch.bool)] * 2, io["lang_tokens"], io["lang_masks"], io["state"]


def test_compute_loss_matches_reference(tiny, io):
    with torch.no_grad():
        losses = tiny.compute_loss(*tensor_inputs(io), io["actions"], noise=io["noise"], time=io["time"])
    assert losses.shape == io["expected_losses"].shape
    torch.testing.assert_close(losses, io["expected_losses"], atol=TOL, rtol=0)
    # the scalar training loss: mean over in-episode steps and the real action dims
    valid = ~io["action_is_pad"]
    loss = (losses[:, :, :6] * valid[..., None]).sum() / (valid.sum() * 6)
    torch.testing.assert_close(loss.reshape(1), io["expected_loss"], atol=TOL, rtol=0)


def test_sample_actions_matches_reference(tiny, io):
    chunk = tiny.sample_actions(*tensor_inputs(io), noise=io["sample_noise"])
    torch.testing.assert_close(chunk, io["expected_sampled"], atol=TOL, rtol=0)


def test_predict_chunk_matches_reference(tiny, io):
    meta = json.load(open(os.path.join(TINY, "io.json")))
    tokens, _ = tiny.tokenize(meta["policy_task"])
    assert torch.equal(tokens, io["policy_lang_tokens"])
    observation = {
        "observation.state": io["policy_state_raw"],
        "observation.images.top": io["image0"][0],
        "observation.images.wrist": io["image1"][0],
        "task": meta["policy_task"],
    }
    chunk = tiny.predict_chunk(observation, noise=io["sample_noise"][:1])
    assert chunk.shape == (1, 50, 6)
    torch.testing.assert_close(chunk, io["policy_expected_chunk"], atol=TOL, rtol=TOL)
