"""Tiny random causal language models (Llama with GQA, GPT-2, Qwen2) with a tiny byte-level BPE
tokenizer that has a ChatML chat template, saved as ordinary Hugging Face folders.

Shared by the decoder tests of every stage (pytest puts this folder on sys.path). A folder is a
few hundred kilobytes and builds in well under a second, so the whole decoder path (train,
merge, export with a KV cache, validate, generate) runs in tests without the real model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Review: this was good and great today. Sentiment: positive",
    "Review: this was bad and awful today. Sentiment: negative",
    "Premise: a man plays. Hypothesis: a person plays. Answer: entailment neutral contradiction",
    "What is the capital of France? The capital of France is Paris.",
    "user assistant system You are a helpful assistant",
    "fine lovely happy poor sad boring",
]
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 32, 2, 4, 2, 48


def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE of about 300 tokens (every byte is a token, so any text encodes)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320, show_progress=False, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    if chat_template:
        fast.chat_template = CHATML
    return fast


def tiny_decoder(arch: str, vocab_size: int, seed: int = 0, eos: int = 2, hidden: int = HIDDEN, ffn: int = FFN) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=eos, pad_token_id=eos)
    if arch in ("llama", "qwen2"):  # the same LLaMA-style block; Qwen2 adds q/k/v biases
        config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
        config = config_cls(
            hidden_size=hidden,
            intermediate_size=ffn,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            **common,
        )
        model = model_cls(config)
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=hidden, n_layer=LAYERS, n_head=HEADS, n_inner=ffn, n_positions=512, **common))
    else:
        raise KeyError(arch)
    model.generation_config.pad_token_id = eos
    return model.eval()


def save_tiny_decoder(root: Path, arch: str = "llama", chat_template: bool = True, seed: int = 0, hidden: int = HIDDEN) -> Path:
    """A tiny decoder folder (model + tokenizer + generation config) under ``root/arch``.

    A wider ``hidden`` (FFN 1.5x) makes the weights outweigh the graph's nodes, as in a real model.
    """
    folder = Path(root) / arch
    tokenizer = tiny_tokenizer(chat_template)
    ffn = FFN if hidden == HIDDEN else hidden * 3 // 2
    tiny_decoder(arch, len(tokenizer), seed=seed, eos=tokenizer.eos_token_id, hidden=hidden, ffn=ffn).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


ALL_DECODER_TARGETS = {"llama": "q,k,v,o,gate,up,down", "qwen2": "q,k,v,o,gate,up,down", "gpt2": "q,k,v,o,up,down"}


def save_tiny_adapter(
    root: Path, arch: str = "llama", method: str = "metatt-4d", rank=4, std: float = 0.3, seed: int = 3
) -> tuple[Path, Path]:
    """A tiny decoder folder and a MetaTT adapter on it with random cores (so it changes the logits).

    Returns (base folder, adapter folder); the adapter folder holds the tokenizer too.
    """
    from metatt_deploy.adapters.base_model import load_causal_lm, load_tokenizer
    from metatt_deploy.adapters.model import attach, build_config, save_adapter

    base = save_tiny_decoder(root, arch)
    model = load_causal_lm(str(base))
    config = build_config(model, method=method, rank=rank, targets=ALL_DECODER_TARGETS[arch], base_model=str(base))
    g = torch.Generator().manual_seed(seed)
    attach(model, config, [torch.randn(s, generator=g) * std for s in config.core_shapes()])
    adapter_dir = Path(root) / f"{arch}-{method}-adapter"
    save_adapter(model, adapter_dir, tokenizer=load_tokenizer(str(base)))
    return base, adapter_dir


def save_tiny_multitask(
    root: Path, tasks: list[str], seed: int, rank: int = 4, std: float = 0.25, hidden: int = HIDDEN
) -> tuple[Path, Path]:
    """A tiny Llama (under ``root/llama``, made once) and a multi-task (4+1)D adapter on it with random cores.

    Returns (base folder, adapter folder ``root/adapter-<seed>``).
    """
    from metatt_deploy.adapters.base_model import load_causal_lm, load_tokenizer
    from metatt_deploy.adapters.multitask import build_multitask, save_multitask

    base = Path(root) / "llama"
    if not base.exists():
        save_tiny_decoder(root, "llama", hidden=hidden)
    model = load_causal_lm(str(base))
    mtm = build_multitask(model, tasks, {t: [] for t in tasks}, rank=rank, targets=ALL_DECODER_TARGETS["llama"], base_model=str(base))
    g = torch.Generator().manual_seed(seed)
    mtm.metatt.set_cores([torch.randn(s, generator=g) * std for s in mtm.adapter_config.core_shapes()])
    return base, save_multitask(mtm, Path(root) / f"adapter-{seed}", load_tokenizer(str(base)))


def save_peaked_decoder(root: Path, outlier: float = 0.0, name: str = "peaked") -> Path:
    """A tiny Llama that predicts its input token again with a clear margin, and a tunable trap for 4-bit weights.

    The blocks add (almost) nothing (o_proj and down_proj scaled to 1e-4), so the logits are the
    tied table applied to the normalised embedding: each token's own row wins by several logits,
    and quantization noise does not flip it. ``outlier`` sets hidden unit 0 of every table row to
    that value and the final norm's weight for that unit to 0: float32 ignores the unit, but one
    value per 32-wide block that large sets the block's scale, so at 4 bits (step outlier/7) most
    weights of the row round to 0 and the lookup and the head lose the token's identity; at 8 bits
    (step outlier/127) they survive.
    """
    folder = Path(root) / name
    tokenizer = tiny_tokenizer()
    model = tiny_decoder("llama", len(tokenizer), eos=tokenizer.eos_token_id)
    with torch.no_grad():
        table = model.get_input_embeddings().weight
        table.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(7))
        if outlier:
            table[:, 0] = outlier
            model.model.norm.weight[0] = 0.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(1e-4)
            layer.mlp.down_proj.weight.mul_(1e-4)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
