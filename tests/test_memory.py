"""adalomo.memory: parameter counts, state formulas, activations, FSDP, peaks, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from adalomo import memory as M

GiB = 2**30


# ---------------------------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("preset,count", [
    ("llama-1b", 940_640_256),  # the benchmarks' 0.94B model (measured on GPU)
    ("llama-7b", 6_738_415_616),
    ("llama-13b", 13_015_864_320),
    ("llama-30b", 32_528_943_616),
    ("llama-65b", 65_285_660_672),
    ("llama2-70b", 68_976_648_192),
    ("llama3-8b", 8_030_261_248),
    ("gpt2", 124_439_808),
    ("gpt2-medium", 354_823_168),
    ("gpt2-large", 774_030_080),
    ("gpt2-xl", 1_557_611_200),
])
def test_preset_param_counts(preset, count):
    assert M.num_params(preset) == count
    assert sum(M._numel(s) for _, s in M.model_shapes(preset)) == count


def test_shapes_follow_hf_names_and_layouts():
    shapes = dict(M.model_shapes("llama2-70b"))
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (8192, 8192)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (1024, 8192)  # GQA: 8 kv heads
    assert shapes["model.layers.79.mlp.down_proj.weight"] == (8192, 28672)
    assert shapes["lm_head.weight"] == (32000, 8192)
    g = dict(M.model_shapes("gpt2-xl"))
    assert g["transformer.h.0.attn.c_attn.weight"] == (1600, 4800)  # Conv1D: (in, out)
    assert g["transformer.h.47.mlp.c_proj.bias"] == (1600,)
    assert "lm_head.weight" not in g  # tied


def _meta_model(cls, cfg):
    torch = pytest.importorskip("torch")
    with torch.device("meta"):
        return cls(cfg)


@pytest.mark.parametrize("kind", ["llama_gqa_tied_bias", "llama_untied_headdim", "gpt2"])
def test_shapes_match_meta_device_transformers_model(kind):
    tf = pytest.importorskip("transformers")
    if kind == "llama_gqa_tied_bias":
        cfg = tf.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                             attention_bias=True)
        cls = tf.LlamaForCausalLM
    elif kind == "llama_untied_headdim":
        cfg = tf.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                             tie_word_embeddings=False, mlp_bias=True)
        cls = tf.LlamaForCausalLM
    else:
        cfg = tf.GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        cls = tf.GPT2LMHeadModel
    model = _meta_model(cls, cfg)
    from_model = M.model_shapes(model)
    assert M.model_shapes(cfg.to_dict()) == from_model  # names and shapes, in order
    assert M.model_shapes(cfg) == from_model
    assert M.num_params(model) == sum(p.numel() for p in model.parameters())
    # a module with an HF config gets activations too
    assert M.estimate(model, "adalomo", seq_len=8, batch=2)["activations"] > 0


def test_config_json_files(tmp_path):
    llama = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
             "num_hidden_layers": 32, "num_attention_heads": 32, "tie_word_embeddings": False}
    p = tmp_path / "llama" / "config.json"
    p.parent.mkdir()
    p.write_text(json.dumps(llama))
    assert M.num_params(str(p)) == 6_738_415_616
    assert M.num_params(str(p.parent)) == 6_738_415_616  # a model folder
    gpt2 = {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 1600, "n_layer": 48, "n_head": 25,
            "n_positions": 1024}
    q = tmp_path / "gpt2.json"
    q.write_text(json.dumps(gpt2))
    assert M.num_params(q) == 1_557_611_200
    assert M.model_spec(q).arch == "gpt2"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match="config has no"):
        M.model_spec(bad)
    with pytest.raises(ValueError, match="not found"):
        M.model_spec(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="unknown preset"):
        M.model_spec("llama-3b")


# ----------------------------------------------------------------------------------------------- state

SMALL = [("w", (4, 6)), ("b", (6,))]  # 24 + 6 = 30 params


def test_state_bytes_by_hand():
    sb = M.optimizer_state_bytes
    assert sb(SMALL, "adamw") == 2 * 30 * 2  # m, v in bf16
    assert sb(SMALL, "adamw", dtype="fp32") == 2 * 30 * 4
    assert sb(SMALL, "adamw", master_weights=True) == 30 * (4 + 4 + 4)  # master, m, v fp32
    assert sb(SMALL, "sgd") == 0 and sb(SMALL, "lomo") == 0
    assert sb(SMALL, "sgd", master_weights=True) == 30 * 4
    assert sb(SMALL, "lomo", master_weights=True) == 0  # fused: no master copy
    # 8-bit: below min_8bit_size -> fp32 states; else 1+1 byte + fp32 absmax per block, per state
    assert sb(SMALL, "adamw-8bit") == 30 * 8
    assert sb(SMALL, "adamw-8bit", bnb_min_8bit_size=1, bnb_blocksize=4) == 2 * (24 + 4 * 6) + 2 * (6 + 4 * 2)
    assert sb(SMALL, "adamw-8bit", bnb_min_8bit_size=1, bnb_blocksize=2048) == 2 * (24 + 4) + 2 * (6 + 4)
    # factored: fp32 rows + cols, full for 1-D
    assert sb(SMALL, "adalomo") == 4 * (4 + 6) + 4 * 6
    assert sb(SMALL, "adafactor") == 4 * (4 + 6) + 4 * 6
    assert sb(SMALL, "adafactor", adafactor_beta1=0.9) == 4 * (4 + 6) + 4 * 6 + 2 * 30
    assert sb(SMALL, "adalomo", adafactor_beta1=0.9) == 4 * (4 + 6) + 4 * 6  # AdaLomo has no momentum
    assert sb(SMALL, "adafactor-torch") == 2 * (4 + 6) + 2 * 6  # torch keeps it in the param dtype
    assert sb([("x", (2, 3, 4))], "adalomo") == 4 * (2 * 3 + 2 * 4)  # last two dims factored
    assert sb(SMALL, "adalomo", per_tensor=True) == {"w": 40, "b": 24}


def test_adapm_policy_and_rank():
    shapes = [("model.layers.0.self_attn.q_proj.weight", (8, 16)),
              ("model.layers.0.self_attn.v_proj.weight", (8, 16)),
              ("model.layers.0.self_attn.o_proj.weight", (16, 8)),
              ("model.embed_tokens.weight", (50, 16)),
              ("model.layers.0.input_layernorm.weight", (16,))]
    per = M.optimizer_state_bytes(shapes, "adapm", adapm_rank=2, per_tensor=True)
    v = 4 * 8 * 16  # full fp32 Adam v (the default)
    assert per["model.layers.0.self_attn.q_proj.weight"] == v + 4 * 2 * (8 + 16)  # low rank: r (m + n)
    assert per["model.layers.0.self_attn.v_proj.weight"] == v + 4 * 8 * 16  # full momentum
    assert per["model.layers.0.self_attn.o_proj.weight"] == v  # no momentum
    assert per["model.embed_tokens.weight"] == 4 * 50 * 16
    assert per["model.layers.0.input_layernorm.weight"] == 4 * 16 + 4 * 16  # 1-D: v and full momentum
    fac = M.optimizer_state_bytes(shapes[:1], "adapm", adapm_rank=2, adapm_second_moment="factored")
    assert fac == 4 * (8 + 16) + 4 * 2 * (8 + 16)
    # rank: capped by the smaller side; a float is a fraction of it
    assert M.optimizer_state_bytes(shapes[:1], "adapm", adapm_rank=1000) == v + 4 * 8 * (8 + 16)
    assert M.optimizer_state_bytes(shapes[:1], "adapm", adapm_rank=0.25) == v + 4 * 2 * (8 + 16)
    # GPT-2's fused c_attn (in, 3 out): Q, K low rank, V full, on (in, out) chunks
    c = M.optimizer_state_bytes([("transformer.h.0.attn.c_attn.weight", (8, 24))], "adapm", adapm_rank=2)
    assert c == 4 * 8 * 24 + 4 * (2 * 2 * (8 + 8) + 8 * 8)
    # a policy can be plugged in: AdaPMRule, a kind string, or a tensor-style policy
    everything_full = lambda name, shape: M.AdaPMRule("full", "adam")
    assert M.optimizer_state_bytes(SMALL, "adapm", adapm_policy=everything_full) == 30 * 8
    assert M.optimizer_state_bytes(SMALL, "adapm-fused", adapm_policy=lambda n, p: "none") == 30 * 4
    assert M.optimizer_state_bytes(SMALL, "adapm", adapm_policy=lambda n, p: "low_rank" if p.dim() > 1 else "none",
                                   adapm_rank=1) == 30 * 4 + 4 * (4 + 6)
    assert M.default_adapm_policy("transformer.h.0.attn.c_proj.weight", (4, 4)).momentum == "none"
    assert M.default_adapm_policy("transformer.h.0.mlp.c_fc.weight", (4, 16)).momentum == "low_rank"
    assert M.default_adapm_policy("transformer.h.0.mlp.c_proj.weight", (16, 4)).momentum == "low_rank"
    with pytest.raises(ValueError):
        M.optimizer_state_bytes(SMALL, "adapm", adapm_policy=lambda n, s: M.AdaPMRule("half"))


@pytest.mark.parametrize("preset", ["llama-1b", "llama2-70b", "gpt2"])
@pytest.mark.parametrize("second_moment", ["adam", "factored"])
def test_adapm_matches_the_optimizer_s_own_count(preset, second_moment):
    """Same bytes as adalomo.optim.adapm.state_bytes, with its policy or ours."""
    adapm = pytest.importorskip("adalomo.optim.adapm")
    shapes = M.model_shapes(preset)
    theirs = adapm.state_bytes(shapes, rank=64, second_moment=second_moment)["total"]
    assert M.optimizer_state_bytes(shapes, "adapm", adapm_second_moment=second_moment) == theirs
    assert M.optimizer_state_bytes(shapes, "adapm", adapm_second_moment=second_moment,
                                   adapm_policy=adapm.adapm_policy) == theirs


def test_state_7b_headline_numbers():
    p = 6_738_415_616
    assert M.optimizer_state_bytes("llama-7b", "adamw") == 4 * p
    assert M.optimizer_state_bytes("llama-7b", "adamw", master_weights=True) == 12 * p
    assert M.optimizer_state_bytes("llama-7b", "lomo") == 0
    assert M.optimizer_state_bytes("llama-7b", "adalomo") < 0.01 * p  # a few MB
    eight = M.optimizer_state_bytes("llama-7b", "adamw-8bit")
    assert 2 * p < eight < 2.04 * p
    with pytest.raises(ValueError, match="unknown optimizer"):
        M.optimizer_state_bytes("llama-7b", "adam-9bit")


# ---------------------------------------------------------------------------------------- activations

def test_activation_formula_llama():
    s, b = 1024, 4
    t = s * b
    spec = M.PRESETS["llama-1b"]
    h, i, V, L = 2048, 5504, 32000, 16
    d = M.activation_bytes(spec, seq_len=s, batch=b, detail=True)
    per_layer = (20 * h + 4 * h + 8 * i + 4 * 16) * t  # bf16, MHA, + fp32 lse per head
    assert d["layer"] == per_layer
    assert d["saved"] == L * per_layer + (8 * h + 4 * V) * t
    assert d["loss_transient"] == 8 * V * t
    assert d["peak"] == d["saved"] + d["loss_transient"]
    ck = M.activation_bytes(spec, seq_len=s, batch=b, grad_ckpt=True, detail=True)
    assert ck["saved"] == L * 2 * h * t + (8 * h + 4 * V) * t
    eager = M.activation_bytes(spec, seq_len=s, batch=b, attention="eager", detail=True)
    assert eager["layer"] - d["layer"] == (6 * 16 * s - 4 * 16) * t
    k = M.activation_bytes(spec, seq_len=s, batch=b, activation_model="korthikanti", detail=True)
    assert k["layer"] == 34 * h * t
    ke = M.activation_bytes(spec, seq_len=s, batch=b, activation_model="korthikanti", attention="eager", detail=True)
    assert ke["layer"] == t * h * (34 + 5 * 16 * s / h)
    # activations scale with tokens, not with the model's weights; fp32 doubles the 16-bit parts
    assert M.activation_bytes(spec, seq_len=s, batch=2 * b) == 2 * d["peak"]
    assert M.activation_bytes(spec, seq_len=s, batch=b, dtype="fp32") > d["peak"]


def test_activation_formula_gpt2():
    spec = M.PRESETS["gpt2-xl"]
    t = 1024
    d = M.activation_bytes(spec, seq_len=1024, batch=1, detail=True)
    assert d["layer"] == (62 * 1600 + 4 * 25) * t  # with dropout masks and gelu_new
    nodrop = M.ModelSpec("gpt2", 50257, 1600, 48, 25, 6400, tie_word_embeddings=True,
                         max_position_embeddings=1024, activation="gelu_pytorch_tanh")
    # 8h LayerNorms + 12h attention + 16h MLP (fused GeLU: c_fc output and GeLU output)
    assert M.activation_bytes(nodrop, seq_len=1024, batch=1, detail=True)["layer"] == (36 * 1600 + 4 * 25) * t


# ------------------------------------------------------------------------------------------- estimate

def test_estimate_components_and_peak():
    e = M.estimate("llama-7b", "adamw", seq_len=2048, batch=1, grad_ckpt=True)
    p = 6_738_415_616
    assert e["params"] == p
    assert e["weights"] == 2 * p and e["grads"] == 2 * p and e["state"] == 4 * p
    assert e["fsdp_buffers"] == 0
    assert e["sum"] == e["weights"] + e["grads"] + e["state"] + e["activations"]
    assert e["weights"] + e["state"] <= e["peak"] <= e["sum"]
    assert e["fits"] == {"24": False, "40": False, "80": True, "141": True}
    f = M.estimate("llama-7b", "adalomo", seq_len=2048, batch=1, grad_ckpt=True)
    assert f["fused"] and f["grads"] == 2 * 32000 * 4096 + 16 * 2**24  # largest grad + fp32 block temporaries
    assert f["fits"]["24"] and f["peak"] < 15 * GiB
    # bigger batches only ever cost more
    assert M.estimate("llama-7b", "adalomo", seq_len=2048, batch=4)["peak"] > f["peak"]


def test_fsdp_divides_weights_grads_state_not_activations():
    one = M.estimate("llama-7b", "adamw", seq_len=1024, batch=2, grad_ckpt=True)
    four = M.estimate("llama-7b", "adamw", seq_len=1024, batch=2, grad_ckpt=True, n_gpus=4)
    for k in ("weights", "grads", "state"):
        assert four[k] * 4 == one[k]
    assert four["activations"] == one["activations"]
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    assert four["fsdp_buffers"] == 3 * 2 * layer  # 2 gathered units + 1 unsharded gradient unit
    assert four["peak"] < one["peak"]
    fused1 = M.estimate("llama-7b", "adalomo", n_gpus=1)
    fused8 = M.estimate("llama-7b", "adalomo", n_gpus=8)
    assert fused8["grads"] == 2 * 32000 * 4096 // 8 + 16 * (32000 * 4096 // 8)  # the largest gradient's shard
    assert fused8["weights"] * 8 == fused1["weights"]
    with pytest.raises(ValueError):
        M.estimate("llama-7b", "adamw", n_gpus=0)


def test_estimate_from_shapes_and_given_activations():
    e = M.estimate(SMALL, "adamw", activations=1000)
    assert e["activations"] == 1000 and e["weights"] == 60 and e["grads"] == 60 and e["state"] == 120
    assert M.estimate(SMALL, "adamw")["activations"] == 0  # no architecture: no activation estimate


# Peaks measured on one H100 (torch 2.11, transformers 5.17, bf16 params, SDPA, fp32 loss;
# torch.cuda.max_memory_allocated, bytes); see docs/memory.md. The planner must stay within 3%.
MEASURED = [
    ("llama-1b", 4, 1024, False, "sdpa", "lomo", 9794951168),  # floor
    ("llama-1b", 4, 1024, False, "sdpa", "adamw", 13598481920),
    ("llama-1b", 4, 1024, False, "sdpa", "adafactor-torch", 9796484096),
    ("llama-1b", 4, 1024, False, "sdpa", "adalomo", 9797992448),
    ("llama-1b", 4, 1024, False, "eager", "lomo", 16098973696),
    ("llama-1b", 4, 1024, True, "sdpa", "lomo", 3817535488),
    ("llama-1b", 4, 1024, True, "sdpa", "adamw", 7898296832),
    ("gpt2-xl", 4, 1024, False, "sdpa", "lomo", 25239532544),
    ("gpt2-xl", 4, 1024, False, "sdpa", "adamw", 31507832832),
    ("gpt2-xl", 4, 1024, True, "sdpa", "lomo", 6317143040),
    ("llama-7b", 2, 1024, True, "sdpa", "lomo", 14867802112),
    ("llama-7b", 2, 1024, True, "sdpa", "sgd", 26970458112),  # grads kept, no step
    ("llama-7b", 2, 1024, True, "sdpa", "adamw", 53924269568),
    ("llama-7b", 2, 1024, True, "sdpa", "adafactor-torch", 40436185088),
    ("llama-7b", 2, 1024, True, "sdpa", "adalomo", 14879150080),
    ("llama-7b", 1, 2048, False, "sdpa", "lomo", 26688423936),
]


@pytest.mark.parametrize("preset,b,s,ckpt,attn,opt,measured", MEASURED)
def test_calibration_against_gpu_measurements(preset, b, s, ckpt, attn, opt, measured):
    e = M.estimate(preset, opt, seq_len=s, batch=b, grad_ckpt=ckpt, attention=attn)
    assert abs(e["peak"] - measured) / measured < 0.03


def test_published_component_numbers():
    # LOMO paper, LLaMA-7B (GiB): AdamW 12.55 + 12.55 + 75.31 + act 1.79 = 102.2; SGD 52.0; LOMO 14.6
    act = int(1.79 * GiB)
    adamw = M.estimate("llama-7b", "adamw", master_weights=True, activations=act)
    sgd = M.estimate("llama-7b", "sgd", master_weights=True, activations=act)
    lomo = M.estimate("llama-7b", "lomo", activations=act)
    assert abs(adamw["sum"] / GiB - 102.2) < 0.1
    assert abs(sgd["sum"] / GiB - 52.0) < 0.1
    assert abs(lomo["sum"] / GiB - 14.6) / 14.6 < 0.03


# ------------------------------------------------------------------------------------------------- CLI

def test_cli_table(capsys):
    assert M.main(["llama-7b", "--seq-len", "2048", "--grad-ckpt"]) == 0
    out = capsys.readouterr().out
    for name in M.DEFAULT_OPTIMIZERS:
        assert f"\n{name} " in out
    assert "24GB" in out and "141GB" in out and "yes" in out and "no" in out
    assert M.main(["--preset", "llama-65b", "--n-gpus", "8", "--optimizers", "adamw,adalomo"]) == 0
    assert "fsdp" in capsys.readouterr().out


def test_cli_json(capsys, tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12,
                               "n_head": 12, "n_positions": 1024}))
    assert M.main(["--config", str(cfg), "--json", "--optimizers", "adamw,lomo", "--batch", "8"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"] == 124_439_808
    assert [r["optimizer"] for r in data["rows"]] == ["adamw", "lomo"]
    assert all(r["batch"] == 8 for r in data["rows"])


@pytest.mark.parametrize("argv,needle", [
    (["llama-3b"], "unknown preset"),
    (["--preset", "nope"], "unknown preset"),
    (["--config", "/does/not/exist/config.json"], "not found"),
    ([], "give exactly one model"),
    (["llama-7b", "--optimizers", "adamw,adam9"], "unknown optimizer"),
    (["llama-7b", "--dtype", "int3"], "unknown dtype"),
    (["llama-7b", "--batch", "0"], "--batch"),
])
def test_cli_bad_arguments_one_line_exit_2(capsys, argv, needle):
    assert M.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and err.startswith("adalomo memory: error:")


def test_list_presets(capsys):
    assert M.main(["--list-presets"]) == 0
    assert "llama2-70b" in capsys.readouterr().out


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "adalomo.memory", "gpt2", "--optimizers", "adalomo"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "adalomo" in r.stdout
    r = subprocess.run([sys.executable, "-m", "adalomo.memory", "no-such-model"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1


def test_adalomo_cli_memory_subcommand(capsys):
    cli = pytest.importorskip("adalomo.cli")
    assert cli.main(["memory", "gpt2", "--optimizers", "adalomo,adamw"]) == 0
    assert "adalomo" in capsys.readouterr().out
    assert cli.main(["memory", "no-such-model"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
