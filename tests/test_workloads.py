"""Workload loaders on the real data files, option semantics, errors, and token-id expansion."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from servebench.engine.core.request import Request
from servebench.workbench.token_ids import approx_tokenize, prompt_token_ids
from servebench.workbench.workload_files import REPO_ROOT
from servebench.workbench.workload_requests import iter_requests
from servebench.workbench.workloads import load_workload


@pytest.fixture(scope="module")
def azure_conv() -> pd.DataFrame:
    return load_workload({"name": "azure_conv"})


@pytest.mark.parametrize(("name", "rows", "mean_prompt", "mean_output", "span_s"), [
    ("azure_conv", 19_366, 1154.7, 211.1, 3501.7),
    ("azure_code", 8_819, 2047.8, 27.9, 3435.9),
    ("splitwise", 19_366, 1154.7, 211.1, 3501.7),
    ("mooncake", 12_031, 12_035.1, 342.6, 3537.0),
])
def test_traces_load_with_their_published_statistics(name, rows, mean_prompt, mean_output, span_s):
    df = load_workload({"name": name})
    assert len(df) == rows
    assert list(df.columns[:4]) == ["request_id", "arrival_s", "prompt_tokens", "output_tokens"]
    assert df["arrival_s"].iloc[0] == 0 and df["arrival_s"].is_monotonic_increasing
    assert df["arrival_s"].iloc[-1] == pytest.approx(span_s, abs=0.1)
    assert df["prompt_tokens"].mean() == pytest.approx(mean_prompt, abs=0.1)
    assert df["output_tokens"].mean() == pytest.approx(mean_output, abs=0.1)
    assert df["request_id"].is_unique


def test_azure_timestamps_agree_with_vidurs_relative_seconds(azure_conv):
    splitwise = load_workload({"name": "splitwise"})
    np.testing.assert_allclose(azure_conv["arrival_s"], splitwise["arrival_s"], atol=1e-6)


def test_text_sets_tokenize_real_prompts():
    sharegpt = load_workload({"name": "sharegpt"})
    mt = load_workload({"name": "mt_bench", "request_rate": None})
    assert len(sharegpt) == 500 and len(mt) == 160
    for df in (sharegpt, mt):
        assert (df["prompt_tokens"] == df["prompt_token_ids"].map(len)).all()
    assert sharegpt["request_id"].iloc[0] == "fzcoUcK_0"
    assert (sharegpt["arrival_s"] == 0).all()  # no request_rate: everything at t = 0, like vLLM's inf


def test_sharegpt_output_lengths_come_from_the_given_distribution():
    fixed = load_workload({"name": "sharegpt", "output_len": 64})
    assert (fixed["output_tokens"] == 64).all()
    drawn = load_workload({"name": "sharegpt", "output_len": {"dist": "uniform", "min": 10, "max": 20}})
    assert drawn["output_tokens"].between(10, 20).all() and drawn["output_tokens"].nunique() > 5
    default = load_workload({"name": "sharegpt"})["output_tokens"]
    assert 80 < default.median() < 180 and default.max() <= 1000


def test_given_tokenizer_is_used_for_text():
    df = load_workload({"name": "sharegpt", "num_requests": 3}, tokenizer=lambda s: [7] * len(s))
    entries = json.loads((REPO_ROOT / "data/prompts/sharegpt_500/ShareGPT_V3_filtered_500.json").read_text())
    assert df["prompt_tokens"].tolist() == [len(e["conversations"][0]["value"]) for e in entries[:3]]


def test_mt_bench_second_turn_extends_the_first_turn_and_its_answer():
    df = load_workload({"name": "mt_bench"}).set_index("request_id")
    questions = [json.loads(line) for line in (REPO_ROOT / "data/prompts/mt_bench/question.jsonl").open()]
    refs = {json.loads(line)["question_id"]: json.loads(line)["choices"][0]["turns"]
            for line in (REPO_ROOT / "data/prompts/mt_bench/reference_answer_gpt-4.jsonl").open()}
    q81 = next(q for q in questions if q["question_id"] == 81)  # writing: no reference answer
    t1, t2 = df.loc["81-1", "prompt_token_ids"], df.loc["81-2", "prompt_token_ids"]
    assert t1 == approx_tokenize(q81["turns"][0])
    turn2 = approx_tokenize(q81["turns"][1])
    assert t2[:len(t1)] == t1 and t2[-len(turn2):] == turn2
    assert df.loc["81-1", "output_tokens"] == 256 == len(t2) - len(t1) - len(turn2)
    assert df.loc["101-1", "output_tokens"] == len(approx_tokenize(refs[101][0]))  # GPT-4 reference answer
    assert df.loc["101-2", "output_tokens"] == len(approx_tokenize(refs[101][1]))
    order = load_workload({"name": "mt_bench"})["request_id"]
    assert order.str.endswith("-1")[:80].all() and order.str.endswith("-2")[80:].all()


def test_mt_bench_without_answers_file_uses_synthetic_answers():
    df = load_workload({"name": "mt_bench", "answers_path": None, "answer_len": 32})
    assert (df["output_tokens"] == 32).all()


def test_presets_compose_and_load():
    presets = sorted(p.stem for p in (REPO_ROOT / "conf/workload").glob("*.yaml"))
    assert {"azure_conv", "azure_code", "splitwise_conv", "mooncake", "sharegpt", "mt_bench",
            "synthetic"} <= set(presets)
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        for preset in presets:
            cfg = compose(config_name=f"workload/{preset}", overrides=["workload.num_requests=20"])
            df = load_workload(OmegaConf.to_container(cfg.workload, resolve=True))
            assert len(df) == 20, preset


def test_duration_then_num_requests_select_a_slice(azure_conv):
    first20 = load_workload({"name": "azure_conv", "duration_s": 1200})
    assert len(first20) == (azure_conv["arrival_s"] < 1200).sum() and first20["arrival_s"].max() < 1200
    head = load_workload({"name": "azure_conv", "duration_s": 1200, "num_requests": 100})
    pd.testing.assert_frame_equal(head, azure_conv.head(100))


def test_time_scale_multiplies_gaps(azure_conv):
    fast = load_workload({"name": "azure_conv", "num_requests": 500, "time_scale": 0.5})
    np.testing.assert_allclose(fast["arrival_s"], azure_conv["arrival_s"][:500] * 0.5)
    assert fast["prompt_tokens"].tolist() == azure_conv["prompt_tokens"][:500].tolist()


def test_request_rate_rescales_a_trace_to_that_mean_rate():
    df = load_workload({"name": "mooncake", "num_requests": 1000, "request_rate": 10.0})
    assert (len(df) - 1) / df["arrival_s"].iloc[-1] == pytest.approx(10.0)
    with pytest.raises(ValueError, match="time_scale and workload.request_rate"):
        load_workload({"name": "mooncake", "request_rate": 10.0, "time_scale": 0.5})


def test_synthetic_is_seeded_and_its_arrivals_have_the_given_rate_and_cv():
    spec = {"name": "synthetic", "num_requests": 20_000, "request_rate": 8.0, "cv": 3.0, "seed": 1,
            "input_len": {"dist": "lognormal", "median": 500, "sigma": 0.5, "max": 4000}, "output_len": 100}
    df = load_workload(spec)
    pd.testing.assert_frame_equal(df, load_workload(spec))
    gaps = np.diff(df["arrival_s"])
    assert gaps.mean() == pytest.approx(1 / 8.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.1)
    assert df["prompt_tokens"].median() == pytest.approx(500, rel=0.05) and df["prompt_tokens"].max() <= 4000
    assert (df["output_tokens"] == 100).all()
    # a smaller num_requests gives the same first requests
    pd.testing.assert_frame_equal(load_workload(spec | {"num_requests": 50}), df.head(50))
    assert not load_workload(spec | {"seed": 2})["arrival_s"].equals(df["arrival_s"])


def test_synthetic_by_duration():
    df = load_workload({"name": "synthetic", "num_requests": None, "duration_s": 100.0, "request_rate": 5.0})
    assert 400 < len(df) < 600 and df["arrival_s"].max() < 100


@pytest.mark.parametrize(("spec", "error", "message"), [
    ({"name": "azure_conv", "duraton_s": 10}, ValueError, "workload.duraton_s: unknown key"),
    ({"name": "azure"}, ValueError, "workload.name='azure'"),
    ({"name": "azure_conv", "path": "data/traces/nope.csv"}, FileNotFoundError, "nope.csv"),
    ({"name": "azure_conv", "num_requests": 0}, ValueError, "workload.num_requests=0"),
    ({"name": "azure_conv", "time_scale": -1}, ValueError, "workload.time_scale=-1"),
    ({"name": "synthetic", "request_rate": math.inf}, ValueError, "workload.request_rate=inf"),
    ({"name": "azure_conv", "duration_s": 1e-9, "num_requests": 1, "request_rate": 2.0}, ValueError,
     "needs at least 2 requests"),
    ({"name": "synthetic", "num_requests": None}, ValueError, "set num_requests"),
    ({"name": "synthetic", "num_requests": 5, "input_len": {"dist": "zipf"}}, ValueError,
     "workload.input_len"),
    ({"name": "synthetic", "num_requests": 5, "output_len": {"dist": "uniform", "min": 3}}, ValueError,
     r"workload.output_len: dist uniform needs min, max \(missing \['max'\]\)"),
])
def test_bad_specs_fail_with_a_message_naming_the_key(spec, error, message):
    with pytest.raises(error, match=message):
        load_workload(spec)


@pytest.mark.parametrize(("name", "text", "message"), [
    ("azure_conv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,10,5\n"
     "2023-11-16 18:15:47.00,ten,5\n", r"line 3: ContextTokens='ten' is not a whole number of tokens"),
    ("azure_conv", "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,10,5\n",
     "line 2: TIMESTAMP='yesterday'"),
    ("azure_conv", "TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.68,10\n",
     r"missing column\(s\) \['GeneratedTokens'\]"),
    ("splitwise", "arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,10,5\n1.0,10\n",
     r"line 3: num_decode_tokens=\(empty\) is not a whole number of tokens"),
    ("splitwise", "arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,10,5.5\n",
     "line 2: num_decode_tokens=5.5 is not a whole number of tokens"),
    ("splitwise", "arrived_at,num_prefill_tokens,num_decode_tokens\n-1.0,10,5\n",
     "line 2: arrived_at=-1.0 is not a finite time >= 0"),
    ("splitwise", "arrived_at,num_prefill_tokens,num_decode_tokens\n0,10,5\ninf,10,5\n",
     "line 3: arrived_at=inf is not a finite time >= 0"),
    ("azure_conv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,2000000000,5\n",
     "line 2: ContextTokens=2000000000 is not a whole number of tokens from 1 to 1,048,576"),
    ("azure_conv", "TIMESTAMP,ContextTokens,GeneratedTokens\n", "no requests in the file"),
    ("mooncake", "", "no records: expected one JSON object a line"),
    ("sharegpt", "5", "expected a non-empty JSON list of conversations, got a number"),
    ("sharegpt", '[{"id": "a", "conversations": "hi"}]', "entry 0: expected conversations: a list of"),
    ("sharegpt", '[{"id": "a", "conversations": [{"from": "human", "value": " "}]}]',
     "entry 0: no non-empty conversations"),
    ("mt_bench", '{"question_id": 1, "turns": 7}\n', "line 1: expected turns: a list of non-empty strings"),
    ("mooncake", '{"timestamp": 0, "input_length": 10, "output_length": 5, "hash_ids": [0]}\n{"time',
     "line 2: invalid JSON"),
    ("mooncake", '{"timestamp": 0, "input_length": 10, "output_length": 5}\n',
     r"line 1: missing field\(s\) \['hash_ids'\]"),
    ("mooncake", '{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [0]}\n',
     "line 1: hash_ids must list ceil"),
])
def test_malformed_files_fail_naming_file_line_and_field(tmp_path, name, text, message):
    path = tmp_path / "trace.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        no_answers = {"answers_path": None} if name == "mt_bench" else {}
        load_workload({"name": name, "path": str(path), **no_answers})
    assert str(path) in str(info.value)


def test_a_binary_file_is_named(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ValueError, match=f"{path}: byte 0: not UTF-8 text"):
        load_workload({"name": "mooncake", "path": str(path)})


def test_a_trailing_blank_line_is_no_error(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 10, "output_length": 5, "hash_ids": [0]}\n\n')
    assert len(load_workload({"name": "mooncake", "path": str(path)})) == 1


def test_a_folder_or_a_missing_file_is_named_once(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=f"workload.path={tmp_path}: is a folder; expected a file"):
        load_workload({"name": "azure_conv", "path": str(tmp_path)})
    monkeypatch.chdir(REPO_ROOT)  # the working folder is the repo: one place to look, named once
    with pytest.raises(FileNotFoundError) as info:
        load_workload({"name": "azure_conv", "path": "nope.csv"})
    assert str(info.value).count("nope.csv") == 2  # as given, and the one place it was looked for


def test_absurd_lengths_are_refused_before_anything_is_allocated():
    with pytest.raises(ValueError, match="workload.input_len=.*within 1,048,576 tokens"):
        load_workload({"name": "synthetic", "num_requests": 2, "input_len": 2_000_000_000})


def test_relative_paths_resolve_against_the_repo_root(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    df = load_workload({"name": "azure_code", "path": "data/traces/AzureLLMInferenceTrace_code.csv"})
    assert len(df) == 8819


def test_mooncake_hash_ids_expand_to_shared_blocks_cut_to_the_prompt():
    rows = pd.DataFrame({"request_id": ["a", "b", "c"], "arrival_s": 0.0, "prompt_tokens": [600, 1000, 600],
                         "output_tokens": 1, "hash_ids": [[7, 8], [7, 9], [7, 8]]})
    a, b, c = (prompt_token_ids(r, i, 32_000) for i, r in enumerate(rows.itertuples(index=False)))
    assert len(a) == 600 and len(b) == 1000
    assert a[:512] == b[:512] and a[512:] != b[512:600]  # shared first block only
    assert a == c  # identical hash ids, identical tokens
    assert 100 <= min(a + b) and max(a + b) < 32_000 - 100
    again = prompt_token_ids(next(rows.head(1).itertuples(index=False)), 5, 32_000)
    assert again == a  # a function of the hash ids only, not of the row


def test_mooncake_trace_prefix_sharing_survives_expansion():
    df = load_workload({"name": "mooncake", "num_requests": 2})
    r0, r1 = (r.prompt_token_ids for r in iter_requests(df, 128_256))
    assert df["hash_ids"][0][0] == df["hash_ids"][1][0] == 0
    assert r0[:512] == r1[:512] and r0[512:1024] != r1[512:1024]
    assert (len(r0), len(r1)) == tuple(df["prompt_tokens"])


def test_requests_without_ids_share_no_cache_block(azure_conv):
    seen: set[tuple[int, ...]] = set()
    for i, req in enumerate(iter_requests(azure_conv.head(200), 32_000)):
        ids = req.prompt_token_ids
        assert len(ids) == azure_conv["prompt_tokens"][i]
        blocks = {tuple(ids[j:j + 16]) for j in range(0, len(ids) - 15, 16)}
        assert not blocks & seen
        seen |= blocks


def test_iter_requests_is_lazy_and_builds_engine_requests(azure_conv):
    it = iter_requests(azure_conv, 32_000)
    assert iter(it) is it
    req = next(it)
    assert isinstance(req, Request) and req.request_id == "0" and req.arrival_time == 0.0
    p = req.sampling_params
    assert (p.max_tokens, p.ignore_eos, p.temperature) == (44, True, 0.0)
    assert req.num_prompt_tokens == 374


def test_text_ids_fold_into_a_small_vocabulary():
    df = load_workload({"name": "mt_bench", "num_requests": 4})
    reqs = list(iter_requests(df, 1000))
    assert all(100 <= t < 1000 for r in reqs for t in r.prompt_token_ids)
    assert [r.num_prompt_tokens for r in reqs] == df["prompt_tokens"].tolist()
    with pytest.raises(ValueError, match="vocab_size=150"):
        next(iter_requests(df, 150))


def test_approx_tokenizer_is_deterministic_and_prefix_preserving():
    a, b = approx_tokenize("Hello, world! How are you?"), approx_tokenize("Hello, world! How is it going?")
    assert a == approx_tokenize("Hello, world! How are you?")
    assert a[:5] == b[:5] and a != b
    text = (REPO_ROOT / "data/prompts/mt_bench/question.jsonl").read_text()
    assert 3 < len(text) / len(approx_tokenize(text)) < 5  # about 4 characters a token, like BPE on English
    assert approx_tokenize("") == []


def test_priority_column_is_passed_through():
    df = load_workload({"name": "synthetic", "num_requests": 3, "input_len": 20}).assign(priority=[2, 0, 1])
    assert [r.priority for r in iter_requests(df, 32_000)] == [2, 0, 1]
