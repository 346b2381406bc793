"""AdaPM: float64 references per momentum kind, unbiasedness, fused == classic, checkpoints, policies, errors."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from adalomo import momentum as M
from adalomo.memory import ModelSpec, model_shapes
from adalomo.optim.adalomo import AdaLomo
from adalomo.optim.adapm import AdaPM, SplitMomentum, adapm_param_groups, momentum_kinds


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared CPU (30x slower here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------ float64 reference


class RefAdaPM:
    """AdaPM for one tensor in float64, written from docs/adapm.md (exact SVD basis)."""

    def __init__(self, p, kind, *, lr, betas=(0.9, 0.999), eps=1e-8, wd=0.0, rank=3, gap=10, second="adam",
                 clip=1.0, relative_lr=False, fill=True):
        self.p = p.detach().double().clone()
        self.kind, self.lr, self.b1, self.b2, self.eps, self.wd = kind, lr, betas[0], betas[1], eps, wd
        self.gap, self.second, self.clip, self.relative_lr, self.fill = gap, second, clip, relative_lr, fill
        self.t = 0
        self.m = torch.zeros_like(self.p)
        if kind == "low_rank":
            a, b = self.p.shape[0], self.p[0].numel()
            self.left = a <= b
            small, large = (a, b) if self.left else (b, a)
            self.r = min(rank, a, b)
            self.P = torch.zeros(small, self.r, dtype=torch.float64)
            self.Mom = torch.zeros(self.r, large, dtype=torch.float64)
        if second == "factored" and self.p.dim() >= 2:
            self.row = torch.zeros(self.p.shape[:-1], dtype=torch.float64)
            self.col = torch.zeros(self.p.shape[:-2] + self.p.shape[-1:], dtype=torch.float64)
        else:
            self.v = torch.zeros_like(self.p)

    def _momentum(self, g):
        b1, t = self.b1, self.t
        if self.kind == "none":
            return g
        if self.kind == "full":
            self.m = b1 * self.m + (1 - b1) * g
            return self.m / (1 - b1 ** t)
        X = g.reshape(g.shape[0], -1)
        X = X if self.left else X.T  # rows = the smaller side
        if (t - 1) % self.gap == 0:
            Pn = torch.linalg.svd(X, full_matrices=False)[0][:, :self.r]
            carried = Pn.T @ self.P @ self.Mom
            if self.fill:
                carried = carried + (1 - b1 ** (t - 1)) * Pn.T @ (X - self.P @ self.P.T @ X)
            self.P, self.Mom = Pn, carried
        self.Mom = b1 * self.Mom + (1 - b1) * self.P.T @ X
        Xh = self.P @ (self.Mom / (1 - b1 ** t)) + X - self.P @ (self.P.T @ X)
        return (Xh if self.left else Xh.T).reshape(g.shape)

    def step(self, g):
        g = g.double()
        self.t += 1
        mh = self._momentum(g)
        bc2 = 1 - self.b2 ** self.t
        if self.second == "adam":
            self.v = self.b2 * self.v + (1 - self.b2) * g * g
            u = mh / ((self.v / bc2).sqrt() + self.eps)
            lr_t = self.lr
        else:
            sq = g * g + self.eps ** 2
            if self.p.dim() >= 2:
                self.row = self.b2 * self.row + (1 - self.b2) * sq.mean(-1)
                self.col = self.b2 * self.col + (1 - self.b2) * sq.mean(-2)
                v = (self.row / self.row.mean(-1, keepdim=True)).unsqueeze(-1) * self.col.unsqueeze(-2)
            else:
                self.v = self.b2 * self.v + (1 - self.b2) * sq
                v = self.v
            u = mh / (v / bc2).sqrt()
            rms_u = u.square().mean().sqrt().item()
            u = u / max(1.0, rms_u / self.clip)
            lr_t = self.lr * max(1e-3, self.p.square().mean().sqrt().item()) if self.relative_lr else self.lr
        self.p = self.p * (1 - lr_t * self.wd) - lr_t * u


SHAPES = [(7, 13), (13, 7), (5, 3, 4), (12, 2, 2), (9,)]


def _planted_grads(shape, steps, seed):
    """Stationary-ish gradients with a clear rank-3 structure (so fp32 and fp64 SVDs agree) plus noise."""
    gen = torch.Generator().manual_seed(seed)
    a, b = shape[0], math.prod(shape[1:])
    if len(shape) < 2:
        return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(steps)]
    U = torch.linalg.qr(torch.randn(a, 3, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(b, 3, generator=gen, dtype=torch.float64))[0]
    S = torch.diag(torch.tensor([5.0, 3.0, 2.0], dtype=torch.float64))
    out = []
    for _ in range(steps):
        drift = 1 + 0.1 * torch.randn(3, generator=gen, dtype=torch.float64)
        g = U @ (S * drift) @ V.T + 0.03 * torch.randn(a, b, generator=gen, dtype=torch.float64)
        out.append(g.reshape(shape))
    return out


@pytest.mark.parametrize("second", ["adam", "factored"])
@pytest.mark.parametrize("kind", ["full", "low_rank", "none"])
def test_matches_float64_reference(kind, second):
    steps, gap, lr, wd = 25, 10, 1e-2, 0.1
    params, refs, grads = [], [], []
    for i, shape in enumerate(SHAPES):
        p = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(i)))
        params.append(p)
        k = kind if (kind != "low_rank" or p.dim() >= 2) else "full"  # low_rank on 1-D means full
        refs.append(RefAdaPM(p, k, lr=lr, wd=wd, rank=3, gap=gap, second=second))
        grads.append(_planted_grads(shape, steps, 100 + i))
    opt = AdaPM([{"params": [p], "momentum": kind} for p in params], lr=lr, weight_decay=wd, rank=3,
                update_proj_gap=gap, second_moment=second, proj_method="svd")
    for t in range(steps):
        for p, ref, gs in zip(params, refs, grads):
            p.grad = gs[t].float()
            ref.step(gs[t])
        opt.step()
    for p, ref in zip(params, refs):
        torch.testing.assert_close(p.detach().double(), ref.p, rtol=1e-5, atol=2e-5)


def test_relative_lr_and_no_fill_match_reference():
    p = nn.Parameter(torch.randn(6, 11) * 0.05)
    ref = RefAdaPM(p, "low_rank", lr=3e-2, wd=0.01, rank=2, gap=4, second="factored", relative_lr=True, fill=False)
    opt = AdaPM([{"params": [p], "momentum": "low_rank"}], lr=3e-2, weight_decay=0.01, rank=2, update_proj_gap=4,
                second_moment="factored", relative_lr=True, refresh_fill=False, proj_method="svd")
    for g in _planted_grads((6, 11), 21, 7):
        p.grad = g.float()
        ref.step(g)
        opt.step()
    torch.testing.assert_close(p.detach().double(), ref.p, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ equalities


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))


def _fit(model, opt, steps=25, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen)
        y = torch.randn(16, 4, generator=gen)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


@pytest.mark.parametrize("kind,beta1", [("full", 0.9), ("none", 0.0)])
def test_adam_second_moment_equals_torch_adamw(kind, beta1):
    a, b = _mlp(), _mlp()
    _fit(a, AdaPM(a.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, momentum_policy=kind))
    _fit(b, torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(beta1, 0.99), weight_decay=0.1))
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["svd", "randomized"])
@pytest.mark.parametrize("second", ["adam", "factored"])
def test_full_rank_low_rank_equals_full(second, method):
    a, b = _mlp(), _mlp()
    kw = dict(lr=1e-2, weight_decay=0.05, second_moment=second, update_proj_gap=7)
    _fit(a, AdaPM(a.parameters(), momentum_policy="low_rank", rank=100, proj_method=method, **kw))
    _fit(b, AdaPM(b.parameters(), momentum_policy="full", **kw))
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=2e-6)


def test_factored_none_is_adalomo():
    a, b = _mlp(), _mlp()
    _fit(a, AdaPM(a.parameters(), lr=3e-2, eps=1e-15, weight_decay=0.01, second_moment="factored",
                  momentum_policy="none", decay_rate=-0.8, relative_lr=True))
    _fit(b, AdaLomo(b.parameters(), lr=3e-2, weight_decay=0.01))
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------ unbiasedness

_DT = torch.float64


def _signal(a=6, b=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(a, a, generator=gen, dtype=_DT))[0]
    V = torch.linalg.qr(torch.randn(b, a, generator=gen, dtype=_DT))[0]
    return U @ torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5, 0.3, 0.2], dtype=_DT)) @ V.T


def _simulate(basis, fill=True, N=8000, steps=9, gap=4, r=2, beta1=0.9, sigma=1.0, seed=0):
    """Batched trials of g_t = G + noise: per step, (max |z| of low-rank m_hat - G, of truncated P M_hat - G,
    of full momentum - G), z = error / standard error of the mean."""
    torch.manual_seed(seed)
    G = _signal()
    a, b = G.shape
    ok = torch.tensor(True)
    P, Mom, m = torch.zeros(N, a, r, dtype=_DT), torch.zeros(N, r, b, dtype=_DT), torch.zeros(N, a, b, dtype=_DT)
    out = []
    for t in range(1, steps + 1):
        g = G + sigma * torch.randn(N, a, b, dtype=_DT)
        M.full_momentum_(m, g, beta1, ok)
        if (t - 1) % gap == 0:
            Pn = (torch.linalg.qr(torch.randn(N, a, r, dtype=_DT))[0] if basis == "independent"
                  else torch.linalg.svd(g, full_matrices=False)[0][..., :r])
            M.refresh_basis_(P, Mom, Pn, g, "left", carry_weight=1 - beta1 ** (t - 1), ok=ok, fill=fill)
        pg = M.low_rank_momentum_(P, Mom, g, "left", beta1, ok)
        est = M.low_rank_estimate(g, P, Mom, pg, "left", 1 - beta1 ** t)
        trunc = M.lift(Mom / (1 - beta1 ** t), P, "left")

        def z(x):
            return ((x.mean(0) - G).abs() / (x.std(0) / math.sqrt(N))).max().item()
        out.append((z(est), z(trunc), z(m / (1 - beta1 ** t))))
    return out


def test_low_rank_estimate_is_unbiased_given_the_basis():
    # bases drawn independently of the gradient noise: E[m_hat_t] = G at every step, across refreshes
    res = _simulate("independent", fill=True)
    assert max(r[0] for r in res) < 5.0, res
    assert max(r[2] for r in res) < 5.0, res  # the full momentum, for scale
    assert min(r[1] for r in res) > 50.0, res  # dropping the residual (GaLore-style truncation) is biased


def test_refresh_without_fill_is_biased():
    res = _simulate("independent", fill=False)
    assert max(r[0] for r in res[:4]) < 5.0  # before the first refresh
    assert min(r[0] for r in res[4:]) > 10.0, res  # the old subspace's momentum alone is biased


def test_gradient_basis_bias_is_small_compared_with_truncation():
    # a basis chosen from the noisy gradient itself adds a selection bias (documented); still far below truncation
    res = _simulate("gradient", fill=True, N=2000, sigma=0.3)
    assert all(r[0] < 0.5 * r[1] for r in res), res


# ------------------------------------------------------------------------------------ tiny LM


class TinyLM(nn.Module):
    """Layer 0 with LLaMA names, layer 1 with GPT-2 names (fused c_attn), odd sizes."""

    def __init__(self, vocab=23, dim=12, ffn=20):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        llama = nn.Module()
        llama.input_layernorm = nn.LayerNorm(dim)
        llama.self_attn = nn.Module()
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(llama.self_attn, n, nn.Linear(dim, dim, bias=False))
        llama.post_attention_layernorm = nn.LayerNorm(dim)
        llama.mlp = nn.Module()
        llama.mlp.gate_proj, llama.mlp.up_proj = nn.Linear(dim, ffn, bias=False), nn.Linear(dim, ffn, bias=False)
        llama.mlp.down_proj = nn.Linear(ffn, dim, bias=False)
        gpt2 = nn.Module()
        gpt2.ln_1, gpt2.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        gpt2.attn, gpt2.mlp = nn.Module(), nn.Module()
        gpt2.attn.c_attn = nn.Linear(dim, 3 * dim)  # its weight is (3*dim, dim): use it transposed like Conv1D
        gpt2.attn.c_attn.weight = nn.Parameter(torch.randn(dim, 3 * dim) * 0.2)
        gpt2.attn.c_proj = nn.Linear(dim, dim)
        gpt2.mlp.c_fc, gpt2.mlp.c_proj = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.layers = nn.ModuleList([llama, gpt2])
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.dim = dim

    @staticmethod
    def _attend(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    def forward(self, idx):
        x = self.embed_tokens(idx)
        ll, gp = self.layers
        h = ll.input_layernorm(x)
        x = x + ll.self_attn.o_proj(self._attend(ll.self_attn.q_proj(h), ll.self_attn.k_proj(h),
                                                 ll.self_attn.v_proj(h)))
        h = ll.post_attention_layernorm(x)
        x = x + ll.mlp.down_proj(nn.functional.silu(ll.mlp.gate_proj(h)) * ll.mlp.up_proj(h))
        qkv = gp.ln_1(x) @ gp.attn.c_attn.weight + gp.attn.c_attn.bias
        x = x + gp.attn.c_proj(self._attend(*qkv.split(self.dim, -1)))
        x = x + gp.mlp.c_proj(nn.functional.gelu(gp.mlp.c_fc(gp.ln_2(x))))
        return self.lm_head(self.norm(x))


def _lm_batches(n, seed=0, vocab=23):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (4, 9), generator=gen) for _ in range(n)]


def _lm_loss(model, idx):
    logits = model(idx[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


def _train_lm(model, opt, batches):
    losses = []
    for idx in batches:
        loss = _lm_loss(model, idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


EXPECTED_KINDS = {
    "embed_tokens.weight": "none", "lm_head.weight": "none", "norm.weight": "full",
    "layers.0.self_attn.q_proj.weight": "low_rank", "layers.0.self_attn.k_proj.weight": "low_rank",
    "layers.0.self_attn.v_proj.weight": "full", "layers.0.self_attn.o_proj.weight": "none",
    "layers.0.mlp.gate_proj.weight": "low_rank", "layers.0.mlp.down_proj.weight": "low_rank",
    "layers.0.input_layernorm.bias": "full",
    "layers.1.attn.c_attn.weight": SplitMomentum(-1, ("low_rank", "low_rank", "full")),
    "layers.1.attn.c_attn.bias": "full", "layers.1.attn.c_proj.weight": "none",
    "layers.1.mlp.c_fc.weight": "low_rank", "layers.1.mlp.c_proj.weight": "low_rank",
}


def test_default_policy_on_names():
    kinds = momentum_kinds(TinyLM().named_parameters())
    for name, kind in EXPECTED_KINDS.items():
        assert kinds[name] == kind, name
    hf = momentum_kinds(model_shapes(ModelSpec("llama", 100, 64, 2, 4, 96, num_kv_heads=2)))
    assert hf["model.embed_tokens.weight"] == hf["lm_head.weight"] == "none"
    assert hf["model.layers.1.self_attn.o_proj.weight"] == "none"
    assert hf["model.layers.1.self_attn.v_proj.weight"] == "full"
    assert hf["model.layers.1.mlp.up_proj.weight"] == hf["model.layers.0.self_attn.k_proj.weight"] == "low_rank"
    g2 = momentum_kinds(model_shapes(ModelSpec("gpt2", 50, 32, 1, 4, tie_word_embeddings=True,
                                               max_position_embeddings=16)))
    assert g2["transformer.wpe.weight"] == "none" and g2["transformer.h.0.mlp.c_proj.weight"] == "low_rank"
    assert g2["transformer.h.0.attn.c_proj.weight"] == "none"
    ours = momentum_kinds([("tok_emb.weight", (50, 8)), ("layers.0.attn.wq.weight", (8, 8)),
                           ("layers.0.attn.wv.weight", (8, 8)), ("layers.0.attn.wo.weight", (8, 8)),
                           ("layers.0.ffn.w2.weight", (8, 24)), ("layers.0.attn_norm.weight", (8,))])
    assert list(ours.values()) == ["none", "low_rank", "full", "none", "low_rank", "full"]


@pytest.mark.parametrize("second", ["adam", "factored"])
def test_fused_equals_classic_on_named_tiny_lm(second):
    torch.manual_seed(0)
    base = TinyLM()
    batches = _lm_batches(12)
    results = []
    for fused in (False, True):
        model = copy.deepcopy(base)
        opt = AdaPM(model.named_parameters(), lr=3e-3, weight_decay=0.1, rank=3, update_proj_gap=5,
                    second_moment=second, fused=fused)
        losses = _train_lm(model, opt, batches)
        results.append((model, losses, opt))
    (a, la, opt_a), (b, lb, opt_b) = results
    assert la == lb and la[-1] < la[0]
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    for name, p in a.named_parameters():
        assert opt_a.momentum_kind(p) == EXPECTED_KINDS.get(name, opt_a.momentum_kind(p))


@pytest.mark.parametrize("fused", [False, True])
def test_state_dict_round_trip_across_basis_refresh(fused):
    torch.manual_seed(0)
    base = TinyLM()
    batches = _lm_batches(13, seed=3)

    def make(model):  # refreshes at steps 1, 6, 11: the resume at step 4 crosses two of them
        return AdaPM(adapm_param_groups(model, weight_decay=0.1, rank=3), lr=3e-3, update_proj_gap=5,
                     second_moment="factored", fused=fused)

    full = copy.deepcopy(base)
    _train_lm(full, make(full), batches)
    part = copy.deepcopy(base)
    opt = make(part)
    _train_lm(part, opt, batches[:4])
    buf = io.BytesIO()
    torch.save({"model": part.state_dict(), "opt": opt.state_dict()}, buf)
    opt.remove_hooks()
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    resumed = copy.deepcopy(base)
    resumed.load_state_dict(ck["model"])
    opt2 = make(resumed)
    opt2.load_state_dict(ck["opt"])
    assert all(v.dtype == torch.float32 for st in opt2.state.values() for v in st.values())
    _train_lm(resumed, opt2, batches[4:])
    for x, y in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_param_groups_helper():
    model = TinyLM()
    groups = adapm_param_groups(model, weight_decay=0.1, rank=4, lr=1e-3)
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    for g in groups:
        assert g["rank"] == 4 and g["lr"] == 1e-3
        for n, p in zip(g["param_names"], g["params"]):
            assert g["weight_decay"] == (0.1 if p.dim() >= 2 and "embed" not in n else 0.0), n
    opt = AdaPM(groups)
    assert set(opt.state[model.layers[1].attn.c_attn.weight]) >= {"0.proj", "1.exp_avg_lr", "2.exp_avg"}


def test_unnamed_params_warn_and_keep_full_momentum():
    model = TinyLM()
    with pytest.warns(UserWarning, match="without names"):
        opt = AdaPM(model.parameters())
    assert all(opt.momentum_kind(p) == "full" for p in model.parameters())


# ------------------------------------------------------------------------------------ robustness & errors


def test_nonfinite_gradient_at_refresh_leaves_everything_unchanged():
    torch.manual_seed(0)
    model = TinyLM()
    opt = AdaPM(model.named_parameters(), rank=3, update_proj_gap=2, nonfinite="count")
    _train_lm(model, opt, _lm_batches(2))
    p = model.layers[0].mlp.up_proj.weight
    before = p.detach().clone()
    state_before = {k: v.clone() for k, v in opt.state[p].items() if k != "step"}
    loss = _lm_loss(model, _lm_batches(1, seed=9)[0])
    loss.backward()
    model.layers[0].mlp.up_proj.weight.grad[0, 0] = float("nan")  # step 3 refreshes the basis
    opt.step()
    opt.zero_grad()
    torch.testing.assert_close(p.detach(), before, rtol=0, atol=0)
    for k, v in state_before.items():
        torch.testing.assert_close(opt.state[p][k], v, rtol=0, atol=0)
    assert int(opt.skipped_updates) == 1
    _train_lm(model, opt, _lm_batches(2, seed=4))
    assert all(torch.isfinite(q).all() for q in model.parameters())


def test_bf16_fused_runs_with_fp32_state():
    torch.manual_seed(0)
    model = TinyLM().to(torch.bfloat16)
    opt = AdaPM(model.named_parameters(), lr=1e-3, rank=2, fused=True, second_moment="factored")
    for idx in _lm_batches(3):
        _lm_loss(model, idx).float().backward()
    assert all(v.dtype == torch.float32 for st in opt.state.values() for v in st.values())


@pytest.mark.parametrize("kwargs,match", [
    (dict(momentum_policy={"q_proj": "lowrank"}), "unknown momentum kind 'lowrank'"),
    (dict(momentum_policy="bogus"), "unknown momentum kind 'bogus'"),
    (dict(momentum_policy=lambda name, p: 3), "momentum_policy returned"),
    (dict(momentum_policy={"c_attn": SplitMomentum(-1, ("full", "none", "low_rank", "full", "none"))}),
     "divisible"),
    (dict(rank=0), "rank must be"),
    (dict(rank=-4), "rank must be"),
    (dict(rank=1.5), "rank must be"),
    (dict(rank=True), "rank must be"),
    (dict(update_proj_gap=0), "update_proj_gap"),
    (dict(second_moment="adafactor"), "second_moment"),
    (dict(proj_method="qr"), "proj_method"),
    (dict(betas=(0.9, 1.0)), r"betas\[1\]"),
    (dict(decay_rate=0.5), "decay_rate"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaPM(TinyLM().named_parameters(), **kwargs)


def test_bad_group_kind_and_mismatched_checkpoint():
    model = TinyLM()
    with pytest.raises(ValueError, match="unknown momentum kind 'half'"):
        AdaPM([{"params": list(model.parameters()), "momentum": "half"}])
    opt = AdaPM(model.named_parameters(), rank=3)
    _train_lm(model, opt, _lm_batches(1))
    other = AdaPM(model.named_parameters(), rank=3, momentum_policy="full")
    with pytest.raises(ValueError, match="another momentum policy"):
        other.load_state_dict(opt.state_dict())


def test_hugging_face_models():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2,
                                                                n_positions=16))
    kinds = momentum_kinds(llama.named_parameters())
    assert kinds["model.layers.0.self_attn.v_proj.weight"] == "full"
    assert kinds["model.layers.0.self_attn.o_proj.weight"] == kinds["model.embed_tokens.weight"] == "none"
    assert kinds["model.layers.0.mlp.gate_proj.weight"] == "low_rank"
    kinds = momentum_kinds(gpt2.named_parameters())
    assert kinds["transformer.h.0.attn.c_attn.weight"] == SplitMomentum(-1, ("low_rank", "low_rank", "full"))
    for model in (llama, gpt2):
        opt = AdaPM(adapm_param_groups(model, weight_decay=0.1, rank=4), lr=1e-2, fused=True,
                    second_moment="factored")
        idx = torch.randint(0, 40, (2, 8))
        losses = []
        for _ in range(4):
            out = model(input_ids=idx, labels=idx)
            out.loss.backward()
            losses.append(out.loss.item())
        assert losses[-1] < losses[0]
        assert opt.skipped_updates is not None and int(opt.skipped_updates) == 0


def test_rank_fraction_and_layout():
    a, b, c = nn.Parameter(torch.zeros(8, 20)), nn.Parameter(torch.zeros(20, 8)), nn.Parameter(torch.zeros(6, 2, 5))
    opt = AdaPM([a, b, c], momentum_policy="low_rank", rank=0.25, second_moment="factored")
    assert opt.state[a]["proj"].shape == (8, 2) and opt.state[a]["exp_avg_lr"].shape == (2, 20)  # left
    assert opt.state[b]["proj"].shape == (8, 2) and opt.state[b]["exp_avg_lr"].shape == (20, 2)  # right
    assert opt.state[c]["proj"].shape == (6, 2) and opt.state[c]["exp_avg_lr"].shape == (2, 10)  # (6, 2*5)
    assert opt.state[c]["exp_avg_sq_row"].shape == (6, 2)  # the second moment factors the last two dims
