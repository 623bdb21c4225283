"""The config schema: every group typed, a wrong type or an unknown key one line naming it."""

from __future__ import annotations

import pytest
from servebench.workbench.cli import check_preset_names, compose_config
from servebench.workbench.schema import ConfigError, validate


def test_the_default_config_and_every_experiment_preset_pass_unchanged():
    cfg = compose_config()
    assert validate(cfg) == cfg
    tuned = compose_config(["+experiment=case2_code_34b", "hydra.mode=RUN"])
    assert validate(tuned)["scheduler"]["enable_chunked_prefill"] is True


@pytest.mark.parametrize(("value", "expected"), [("no", False), ("false", False), ("true", True), (1, True)])
def test_booleans_become_booleans(value, expected):
    cfg = validate({"scheduler": {"enable_chunked_prefill": value}})
    assert cfg["scheduler"]["enable_chunked_prefill"] is expected


@pytest.mark.parametrize(("cfg", "message"), [
    ({"scheduler": {"enable_chunked_prefill": "maybe"}},
     "scheduler.enable_chunked_prefill='maybe': expected a boolean (true or false)"),
    ({"cache": {"enable_prefix_caching": "maybe"}},
     "cache.enable_prefix_caching='maybe': expected a boolean"),
    ({"scheduler": {"max_num_seqs": 2.5}}, "scheduler.max_num_seqs=2.5: expected an integer"),
    ({"cache": {"gpu_memory_utilization": "most"}}, "cache.gpu_memory_utilization='most': expected a number"),
    ({"scheduler": {"max_num_seqz": 8}}, "scheduler.max_num_seqz is not a known key (known: max_num_seqs,"),
    ({"workload": {"name": "synthetic", "num_requests": "ten"}},
     "workload.num_requests='ten': expected an integer or null"),
    ({"workload": {"name": "azure_conv", "input_len": 5}}, "workload.input_len is not a known key"),
    ({"backend": {"name": "gpu"}}, "backend.name='gpu': choose one of sim, engine, server"),
    ({"backend": {"name": "engine", "warmup": "sure"}}, "backend.warmup='sure': expected a boolean"),
    ({"backend": {"name": "sim", "step_tim": "vidur"}}, "backend.step_tim is not a known key"),
    ({"slo": {"ttft_ms": "fast"}}, "slo.ttft_ms='fast': expected a number or null"),
    ({"model": {"num_layers": "many"}}, "model.num_layers='many': expected an integer"),
    ({"report": "maybe"}, "report='maybe': expected a boolean"),
])
def test_a_wrong_type_or_key_is_one_line_naming_it(cfg, message):
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_model_is_chosen_by_its_preset_not_renamed():
    cfg = compose_config(["model.name=gpt5"])
    with pytest.raises(ConfigError, match="model.name='gpt5' does not rename the model: it stays llama2_7b"):
        check_preset_names(cfg, {"model": "llama2_7b", "hardware": "a100_80g"})
    check_preset_names(compose_config(["model=llama3_8b"]), {"model": "llama3_8b", "hardware": "a100_80g"})
