"""Images in the simulator: the vision encoder's time per image, and its weights.

The model config of a vision-language model (LLaVA style) names its vision tower under `vision_encoder`
(a ViT: patches of `patch_size` pixels of an `image_size` square image, plus a class token) and a
two-layer MLP projector into the language model's hidden size. Each image becomes `image_tokens`
placeholder tokens of the prompt (workbench.workloads), so prefill and KV grow with it; the scheduler
(engine.core) lists in `SchedulerOutput.encoder_inputs` the images the encoder runs on this step (not
those in its encoder cache, `scheduler.encoder_cache_size`), and `EncoderTerm` prices them: a roofline
of the tower's FLOPs on the batch of images against reading its weights once, split over tensor
parallelism as vLLM shards the tower.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from servebench.engine.core.scheduler_output import SchedulerOutput
from servebench.sim.specs import HardwareSpec, ModelSpec, ParallelSpec, check_int, from_group


@dataclass(slots=True)
class VisionEncoder:
    """A ViT vision tower (CLIP), numbers from its config.json, plus LLaVA's MLP projector."""

    name: str
    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int  # layers run: LLaVA takes the penultimate layer's features, vLLM builds only those
    num_attention_heads: int

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def params(self, text_hidden: int) -> int:
        h = self.hidden_size
        layer = 4 * h * h + 2 * h * self.intermediate_size
        patch_embed = 3 * self.patch_size**2 * h
        projector = h * text_hidden + text_hidden * text_hidden
        return self.num_layers * layer + patch_embed + projector

    def flops_per_image(self, text_hidden: int) -> float:
        """Matmul FLOPs (2 per weight per token) plus attention (4 x tokens^2 x hidden per layer)."""
        tokens = self.num_patches + 1  # + the class token
        attention = 4 * tokens * tokens * self.hidden_size * self.num_layers
        return 2 * tokens * self.params(text_hidden) + attention


@dataclass(slots=True)
class Multimodal:
    """The `multimodal` group: images in the workload's requests."""

    images_per_request: int = 0  # 0: text only
    image_tokens: int | None = None  # placeholder tokens per image; None: the encoder's patches
    num_unique_images: int | None = None  # images drawn uniformly from this many; None: all distinct

    def __post_init__(self) -> None:
        check_int("multimodal.images_per_request", self.images_per_request, 0)
        if self.image_tokens is not None:
            check_int("multimodal.image_tokens", self.image_tokens, 1)
        if self.num_unique_images is not None:
            check_int("multimodal.num_unique_images", self.num_unique_images, 1)

    @property
    def enabled(self) -> bool:
        return self.images_per_request > 0


def multimodal_spec(
    cfg: Mapping[str, Any] | None, model: ModelSpec
) -> tuple[Multimodal, VisionEncoder | None]:
    """The group and the model's vision encoder; images need a model that has one. Fills `image_tokens`."""
    mm = from_group(Multimodal, "multimodal", cfg or {})
    if not mm.enabled:
        return mm, None
    if model.vision_encoder is None:
        raise ValueError(
            f"multimodal.images_per_request={mm.images_per_request}: model {model.name} has no "
            "vision_encoder (use a vision-language model, e.g. model=llava1_5_13b)"
        )
    encoder = from_group(VisionEncoder, "model.vision_encoder", model.vision_encoder)
    if mm.image_tokens is None:
        mm.image_tokens = encoder.num_patches
    return mm, encoder


def encoder_weight_bytes(encoder: VisionEncoder, model: ModelSpec, parallel: ParallelSpec) -> int:
    return encoder.params(model.hidden_size) * model.dtype_bytes // parallel.tensor_parallel_size


class EncoderTerm:
    """Seconds a step spends in the vision encoder on `out.encoder_inputs`; counts the images encoded."""

    def __init__(
        self, encoder: VisionEncoder, model: ModelSpec, hw: HardwareSpec, parallel: ParallelSpec
    ) -> None:
        tp = parallel.tensor_parallel_size
        self._s_per_image = encoder.flops_per_image(model.hidden_size) / tp / hw.matmul_flops
        self._weights_s = encoder_weight_bytes(encoder, model, parallel) / hw.mem_bandwidth
        self.num_encoded = 0

    def __call__(self, out: SchedulerOutput) -> float:
        n = len(out.encoder_inputs)
        if not n:
            return 0.0
        self.num_encoded += n
        return max(n * self._s_per_image, self._weights_s)
