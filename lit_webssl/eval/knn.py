"""Weighted k-nearest-neighbour classification on frozen features (DINOv2 ``eval/knn.py`` protocol)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def knn_top1(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy of a cosine-similarity kNN vote weighted by ``exp(sim / temperature)``.

    Args:
        bank: ``(M, F)`` features of the labelled bank; ``bank_labels`` ``(M,)``.
        queries: ``(Q, F)`` features to classify; ``query_labels`` ``(Q,)``.
        k: Neighbours per query (clipped to the bank size).
        temperature: Vote temperature (0.07 in DINO/DINOv2).
        chunk: Queries per similarity block (bounds memory).
    """
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    k = min(k, bank.shape[0])
    correct = 0
    for start in range(0, queries.shape[0], chunk):
        sims, idx = (queries[start : start + chunk] @ bank.T).topk(k, dim=1)
        votes = torch.zeros(sims.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[idx], (sims / temperature).exp())
        correct += (votes.argmax(1) == query_labels[start : start + chunk]).sum().item()
    return correct / queries.shape[0]
