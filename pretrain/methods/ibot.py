"""iBOT (Zhou et al., 2022): image BERT pre-training with an online tokenizer.

DINO (``pretrain.methods.dino``) plus masked image modelling in its own feature space. The student's global views are
block-masked (``data_pipeline.masking``; a masked patch's embedding becomes the mask token through
``kernels.mask_token_replace``); the teacher sees them whole. The head, shared by the image-level token and the patch
tokens, maps every token to prototype logits (with ``patch_head: separate``, DINOv2's, the patch tokens have a head
and prototypes of their own). Two losses, summed: DINO's cross-view loss on the image-level token
(global and local views, ``kernels.dino_loss``) and the patch loss, the cross-entropy between the teacher's centred and
sharpened patch distributions and the student's at the masked patches of the same view
(``kernels.ibot_masked_patch_loss``, the DINO kernel on diagonal pairs, over the masked patches packed). Each has its
own center, an EMA of the teacher's mean over every rank (or, with ``centering: sinkhorn``, DINOv2's Sinkhorn-Knopp
codes: the image-level tokens balanced over the global batch, the masked patches over all ranks' masked patches), and
its own teacher temperature. The image-level token is the backbone's ``pool``: the cls token, or the patch mean with
``global_pool: mean``, so the loss trains what evaluation and downstream use get. ``backbone`` is the teacher's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from data_pipeline.masking import block_masks
from kernels.dino_loss import dino_loss, ibot_masked_patch_loss
from kernels.masked_gather import packed_gather
from pretrain.config import Config
from pretrain.ema import teacher_copy
from pretrain.methods.base import Gather, Reduce, StepMean, features_by_resolution, require_vit
from pretrain.methods.dino import DINO, dino_head, teacher_temperature


class IBOT(DINO):
    config_keys = DINO.config_keys | {"mask_prob", "mask_ratio_range", "patch_head", "patch_loss_weight",
                                      "patch_prototypes", "teacher_patch_temp"}
    masks = True

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        require_vit(cfg, "ibot masks patch tokens of")

    def __init__(self, cfg: Config, *, gather: Gather | None = None, reduce: Reduce | None = None,
                 rank: int = 0) -> None:
        super().__init__(cfg, gather=gather, reduce=reduce, rank=rank)
        m = cfg.method
        patch_prototypes = m.patch_prototypes or m.num_prototypes
        self._patch_key = "head"
        if m.patch_head == "separate":  # DINOv2's: the patch tokens' own head, its teacher an EMA of it like the rest
            self._patch_key = "patch_head"
            self.student[self._patch_key] = dino_head(cfg, self.student["backbone"].embed_dim, patch_prototypes)
            self.teacher[self._patch_key] = teacher_copy(self.student[self._patch_key])
        self.register_buffer("patch_center", torch.zeros(patch_prototypes))
        for part in (self.student, self.teacher):
            part["backbone"].mask_impl = m.loss_impl
        self.patch_weight = m.patch_loss_weight
        self._patch_temp = m.warmup_teacher_temp
        self._patch_mean = StepMean()

    def on_step_start(self, step: int, max_steps: int) -> None:
        super().on_step_start(step, max_steps)
        m = self.cfg
        self._patch_temp = teacher_temperature(step, m.warmup_teacher_temp, m.teacher_patch_temp,
                                               m.warmup_teacher_temp_steps)

    @staticmethod
    def _encode(backbone: nn.Module, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """x (N, C, H, W) -> the image-level token (N, D), the backbone's ``pool`` (what the local crops, evaluation and
        downstream use get: the cls token, or the patch mean with ``global_pool: mean``), and the patch tokens
        (N, L, D)."""
        tokens = backbone.forward_features(x, mask)
        return backbone.pool(tokens), backbone.patch_tokens(tokens)

    @staticmethod
    def _head(net: nn.ModuleDict, x: Tensor, freeze: bool = False, key: str = "head") -> Tensor:
        """(..., D) -> (..., K) prototype logits, token by token, by the head ``net[key]``."""
        return net[key](x.reshape(-1, x.shape[-1]), freeze_last_layer=freeze).view(*x.shape[:-1], -1)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """batch["views"]: ``n_global`` tensors (B, C, H, W), then any local crops (B, C, h, w).

        The head runs over the image-level tokens (all views, as in DINO) and over the patch tokens in separate calls:
        a head with BatchNorm then normalises each population by its own statistics (together, the patch tokens'
        would squash the image-level tokens' spread, and DINO's targets with it). The student's head runs over the
        masked patches only (``kernels.packed_gather``), the only ones the patch loss reads: with iBOT's masking
        (half the views, 10-50% of their patches) about a sixth of its patch tokens, the teacher's over them all."""
        views = batch["views"]
        g, n = self.n_global, views[0].shape[0]
        glob = torch.cat(views[:g])
        backbone = self.student["backbone"]
        grid = (glob.shape[-2] // backbone.patch_size, glob.shape[-1] // backbone.patch_size)
        mask = block_masks(g * n, grid, self.cfg.mask_ratio_range, self.cfg.mask_prob)
        masked = int(mask.sum())  # the mask is drawn on the host: no device sync
        mask = mask.to(glob.device)
        with torch.no_grad():  # the teacher's head over every patch: the patch center is their mean
            t_image, t_patch = self._encode(self.teacher["backbone"], glob, None)
            t_image, t_patch = self._head(self.teacher, t_image), self._head(self.teacher, t_patch, key=self._patch_key)
            patch_mean = t_patch.float().mean(dim=(0, 1))
            t_image, center = self._centred(t_image, self.center, self._teacher_temp)
            # the teacher's masked patches, on every rank whatever its draw (Sinkhorn-Knopp centering balances them
            # over the global batch: a collective each rank must call)
            t_masked, patch_center = self._centred(packed_gather(t_patch, mask, impl=backbone.mask_impl),
                                                   self.patch_center, self._patch_temp)
        s_image, s_patch = self._encode(backbone, glob, mask)
        if len(views) > g:  # local crops: image-level tokens only, one backbone pass per resolution
            s_image = torch.cat([s_image, features_by_resolution(backbone, views[g:])])
        features, s_image = s_image, self._head(self.student, s_image, self._freeze)
        cls_loss, cls_mean = dino_loss(s_image.view(len(views), n, -1), t_image.view(g, n, -1), center,
                                       self.cfg.student_temp, self._teacher_temp, impl=self.loss_impl)
        # The student's head only where the loss reads: the masked patches. A draw that hid under 2 (tiny batches
        # only) has no patch loss (a BatchNorm head cannot normalise one row); the head still runs, over every patch,
        # so each rank calls it as often as the others (ZeRO-3 gathers its parameters collectively per call).
        if masked >= 2:
            s_masked = self._head(self.student, packed_gather(s_patch, mask, impl=backbone.mask_impl), self._freeze,
                                  self._patch_key)
            patch_loss = ibot_masked_patch_loss(s_masked, t_masked, mask, patch_center, self.cfg.student_temp,
                                                self._patch_temp, impl=self.loss_impl)
        else:
            patch_loss = self._head(self.student, s_patch, self._freeze, self._patch_key).float().sum() * 0.0
        if self.cfg.centering == "ema":
            self._teacher_mean.add(cls_mean)
            self._patch_mean.add(patch_mean)
        loss = cls_loss + self.patch_weight * patch_loss
        out = {"cls_loss": cls_loss.detach(), "patch_loss": patch_loss.detach()}
        if self.cfg.koleo_weight:  # DINOv2's KoLeo on the student's image-level tokens of the global views
            out["koleo"] = self._koleo(features, n)
            loss = loss + out["koleo"]
            out["koleo"] = out["koleo"].detach()
        return {"loss": loss, **out}

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        super().on_step_end(step, max_steps)  # the EMA teacher and the cls center
        if (mean := self._patch_mean.pop()) is not None:
            mean = self.reduce(mean) if self.reduce is not None else mean
            momentum = self.cfg.center_momentum
            self.patch_center.mul_(momentum).add_(mean.to(self.patch_center.dtype), alpha=1.0 - momentum)
