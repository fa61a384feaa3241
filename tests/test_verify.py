import copy

import pytest
import torch

from attnlab.config import ModelConfig
from attnlab.config.verify import VerifyCase, VerifyConfig
from attnlab.data import build_tokenizer
from attnlab.config.data import TokenizerConfig
from attnlab.model import build_model
from attnlab.verify import VerificationError, run_case, verify, verify_and_record


def tiny(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig.model_validate({"vocab_size": 256, "d_model": 32, "num_layers": 2, "block_size": 32,
                                      "attention": {"type": "standard", "num_heads": 4}})
    return build_model(cfg).eval()


def batches():
    return torch.randint(0, 256, (2, 2, 12))


def test_identical_models_agree_exactly_and_pass():
    teacher = tiny()
    cfg = VerifyConfig.model_validate({"attention": {"max_max_abs": 1e-6}, "logits": {"max_kl": 1e-6, "max_max_abs": 1e-5}})
    result = verify(copy.deepcopy(teacher), teacher, cfg, batches())
    assert not result.failures and result.logits["kl"] == pytest.approx(0, abs=1e-7)
    assert set(result.attention["per_layer"]) == {0, 1}


def test_a_different_student_fails_with_a_one_line_reason(tmp_path):
    cfg = VerifyConfig.model_validate({"logits": {"max_kl": 1e-4}})
    with pytest.raises(VerificationError, match=r"logits kl .* exceeds 0.0001") as err:
        verify_and_record(tiny(1), tiny(0), cfg, batches(), tmp_path)
    assert "\n" not in str(err.value)
    assert (tmp_path / "verify.json").is_file()


def test_choice_logprob_picks_the_most_likely_choice():
    model = tiny()
    tok = build_tokenizer(TokenizerConfig(type="byte"))
    case = VerifyCase(id="c", kind="choice_logprob", prompt="ab", choices=["x", "yz"], answer="x")
    ok, picked = run_case(model, case, tok)
    ids = tok.encode("ab")
    scores = []
    for choice in ("x", "yz"):
        full = torch.tensor([ids + tok.encode(choice)])
        logp = torch.log_softmax(model(full[:, :-1]), -1)[0]
        scores.append(sum(logp[len(ids) - 1 + i, t].item() for i, t in enumerate(tok.encode(choice))))
    assert picked == ["x", "yz"][max(range(2), key=scores.__getitem__)] and ok == (picked == "x")


def test_accuracy_thresholds_and_ids_cases():
    teacher = tiny()
    cases = [{"id": f"c{i}", "kind": "choice_logprob", "prompt_ids": [1, 2, 3], "choice_ids": [[4], [5]], "answer": i % 2}
             for i in range(4)]
    cfg = VerifyConfig.model_validate({"cases": cases, "min_accuracy": 1.0})
    result = verify(teacher, teacher, cfg, batches())
    assert result.student_accuracy == 0.5 and result.failures == ["student accuracy 0.500 below 1"]
    cfg = VerifyConfig.model_validate({"cases": cases, "max_accuracy_drop": 0.0})
    assert not verify(teacher, teacher, cfg, batches()).failures


def test_int_greedy_needs_a_tokenizer():
    case = VerifyCase(id="n", kind="int_greedy", prompt_ids=[1, 2], answer=4)
    with pytest.raises(Exception, match="needs the run's tokenizer"):
        run_case(tiny(), case, None)
