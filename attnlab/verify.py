"""Verification of a student against its teacher: per-layer attention-output agreement (the
student's layers fed the teacher's layer inputs), logit agreement (mean/max |difference|, KL) and
behavioural cases; thresholds that are exceeded fail the run."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from attnlab.config.verify import Thresholds, VerifyCase, VerifyConfig
from attnlab.errors import AttnlabError
from attnlab.nn.context import ForwardContext
from attnlab.train.objectives import capture_attention_io


class VerificationError(AttnlabError):
    """A verification threshold was exceeded."""


@dataclass
class VerifyResult:
    attention: dict = field(default_factory=dict)   # mean_abs, max_abs (worst layer), per_layer
    logits: dict = field(default_factory=dict)      # mean_abs, max_abs, kl
    cases: list[dict] = field(default_factory=list)
    student_accuracy: float | None = None
    teacher_accuracy: float | None = None
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def agreement(student, teacher, batches: torch.Tensor) -> tuple[dict, dict]:
    """(attention, logits) agreement over ``batches`` (N, B, T) of token ids."""
    layer_mean, layer_max = {}, {}
    logit_sum = kl_sum = logit_max = 0.0
    count = tokens = 0
    for x in batches:
        with capture_attention_io(teacher) as io:
            t_logits = teacher(x).float()
        ctx = ForwardContext(positions=torch.arange(x.shape[1], device=x.device))
        for layer in student.attention_layers():
            inputs, target = io[layer.layer_index]
            diff = (layer(inputs, ctx).float() - target.float()).abs()
            layer_mean[layer.layer_index] = layer_mean.get(layer.layer_index, 0.0) + diff.mean().item()
            layer_max[layer.layer_index] = max(layer_max.get(layer.layer_index, 0.0), diff.max().item())
        s_logits = student(x).float()
        diff = (s_logits - t_logits).abs()
        logit_sum += diff.mean().item()
        logit_max = max(logit_max, diff.max().item())
        kl = F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True, reduction="sum")
        kl_sum += kl.item()
        tokens += x.numel()
        count += 1
    per_layer = {i: {"mean_abs": layer_mean[i] / count, "max_abs": layer_max[i]} for i in sorted(layer_mean)}
    attention = {"mean_abs": max(v["mean_abs"] for v in per_layer.values()),
                 "max_abs": max(v["max_abs"] for v in per_layer.values()), "per_layer": per_layer}
    logits = {"mean_abs": logit_sum / count, "max_abs": logit_max, "kl": kl_sum / tokens}
    return attention, logits


def _ids(text: str | None, ids: list[int] | None, tokenizer, what: str) -> list[int]:
    if ids is not None:
        return ids
    if tokenizer is None:
        raise AttnlabError(f"verify case {what}: text needs the run's tokenizer; give token ids instead")
    return tokenizer.encode(text)


@torch.no_grad()
def run_case(model, case: VerifyCase, tokenizer) -> tuple[bool, object]:
    """(correct, what the model answered)."""
    device = next(model.parameters()).device
    prompt = _ids(case.prompt, case.prompt_ids, tokenizer, case.id)
    if case.kind == "int_greedy":
        if tokenizer is None:
            raise AttnlabError(f"verify case {case.id}: int_greedy decodes text and needs the run's tokenizer")
        from attnlab.infer.generate import generate

        new = generate(model, [prompt], case.max_new_tokens).tokens[0]
        match = re.search(r"-?\d+", tokenizer.decode(new))
        got = int(match.group()) if match else None
        return got == int(case.answer), got
    options = case.choice_ids or [_ids(c, None, tokenizer, case.id) for c in case.choices]
    scores = []
    for option in options:
        ids = torch.tensor([prompt + option], device=device)
        logp = F.log_softmax(model(ids[:, :-1]).float(), -1)[0, len(prompt) - 1:]
        scores.append(logp.gather(-1, ids[0, len(prompt):, None]).sum().item())
    best = max(range(len(options)), key=scores.__getitem__)
    labels = case.choices or [str(i) for i in range(len(options))]
    answer = case.answer if isinstance(case.answer, str) else labels[case.answer]
    return labels[best] == answer, labels[best]


def _check(name: str, values: dict, limits: Thresholds | None, failures: list[str]) -> None:
    if limits is None:
        return
    for key, limit in (("mean_abs", limits.max_mean_abs), ("max_abs", limits.max_max_abs), ("kl", limits.max_kl)):
        if limit is not None and key in values and not values[key] <= limit:
            failures.append(f"{name} {key} {values[key]:.4g} exceeds {limit:g}")


def verify(student, teacher, cfg: VerifyConfig, batches: torch.Tensor, tokenizer=None) -> VerifyResult:
    result = VerifyResult()
    result.attention, result.logits = agreement(student, teacher, batches)
    _check("attention", result.attention, cfg.attention, result.failures)
    _check("logits", result.logits, cfg.logits, result.failures)
    if cfg.cases:
        s_ok = t_ok = 0
        for case in cfg.cases:
            s_right, s_answer = run_case(student, case, tokenizer)
            t_right, t_answer = run_case(teacher, case, tokenizer)
            s_ok += s_right
            t_ok += t_right
            result.cases.append({"id": case.id, "student": s_answer, "teacher": t_answer,
                                 "student_correct": s_right, "teacher_correct": t_right})
        result.student_accuracy, result.teacher_accuracy = s_ok / len(cfg.cases), t_ok / len(cfg.cases)
        if cfg.min_accuracy is not None and result.student_accuracy < cfg.min_accuracy:
            result.failures.append(f"student accuracy {result.student_accuracy:.3f} below {cfg.min_accuracy:g}")
        drop = result.teacher_accuracy - result.student_accuracy
        if cfg.max_accuracy_drop is not None and drop > cfg.max_accuracy_drop + 1e-12:
            result.failures.append(f"accuracy drop {drop:.3f} vs the teacher exceeds {cfg.max_accuracy_drop:g}")
    return result


def verify_and_record(student, teacher, cfg: VerifyConfig, batches: torch.Tensor, run_dir: Path,
                      tokenizer=None) -> VerifyResult:
    """Verify, write ``<run_dir>/verify.json``, and raise ``VerificationError`` on failure."""
    result = verify(student, teacher, cfg, batches, tokenizer)
    path = Path(run_dir) / "verify.json"
    path.write_text(json.dumps(result.to_dict(), indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v)))
    if result.failures:
        raise VerificationError(f"verification failed for {run_dir.name}: " + "; ".join(result.failures))
    return result
