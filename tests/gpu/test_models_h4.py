"""The GPT-lineage families (tests/python/test_models_h4.py) on the GPU against transformers.

Same method and bounds as test_models.py: octavo in fp16 against transformers in fp32 on the same
fp16 weights; greedy tokens equal up to a step whose fp32 top-2 margin is within transformers' own
half-precision noise, logprobs within a multiple of that noise. Shapes are GPU-sized (head dim
64, which the kernels compile) but keep each family's quirks: partial and GPT-J rotary,
multi-query and grouped KV, fused per-head q/k/v layouts, ALiBi, learned positions (OPT's offset),
parallel residuals, the embedding LayerNorm, LM-head biases, sliding windows.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

# tests/gpu is on sys.path under pytest; test_models puts tests/python there (checkpoints).
from test_models import (
    NEW_TOKENS, TINY_POOL, check_greedy_against_reference, half_noise, hf_greedy, prompts_for)
from checkpoints import build_tokenizer  # noqa: E402  (after test_models sets the path)

from octavo import LLM, SamplingParams  # noqa: E402

VOCAB = 320
MAX_POSITIONS = 256  # learned tables hold the longest prompt (90) plus NEW_TOKENS
T = transformers
# hidden 256 / 4 heads = head dim 64; the wide init of test_models.py keeps greedy choices clear
# of fp16 near-ties.
INIT = 0.25
CASES = {
    "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=256, n_layer=2, n_head=4,
                                 n_positions=MAX_POSITIONS, initializer_range=INIT),
    "gpt_bigcode_mqa": lambda: T.GPTBigCodeConfig(
        vocab_size=VOCAB, n_embd=256, n_layer=2, n_head=4, n_positions=MAX_POSITIONS,
        multi_query=True, initializer_range=INIT),
    "opt": lambda: T.OPTConfig(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
        ffn_dim=512, max_position_embeddings=MAX_POSITIONS, word_embed_proj_dim=256,
        init_std=INIT, pad_token_id=2),
    "gptj": lambda: T.GPTJConfig(vocab_size=VOCAB, n_embd=256, n_layer=2, n_head=4, rotary_dim=32,
                                 n_positions=MAX_POSITIONS, initializer_range=INIT),
    "gpt_neox": lambda: T.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=512, max_position_embeddings=MAX_POSITIONS, rotary_pct=0.25,
        initializer_range=INIT),
    "falcon_7b_style": lambda: T.FalconConfig(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
        multi_query=True, parallel_attn=True, bias=False, initializer_range=INIT),
    "falcon_40b_style": lambda: T.FalconConfig(
        vocab_size=VOCAB, hidden_size=384, num_hidden_layers=2, num_attention_heads=6,
        num_kv_heads=2, new_decoder_architecture=True, bias=False, initializer_range=INIT),
    "falcon_rw_alibi": lambda: T.FalconConfig(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
        multi_query=False, parallel_attn=False, bias=True, alibi=True, initializer_range=INIT),
    "mpt": lambda: T.MptConfig(vocab_size=VOCAB, d_model=256, n_layers=2, n_heads=4,
                               max_seq_len=MAX_POSITIONS, initializer_range=INIT),
    "bloom": lambda: T.BloomConfig(vocab_size=VOCAB, hidden_size=256, n_layer=2, n_head=4,
                                   initializer_range=INIT),
    "phi": lambda: T.PhiConfig(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=512, max_position_embeddings=MAX_POSITIONS, partial_rotary_factor=0.5,
        initializer_range=INIT),
    "phi3": lambda: T.Phi3Config(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=512, max_position_embeddings=MAX_POSITIONS,
        original_max_position_embeddings=MAX_POSITIONS, sliding_window=24, pad_token_id=2,
        initializer_range=INIT),
    "stablelm": lambda: T.StableLmConfig(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=512, max_position_embeddings=MAX_POSITIONS,
        use_qkv_bias=True, initializer_range=INIT),
    "starcoder2": lambda: T.Starcoder2Config(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=512, max_position_embeddings=MAX_POSITIONS,
        sliding_window=24, initializer_range=INIT),
    "olmo": lambda: T.OlmoConfig(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=512, max_position_embeddings=MAX_POSITIONS,
        attention_bias=True, pad_token_id=2, initializer_range=INIT),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_family_matches_transformers_on_gpu(case, tmp_path):
    torch.manual_seed(sorted(CASES).index(case))
    model32 = transformers.AutoModelForCausalLM.from_config(CASES[case]()).float().eval()
    with torch.no_grad():  # norms at 1 and biases at 0 would hide misplaced ones
        for param in model32.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    model_half = copy.deepcopy(model32).half()
    model_half.save_pretrained(str(tmp_path))
    build_tokenizer(str(tmp_path))
    # The reference runs in fp32 on the fp16-rounded weights, as octavo reads them; its buffers
    # (rotary frequencies, ALiBi tables) stay fp32, as octavo computes them.
    with torch.no_grad():
        for param in model32.parameters():
            param.copy_(param.half().float())
    model32 = model32.cuda()
    model_half = model_half.cuda()
    prompts = prompts_for(VOCAB)
    reference = [hf_greedy(model32, p, device="cuda", with_margins=True) for p in prompts]
    changes = [half_noise(model32, model_half, p, r[0]) for p, r in zip(prompts, reference)]
    noise = (max(c[0] for c in changes), max(c[1] for c in changes))
    llm = LLM(model=str(tmp_path), device="cuda", dtype="float16", max_model_len=MAX_POSITIONS,
              **TINY_POOL)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    for batch in ([[p] for p in prompts] + [prompts]):
        outputs = llm.generate(batch, params, use_tqdm=False)
        compared, agreed, worst = check_greedy_against_reference(
            outputs, prompts, reference, noise, case)
    print(f"{case}: {agreed}/{compared} greedy tokens equal the fp32 reference's; "
          f"max |logprob - fp32| octavo fp16 {worst:.4f}, transformers fp16 {noise[0]:.4f}")
