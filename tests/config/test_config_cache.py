"""The manifest's cache section: per-field formats named at the top level (any registered
variant's fields), gathered into ``fields``; a flat dump that round-trips; one-line errors."""

from typing import get_args

import pytest

from attnlab.config import validate_section
from attnlab.config.cache import CacheConfig, Format
from attnlab.errors import ConfigError
from attnlab.quant.formats import FORMATS


def test_fields_of_every_registered_variant_are_accepted_and_round_trip():
    cfg = validate_section(CacheConfig, {"k_sem": "q4_0", "c_kv": "q8_0", "v": "q4_0", "tail": 8}, "cache")
    assert cfg.fields == {"k_sem": "q4_0", "c_kv": "q8_0", "v": "q4_0"} and cfg.tail == 8
    dumped = cfg.model_dump(mode="json")
    assert dumped == {"default": None, "tail": 8, "rollback": 64, "k_sem": "q4_0", "c_kv": "q8_0", "v": "q4_0"}
    assert validate_section(CacheConfig, dumped, "cache") == cfg
    assert cfg.policy_text() == "k_sem=q4_0,c_kv=q8_0,v=q4_0,tail=8"
    assert validate_section(CacheConfig, {"k": None, "default": "q8_0"}, "cache").fields == {}  # old dumps


@pytest.mark.parametrize("section, message", [
    ({"q_sem": "q4_0"}, "unknown cache field 'q_sem'"),
    ({"k_sem": "q3_k"}, "cache.fields.k_sem"),
    ({"tail": -1}, "cache.tail"),
])
def test_bad_sections_are_one_line_errors(section, message):
    with pytest.raises(ConfigError, match=message):
        validate_section(CacheConfig, section, "cache")


def test_the_manifest_format_names_are_the_storage_formats():
    # config sits below quant (it may not import it), so the schema's Literal is checked here
    assert set(get_args(Format)) == set(FORMATS)
