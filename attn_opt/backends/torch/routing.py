"""Routing attention in PyTorch (patterns/form.py: Selection, routing): k-means centroids
on the sequence's queries and keys, balanced clusters (each centroid's `size` most
similar keys), each query attending its nearest centroid's cluster plus the window; the
torch statement of patterns/reference.py: routing_clusters, float32 as there.

Computed as dense scores masked to the clusters (forms.py: _explicit), so it saves no
FLOPs yet: the report says so (passes/sparse.py); backends/onnx/routing.py is the same in ONNX."""

from __future__ import annotations

import torch


def _unit(x):
    return x / x.pow(2).sum(-1, keepdim=True).sqrt().clamp(min=1e-12)


def routing_visible(form, q, k, sees=None):
    """[B, H, Tq, Tk] bool: the pairs the routing pattern keeps (`sees` [Bm, Hm, Tqm, Tk]:
    the pairs the site's masks keep; keys none of them keeps move nothing and rank last)."""
    sel = form.selection
    b, h, tq, d = q.shape
    hkv, tk, c = k.shape[1], k.shape[2], sel.clusters
    qn = _unit(q.float()).reshape(b, hkv, (h // hkv) * tq, d)
    kn = _unit(k.float())
    live = torch.ones((b, 1, tk), dtype=torch.bool, device=q.device)
    if sees is not None:
        live = live & sees.any(1).any(1)[:, None, :]
    w = live.expand(b, hkv, tk).float()
    run = (torch.arange(tk, device=q.device) * c) // tk
    onehot = (run[:, None] == torch.arange(c, device=q.device)[None, :]).float()
    mu = _unit((onehot[None, None] * w[..., None]).transpose(-1, -2) @ kn)
    pts = torch.cat([qn, kn], 2)
    wp = torch.cat([torch.ones((b, hkv, qn.shape[2]), device=q.device), w], 2)
    for _ in range(sel.iterations):
        near = torch.argmax(pts @ mu.transpose(-1, -2), -1)
        m = (near[..., None] == torch.arange(c, device=q.device)).float() * wp[..., None]
        mass = m.sum(2)[..., None]
        mu = torch.where(mass > 0, _unit(m.transpose(-1, -2) @ pts), mu)
    n = min(tk, sel.size or -(-tk // c))
    sim = torch.where(live[:, :, None, :], mu @ kn.transpose(-1, -2), -torch.inf)
    order = torch.sort(sim, dim=-1, descending=True, stable=True).indices[..., :n]
    members = torch.zeros(sim.shape, dtype=torch.bool, device=q.device).scatter_(-1, order, True)
    nearest = torch.argmax(qn @ mu.transpose(-1, -2), -1).reshape(b, hkv, h // hkv, tq)
    members = members.repeat_interleave(h // hkv, 1)  # [B, H, C, Tk]
    vis = torch.gather(members, 2, nearest.reshape(b, h, tq, 1).expand(b, h, tq, tk))
    i = torch.arange(tq, device=q.device)[:, None] + (tk - tq)
    j = torch.arange(tk, device=q.device)[None, :]
    if form.window > 0:
        vis = vis | (((i - j >= 0) & (i - j < form.window)) if form.causal else ((i - j).abs() <= form.window // 2))
    return vis & (j <= i) if form.causal else vis
