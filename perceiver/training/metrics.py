"""What an epoch measured: loss and top-1/top-5 summed on the device, the loss itself, and throughput."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from perceiver.training import distributed


class RunningMetrics:
    """Sums of loss, top-1/top-5 hits and images kept as device tensors; `compute` syncs once.

    `update(..., keep=flag)` adds a step only where the device flag is True (a masked, sync-free step)."""

    def __init__(self, device: torch.device, num_classes: int) -> None:
        self.top_k = min(5, num_classes)
        self.sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss * n, top-1 hits, top-5 hits, n
        self.skipped = 0  # training steps skipped for a non-finite loss
        self.total_count = 0  # images over all ranks, set by compute()

    @property
    def count(self) -> int:
        """Images summed on this rank (a host read)."""
        return int(self.sums[3].item())

    def state_dict(self) -> dict[str, Any]:
        """A part-done epoch's sums (over all ranks), so a run resumed mid-epoch reports the same metrics."""
        totals = self.totals()
        return {"sums": totals[:3].cpu(), "count": int(totals[3]), "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The saved sums are global: rank 0 carries them on, the other ranks start from zero."""
        self.skipped = state["skipped"]
        if distributed.current().is_main:
            count = torch.tensor([float(state["count"])], dtype=torch.float64)
            self.sums = torch.cat([state["sums"].double(), count]).to(self.sums.device)

    def totals(self) -> torch.Tensor:
        """Loss and hit sums and the image count, summed over ranks (one collective in a distributed run)."""
        return distributed.all_reduce_sum(self.sums.clone())

    @torch.no_grad()
    def update(
        self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor | None = None
    ) -> None:
        n = labels.shape[0]
        hits = logits.topk(self.top_k, dim=-1).indices == labels[:, None]
        top1, top5 = hits[:, 0].sum().double(), hits.any(dim=-1).sum().double()
        row = torch.stack([loss.detach().double() * n, top1, top5, torch.full_like(top1, n)])
        self.sums += row if keep is None else torch.where(keep, row, 0.0)

    def compute(self) -> dict[str, float]:
        """Global metrics: in a distributed run every rank gets the same all-reduced numbers."""
        loss, top1, top5, count = self.totals().tolist()
        self.total_count = int(count)
        n = max(count, 1)
        return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n}


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy from logits against class indices, or against soft targets (Mixup/CutMix)."""
    logits = logits.float()
    if targets.is_floating_point():
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def training_flops(model: torch.nn.Module, batch_size: int) -> int:
    """FLOPs of one training step (forward and backward) on `batch_size` images, as the model counts them."""
    count = getattr(model, "training_flops", None)
    if not callable(count):
        raise TypeError(f"no FLOP count for {type(model).__name__}; give it a training_flops(batch_size) method")
    return count(batch_size)


def utilisation(images_per_second: float, flops_per_image: float | None, peak_flops: float | None) -> dict:
    """perf/tflops achieved by the model's arithmetic, and perf/mfu, its fraction of every rank's peak."""
    if flops_per_image is None:
        return {}
    achieved = images_per_second * flops_per_image
    row = {"perf/tflops": achieved / 1e12}
    if peak_flops:
        row["perf/mfu"] = achieved / (peak_flops * distributed.current().world_size)
    return row


def steady_throughput(history: list[dict[str, float]]) -> float:
    """Training images/s over all epochs but the first, which also pays for warm-up and compilation."""
    epochs = history[1:] or history
    seconds = sum(row["epoch_seconds"] for row in epochs)
    images = sum(row["images_per_second"] * row["epoch_seconds"] for row in epochs)
    return images / max(seconds, 1e-9)
