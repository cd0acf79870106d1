"""Tiny random-weight Hugging Face checkpoints and a tokenizer, built offline with transformers.
Shared by the CPU tests (tests/python), the GPU tests (tests/gpu) and bench/throughput.py."""

from __future__ import annotations

CORPUS = [
    "Paris is a city in France. It is known for the Eiffel Tower and its museums.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps.",
    "Octavo splits the key-value cache into blocks of sixteen tokens each.",
    "Continuous batching admits new requests at every step of the engine.",
    "Le café est très bon à Paris, n'est-ce pas ? Ça coûte 3 €.",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(directory: str, vocab_size: int = 250) -> None:
    """A byte-level BPE tokenizer trained on CORPUS, saved in the HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)


def tiny_config(architecture: str, **overrides):
    """A tiny config of the architecture with odd sizes: head_dim 48, GQA ratio 3."""
    import transformers

    common = dict(
        vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, head_dim=48, max_position_embeddings=256,
        rms_norm_eps=1e-6, initializer_range=0.1, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        tie_word_embeddings=False,
    )
    per_architecture = {
        "LlamaForCausalLM": (transformers.LlamaConfig, {"rope_theta": 10000.0}),
        "MistralForCausalLM": (transformers.MistralConfig, {"sliding_window": 24}),
        "Qwen2ForCausalLM": (transformers.Qwen2Config, {"tie_word_embeddings": True}),
        "Qwen3ForCausalLM": (transformers.Qwen3Config, {}),
    }
    if architecture not in per_architecture:
        raise ValueError(architecture)
    config_class, extra = per_architecture[architecture]
    config = config_class(**{**common, **extra, **overrides})
    return config


def build_checkpoint(directory: str, architecture: str, seed: int = 0, dtype=None, **overrides):
    """Saves a random-weight model of the architecture plus the tiny tokenizer into `directory`."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = tiny_config(architecture, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if architecture == "Qwen2ForCausalLM":
        # Qwen2's attention has q/k/v biases; random non-zero ones exercise the bias path.
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.1)
    model = model.to(dtype or torch.float32).eval()
    model.save_pretrained(directory)
    build_tokenizer(directory)
    return model


ARCHITECTURES = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]
