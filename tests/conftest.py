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
