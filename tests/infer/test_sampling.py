import pytest
import torch

from attnlab.infer import SamplingConfig, filtered_probs, select_next


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    assert select_next(logits, SamplingConfig(temperature=0.0)).tolist() == [1, 0]


def test_top_k_keeps_k_largest():
    probs = filtered_probs(torch.tensor([[1.0, 4.0, 3.0, 2.0]]), SamplingConfig(top_k=2))
    assert (probs[0, [0, 3]] == 0).all()
    torch.testing.assert_close(probs[0, [1, 2]], torch.softmax(torch.tensor([4.0, 3.0]), 0))


def test_top_p_keeps_smallest_prefix_reaching_p():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    probs = filtered_probs(p.log(), SamplingConfig(top_p=0.8))
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    probs = filtered_probs(p.log(), SamplingConfig(top_p=0.81))
    assert probs[0, 2] > 0 and probs[0, 3] == 0


def test_temperature_sharpens_and_sampling_is_seeded():
    logits = torch.tensor([[1.0, 2.0]])
    hot, cold = filtered_probs(logits, SamplingConfig(2.0)), filtered_probs(logits, SamplingConfig(0.5))
    assert cold[0, 1] > hot[0, 1]
    draw = lambda seed: select_next(torch.zeros(1, 50).repeat(64, 1), SamplingConfig(), torch.Generator().manual_seed(seed))
    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))


@pytest.mark.parametrize("kw", [{"temperature": -1.0}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_invalid_settings_rejected(kw):
    with pytest.raises(ValueError):
        SamplingConfig(**kw)
