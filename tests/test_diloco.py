import pytest
import torch

from gpunite.train.diloco import OuterOptimizer, pseudo_gradient
from gpunite.train.weights import TensorPayloadError


def test_pseudo_gradient_is_base_minus_local():
    base, local = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0])
    assert pseudo_gradient(base, local).tolist() == [0.5, -1.0]
    with pytest.raises(TensorPayloadError, match="expected"):
        pseudo_gradient(base, torch.zeros(3))


@pytest.mark.parametrize("nesterov", [True, False])
def test_outer_step_matches_torch_sgd(nesterov):
    torch.manual_seed(0)
    weights = torch.randn(257)
    reference = torch.nn.Parameter(weights.clone())
    sgd = torch.optim.SGD([reference], lr=0.7, momentum=0.9, nesterov=nesterov)
    outer = OuterOptimizer(lr=0.7, momentum=0.9, nesterov=nesterov)
    for _ in range(5):
        grad = torch.randn(257)
        weights = outer.step(weights, grad)
        reference.grad = grad.clone()
        sgd.step()
        assert torch.allclose(weights, reference.detach(), atol=1e-6)


def test_outer_step_by_hand_and_bitwise_deterministic():
    outer = OuterOptimizer(lr=0.5, momentum=0.5, nesterov=True)
    w = outer.step(torch.tensor([1.0]), torch.tensor([1.0]))  # buf 1, update 1 + 0.5 = 1.5
    assert w.tolist() == [0.25]
    w = outer.step(w, torch.tensor([2.0]))  # buf 0.5 + 2 = 2.5, update 2 + 1.25 = 3.25
    assert w.tolist() == [0.25 - 1.625]

    def run():
        g = torch.Generator().manual_seed(3)
        opt, weights = OuterOptimizer(), torch.randn(10_000, generator=g)
        for _ in range(4):
            weights = opt.step(weights, torch.randn(10_000, generator=g) * 1e-2)
        return weights

    assert torch.equal(run(), run())


def test_state_round_trip_continues_identically():
    torch.manual_seed(1)
    weights, grads = torch.randn(64), [torch.randn(64) for _ in range(4)]
    first = OuterOptimizer()
    assert first.state_tensors() == {}
    w1 = first.step(first.step(weights, grads[0]), grads[1])
    joiner = OuterOptimizer()
    joiner.load_state_tensors(first.state_tensors(), numel=64)
    assert torch.equal(first.step(w1, grads[2]), joiner.step(w1, grads[2]))
    with pytest.raises(TensorPayloadError, match="expected 65"):
        joiner.load_state_tensors(first.state_tensors(), numel=65)
    with pytest.raises(TensorPayloadError, match="non-finite"):
        joiner.load_state_tensors({"outer.momentum_buffer": torch.full((64,), float("nan"))}, numel=64)
    with pytest.raises(TensorPayloadError, match="unknown"):
        joiner.load_state_tensors({"other": torch.zeros(64)})
