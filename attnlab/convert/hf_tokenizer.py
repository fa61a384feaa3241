"""The tokenizer of an export: attnlab's tokenizers as Hugging Face fast tokenizers (a
``tokenizer.json`` that ``AutoTokenizer.from_pretrained`` loads and that gives the same ids).

- ``gpt2``: the BPE rebuilt from the local ``.tiktoken`` ranks (or tiktoken's cached ranks) by
  transformers' ``TikTokenConverter`` with GPT-2's split pattern; ``<|endoftext|>`` (50256) is the
  bos, eos and pad token, as in Hugging Face's ``gpt2`` tokenizer.
- ``byte``: a byte-level BPE without merges whose vocabulary maps the byte-level alphabet's
  character for byte b to id b, so ids are the UTF-8 bytes; no special tokens.

Needs ``transformers`` (``pip install attnlab[hf]``); imported on use.
"""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

from attnlab.config.data import TokenizerConfig
from attnlab.data.tokenizers import GPT2_EOT_ID, build_tokenizer
from attnlab.errors import AttnlabError

#: GPT-2's pre-tokenizer pattern (tiktoken's ``gpt2`` encoding)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT_TEXT = "<|endoftext|>"


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise AttnlabError("exporting the tokenizer needs transformers (pip install 'attnlab[hf]'); "
                           "pass --no-tokenizer to export the weights alone") from None


def _gpt2_ranks_file(cfg: TokenizerConfig, folder: Path) -> str:
    """A ``.tiktoken`` file of the GPT-2 ranks: ``cfg.path``, or the loaded encoding's ranks
    written into ``folder``."""
    if cfg.path is not None:
        return str(Path(cfg.path).expanduser())
    ranks = build_tokenizer(cfg).encoding._mergeable_ranks  # tiktoken's own table (cached download)
    path = folder / "gpt2.tiktoken"
    lines = (f"{base64.b64encode(token).decode()} {rank}" for token, rank in sorted(ranks.items(), key=lambda x: x[1]))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def hf_tokenizer(cfg: TokenizerConfig):
    """A ``transformers.PreTrainedTokenizerFast`` equivalent to ``cfg``'s tokenizer."""
    _require_transformers()
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter, bytes_to_unicode

    if cfg.type == "gpt2":
        with tempfile.TemporaryDirectory() as tmp:
            core = TikTokenConverter(vocab_file=_gpt2_ranks_file(cfg, Path(tmp)), pattern=GPT2_PATTERN).converted()
        # added here, not through the converter's keyword (renamed between transformers 4 and 5)
        core.add_special_tokens([AddedToken(EOT_TEXT, normalized=False, special=True)])
        if core.token_to_id(EOT_TEXT) != GPT2_EOT_ID:
            raise AttnlabError(f"the rebuilt GPT-2 tokenizer puts {EOT_TEXT} at {core.token_to_id(EOT_TEXT)}, "
                               f"not {GPT2_EOT_ID}")
        return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=EOT_TEXT, eos_token=EOT_TEXT,
                                       unk_token=EOT_TEXT, pad_token=EOT_TEXT)
    if cfg.type == "byte":
        vocab = {char: byte for byte, char in bytes_to_unicode().items()}
        core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        core.decoder = decoders.ByteLevel()
        return PreTrainedTokenizerFast(tokenizer_object=core)
    raise AttnlabError(f"no Hugging Face equivalent of tokenizer type {cfg.type!r}")


def special_ids(cfg: TokenizerConfig) -> dict[str, int | None]:
    """bos/eos/pad ids of the exported tokenizer (None for the byte tokenizer)."""
    eot = GPT2_EOT_ID if cfg.type == "gpt2" else None
    return {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}


def write_tokenizer(cfg: TokenizerConfig, folder: str | Path) -> dict[str, int | None]:
    """Write ``tokenizer.json`` (+ its config files) into ``folder``; returns the special ids."""
    hf_tokenizer(cfg).save_pretrained(str(folder))
    return special_ids(cfg)


__all__ = ["GPT2_PATTERN", "hf_tokenizer", "special_ids", "write_tokenizer"]
