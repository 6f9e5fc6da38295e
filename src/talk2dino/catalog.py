"""The registry's data: named models, backbones and text encoders (house-style §3). Pure data, no torch.

`talk2dino models`, `talk2dino.list_models()` and the server's model list read these names without
importing torch or transformers; `talk2dino.registry` re-exports them and `talk2dino.factory` builds models from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from talk2dino.config import BackboneConfig, InferenceConfig, ModelConfig, ProjectionConfig, TextConfig

if TYPE_CHECKING:
    from talk2dino.models.backbones import LogitsRope

# The authors' psi files, pinned to commits of the reference repository (method.md §7,
# ../reference/README.md). They carry no licence, so we download them, never bundle them.
_PSI_URL = "https://raw.githubusercontent.com/lorebianchi98/Talk2DINO/{commit}/weights/{file}"
_CURRENT = "4918c2df1d00c644ecc7f34de070694af1a8bc69"
_SUPERSEDED = "d35413640f70d3e2beb686b1f2b36c13b1d78335"
_CLIP_B16 = "hf-hub:openai/clip-vit-base-patch16"  # CLIP ViT-B/16 text for every backbone, method.md §2.1


# Named frozen parts, so that `--backbone dinov2-vitl14-reg` or `--text-encoder clip-vitb16` works
# wherever a source string is accepted.
BACKBONES: dict[str, str] = {
    # DINOv2 ViT-S/B/L/g at patch 14, without and with 4 registers (method.md §2.2): one command per
    # variant answers the registers question.
    **{
        f"dinov2-vit{size}14{reg}": f"hf-hub:facebook/dinov2-{'with-registers-' if reg else ''}{name}"
        for size, name in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))
        for reg in ("", "-reg")
    },
    # DINO v1 ViT-S/B at patch 8 and 16, no registers: the paper's "DINO instead of DINOv2" ablation.
    **{f"dino-vit{size}{patch}": f"hf-hub:facebook/dino-vit{size}{patch}" for size in ("s", "b") for patch in (8, 16)},
    # DINOv3 ViT-S/B/L/H+ at patch 16 with 4 registers (method.md §2.4). These hub repositories are
    # gated: accept Meta's licence on the model page and log in (`hf auth login`) before the
    # first download.
    **{f"dinov3-{arch}": f"hf-hub:facebook/dinov3-{arch}-pretrain-lvd1689m"
       for arch in ("vits16", "vitb16", "vitl16", "vith16plus")},
}
TEXT_ENCODERS: dict[str, str] = {"clip-vitb16": _CLIP_B16}


def resolve_part(source: str, table: dict[str, str]) -> str:
    """A part name from `table` -> its source string; anything else is returned unchanged."""
    return table.get(source, source)


@dataclass(frozen=True)
class RegistryEntry:
    """A named model: configuration with pinned sources, and a one-line description."""

    config: ModelConfig
    description: str
    aliases: tuple[str, ...] = ()


def _entry(name: str, backbone: str, psi: ProjectionConfig, description: str, *, aliases: tuple[str, ...] = (),
           inference: InferenceConfig | None = None, profile: str = "2025",
           logits_rope: LogitsRope = "model") -> RegistryEntry:
    config = ModelConfig(
        name=name,
        backbone=BackboneConfig(source=backbone, logits_rope=logits_rope),
        text=TextConfig(source=_CLIP_B16),
        projection=psi,
        inference=inference or InferenceConfig(),
        profile=profile,  # type: ignore[arg-type]
    )
    return RegistryEntry(config, description, aliases)


_ENTRIES: tuple[RegistryEntry, ...] = (
    _entry(
        "talk2dino-vitb14-reg",
        "hf-hub:facebook/dinov2-with-registers-base",
        ProjectionConfig(
            source=_PSI_URL.format(commit=_CURRENT, file="vitb_mlp_infonce.pth"),
            sha256="5f6efcc520f22916ecf3dfdfb01d6f57e701c1c2e1feda71a80d89e3cd752f0f",
        ),
        "DINOv2 ViT-B/14 with registers + CLIP B/16 text, current psi (2025 results)",
        aliases=("talk2dino-vitb14-reg.2025", "talk2dino-vitb14reg.2025"),
    ),
    _entry(
        "talk2dino-vitl14-reg",
        "hf-hub:facebook/dinov2-with-registers-large",
        ProjectionConfig(
            source=_PSI_URL.format(commit=_CURRENT, file="vitl_mlp_infonce.pth"),
            git_blob_sha1="21a0038cc793403648264fe9c90a29c9533770a3",
        ),
        "DINOv2 ViT-L/14 with registers + CLIP B/16 text (2025 results, theta 0.54)",
        aliases=("talk2dino-vitl14-reg.2025", "talk2dino-vitl14reg.2025"),
        inference=InferenceConfig(bg_threshold=0.54),  # method.md §4.6: ViT-L threshold
    ),
    _entry(
        "talk2dino-vitb14-reg.2024",
        "hf-hub:facebook/dinov2-with-registers-base",
        ProjectionConfig(
            source=_PSI_URL.format(commit=_SUPERSEDED, file="vitb_mlp_infonce.pth"),
            sha256="5db3e85d8745a621cddfcb5c76641f47a0514852a2da64138d5c893864c9bc81",
        ),
        "superseded ViT-B psi of 2024-11-21 with the 2024 cleaning formula (legacy profile, best effort)",
        aliases=("talk2dino-vitb14reg.2024",),
        inference=InferenceConfig(clean_head_embedding="softmax"),
        profile="2024",
    ),
    # The authors' DINOv3 psi (method.md §2.4, §7; no published results). The reference computed the
    # training targets' CLS->patch logits from the qkv projection, before RoPE, so these entries use
    # logits_rope="none" to feed psi what it was trained on (pitfall P20). For a psi trained with this
    # package on the true logits, use --backbone dinov3-vitb16 (logits_rope "model", the default) or
    # the model folder the training writes, which records its own setting.
    _entry(
        "talk2dinov3-vitb16",
        BACKBONES["dinov3-vitb16"],
        ProjectionConfig(
            source=_PSI_URL.format(commit=_CURRENT, file="dinov3_vitb_mlp_infonce.pth"),
            sha256="6fc5ce7a05d8f1c829c174d87b861da05399cf0bfe50de3711ac940115d85fcc",
        ),
        "DINOv3 ViT-B/16 (4 registers) + CLIP B/16 text, authors' DINOv3 psi; RoPE-free logits as trained; "
        "the DINOv3 hub repo is gated (accept its licence, log in)",
        logits_rope="none",
    ),
    _entry(
        "talk2dinov3-vitl16",
        BACKBONES["dinov3-vitl16"],
        ProjectionConfig(
            source=_PSI_URL.format(commit=_CURRENT, file="dinov3_vitl_mlp_infonce.pth"),
            git_blob_sha1="51dfe9926175877b5deecaba07c398e46e9d61fe",
        ),
        "DINOv3 ViT-L/16 (4 registers) + CLIP B/16 text, authors' DINOv3 psi; RoPE-free logits as trained; "
        "the DINOv3 hub repo is gated (accept its licence, log in)",
        logits_rope="none",
    ),
)


def registered_config(name: str) -> ModelConfig | None:
    """The configuration of a registered model name or alias; None for any other string."""
    for entry in _ENTRIES:
        if name in (entry.config.name, *entry.aliases):
            return entry.config
    return None


def list_models() -> list[str]:
    """Names of the registered models (aliases not included)."""
    return [e.config.name for e in _ENTRIES]


def describe_models() -> dict[str, str]:
    """Registered model name -> one-line description."""
    return {e.config.name: e.description for e in _ENTRIES}

