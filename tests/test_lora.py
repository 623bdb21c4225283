"""Multi-LoRA serving on the CPU engine (fp32) against HF transformers with each adapter merged into a copy
of the base weights (W + scaling B A): one batch mixes adapters and the base model; more adapters than GPU
slots evict and reload; bad adapters fail with one line naming the file and what is wrong."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from servebench.engine.config import ModelConfig
from servebench.engine.dummy import write_dummy_adapter
from servebench.engine.lora import CONFIG_FILE, WEIGHTS_FILE, LoRARequest
from transformers import AutoModelForCausalLM

from servebench import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [[1, 40, 41, 42, 43, 44, 45, 46], [1, *range(100, 140)], [1, 7], [1, 300, 200, 100, 50, 25] * 5]


def merged_hf_model(model_dir: Path, adapter: LoRARequest | None):
    """HF's model of model_dir with the adapter merged into its weights: W += scaling B A, per module."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter is None:
        return model
    config = json.loads((Path(adapter.lora_path) / CONFIG_FILE).read_text())
    rank = config["r"]
    scaling = config["lora_alpha"] / (math.sqrt(rank) if config["use_rslora"] else rank)
    tensors = load_file(Path(adapter.lora_path) / WEIGHTS_FILE)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, a in tensors.items():
            if ".lora_A." in name:
                b = tensors[name.replace("lora_A", "lora_B")]
                module = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                params[module] += scaling * b @ a
    return model


_hf: dict[tuple[str, str | None], list[list[int]]] = {}


def hf_greedy(model_dir: Path, adapter: LoRARequest | None) -> list[list[int]]:
    """HF's greedy continuation of each of PROMPTS under the merged adapter (past EOS, as ignore_eos)."""
    key = (str(model_dir), None if adapter is None else adapter.lora_name)
    if key not in _hf:
        model = merged_hf_model(model_dir, adapter)
        _hf[key] = [model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=GREEDY.max_tokens,
                                   eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
                    for ids in PROMPTS]
    return _hf[key]


def lora_llm(model_dir: Path, **kw) -> LLM:
    args = {"dtype": "float32", "device": "cpu", "enable_lora": True, "max_loras": 3, "max_lora_rank": 16}
    return LLM(str(model_dir), **(args | kw))


def run_mixed(llm: LLM, adapters: dict[str, LoRARequest]) -> list[tuple[LoRARequest | None, int, list[int]]]:
    """Every prompt under every adapter and the base model, in one generate call (one batch)."""
    cases = [(lora, i) for i in range(len(PROMPTS)) for lora in (*adapters.values(), None)]
    outs = llm.generate([{"prompt_token_ids": PROMPTS[i]} for _, i in cases], GREEDY, use_tqdm=False,
                        lora_request=[lora for lora, _ in cases])
    return [(lora, i, out.outputs[0].token_ids) for (lora, i), out in zip(cases, outs)]


def assert_matches_merged(model_dir: Path, results: list) -> None:
    for lora, i, tokens in results:
        assert tokens == hf_greedy(model_dir, lora)[i], (lora and lora.lora_name, i)


MIXED_CASES = {"sync": ("tiny_llama_dir", False), "async": ("tiny_llama_dir", True),
               "qwen3": ("tiny_qwen3_dir", False)}


@pytest.mark.parametrize("model,async_scheduling", MIXED_CASES.values(), ids=MIXED_CASES)
def test_mixed_adapter_batch_matches_hf_with_each_adapter_merged(model, async_scheduling, lora_adapters,
                                                                 request):
    # The same prompts under three adapters and the base model: prefix caching must not share their KV. The
    # tiny Qwen3 (q/k norms) has the tiny Llama's shapes: the same adapters fit it.
    model_dir = request.getfixturevalue(model)
    llm = lora_llm(model_dir, async_scheduling=async_scheduling)
    results = run_mixed(llm, lora_adapters)
    assert_matches_merged(model_dir, results)
    base = {i: tokens for lora, i, tokens in results if lora is None}
    for name in lora_adapters:  # each adapter changes some continuation: the comparison above means something
        assert any(tokens != base[i] for lora, i, tokens in results if lora and lora.lora_name == name), name
    steps = llm.engine.recorder.steps_table()
    assert sum(steps["lora_loads"]) == sum(steps["lora_loads_from_disk"]) == 3
    assert all(s > 0 for s, n in zip(steps["lora_load_s"], steps["lora_loads"]) if n)


@pytest.mark.parametrize("max_cpu_loras", [2, 3])
def test_more_adapters_than_slots_evict_and_reload(tiny_llama_dir, lora_adapters, max_cpu_loras):
    # One GPU slot for three adapters: each request waits for its adapter's turn, which comes round again.
    llm = lora_llm(tiny_llama_dir, max_loras=1, max_cpu_loras=max_cpu_loras, max_num_seqs=4)
    assert_matches_merged(tiny_llama_dir, run_mixed(llm, lora_adapters))
    steps = llm.engine.recorder.steps_table()
    loads, from_disk = sum(steps["lora_loads"]), sum(steps["lora_loads_from_disk"])
    assert loads > 3
    # Taken in turn, three adapters miss an LRU cache of two every time; a cache of three keeps them all.
    assert from_disk == (loads if max_cpu_loras == 2 else 3)
    assert len(llm.engine.runner.lora.host) == max_cpu_loras


PEFT_CASES = {  # target_modules, layers_to_transform, use_rslora
    "all_linear": ("all-linear", None, False),
    "layer1_rslora": (["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], [1], True),
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_an_adapter_saved_by_peft_matches_peft_merged(tiny_llama_dir, tmp_path, case):
    """PEFT's own save_pretrained output (its config keys, tensor names) and merge_and_unload, where PEFT is
    installed (it is not a dependency)."""
    peft = pytest.importorskip("peft")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    torch.manual_seed(0)
    targets, layers, rslora = PEFT_CASES[case]
    config = peft.LoraConfig(r=8, lora_alpha=2, target_modules=targets, use_rslora=rslora,
                             layers_to_transform=layers, init_lora_weights=False)  # random A and B
    model = peft.get_peft_model(base, config)
    model.save_pretrained(tmp_path / "peft")
    merged = model.merge_and_unload().eval()
    llm = lora_llm(tiny_llama_dir)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False,
                        lora_request=LoRARequest("peft", 1, str(tmp_path / "peft")))
    for ids, out in zip(PROMPTS, outs, strict=True):
        want = merged.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=GREEDY.max_tokens,
                               eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == want
    assert [o.outputs[0].token_ids for o in outs] != hf_greedy(tiny_llama_dir, None)  # the adapter mattered


def test_lora_composes_with_fp8_weights(tiny_llama_dir, lora_adapters):
    llm = lora_llm(tiny_llama_dir, quantization="fp8")
    outs = {lora and lora.lora_name: tokens for lora, i, tokens in run_mixed(llm, lora_adapters) if i == 1}
    assert outs["all"] != outs[None]  # the update reaches the quantized layers' output


_ids = itertools.count(10)


def write_adapter(root: Path, tiny_llama_dir: Path, name: str, **kw) -> LoRARequest:
    write_dummy_adapter(root / name, ModelConfig.from_dir(tiny_llama_dir), kw.pop("rank", 8), **kw)
    return LoRARequest(name, next(_ids), str(root / name))


def edit_config(request: LoRARequest, **changes) -> LoRARequest:
    file = Path(request.lora_path) / CONFIG_FILE
    file.write_text(json.dumps(json.loads(file.read_text()) | changes))
    return request


def test_bad_adapters_are_one_clear_error_and_nothing_is_queued(tiny_llama_dir, lora_adapters, tmp_path):
    llm = lora_llm(tiny_llama_dir)
    missing = LoRARequest("missing", 7, str(tmp_path / "nowhere"))
    no_weights = write_adapter(tmp_path, tiny_llama_dir, "no_weights")
    (Path(no_weights.lora_path) / WEIGHTS_FILE).unlink()
    wide = tmp_path / "wide"
    wide_model = ModelConfig.from_dir(tiny_llama_dir)
    wide_model.hidden_size = 96  # an adapter of another model: its A has 96 inputs
    write_dummy_adapter(wide, wide_model, 8)
    garbage = write_adapter(tmp_path, tiny_llama_dir, "garbage")
    (Path(garbage.lora_path) / WEIGHTS_FILE).write_bytes(b"not safetensors")
    bad_tensor = write_adapter(tmp_path, tiny_llama_dir, "bad_tensor")
    weights = load_file(Path(bad_tensor.lora_path) / WEIGHTS_FILE)
    weights["base_model.model.lm_head.lora_A.weight"] = torch.zeros(8, 64)
    save_file(weights, Path(bad_tensor.lora_path) / WEIGHTS_FILE)
    cases = [
        (missing, "is not a PEFT adapter folder"),
        (no_weights, "has no adapter_model.safetensors"),
        (garbage, "adapter_model.safetensors: not a readable safetensors file"),
        (write_adapter(tmp_path, tiny_llama_dir, "rank32", rank=32), r"r=32 exceeds max_lora_rank=16"),
        (edit_config(write_adapter(tmp_path, tiny_llama_dir, "embed"),
                     target_modules=["q_proj", "embed_tokens"]), "target_modules has 'embed_tokens'"),
        (edit_config(write_adapter(tmp_path, tiny_llama_dir, "dora"), use_dora=True), "use_dora=True"),
        (LoRARequest("wide", next(_ids), str(wide)), "has shape .* expected .* an adapter of another model"),
        (bad_tensor, "lm_head.lora_A.weight is not the lora_A or lora_B weight"),
        (LoRARequest("all", lora_adapters["all"].lora_int_id, str(wide)), "one id names one adapter"),
    ]
    llm.generate([{"prompt_token_ids": [1, 2]}], GREEDY, use_tqdm=False, lora_request=lora_adapters["all"])
    for request, message in cases:
        with pytest.raises(ValueError, match=message):
            llm.generate([{"prompt_token_ids": [1, 2]}] * 2, GREEDY, use_tqdm=False,
                         lora_request=[lora_adapters["attn"], request])
        assert not llm.engine.has_unfinished_requests()  # all or nothing: the good request went too
    with pytest.raises(ValueError, match="lora_int_id must be an integer >= 1"):
        LoRARequest("zero", 0, str(wide))


def test_an_adapter_needs_enable_lora_and_valid_knobs(tiny_llama_dir, lora_adapters):
    llm = LLM(str(tiny_llama_dir), dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="pass enable_lora=True"):
        llm.generate("Hello", GREEDY, use_tqdm=False, lora_request=lora_adapters["all"])
    for kw, message in (({"max_lora_rank": 12}, "max_lora_rank=12: choose one of 8, 16, 32, 64"),
                        ({"max_loras": 0}, "max_loras=0 must be >= 1"),
                        ({"max_loras": 4, "max_cpu_loras": 2}, "max_cpu_loras=2 must be >= max_loras=4")):
        with pytest.raises(ValueError, match=message):
            lora_llm(tiny_llama_dir, **kw)


REPO = Path(__file__).resolve().parents[1]
LORA_RUN = ("workload=synthetic", "workload.num_requests=24", "workload.request_rate=null",
            "workload.input_len=32", "workload.output_len=8", "lora.num_adapters=5", "lora.distribution=zipf",
            "lora.rank=8", "scheduler.max_loras=2", "scheduler.max_cpu_loras=3", "report=false",
            "progress=false")
ENGINE = ("backend=engine", "model=tiny_llama", "++backend.dtype=float32", "++backend.warmup=false")


def workbench(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "servebench.workbench", f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_workbench_engine_backend_serves_the_workloads_adapters_as_the_simulator_assigns_them(tmp_path):
    # Random adapters of lora.rank are written for the run; requests get the simulator's adapters.
    runs = {}
    for name, backend in (("sim", ()), ("engine", ENGINE)):
        res = workbench(tmp_path / name, *backend, *LORA_RUN)
        assert res.returncode == 0, res.stderr
        runs[name] = (json.loads((tmp_path / name / "summary.json").read_text()),
                      pd.read_parquet(tmp_path / name / "requests.parquet").set_index("request_id"),
                      pd.read_parquet(tmp_path / name / "steps.parquet"))
    (sim, sim_requests, _), (engine, requests, steps) = runs["sim"], runs["engine"]
    assert engine["num_finished"] == 24 and requests["lora_id"].nunique() > 2
    assert sim["lora_loads"] >= requests["lora_id"].nunique()  # both count the slot policy's loads
    assert requests["lora_id"].sort_index().equals(sim_requests["lora_id"].sort_index())
    assert engine["lora_loads"] == steps["lora_loads"].sum() >= requests["lora_id"].nunique()
    assert engine["lora_loads_from_disk"] <= engine["lora_loads"] and engine["mean_lora_load_ms"] > 0
    res = workbench(tmp_path / "server", "backend=server", *LORA_RUN)
    assert res.returncode == 2 and "lora.num_adapters=5: a server runs as it was started" in res.stderr


def test_lora_serving_benchmark_runs_tiny_on_the_cpu(tmp_path):
    out = tmp_path / "lora.json"
    cmd = [sys.executable, "benchmarks/lora_serving.py", "--tiny", "--device", "cpu", "--json", str(out)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    result = json.loads(out.read_text())
    assert [r["run"] for r in result["rows"]] == ["base", "lora-base", "lora-4"]
    assert result["rows"][-1]["lora_loads"] >= result["rows"][-1]["adapters"] > 1
    assert result["memory"]["lora_slots_gib"] > 0 and result["memory"]["host_to_device_ms"] > 0
