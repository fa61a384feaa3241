from __future__ import annotations

import pytest

from attnlab.config.data import TokenizerConfig
from attnlab.data import ByteTokenizer, Tokenizer, build_tokenizer, tokenizer_vocab_size
from attnlab.data import tokenizers as tk
from attnlab.errors import DataError


def test_byte_roundtrip_non_ascii():
    tok = build_tokenizer(TokenizerConfig(type="byte"))
    assert isinstance(tok, Tokenizer) and isinstance(tok, ByteTokenizer)
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("byte", 256, None)
    text = "héllo wörld ✓ 日本語 🚀\n\ttabs"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert list(tok.encode_array(text)) == ids


def test_byte_decode_invalid_utf8_replaces():
    tok = build_tokenizer(TokenizerConfig(type="byte"))
    assert tok.decode([0x68, 0xFF, 0x69]) == "h\ufffdi"


def test_byte_rejects_path():
    with pytest.raises(DataError, match="only used by type gpt2"):
        build_tokenizer(TokenizerConfig(type="byte", path="/x.tiktoken"))


def test_vocab_sizes_without_loading():
    assert tokenizer_vocab_size(TokenizerConfig(type="byte")) == 256
    assert tokenizer_vocab_size(TokenizerConfig(type="gpt2")) == 50257


def test_gpt2_offline_hello_world(gpt2_cfg):
    tok = build_tokenizer(gpt2_cfg)
    assert isinstance(tok, Tokenizer)
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("gpt2", 50257, 50256)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode([15496, 995]) == "Hello world"
    assert build_tokenizer(gpt2_cfg) is tok  # memoized


def test_gpt2_special_token_text_is_plain(gpt2_cfg):
    tok = build_tokenizer(gpt2_cfg)
    ids = tok.encode("a<|endoftext|>b")
    assert 50256 not in ids
    assert tok.decode(ids) == "a<|endoftext|>b"


def test_gpt2_batch_matches_single(gpt2_cfg):
    tok = build_tokenizer(gpt2_cfg)
    texts = ["def f(x):\n    return x\n", "Héllo  wörld\n\n\nend", "<|endoftext|> x", " "]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_gpt2_missing_file(tmp_path):
    missing = tmp_path / "nope.tiktoken"
    with pytest.raises(DataError, match="tokenizer file not found"):
        build_tokenizer(TokenizerConfig(type="gpt2", path=str(missing)))


def test_gpt2_wrong_file(tmp_path):
    bad = tmp_path / "small.tiktoken"
    bad.write_text("IQ== 0\nIg== 1\n")
    with pytest.raises(DataError, match="not the GPT-2 BPE file"):
        build_tokenizer(TokenizerConfig(type="gpt2", path=str(bad)))


def test_gpt2_network_failure_names_offline_file(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    tk._build.cache_clear()
    try:
        with pytest.raises(DataError, match=r"tokenizer.path .*\.tiktoken"):
            build_tokenizer(TokenizerConfig(type="gpt2"))
    finally:
        tk._build.cache_clear()
