"""An independent float64 numpy implementation of Lazy Attention (method.md formulas).

VLA follows the revised reading: query row i scores visual key j with the anchor's query and
key, ``Q_b[i]·K_b[j]``, text key j with its own, ``Q_l[i]·K_l[j]``; one softmax over both.

It reads the Hugging Face PyTorch model directly: HF provides the merged input embeddings
(``hidden_states[0]``) and the RoPE tables; everything after that is written out here.
"""

from __future__ import annotations

import numpy as np
import torch


def _np(t):
    return t.detach().double().numpy()


def lazy_logits_reference(hf, input_ids, pixel_values, lazy, mode, attention_mask=None, image_sizes=None,
                          first_reading=False, fastv=None, fastv_row=None, kept_out=None, image_grid_thw=None):
    """Logits [B, T, V] of the HF model with layers ``lazy`` inheriting attention (GLA or VLA).
    ``image_sizes``: for a LLaVA-NeXT model (its image-token positions, base view, tiles and
    newlines, are the visual positions). ``first_reading`` (VLA): the project's superseded
    formula, ``Q~ = where(vis, Q_b, Q_l)``, ``K~ = where(vis, K_b, K_l)``, only so that tests
    can show they tell the two apart.

    ``fastv=(K, R)``: FastV (Chen et al., 2024) as docs/method.md states it: after layer K the
    row's visual tokens are ranked by layer K's attention probabilities from the selector
    token (``fastv_row[b]``, default the last token), averaged over heads; the
    ceil(R * n_visual) best are kept (at least 1; a row without visual tokens keeps none), the
    rest are no keys for the layers above K; layer K+1 is made an anchor (a lazy block
    straddling K is cut). ``kept_out``: a list that receives the kept visual mask [B, T].

    ``image_grid_thw``: a Qwen2-VL model's image grids; its M-RoPE tables come from HF's own
    ``get_rope_index`` positions and rotary embedding, its visual positions are the image-pad
    tokens."""
    cfg = hf.config.text_config
    ids = torch.tensor(input_ids)
    b, t = ids.shape
    with torch.no_grad():
        kw = {"input_ids": ids, "output_hidden_states": True}
        if pixel_values is not None:
            kw["pixel_values"] = torch.tensor(pixel_values)
        if image_sizes is not None:
            kw["image_sizes"] = torch.tensor(image_sizes)
        image_token = hf.config.image_token_index if hasattr(hf.config, "image_token_index") else hf.config.image_token_id
        pos = torch.arange(t)[None].expand(b, t)
        if image_grid_thw is not None:
            kw["image_grid_thw"] = torch.tensor(image_grid_thw)
            kw["mm_token_type_ids"] = (ids == image_token).long()
            pos, _ = hf.model.get_rope_index(ids, kw["mm_token_type_ids"], image_grid_thw=kw["image_grid_thw"])
        h = _np(hf.model(**kw).hidden_states[0])
        cos, sin = hf.model.language_model.rotary_emb(torch.zeros(1, dtype=torch.float64), pos)
    cos, sin = _np(cos)[:, :, None, :], _np(sin)[:, :, None, :]
    vis_key = (np.asarray(input_ids) == image_token)[:, None, None, :]  # [B, 1, 1, T_k]
    mask = np.tril(np.ones((t, t), bool))[None] & (
        np.ones((b, 1, t), bool) if attention_mask is None else np.asarray(attention_mask, bool)[:, None, :]
    )
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    sd = {k: _np(v) for k, v in hf.model.language_model.state_dict().items()}
    eps = cfg.rms_norm_eps

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w

    def lin(x, name):
        y = x @ sd[name + ".weight"].T
        return y + sd[name + ".bias"] if name + ".bias" in sd else y

    def rope(x):
        half = x.shape[-1] // 2
        return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin

    lazy = list(lazy)
    if fastv is not None and fastv[0] + 1 < len(lazy):
        lazy[fastv[0] + 1] = False
    q_anchor = k_anchor = None
    for layer in range(cfg.num_hidden_layers):
        p = f"layers.{layer}."
        x = rms(h, sd[p + "input_layernorm.weight"])
        own_q = lambda: rope(lin(x, p + "self_attn.q_proj").reshape(b, t, hq, d))  # noqa: E731
        own_k = lambda: rope(lin(x, p + "self_attn.k_proj").reshape(b, t, hkv, d))  # noqa: E731
        v = lin(x, p + "self_attn.v_proj").reshape(b, t, hkv, d)
        rep = hq // hkv

        def scores(q, k):
            return np.einsum("bqhd,bkhd->bhqk", q, np.repeat(k, rep, axis=2)) / np.sqrt(d)

        if not lazy[layer]:
            q_anchor, k_anchor = own_q(), own_k()
            s = scores(q_anchor, k_anchor)
        elif mode == "gla":
            s = scores(q_anchor, k_anchor)
        elif first_reading:
            vis_q = np.swapaxes(vis_key, 1, 3)  # [B, T, 1, 1]
            s = scores(np.where(vis_q, q_anchor, own_q()), np.where(vis_q, k_anchor, own_k()))
        else:  # VLA: visual keys scored with the anchor's query and keys, text keys with its own
            s = np.where(vis_key, scores(q_anchor, k_anchor), scores(own_q(), own_k()))
        vr = np.repeat(v, rep, axis=2)
        s = np.where(mask[:, None], s, -np.inf)
        s = s - s.max(-1, keepdims=True)
        pr = np.exp(s)
        pr /= pr.sum(-1, keepdims=True)
        if fastv is not None and layer == fastv[0]:
            vis = vis_key[:, 0, 0, :] & mask[:, -1, :]
            rows = np.full(b, t - 1) if fastv_row is None else np.broadcast_to(fastv_row, (b,))
            kept = np.zeros((b, t), bool)
            for i in range(b):
                score = pr[i, :, rows[i], :].mean(0)
                cand = np.flatnonzero(vis[i])
                n_keep = int(np.ceil(fastv[1] * len(cand) - 1e-9))
                n_keep = max(n_keep, 1) if len(cand) else 0  # at least one of a row's visual tokens
                best = cand[np.argsort(-score[cand], kind="stable")[:n_keep]]
                kept[i, best] = True
            if kept_out is not None:
                kept_out.append(kept)
            dropped = vis & ~kept
            mask = mask & ~dropped[:, None, :]  # the layers above K: dropped tokens are no keys
        o = np.einsum("bhqk,bkhd->bqhd", pr, vr).reshape(b, t, hq * d)
        h = h + lin(o, p + "self_attn.o_proj")
        x2 = rms(h, sd[p + "post_attention_layernorm.weight"])
        act = lin(x2, p + "mlp.gate_proj")
        h = h + lin(act / (1 + np.exp(-act)) * lin(x2, p + "mlp.up_proj"), p + "mlp.down_proj")
    h = rms(h, sd["norm.weight"])
    head = _np(hf.lm_head.weight)
    return h @ head.T
