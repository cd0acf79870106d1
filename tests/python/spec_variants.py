"""ModelSpec features that some families need and Llama lacks, made on a tiny transformers Llama
and on octavo's spec and weights alike: the CPU test (test_spec_features.py) and the GPU one
(tests/gpu/test_spec_features.py) check each variant against transformers with their own bounds.

Each function takes (model, spec, weights) from checkpoints.build_checkpoint and
octavo.models.load_model, changes the torch model in place (forward hooks, swapped attention
modules, on the model's device) and returns the spec and weight list octavo runs.
"""

from __future__ import annotations

import numpy as np
import torch


def rms_norm(x, weight, eps=1e-6):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
            * weight.to(x.device).float()).to(x.dtype)


def with_embedding_norm(model, spec, weights):
    """An RMSNorm right after the token embedding (BLOOM's embedding_norm)."""
    w = torch.rand(model.config.hidden_size) + 0.5
    model.model.embed_tokens.register_forward_hook(lambda m, i, out: rms_norm(out, w))
    return {**spec, "embedding_norm": True}, weights + [("embed_norm.weight", w.numpy(), "float32")]


def with_sandwich_norms(model, spec, weights):
    """Norms on the attention and MLP outputs before each residual add (Gemma 2)."""
    extra = []
    for l, layer in enumerate(model.model.layers):
        attn_w = torch.rand(model.config.hidden_size) + 0.5
        mlp_w = torch.rand(model.config.hidden_size) + 0.5
        layer.self_attn.o_proj.register_forward_hook(lambda m, i, out, w=attn_w: rms_norm(out, w))
        layer.mlp.down_proj.register_forward_hook(lambda m, i, out, w=mlp_w: rms_norm(out, w))
        extra += [(f"layers.{l}.attn_out_norm.weight", attn_w.numpy(), "float32"),
                  (f"layers.{l}.mlp_out_norm.weight", mlp_w.numpy(), "float32")]
    return {**spec, "sandwich_norms": True}, weights + extra


def with_lm_head_bias(model, spec, weights):
    """An fp32 LM-head bias (Phi, GPT-J); returns it too: the reference adds it to the logits."""
    bias = np.random.default_rng(0).normal(0, 2.0, model.config.vocab_size).astype(np.float32)
    return ({**spec, "lm_head_bias": True}, weights + [("lm_head.bias", bias, "float32")], bias)


def with_per_layer_kv_heads(model, spec, weights, counts=(2, 6, 1), init_std=0.1):
    """Layer l gets counts[l] KV heads (DeciLM): new random attention modules in the torch model,
    their projections in octavo's weights."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    device = next(model.parameters()).device
    torch.manual_seed(5)
    by_name = {name: (array, dtype) for name, array, dtype in weights}
    for l, heads in enumerate(counts):
        config = type(model.config)(**{**model.config.to_dict(), "num_key_value_heads": heads})
        config._attn_implementation = model.config._attn_implementation
        attention = LlamaAttention(config, l)
        for p in attention.parameters():
            torch.nn.init.normal_(p, 0.0, init_std)
        model.model.layers[l].self_attn = attention.to(device).eval()
        qkv = torch.cat([attention.q_proj.weight, attention.k_proj.weight,
                         attention.v_proj.weight]).detach().cpu()
        by_name[f"layers.{l}.qkv.weight"] = (qkv.numpy(), "float32")
        o_weight = attention.o_proj.weight.detach().cpu().numpy()
        by_name[f"layers.{l}.o.weight"] = (o_weight, "float32")
    return ({**spec, "num_kv_heads_per_layer": list(counts)},
            [(n, a, d) for n, (a, d) in by_name.items()])
