"""Every `device` key of the config follows one rule (utils.devices.resolve_device)."""
import pytest
import torch

from utils.devices import resolve_device
from utils.errors import UserError


def test_cpu_and_auto():
    assert resolve_device("cpu", "eval.device") == "cpu"
    assert resolve_device("auto", "eval.device") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_unknown_setting_names_the_key():
    with pytest.raises(UserError, match="features.device"):
        resolve_device("tpu", "features.device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_a_user_error():
    with pytest.raises(UserError, match="training.device.*no CUDA device"):
        resolve_device("cuda", "training.device")
