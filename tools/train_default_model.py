"""Trains octavo's default model (python/octavo/default_model) on the data that
tools/prepare_default_corpus.py made: a small Llama (LlamaForCausalLM) trained from scratch with
torch, saved in bfloat16 as a Hugging Face checkpoint (config.json, model.safetensors,
generation_config.json) plus the tokenizer files and training_log.json.

The corpus is small (about 1.9 M tokens), so data, not compute, bounds the model: a few sizes and
epoch counts are trained in turn (--runs), each one's validation loss is measured every
--eval-every steps, and the checkpoint with the lowest validation loss over all runs is kept.

Usage (on a GPU, a few minutes; --device cpu --runs 64x2x128:0.01 checks the script in seconds):
  python tools/train_default_model.py --data .default_model_data --out /tmp/default_model
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import time

import numpy as np
import torch

# A run: HIDDENxLAYERSxINTERMEDIATE then options: eEPOCHS, lrPEAK_LR, dDROPOUT, bBATCH_SIZE (in
# sequences of SEQ_LEN), e.g. 384x6x1024:e24:d0.1:b16. Heads are HIDDEN / 64, with half as many KV
# heads when that count is even. 384x6x1024 is 12.9 M parameters, 26 MB in bf16: near the size limit.
# A first sweep without dropout (batch 64; 6, 10, 16, 24 epochs; lr 1e-3, 2e-3) found the best
# validation loss, 3.76, with 384x6x1024 after about 12 epochs; past that it overfits (2 M tokens).
DEFAULT_RUNS = ("384x6x1024:e14,384x6x1024:e24:d0.1,384x6x1024:e16:d0.1:b16:lr5e-4,"
                "384x6x1024:e40:d0.2,384x6x1024:e30:d0.2:b16:lr5e-4")
HEAD_DIM = 64
SEQ_LEN = 1024
BOS_ID, EOS_ID, PAD_ID, IM_END_ID = 0, 1, 2, 4  # the order of SPECIAL_TOKENS in the tokenizer


def parse_run(text: str, args) -> dict:
    sizes, *options = text.split(":")
    hidden, layers, intermediate = (int(v) for v in sizes.split("x"))
    run = {"hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": intermediate,
           "epochs": 10.0, "lr": args.lr, "dropout": 0.0, "batch_size": args.batch_size}
    names = {"e": "epochs", "lr": "lr", "d": "dropout", "b": "batch_size"}
    for option in options:
        match = re.fullmatch(r"(lr|e|d|b)([0-9][0-9.e-]*)", option)
        if match is None:
            raise ValueError(f"run option {option!r} of {text!r}: use eEPOCHS, lrLR, dDROPOUT or "
                             "bBATCH_SIZE")
        key, value = match.groups()
        run[names[key]] = int(value) if key == "b" else float(value)
    return run


def add_dropout(model, p: float) -> None:
    """Dropout on the embeddings and on each attention and MLP output (residual dropout, as GPT-2
    trains), through forward hooks: active in train() mode only, and the saved model is a plain
    Llama. LlamaConfig has attention dropout only, and it is residual dropout that fights the
    overfitting of a small corpus."""
    if p <= 0:
        return
    dropout = torch.nn.functional.dropout

    def hook(module, inputs, output):
        if isinstance(output, tuple):
            return (dropout(output[0], p, module.training),) + tuple(output[1:])
        return dropout(output, p, module.training)

    model.model.embed_tokens.register_forward_hook(hook)
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


def make_config(run: dict, vocab_size: int):
    from transformers import LlamaConfig

    heads = max(1, run["hidden_size"] // HEAD_DIM)
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=run["hidden_size"],
        intermediate_size=run["intermediate_size"], num_hidden_layers=run["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=heads // 2 if heads % 2 == 0 else heads,
        head_dim=HEAD_DIM,
        max_position_embeddings=SEQ_LEN, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        initializer_range=0.02)


def batches(stream: np.ndarray, batch_size: int, generator: np.random.Generator):
    """Random windows of SEQ_LEN + 1 tokens (documents are packed; windows cross them)."""
    while True:
        starts = generator.integers(0, len(stream) - SEQ_LEN - 1, size=batch_size)
        yield torch.from_numpy(np.stack([stream[s:s + SEQ_LEN + 1] for s in starts]).astype(np.int64))


@torch.no_grad()
def validation_loss(model, val: np.ndarray, device: str, batch_size: int) -> float:
    """Mean next-token loss over the whole validation stream, in consecutive windows."""
    model.eval()
    windows = (len(val) - 1) // SEQ_LEN
    tokens = torch.from_numpy(val[:windows * SEQ_LEN + 1].astype(np.int64))
    total, count = 0.0, 0
    for first in range(0, windows, batch_size):
        rows = range(first, min(windows, first + batch_size))
        batch = torch.stack([tokens[r * SEQ_LEN:(r + 1) * SEQ_LEN + 1] for r in rows]).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            logits = model(input_ids=batch[:, :-1]).logits.float()
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
    model.train()
    return total / count


def train_run(run: dict, train: np.ndarray, val: np.ndarray, vocab_size: int, args,
              deadline: float) -> dict:
    """Trains one size for its epochs (cut short at `deadline`); returns its validation curve and
    its best weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = make_config(run, vocab_size)
    model = LlamaForCausalLM(config).to(args.device)
    add_dropout(model, run["dropout"])
    parameters = sum(p.numel() for p in model.parameters())
    tokens_per_step = run["batch_size"] * SEQ_LEN
    steps = max(1, int(run["epochs"] * len(train) / tokens_per_step))
    if args.max_steps:
        steps = min(steps, args.max_steps)
    warmup = min(100, steps // 10 + 1)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=run["lr"], betas=(0.9, 0.95), fused=args.device.startswith("cuda"))

    def lr_at(step):  # linear warmup, cosine decay to 10%
        if step < warmup:
            return run["lr"] * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return run["lr"] * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    generator = np.random.default_rng(args.seed)
    data = batches(train, run["batch_size"], generator)
    curve, best = [], {"val_loss": float("inf")}
    start = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        batch = next(data).to(args.device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device.startswith("cuda")):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, vocab_size), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        out_of_time = time.time() > deadline
        if (step + 1) % args.eval_every == 0 or step + 1 == steps or out_of_time:
            val_loss = validation_loss(model, val, args.device, args.batch_size)
            curve.append({"step": step + 1, "train_loss": round(loss.item(), 4),
                          "val_loss": round(val_loss, 4), "seconds": round(time.time() - start, 1)})
            print(f"  {run} step {step + 1}/{steps} train {loss.item():.3f} val {val_loss:.3f} "
                  f"({time.time() - start:.0f} s)", flush=True)
            if val_loss < best["val_loss"]:
                best = {"val_loss": val_loss, "step": step + 1,
                        "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        if out_of_time:
            print(f"  {run}: --time-budget reached at step {step + 1} of {steps}", flush=True)
            break
    return {"run": run, "parameters": parameters, "steps": steps, "tokens_per_step": tokens_per_step,
            "seconds": round(time.time() - start, 1), "curve": curve, "best": best, "config": config}


SAMPLE_PROMPTS = ["The Python interpreter", "A list is", "To read a file,"]
SAMPLE_QUESTION = "How do I sort a list?"


@torch.no_grad()
def greedy_samples(model, checkpoint: str, device: str) -> list[dict]:
    """Greedy continuations of a few prompts and a chat reply, for the log and the model card."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": SAMPLE_QUESTION}],
                                         tokenize=False, add_generation_prompt=True)
    samples = []
    for prompt, ids in [(p, tokenizer.encode(p)) for p in SAMPLE_PROMPTS] + [
            (chat, tokenizer.encode(chat, add_special_tokens=False))]:
        output = model.generate(torch.tensor([ids], device=device), max_new_tokens=48,
                                do_sample=False, eos_token_id=[EOS_ID, IM_END_ID],
                                pad_token_id=PAD_ID)
        text = tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)
        samples.append({"prompt": prompt, "greedy": text})
        print(f"sample: {prompt!r} -> {text!r}", flush=True)
    return samples


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the folder prepare_default_corpus.py wrote")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--runs", default=DEFAULT_RUNS,
                        help=f"comma-separated runs, see DEFAULT_RUNS (default {DEFAULT_RUNS})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64, help="of runs without bN")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of runs without lrX")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--max-steps", type=int, default=0, help="cap on steps per run (0: none)")
    parser.add_argument("--time-budget", type=float, default=300,
                        help="seconds for all runs; a run still going then stops, later ones are skipped")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from transformers import LlamaForCausalLM

    train = np.load(os.path.join(args.data, "train.npy"))
    val = np.load(os.path.join(args.data, "val.npy"))
    with open(os.path.join(args.data, "tokenizer", "tokenizer.json")) as f:
        vocab_size = len(json.load(f)["model"]["vocab"])
    print(f"train {len(train):,} tokens, validation {len(val):,} tokens, vocab {vocab_size}",
          flush=True)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True

    started = time.time()
    results = []
    deadline = started + args.time_budget
    for text in args.runs.split(","):
        if time.time() > deadline:
            print(f"run {text}: skipped, --time-budget spent", flush=True)
            continue
        result = train_run(parse_run(text, args), train, val, vocab_size, args, deadline)
        print(f"run {text}: {result['parameters'] / 1e6:.2f} M parameters, best validation loss "
              f"{result['best']['val_loss']:.4f} at step {result['best']['step']}", flush=True)
        results.append(result)
    chosen = min(results, key=lambda r: r["best"]["val_loss"])

    model = LlamaForCausalLM(chosen["config"])
    model.load_state_dict(chosen["best"]["state"])
    model = model.to(torch.bfloat16)
    # The loss of the weights as shipped (bf16), computed in fp32 like octavo's CPU backend.
    shipped_val_loss = validation_loss(model.float().to(args.device), val, args.device,
                                       args.batch_size)
    model = model.to("cpu", torch.bfloat16)
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    with open(os.path.join(args.out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, IM_END_ID],
                   "pad_token_id": PAD_ID}, f, indent=2)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(args.data, "tokenizer", name), args.out)
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    log = {
        "card": card, "torch": torch.__version__,
        "train_tokens": int(len(train)), "validation_tokens": int(len(val)), "vocab_size": vocab_size,
        "seq_len": SEQ_LEN, "batch_size": args.batch_size, "lr": args.lr,
        "total_seconds": round(time.time() - started, 1),
        "chosen": {"run": chosen["run"], "parameters": chosen["parameters"],
                   "step": chosen["best"]["step"], "val_loss_fp32_training": chosen["best"]["val_loss"],
                   "val_loss_bf16_weights": shipped_val_loss,
                   "val_perplexity_bf16_weights": math.exp(shipped_val_loss),
                   "seconds_to_chosen_step": next(
                       c["seconds"] for c in chosen["curve"] if c["step"] == chosen["best"]["step"])},
        "runs": [{k: r[k] for k in ("run", "parameters", "steps", "tokens_per_step", "seconds", "curve")}
                 for r in results],
    }
    log["samples"] = greedy_samples(model.float().to(args.device), args.out, args.device)
    with open(os.path.join(args.out, "training_log.json"), "w") as f:
        json.dump(log, f, indent=1)
    print(json.dumps(log["chosen"]), flush=True)


if __name__ == "__main__":
    main()
