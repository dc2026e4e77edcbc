"""ViFi-CLIP: fine-tuned CLIP models are efficient video learners (Rasheed, Khattak et al., CVPR 2023,
https://arxiv.org/abs/2212.03640; muzairkhattak/ViFi-CLIP ``trainers/vificlip.py``).

A video is T frames; each goes through CLIP's image tower and the frame features are averaged over
time; the video feature is matched to class-name text features as in CLIP. Two stages:

- ``stage="bridge"``: fine-tune the towers (``tune``: both, image or text) on video, with the prompt
  "a photo of a {class}." (AdamW, label smoothing, optional mixup / CutMix in the recipe). As in the
  reference, ``both`` trains the temperature too, and the word-embedding table never trains. The run
  writes the tuned backbone as a normal checkpoint folder (``<run>/backbone``; ``save_clip``).
- ``stage="prompt"``: on the bridged backbone (``model.pretrained=<run>/backbone``), frozen, learn
  deep vision + language prompts (IVLP-style: independent tokens in each tower to ``prompt_depth_*``).

Clips are [B, T, 3, H, W]; multi-view test batches [B, V, T, 3, H, W] give one prediction per video
from the views' averaged softmax (ViFi-CLIP's ``validate``), returned as log-probabilities. Plain
images [B, 3, H, W] are one-frame clips.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from promptlab.clip import FrozenCLIP
from promptlab.prompts import (
    PromptModule,
    clean_classname,
    encode_prompts,
    independent_vl_prompts,
    insert_context,
    layer_prompts,
    prompt_buffers,
)

STAGES = ("bridge", "prompt")


def average_views(logits: torch.Tensor) -> torch.Tensor:
    """[B, V, C] per-view logits -> [B, C] log of the views' mean softmax (one score per video)."""
    return logits.float().softmax(-1).mean(1).clamp_min(1e-12).log()


class ViFiCLIP(PromptModule):
    """Video CLIP by temporal mean pooling; bridge (tune the towers) or prompt (deep V+L prompts) stage.

    Args:
        stage: ``"bridge"`` fine-tunes backbone weights; ``"prompt"`` freezes them and learns prompts.
        tune: bridge stage: which towers learn, ``"both"`` (with the temperature), ``"image"`` or
            ``"text"``; never the token-embedding table.
        template: bridge stage: the text prompt (ViFi-CLIP: "a photo of a {}.").
        n_ctx_text / n_ctx_vision: prompt stage: learned tokens per layer in each tower.
        ctx_init: prompt stage: words initialising the text context (ViFi-CLIP uses them only for
            ``n_ctx_text <= 4``; give "" for random N(0, 0.02) context).
        prompt_depth_text / prompt_depth_vision: prompt stage: shallow prompt plus blocks 1..depth-1.
        label_smoothing: of the cross-entropy (ViFi-CLIP AUG.LABEL_SMOOTH 0.1), also on mixed targets.
    """

    image_side_frozen: ClassVar[bool] = False

    def __init__(
        self,
        clip: FrozenCLIP,
        classnames: Sequence[str],
        stage: str = "prompt",
        tune: str = "both",
        template: str = "a photo of a {}.",
        n_ctx_text: int = 16,
        n_ctx_vision: int = 16,
        ctx_init: str | None = "",
        prompt_depth_text: int = 9,
        prompt_depth_vision: int = 9,
        label_smoothing: float = 0.1,
    ):
        super().__init__(clip, classnames)
        if stage not in STAGES:
            raise ValueError(f"stage={stage!r}: expected one of {STAGES}")
        self.stage, self.template, self.label_smoothing = stage, template, label_smoothing
        if stage == "bridge":
            clip.fingerprint()  # pin the pretrained identity before the weights move (exports name it)
            # trainers/vificlip.py returnCLIP: USE="both" trains every ViFiCLIP parameter, logit_scale
            # included; "image" / "text" only image_encoder / text_encoder. The text enters as
            # complete_text_embeddings, a buffer of token embeddings computed once: the word
            # embeddings are not a ViFiCLIP parameter and never train.
            temperature = (clip.TEMPERATURE,) if tune == "both" else ()
            self.trainable_backbone_parts = clip.tower_parts(tune, word_embeddings=False) + temperature
            clip.unfreeze(self.trainable_backbone_parts)
        else:
            self.n_ctx_text = n_ctx_text
            self.prefix, learned = independent_vl_prompts(
                clip,
                n_ctx_text,
                n_ctx_vision,
                ctx_init,
                prompt_depth_text,
                prompt_depth_vision,
                "the prompt stage",
            )
            for name, p in learned.items():  # ctx [n_t, W], text_deep, vis_ctx [n_v, Wv], vis_deep
                setattr(self, name, p)
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        if self.stage == "bridge":
            ids = self.clip.tokenize([self.template.format(clean_classname(c)) for c in self.classnames])
            self.register_buffer("_ids", ids, persistent=False)  # [C, 77]
            return
        self.register_class_buffers(
            prompt_buffers(self.clip, self.classnames, self.n_ctx_text, prefix=self.prefix)
        )

    # ------------------------------------------------------------------ features
    def text_features(self) -> torch.Tensor:
        if self.stage == "bridge":
            return self.clip.encode_text(self._ids)  # [C, D]; a graph into the text tower when it learns
        prompts = insert_context(self._base, self.ctx, self._ctx_pos)  # [C, L, W]
        return encode_prompts(self.clip, prompts, self._eot, deep_prompts=layer_prompts(self.text_deep))

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, D] frame features through the (bridged or prompted) image tower."""
        if self.stage == "bridge":
            return self.clip.encode_image(frames)
        return self.clip.encode_image(frames, prompts=self.vis_ctx, deep_prompts=layer_prompts(self.vis_deep))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Clips [B, T, 3, H, W] (or images [B, 3, H, W]) -> [B, D], the frames' features averaged over time."""
        clips = images.unsqueeze(1) if images.dim() == 4 else images
        B, T = clips.shape[:2]
        return self.encode_frames(clips.flatten(0, 1)).reshape(B, T, -1).mean(1)  # temporal mean pooling

    def forward(
        self,
        images: torch.Tensor | None = None,
        *,
        image_features: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, C]; for multi-view clips [B, V, T, 3, H, W], log of the views' mean softmax.

        ``targets`` (mixed soft labels) are for :meth:`loss`; the engine passes every batch input here.
        """
        if images is not None and images.dim() == 6:
            B, V = images.shape[:2]
            return average_views(super().forward(images.flatten(0, 1)).reshape(B, V, -1))
        return super().forward(images, image_features=image_features)

    def loss(
        self, logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None = None, **aux: Any
    ) -> torch.Tensor:
        """Label-smoothed cross-entropy; against mixed soft ``targets`` [B, C] when mixup / CutMix made them."""
        if targets is None:
            return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        C = logits.shape[-1]
        soft = targets.float() * (1 - self.label_smoothing) + self.label_smoothing / C
        return -(soft * logits.float().log_softmax(-1)).sum(-1).mean()

    # ------------------------------------------------------------------ learned tensors
    def prompt_state_dict(self) -> dict[str, torch.Tensor]:
        """Prompt stage: the prompts. Bridge stage: the tuned tower weights, under the backbone's own
        names (``clip.model.<open_clip or HF name>``), not FrozenCLIP's internal aliases."""
        if self.stage != "bridge":
            return super().prompt_state_dict()
        return {
            f"clip.model.{n}": p.detach() for n, p in self.clip.model.named_parameters() if p.requires_grad
        }

    def load_prompt_state_dict(self, state: dict[str, torch.Tensor], *, source: str = "state dict") -> None:
        if self.stage != "bridge":
            return super().load_prompt_state_dict(state, source=source)
        own = dict(self.clip.model.named_parameters())
        names = {f"clip.model.{n}" for n, p in own.items() if p.requires_grad}
        missing, unexpected = sorted(names - set(state)), sorted(set(state) - names)
        if missing or unexpected:
            raise KeyError(
                f"{source} does not match ViFiCLIP (bridge): missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        with torch.no_grad():
            for k, v in state.items():
                p = own[k[len("clip.model.") :]]
                if tuple(v.shape) != tuple(p.shape):
                    raise ValueError(
                        f"{source}: '{k}' has shape {list(v.shape)}, the backbone's is {list(p.shape)}"
                    )
                p.copy_(v)
