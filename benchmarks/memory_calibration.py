# ruff: noqa  -- kept as it ran on the H100 for benchmarks/results/memory_calibration_h100.json
"""Calibration of adalomo.memory against measured CUDA peaks (bytes, torch.cuda.max_memory_allocated)."""

import gc
import json
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, "src")
OUT = sys.argv[1]
rows = []


def emit(**r):
    print(json.dumps(r), flush=True)
    rows.append(r)
    json.dump(rows, open(f"{OUT}/cal.json", "w"), indent=1)


def build(arch, ckpt=False, attn="sdpa", **kw):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if arch == "llama":
        cfg = LlamaConfig(vocab_size=32000, tie_word_embeddings=False, **kw)
        cls = LlamaForCausalLM
    else:
        cfg = GPT2Config(**kw)
        cls = GPT2LMHeadModel
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            m = cls(cfg)
    finally:
        torch.set_default_dtype(prev)
    if ckpt:
        m.gradient_checkpointing_enable()
    m.train()
    return m, cfg


def loss_fn(model, x):
    out = model(input_ids=x)
    logits = out.logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), x[:, 1:].reshape(-1))


def clean():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def case(tag, arch, b, s, ckpt, modes, attn="sdpa", **kw):
    clean()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    model, cfg = build(arch, ckpt, attn, **kw)
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated() - base
    build_peak = torch.cuda.max_memory_allocated() - base
    n = sum(p.numel() for p in model.parameters())
    V = cfg.vocab_size
    x = torch.randint(0, V, (b, s), device="cuda")
    common = dict(
        tag=tag, arch=arch, b=b, s=s, ckpt=ckpt, attn=attn, params=n, weights=weights, build_peak=build_peak, kw=kw
    )
    # activations saved after forward (loss computed, before backward)
    for p in model.parameters():
        p.requires_grad_(True)
    if "act" in modes or "floor" in modes:
        hs = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in model.parameters()]
        for _it in range(2):
            clean()
            torch.cuda.reset_peak_memory_stats()
            a0 = torch.cuda.memory_allocated()
            loss = loss_fn(model, x)
            torch.cuda.synchronize()
            after_fwd = torch.cuda.memory_allocated() - a0
            fwd_peak = torch.cuda.max_memory_allocated() - a0
            loss.backward()
            torch.cuda.synchronize()
            floor_peak = torch.cuda.max_memory_allocated() - base
            del loss
        emit(
            **common,
            mode="floor",
            saved_after_fwd=after_fwd,
            fwd_peak_over_start=fwd_peak,
            peak=floor_peak,
            t=round(time.time() - t0, 1),
        )
        for h in hs:
            h.remove()
    for mode in modes:
        if mode in ("act", "floor"):
            continue
        clean()
        for p in model.parameters():
            p.grad = None
        step_fn = None
        hs = []
        if mode == "keepgrads":

            def step_fn():
                loss_fn(model, x).backward()
                for p in model.parameters():
                    p.grad = None
        elif mode in ("adamw", "adafactor", "sgd"):
            opt = {
                "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-5, fused=True),
                "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-5),
                "adafactor": lambda ps: torch.optim.Adafactor(ps, lr=1e-3, foreach=True),
            }[mode](list(model.parameters()))

            def step_fn():
                loss_fn(model, x).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        elif mode == "adalomo":
            from adalomo.functional import adalomo_update_, init_factored_state

            states = {}
            for p in model.parameters():
                st = init_factored_state(p)
                st["step"] = torch.zeros(())
                states[p] = st

                def hook(p):
                    adalomo_update_(p, p.grad, states[p], lr=1e-3)
                    p.grad = None

                hs.append(p.register_post_accumulate_grad_hook(hook))

            def step_fn():
                loss_fn(model, x).backward()

        step_fn()  # step 1 (state allocated)
        clean()
        torch.cuda.reset_peak_memory_stats()
        step_fn()  # step 2: steady state
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        resident = torch.cuda.memory_allocated() - base
        emit(**common, mode=mode, peak=peak, resident=resident, t=round(time.time() - t0, 1))
        for h in hs:
            h.remove()
        step_fn = None
        if mode in ("adamw", "adafactor", "sgd"):
            del opt
        states = None
    del model
    clean()


print(torch.__version__, torch.cuda.get_device_name(), flush=True)
import transformers

print("transformers", transformers.__version__, flush=True)
L1 = dict(
    hidden_size=2048,
    intermediate_size=5504,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=4096,
)
L7 = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
)
which = sys.argv[2] if len(sys.argv) > 2 else "all"
if which in ("all", "a"):
    case("1b_4x1024", "llama", 4, 1024, False, ["floor", "keepgrads", "adamw", "adafactor", "adalomo"], **L1)
    case("1b_2x2048", "llama", 2, 2048, False, ["floor"], **L1)
    case("1b_8x512", "llama", 8, 512, False, ["floor"], **L1)
    case("1b_4x1024_eager", "llama", 4, 1024, False, ["floor"], attn="eager", **L1)
    case("1b_4x1024_ckpt", "llama", 4, 1024, True, ["floor", "adamw"], **L1)
    case("1b_gqa4_4x1024", "llama", 4, 1024, False, ["floor"], **{**L1, "num_key_value_heads": 4})
    case("gpt2xl_4x1024", "gpt2", 4, 1024, False, ["floor", "adamw"], n_embd=1600, n_layer=48, n_head=25)
    case("gpt2xl_4x1024_ckpt", "gpt2", 4, 1024, True, ["floor"], n_embd=1600, n_layer=48, n_head=25)
if which in ("all", "b"):
    case("7b_2x1024_ckpt", "llama", 2, 1024, True, ["floor", "keepgrads", "adamw", "adafactor", "adalomo"], **L7)
    case("7b_1x2048", "llama", 1, 2048, False, ["floor", "adalomo"], **L7)
