import pytest
import torch

from nervedet import conv_relu
from nervedet.infer import _run, inference_network
from nervedet.weights import cpu_bf16_supported, load_model

pytestmark = pytest.mark.skipif(not conv_relu.available(torch.device("cpu"), "fp32"),
                                reason="this torch has no oneDNN convolution with a fused ReLU")


@pytest.fixture(scope="module")
def model():
    return load_model(None, device="cpu")


def _fused_count(net: torch.nn.Module) -> int:
    return sum(isinstance(m, conv_relu.ConvReLU) for m in net.modules())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_fused_network_computes_the_same_numbers_to_the_bit(model, precision) -> None:
    if precision == "bf16" and not cpu_bf16_supported():
        pytest.skip("this CPU has no native bf16")
    base, fused = inference_network(model), inference_network(model, precision)
    assert _fused_count(fused) >= 10 and _fused_count(base) == 0  # the U-Net's conv + ReLU pairs, not the base
    assert inference_network(model, precision) is fused  # made once
    x = torch.randn(2, 3, 160, 96).contiguous(memory_format=torch.channels_last)
    want, got = _run(base, x, model.device, precision), _run(fused, x, model.device, precision)
    assert want.abs().max() > 1.0
    # equal to the bit on the machines measured (oneDNN runs both); a ReLU lost or misplaced is off by O(1)
    tol = 1e-4 if precision == "fp32" else 0.05
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_fusing_skips_a_convolution_whose_output_is_used_elsewhere() -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = self.a(x)
            z = self.b(torch.relu(y))
            return torch.relu(z) + y  # a's output also feeds the sum: a and its ReLU stay apart

    net = torch.fx.symbolic_trace(Net().eval())
    fused, n = conv_relu.fuse_conv_relu(net, "fp32")
    assert n == 1 and _fused_count(fused) == 1
    x = torch.randn(2, 3, 20, 24).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = net(x)
        assert (want < 0).any()  # the sum is not all through a ReLU: a wrong fusion would show
        torch.testing.assert_close(fused(x), want, atol=1e-5, rtol=1e-5)


def test_a_fused_operation_that_fails_here_leaves_the_network_unfused(monkeypatch, caplog) -> None:
    model = load_model(None, device="cpu")  # a model of its own: inference_network caches per network

    def broken(*args):
        raise RuntimeError("no such kernel on this CPU")

    monkeypatch.setattr(conv_relu, "_OP", broken)
    net = inference_network(model, "fp32")
    assert net is inference_network(model) and _fused_count(net) == 0
    assert "not fused" in caplog.text and "no such kernel" in caplog.text
