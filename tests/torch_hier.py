"""HIER's regulariser as the official ``HIERLoss`` computes it (tjddus9597/HIER-CVPR23
``hier/losses.py:17-104``), written here in PyTorch from those semantics, with the triplets and the
Gumbel noise passed in (the official code draws them with NumPy and ``F.gumbel_softmax``), for
``tests/test_hier.py``."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

from tests import torch_hyperbolic as hyp


def candidate_masks(similarity: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``get_reciprocal_triplets``' candidate sets: positives where the symmetrised top-k matrix
    (diagonal −1) is 1, negatives where it is below 1."""
    nearest = torch.topk(similarity, topk)[1]
    neighbours = torch.zeros_like(similarity).scatter_(1, nearest, torch.ones_like(similarity))
    mutual = ((neighbours + neighbours.t()) / 2).float()
    mutual.fill_diagonal_(-1)
    return mutual == 1, mutual < 1


def _hard_gumbel(logits: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.gumbel_softmax(logits, tau=1, hard=True)`` with its noise given."""
    soft = F.softmax(logits + noise, dim=1)
    index = soft.argmax(-1)
    hard = F.one_hot(index, logits.shape[1]).to(soft.dtype)
    return hard - soft.detach() + soft, index


def lca_triplet_loss(cp_dist, i, j, k, noise_ij, noise_ijk, tau=0.1, mrg=0.1):
    """``compute_gHHC``: the mean over the given triplets."""
    max_ij = torch.maximum(cp_dist[i], cp_dist[j])
    lca_ij, index_ij = _hard_gumbel(-max_ij / tau, noise_ij)
    max_ijk = torch.maximum(cp_dist[k], max_ij)
    lca_ijk, index_ijk = _hard_gumbel(-max_ijk / tau, noise_ijk)
    d_i_ij, d_i_ijk = (cp_dist[i] * lca_ij).sum(1), (cp_dist[i] * lca_ijk).sum(1)
    d_j_ij, d_j_ijk = (cp_dist[j] * lca_ij).sum(1), (cp_dist[j] * lca_ijk).sum(1)
    d_k_ij, d_k_ijk = (cp_dist[k] * lca_ij).sum(1), (cp_dist[k] * lca_ijk).sum(1)
    loss = F.relu(d_i_ij - d_i_ijk + mrg) + F.relu(d_j_ij - d_j_ijk + mrg) + F.relu(d_k_ijk - d_k_ij + mrg)
    return (loss * (index_ij != index_ijk).to(loss.dtype)).mean()


def hier_loss(z, lcas, data, proxies, c=0.1, tau=0.1, mrg=0.1):
    """``HIERLoss.forward`` on ball points ``z`` and ``lcas``; ``data`` and ``proxies``: ``(i, j, k,
    noise_ij, noise_ijk)`` of the kept triplets."""
    b = len(z)
    nodes = torch.cat([z, lcas])
    if c > 0:
        distances = hyp.distance_matrix(nodes, nodes, c)
    else:
        distances = 2 - 2 * nodes @ nodes.t()
    loss = lca_triplet_loss(distances[:b, b:], *data, tau=tau, mrg=mrg)
    return loss + lca_triplet_loss(distances[b:, b:], *proxies, tau=tau, mrg=mrg)


def official_hier_forward(z, y, lca_parameters, c=0.1, clip_r=2.3, topk=20, per_anchor=50, tau=0.1, mrg=0.1):
    """``HIERLoss.forward`` end to end as its users run it, for ``benchmarks/hier_loss.py``: the LCA
    parameters through ``ToPoincare``, every distance of the ``(B + M)`` nodes as one ``(N, N, d)``
    Möbius computation (``dist_matrix``), the triplets drawn per anchor with NumPy on the host
    (``get_reciprocal_triplets``: candidates on the device, one ``np.random.choice`` pair per
    anchor), and ``F.gumbel_softmax``'s own noise."""
    import numpy as np

    b = len(z)
    lcas = hyp.to_poincare(lca_parameters, c, clip_r=clip_r, riemannian=True)
    nodes = torch.cat([z, lcas])
    distances = hyp.distance_matrix(nodes, nodes, c) if c > 0 else 2 - 2 * nodes @ nodes.t()
    data_similarity = torch.exp(-distances[:b, :b]).detach()
    data_similarity[y.unsqueeze(1) == y.unsqueeze(0)] += 1
    proxy_similarity = torch.exp(-distances[b:, b:]).detach()

    def triplets(similarity):
        positive, negative = candidate_masks(similarity, topk)
        anchors, positives, negatives = [], [], []
        for i in range(len(similarity)):
            candidates = torch.nonzero(positive[i]).squeeze(1).cpu().numpy()
            if len(candidates) <= 1:
                continue
            positives.append(np.random.choice(candidates, per_anchor, replace=True))
            negatives.append(np.random.choice(torch.nonzero(negative[i]).squeeze(1).cpu().numpy(), per_anchor))
            anchors.append(np.full(per_anchor, i))
        return [torch.from_numpy(np.concatenate(x)).long() for x in (anchors, positives, negatives)]

    def term(cp_dist, i, j, k):
        noise = [-torch.empty((len(i), cp_dist.shape[1])).exponential_().log() for _ in range(2)]
        return lca_triplet_loss(cp_dist, i, j, k, *noise, tau=tau, mrg=mrg)

    loss = term(distances[:b, b:], *triplets(data_similarity))
    return loss + term(distances[b:, b:], *triplets(proxy_similarity))
