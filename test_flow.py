"""Flow matching on its own (flow.py's toy): the policy's own functions learn two modes, not their average."""

import os
import subprocess
import sys

import pytest
import torch

from flow import sample_toy, train_toy, two_modes

HERE = os.path.dirname(os.path.abspath(__file__))


def test_flow_matching_samples_both_modes_where_regression_averages():
    model = train_toy(steps=400, seed=0)
    samples = sample_toy(model, n=2000)  # (n, 2) from noise by 10 Euler steps
    left, right = (samples[:, 0] < -1).float().mean(), (samples[:, 0] > 1).float().mean()
    assert 0.35 < left < 0.65 and 0.35 < right < 0.65  # both modes, about half each
    assert left + right > 0.85  # few samples in between, where the data has none
    # the modes' centres, (−2, 0) and (+2, 0), within 0.3
    for centre, part in ((-2.0, samples[samples[:, 0] < -1]), (2.0, samples[samples[:, 0] > 1])):
        torch.testing.assert_close(part.mean(0), torch.tensor([centre, 0.0]), atol=0.3, rtol=0)
    # regression on the same data learns the average, a point between the modes that no sample should be
    data = two_modes(4000, torch.Generator().manual_seed(3))[:, 0]
    assert data.mean(0).abs().max() < 0.15


@pytest.mark.parametrize("argv, message", [(["--steps", "0"], "--steps must be at least 1"),
                                           (["--plot", "no/such/folder/toy.png"], "its folder does not exist")])
def test_the_toy_refuses_bad_values_in_one_line(argv, message):
    result = subprocess.run([sys.executable, os.path.join(HERE, "flow.py"), *argv], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
