"""Tiny random Hugging Face model directories for tests: no hub, built in about a second.

`build_tiny_model(path, arch)` writes what a real checkpoint has: config.json, model.safetensors
(saved by transformers' own model class), a byte-level BPE tokenizer trained on a built-in text with
a chat template, and generation_config.json.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
         "mistral": "MistralForCausalLM"}
SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 384
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
To be or not to be, that is the question. All that glitters is not gold. The early bird catches the worm.
Once upon a time there was a small model that answered every question with a story about the sea.
Large language models generate text one token at a time, reading keys and values from a paged cache.
Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris is.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000. Code: def f(x): return x * 2 + 1
""" * 4


def build_tokenizer(path: Path) -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="</s>")
    fast.save_pretrained(path)
    # The template also goes in tokenizer_config.json, where older transformers look for it.
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(chat_template=CHAT_TEMPLATE, tokenizer_class="PreTrainedTokenizerFast")
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return fast


def tiny_config(arch: str, vocab_size: int, bos: int, eos: int, **overrides) -> transformers.PretrainedConfig:
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r}: choose one of {sorted(ARCHS)}")
    kw = {"vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512,
          "rms_norm_eps": 1e-6, "bos_token_id": bos, "eos_token_id": eos,
          "tie_word_embeddings": arch == "qwen3",
          # A wider init than HF's 0.02 keeps greedy logits far from ties, so exact-match tests are stable.
          "initializer_range": 0.1, "architectures": [ARCHS[arch]]}
    return transformers.AutoConfig.for_model(arch, **(kw | overrides))


def build_tiny_model(path: str | os.PathLike, arch: str = "llama", seed: int = 0,
                     dtype: torch.dtype = torch.float32, device: str = "cpu", **overrides) -> Path:
    """Write a random `arch` model directory (tiny unless `overrides`, which go to the HF config) at `path`,
    its weights initialized on `device` and saved in `dtype`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    config = tiny_config(arch, len(tok), tok.bos_token_id, tok.eos_token_id, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = getattr(transformers, ARCHS[arch])(config).to(dtype)
    model.generation_config = transformers.GenerationConfig(bos_token_id=tok.bos_token_id,
                                                            eos_token_id=tok.eos_token_id)
    model.save_pretrained(path, safe_serialization=True)
    return path


# ~1.0B parameters (TinyLlama's shape) on the tiny tokenizer's vocabulary, with HF's default init: the GPU
# tests' bf16 model (build_tiny_model(path, dtype=torch.bfloat16, device="cuda", **ONE_B)).
ONE_B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
         "num_key_value_heads": 4, "head_dim": 64, "max_position_embeddings": 2048, "initializer_range": 0.02}


def random_prompts(path: Path, n: int) -> list[list[int]]:
    """n prompts of 9 to 301 token ids (BOS, then uniform over the tiny vocabulary's ordinary tokens)."""
    rng = random.Random(0)
    bos = transformers.AutoTokenizer.from_pretrained(path).bos_token_id
    return [[bos] + [rng.randrange(5, VOCAB_SIZE) for _ in range(rng.randint(8, 300))] for _ in range(n)]


def hf_model(path: Path, dtype: torch.dtype, attn_implementation: str = "sdpa"):
    """HF transformers' model from path on the GPU, generating past EOS (as ignore_eos)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation).cuda().eval()
    model.generation_config.eos_token_id = None
    return model


@torch.inference_mode()
def hf_greedy(model, prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
    """Each prompt's first num_tokens greedy tokens from HF generate, one prompt at a time (no padding)."""
    return [model.generate(torch.tensor([ids], device=model.device), do_sample=False,
                           max_new_tokens=num_tokens, pad_token_id=0)[0, len(ids):].tolist()
            for ids in prompts]


def train_tiny_model(path: Path, steps: int = 100, seed: int = 0) -> Path:
    """Train the model at `path` in place on CORPUS until it has memorized it (a few seconds): its
    predictions get the margins of a trained model's, which small weight errors do not cross, where a
    random model's top two logits are often a rounding apart."""
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tok(CORPUS.replace("\n", " "), return_tensors="pt").input_ids[0]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    length = 64
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - length, (16,), generator=gen)
        batch = torch.stack([ids[s:s + length] for s in starts])
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(path, safe_serialization=True)
    return path
