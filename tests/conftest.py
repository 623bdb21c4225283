import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Test models are tiny: more OpenMP threads only spin against each other on a shared 2-core box (20x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import build_tiny_model, train_tiny_model

# Property tests that set no max_examples run 150; CI's slow job passes --hypothesis-profile=thorough, whose
# 20,000 find rare interleavings that 150 miss (a preemption while a first token is in flight).
settings.register_profile("quick", max_examples=150)
settings.register_profile("thorough", max_examples=20_000)
settings.load_profile("quick")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen3"), "qwen3")


@pytest.fixture(scope="session")
def trained_llama_dir(tmp_path_factory) -> Path:
    return train_tiny_model(build_tiny_model(tmp_path_factory.mktemp("trained_llama"), "llama"))


# (rank, targets, layers, rsLoRA) of the LoRA tests' adapters: every projection; attention only; the MLP of
# the second layer only
LORA_ADAPTERS = {
    "all": (8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), None, False),
    "attn": (16, ("q_proj", "k_proj", "v_proj", "o_proj"), None, False),
    "mlp1": (8, ("gate_proj", "up_proj", "down_proj"), range(1, 2), True),
}


@pytest.fixture(scope="session")
def lora_adapters(tiny_llama_dir, tmp_path_factory) -> dict:
    """Random PEFT adapters of tiny_llama_dir (ids 1, 2, 3) as LoRARequests, by name."""
    from servebench.engine.config import ModelConfig
    from servebench.engine.dummy import write_dummy_adapter
    from servebench.engine.lora import LoRARequest

    cfg, root = ModelConfig.from_dir(tiny_llama_dir), tmp_path_factory.mktemp("lora_adapters")
    out = {}
    for i, (name, (rank, targets, layers, rslora)) in enumerate(LORA_ADAPTERS.items(), start=1):
        write_dummy_adapter(root / name, cfg, rank, seed=i, targets=targets, layers=layers, use_rslora=rslora)
        out[name] = LoRARequest(name, i, str(root / name))
    return out
