"""llama2.c legacy ``.bin`` checkpoints (karpathy/llama2.c ``export.py --version 0``).

Layout (little-endian), as ``memory_map_weights`` in llama2.c's ``run.c`` reads it::

    int32 x 7   dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
                (vocab_size < 0: the classifier is stored separately, else it is the embedding)
    float32     token_embedding_table (vocab, dim)
                rms_att_weight (layers, dim)
                wq (layers, n_heads*hs, dim)   wk, wv (layers, n_kv_heads*hs, dim)
                wo (layers, dim, n_heads*hs)
                rms_ffn_weight (layers, dim)
                w1 (layers, hidden, dim)   w2 (layers, dim, hidden)   w3 (layers, hidden, dim)
                rms_final_weight (dim,)
                freq_cis_real, freq_cis_imag (seq_len * hs/2 each; unused, skipped)
                wcls (vocab, dim)              only when vocab_size < 0

with hs = dim / n_heads. Matrices are (out, in), torch ``nn.Linear`` layout; w1 is the SwiGLU
gate, w3 the up projection, w2 the down projection. llama2.c rotates interleaved pairs
(x[2i], x[2i+1]) with theta 10000 and normalizes with RMSNorm eps 1e-5.

By default the model keeps the file's weights byte for byte and uses ``rope.style: interleaved``;
``rope_style="half"`` permutes the q/k rows to the half-split layout instead (same logits).
Either way ``export_hf_llama`` writes a correct half-split Hugging Face checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from attnlab.config.base import validate_section
from attnlab.config.model import ModelConfig
from attnlab.convert.common import interleaved_to_half, model_from_state
from attnlab.errors import AttnlabError, CheckpointError
from attnlab.model.decoder import DecoderLM

HEADER_BYTES = 7 * 4
_HEADER_NAMES = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
_PER_LAYER = frozenset({"rms_att_weight", "wq", "wk", "wv", "wo", "rms_ffn_weight", "w1", "w2", "w3"})
_MAGIC_V1 = 0x616B3432  # "ak42": llama2.c's newer export versions, which this reader does not take


def read_header(path: Path) -> dict[str, int]:
    """The seven header fields (``vocab_size`` made positive, ``shared_classifier`` added),
    checked for consistency."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise CheckpointError(f"{path}: {len(raw)} bytes, too short for a llama2.c header ({HEADER_BYTES} bytes)")
    if raw[:4] == b"PK\x03\x04":
        raise CheckpointError(f"{path}: a zip archive (a PyTorch .bin?), not a llama2.c checkpoint; "
                              f"Hugging Face models load from their folder (safetensors)")
    values = np.frombuffer(raw, dtype="<i4").tolist()
    if np.frombuffer(raw[:4], dtype="<u4")[0] == _MAGIC_V1:
        raise CheckpointError(f"{path}: llama2.c export version >= 1 (magic 'ak42') is unsupported; "
                              f"export with --version 0 (the legacy format)")
    head = dict(zip(_HEADER_NAMES, values))
    bad = [f"{k}={v}" for k, v in head.items() if (v == 0 if k == "vocab_size" else v <= 0)]
    if bad:
        raise CheckpointError(f"{path}: not a llama2.c checkpoint (header has {', '.join(bad)})")
    head["shared_classifier"] = int(head["vocab_size"] > 0)
    head["vocab_size"] = abs(head["vocab_size"])
    if head["dim"] % head["n_heads"] or (head["dim"] // head["n_heads"]) % 2:
        raise CheckpointError(f"{path}: dim={head['dim']} must split into n_heads={head['n_heads']} heads of even size")
    if head["n_heads"] % head["n_kv_heads"]:
        raise CheckpointError(f"{path}: n_heads={head['n_heads']} is not a multiple of n_kv_heads={head['n_kv_heads']}")
    _check_size(path, head)  # before anything is built from the header (compile-time sources too)
    return head


def _check_size(path: Path, h: dict[str, int]) -> None:
    """The file holds exactly the float32 arrays the header implies: a header claiming a billion
    layers in a few-byte file fails here, before any config or model is built from it."""
    expected = HEADER_BYTES + 4 * sum(int(np.prod(shape, dtype=object)) for _, shape in _layout(h))
    actual = Path(path).stat().st_size
    if actual != expected:
        what = "truncated" if actual < expected else "larger than the header implies"
        header = ", ".join(f"{k}={h[k]}" for k in _HEADER_NAMES)
        raise CheckpointError(f"{path}: {what}: the header ({header}, "
                              f"{'shared' if h['shared_classifier'] else 'separate'} classifier) needs "
                              f"{expected} bytes, the file has {actual}")


def _layout(h: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every float32 array in file order."""
    dim, hidden, layers, vocab = h["dim"], h["hidden_dim"], h["n_layers"], h["vocab_size"]
    hs = dim // h["n_heads"]
    q_dim, kv_dim = h["n_heads"] * hs, h["n_kv_heads"] * hs
    out = [
        ("token_embedding_table", (vocab, dim)),
        ("rms_att_weight", (layers, dim)),
        ("wq", (layers, q_dim, dim)),
        ("wk", (layers, kv_dim, dim)),
        ("wv", (layers, kv_dim, dim)),
        ("wo", (layers, dim, q_dim)),
        ("rms_ffn_weight", (layers, dim)),
        ("w1", (layers, hidden, dim)),
        ("w2", (layers, dim, hidden)),
        ("w3", (layers, hidden, dim)),
        ("rms_final_weight", (dim,)),
        ("freq_cis_real", (h["seq_len"], hs // 2)),
        ("freq_cis_imag", (h["seq_len"], hs // 2)),
    ]
    if not h["shared_classifier"]:
        out.append(("wcls", (vocab, dim)))
    return out


def llama2c_model_config(h: dict[str, int], rope_style: str = "interleaved") -> ModelConfig:
    data = {
        "vocab_size": h["vocab_size"],
        "d_model": h["dim"],
        "block_size": h["seq_len"],
        "num_layers": h["n_layers"],
        "attention": {"type": "standard", "num_heads": h["n_heads"], "num_kv_heads": h["n_kv_heads"],
                      "rope": {"theta": 10000.0, "style": rope_style}},
        "mlp": {"type": "swiglu", "d_ff": h["hidden_dim"]},
        "norm": "rmsnorm",
        "norm_eps": 1e-5,
        "tie_embeddings": bool(h["shared_classifier"]),
    }
    try:
        return validate_section(ModelConfig, data, "model")
    except AttnlabError as err:  # e.g. an odd head size, or sizes over the configured limits
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"llama2.c header does not describe a valid model ({first})") from None


def load_llama2c(path: str | Path, *, rope_style: str = "interleaved") -> DecoderLM:
    """A llama2.c legacy ``.bin`` as an attnlab ``DecoderLM`` (float32, eval mode).

    ``rope_style="interleaved"`` (default) keeps the weights as stored; ``"half"`` permutes q/k
    rows to the half-split RoPE layout of Hugging Face (the logits are the same)."""
    if rope_style not in ("interleaved", "half"):
        raise ValueError(f"rope_style must be 'interleaved' or 'half', got {rope_style!r}")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such llama2.c checkpoint")
    h = read_header(path)  # checks the file size against the header too
    layout = _layout(h)
    # per-layer arrays are read layer by layer, so every parameter owns its memory (no views into
    # one big buffer: safetensors export and optimizers expect independent tensors)
    arrays: dict[str, list[torch.Tensor] | torch.Tensor] = {}
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        for name, shape in layout:
            if name.startswith("freq_cis"):
                f.seek(4 * int(np.prod(shape)), 1)
                continue
            stacked = name in _PER_LAYER
            parts = []
            for _ in range(shape[0] if stacked else 1):
                part_shape = shape[1:] if stacked else shape
                count = int(np.prod(part_shape))
                data = np.fromfile(f, dtype="<f4", count=count)
                assert data.size == count, (name, data.size, count)  # the size was checked above
                parts.append(torch.from_numpy(data.astype(np.float32, copy=False)).reshape(part_shape))
            arrays[name] = parts if stacked else parts[0]

    cfg = llama2c_model_config(h, rope_style)
    n_heads, n_kv = h["n_heads"], h["n_kv_heads"]

    def qk(w: torch.Tensor, heads: int) -> torch.Tensor:  # q/k rows in the chosen RoPE layout
        return interleaved_to_half(w, heads) if rope_style == "half" else w

    state = {"embed.weight": arrays["token_embedding_table"], "final_norm.weight": arrays["rms_final_weight"]}
    if not h["shared_classifier"]:
        state["lm_head.weight"] = arrays["wcls"]
    for i in range(h["n_layers"]):
        p = f"body.layers.{i}."
        state[p + "attention_norm.weight"] = arrays["rms_att_weight"][i]
        state[p + "attention.query.weight"] = qk(arrays["wq"][i], n_heads)
        state[p + "attention.key.weight"] = qk(arrays["wk"][i], n_kv)
        state[p + "attention.value.weight"] = arrays["wv"][i]
        state[p + "attention.out.weight"] = arrays["wo"][i]
        state[p + "mlp_norm.weight"] = arrays["rms_ffn_weight"][i]
        state[p + "mlp.gate.weight"] = arrays["w1"][i]
        state[p + "mlp.down.weight"] = arrays["w2"][i]
        state[p + "mlp.up.weight"] = arrays["w3"][i]
    return model_from_state(cfg, state, str(path))
