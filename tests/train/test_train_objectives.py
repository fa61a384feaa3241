import copy

import pytest
import torch

from attnlab.config import ModelConfig
from attnlab.model import build_model
from attnlab.train.objectives import (BlockwiseDistillation, GlobalDistillation, LanguageModeling,
                                      capture_attention_io, lm_loss)


def tiny(attention, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig.model_validate({"vocab_size": 40, "d_model": 32, "num_layers": 2, "block_size": 16,
                                      "attention": attention})
    return build_model(cfg)


STANDARD = {"type": "standard", "num_heads": 4, "num_kv_heads": 2}
DBA = {"type": "decoupled", "num_heads": 4, "num_kv_heads": 2, "sem_dim": 8, "geo_dim": 16, "v_dim": 32}


def test_hooks_capture_every_attention_layers_input_and_output():
    model = tiny(STANDARD)
    x = torch.randint(0, 40, (2, 10))
    with capture_attention_io(model) as io:
        model(x)
    assert sorted(io) == [0, 1]
    inp, out = io[1]
    assert inp.shape == out.shape == (2, 10, 32)
    from attnlab.nn.context import ForwardContext
    torch.testing.assert_close(model.attention_layers()[1](inp, ForwardContext(torch.arange(10))), out)


def test_blockwise_loss_is_zero_for_a_copy_and_trains_only_attention():
    teacher = tiny(STANDARD)
    student = copy.deepcopy(teacher)
    x = torch.randint(0, 40, (2, 10))
    objective = BlockwiseDistillation(teacher)
    assert objective(student, x, x).item() == pytest.approx(0.0, abs=1e-12)
    dba_student = tiny(DBA, seed=1)
    loss = objective(dba_student, x, x)
    assert loss.item() > 0
    loss.backward()
    with_grad = {n for n, p in dba_student.named_parameters() if p.grad is not None}
    assert with_grad and all(".attention." in n for n in with_grad)
    assert all(p.grad is None for p in teacher.parameters())


def test_global_distillation_mixes_ce_and_kl():
    teacher = tiny(STANDARD)
    x, y = torch.randint(0, 40, (2, 10)), torch.randint(0, 40, (2, 10))
    same = GlobalDistillation(teacher, ce_weight=0.0, kl_weight=1.0)(copy.deepcopy(teacher), x, y)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    student = tiny(STANDARD, seed=5)
    ce_only = GlobalDistillation(teacher, ce_weight=1.0, kl_weight=0.0)(student, x, y)
    torch.testing.assert_close(ce_only, LanguageModeling()(student, x, y))
    both = GlobalDistillation(teacher, ce_weight=1.0, kl_weight=1.0, temperature=2.0)(student, x, y)
    assert both.item() > ce_only.item()
    assert lm_loss(student(x), y).item() == pytest.approx(ce_only.item())
