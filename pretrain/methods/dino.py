"""DINO (Caron et al., 2021): self-distillation with no labels.

A student (backbone + DINO head) sees every view, global and local (multi-crop); a teacher, an EMA of the student,
sees the global views only. The loss is the cross-entropy between the teacher's centred and sharpened softmax and the
student's softmax over all (teacher view i, student view j) pairs with i != j (``kernels.dino_loss``, which also gives
the teacher's batch mean). The center is an EMA of that mean over every rank (``reduce``, passed in); the teacher
temperature warms up linearly and the teacher momentum rises to 1 along a cosine, both functions of the step alone;
the prototypes are frozen for the first ``freeze_last_layer_steps`` steps. ``backbone`` is the teacher's, the network
DINO evaluates and releases.

With ``centering: sinkhorn`` the teacher's distributions are DINOv2's Sinkhorn-Knopp codes instead: its logits
balanced over the prototypes across the global batch (``pretrain.methods.swav.sinkhorn_codes`` at the teacher
temperature, the prototypes' totals averaged over ranks), fed to the same loss kernel as ``temp * log(codes)`` with a
zero center; the EMA center is then unused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.dino_loss import dino_loss
from pretrain.config import Config
from pretrain.ema import cosine_momentum, ema_update_, teacher_copy
from pretrain.heads import DINOHead
from pretrain.methods.base import Gather, Reduce, SSLMethod, StepMean, build_method_backbone, features_by_resolution
from pretrain.methods.swav import sinkhorn_codes

LOSS_IMPLS = ("auto", "triton", "ref")


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """DINOv2's KoLeo regularizer (the Kozachenko-Leonenko entropy estimate): x (B, D), L2-normalised inside ->
    -mean_i log ||x_i - x_nn(i) + eps||, nn(i) the most similar other row; in fp32. Lower when the rows spread out."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.T
        dots.fill_diagonal_(-2.0)  # below any cosine: a row is not its own neighbour
        nearest = dots.argmax(dim=1)
    return -torch.log(torch.linalg.vector_norm(x - x[nearest] + eps, dim=-1) + eps).mean()


def teacher_temperature(step: int, warmup_temp: float, temp: float, warmup_steps: int) -> float:
    """Linear from ``warmup_temp`` at step 0 to ``temp`` at ``warmup_steps``, then constant."""
    if step >= warmup_steps:
        return temp
    return warmup_temp + (temp - warmup_temp) * step / warmup_steps


def dino_head(cfg: Config, in_dim: int, prototypes: int) -> DINOHead:
    """The head of ``cfg`` (its MLP: model.proj_*; method.head_bn, method.norm_last_layer) onto ``prototypes``."""
    return DINOHead(in_dim, out_dim=prototypes, hidden_dim=cfg.model.proj_hidden_dim,
                    bottleneck_dim=cfg.model.proj_out_dim, num_layers=cfg.model.proj_layers,
                    use_bn=cfg.method.head_bn, norm_last_layer=cfg.method.norm_last_layer)


class DINO(SSLMethod):
    config_keys = frozenset({"center_momentum", "centering", "freeze_last_layer_steps", "head_bn", "koleo_weight",
                             "loss_impl", "norm_last_layer", "num_prototypes", "sinkhorn_iters", "student_temp",
                             "teacher_momentum", "teacher_temp", "warmup_teacher_temp", "warmup_teacher_temp_steps"})
    masks = False
    """Whether the backbone gets a mask token (iBOT's subclass masks the student's global views)."""

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.method.loss_impl not in LOSS_IMPLS:
            raise ValueError(f"method.loss_impl: dino takes one of {', '.join(LOSS_IMPLS)}, got "
                             f"{cfg.method.loss_impl!r} (chunked is SimCLR's)")
        if cfg.method.centering == "sinkhorn" and not cfg.method.norm_last_layer:
            raise ValueError("method.centering: sinkhorn needs method.norm_last_layer: true (unit prototypes keep the "
                             "teacher's logits in [-1, 1], which its exp at the teacher temperature relies on)")
        if cfg.data.num_views < 2:
            raise ValueError(f"data.num_views: dino needs at least 2 global views (each is the teacher's target for "
                             f"the others), got {cfg.data.num_views}")

    def __init__(self, cfg: Config, *, gather: Gather | None = None, reduce: Reduce | None = None,
                 rank: int = 0) -> None:
        super().__init__()
        del gather, rank  # DINO's loss is per sample: only the center is averaged across ranks
        m = cfg.method
        backbone = build_method_backbone(cfg, masks=self.masks)
        head = dino_head(cfg, backbone.embed_dim, m.num_prototypes)
        self.student = nn.ModuleDict({"backbone": backbone, "head": head})
        self.teacher = teacher_copy(self.student)
        self.register_buffer("center", torch.zeros(m.num_prototypes))
        self.n_global = cfg.data.num_views
        self.reduce = reduce
        self.cfg = m
        self.loss_impl = m.loss_impl
        self._teacher_temp = m.warmup_teacher_temp
        self._freeze = m.freeze_last_layer_steps > 0
        self._teacher_mean = StepMean()

    @property
    def backbone(self) -> nn.Module:  # type: ignore[override]
        return self.teacher["backbone"]

    def on_step_start(self, step: int, max_steps: int) -> None:
        m = self.cfg
        self._teacher_temp = teacher_temperature(step, m.warmup_teacher_temp, m.teacher_temp,
                                                 m.warmup_teacher_temp_steps)
        self._freeze = step < m.freeze_last_layer_steps

    def _koleo(self, features: Tensor, n: int) -> Tensor:
        """DINOv2's KoLeo term on the student's features (V * B, D) of the global views, each view's batch apart, summed
        (this rank's batch, as DINOv2), weighted by ``koleo_weight``."""
        return self.cfg.koleo_weight * sum(koleo_loss(features[i * n:(i + 1) * n]) for i in range(self.n_global))

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """batch["views"]: ``n_global`` tensors (B, C, H, W), then any local crops (B, C, h, w)."""
        views = batch["views"]
        n = views[0].shape[0]
        with torch.no_grad():
            teacher = self.teacher["head"](self.teacher["backbone"](torch.cat(views[: self.n_global])))
            teacher, center = self._centred(teacher, self.center, self._teacher_temp)
        features = features_by_resolution(self.student["backbone"], views)
        student = self.student["head"](features, freeze_last_layer=self._freeze)
        loss, teacher_mean = dino_loss(student.view(len(views), n, -1), teacher.view(self.n_global, n, -1),
                                       center, self.cfg.student_temp, self._teacher_temp, impl=self.loss_impl)
        if self.cfg.centering == "ema":
            self._teacher_mean.add(teacher_mean)
        if not self.cfg.koleo_weight:
            return {"loss": loss}
        koleo = self._koleo(features, n)
        return {"loss": loss + koleo, "dino_loss": loss.detach(), "koleo": koleo.detach()}

    def _centred(self, teacher: Tensor, center: Tensor, temp: float) -> tuple[Tensor, Tensor]:
        """The teacher's logits (N, K) and the center the loss subtracts from them: as they are with the EMA center,
        or with Sinkhorn-Knopp centering ``temp * log(codes)`` and a zero center, so that the loss kernel's
        softmax((t - c) / temp) gives the balanced codes (floored at 1e-30: finite logits for any kernel)."""
        if self.cfg.centering == "ema":
            return teacher, center
        codes = sinkhorn_codes(teacher, temp, self.cfg.sinkhorn_iters, self.reduce)
        return (temp * codes.clamp_min(1e-30).log()).to(teacher.dtype), torch.zeros_like(center)

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        ema_update_(self.teacher, self.student, cosine_momentum(step, max_steps, self.cfg.teacher_momentum))
        if (mean := self._teacher_mean.pop()) is not None:
            mean = self.reduce(mean) if self.reduce is not None else mean
            self.center.mul_(self.cfg.center_momentum).add_(mean.to(self.center.dtype),
                                                            alpha=1.0 - self.cfg.center_momentum)
