"""Every `device` key of the config follows one rule (utils.devices.resolve_device)."""
import pytest
import torch

from utils.devices import read_later, resolve_device
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


@pytest.mark.filterwarnings("ignore:CUDA is not available")
@pytest.mark.parametrize("native", [True, False])
def test_amp_auto_takes_bf16_only_where_the_gpu_computes_it_natively(monkeypatch, native):
    """torch counts emulated bf16 as supported by default (a V100 or T4 says yes); autocast
    `auto` must then fall back to fp16 with a gradient scaler, and `bf16` is refused."""
    from utils.data_utils import inference_autocast
    from utils.train_utils import amp_mode

    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native or including_emulation)
    cuda = torch.device("cuda")
    assert amp_mode("auto", cuda) == ("bf16" if native else "fp16")
    assert inference_autocast(cuda, "auto").fast_dtype == (torch.bfloat16 if native else torch.float16)
    if native:
        assert amp_mode("bf16", cuda) == "bf16"
    else:
        with pytest.raises(UserError, match="training.amp"):
            amp_mode("bf16", cuda)
        with pytest.raises(UserError, match="'eval.amp' is bf16 but this GPU"):
            inference_autocast(cuda, "bf16")


def test_read_later_on_the_cpu_reads_the_value():
    assert read_later(torch.tensor(2.5) * 2)() == 5.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_read_later_waits_for_its_own_value_only():
    """The training loop reads step k's loss after queueing step k+1: the read must not wait for
    step k+1 (a GPU sleep stands in for it), as .item() does."""
    stream = torch.cuda.current_stream()
    value = torch.full((), 3.0, device="cuda") * 2
    read = read_later(value)
    torch.cuda._sleep(1 << 31)  # ~1 s of the GPU's clock, queued after the value
    assert read() == 6.0
    assert not stream.query()  # the later work still runs
    torch.cuda.synchronize()

    value = torch.full((), 3.0, device="cuda") * 2
    torch.cuda._sleep(1 << 31)
    assert value.item() == 6.0
    assert stream.query()  # .item() waited for everything queued before it
