"""torch.optim's generic contract, table-driven over every optimizer x mode x dtype x shape.

One table of optimizer factories (``SPECS``, one row per optimizer and lr mode) and one tiny model (``Bag``: free
parameters of the shapes under test, a loss whose gradients depend on the weights). Each test states one promise
that every ``torch.optim`` optimizer keeps and checks it for every row, in classic (``fused=False``) and fused
(``fused=True``) mode. The plain-loop traps are in test_plain_loop.py, targeted value checks in test_values.py.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from reference import RefFactored
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from adalomo import Adafactor, AdaLomo, AdaPM, DynamicLossScaler, Lomo

#: (class, constructor keywords) per optimizer and lr mode. Learning rates are powers of two (exact in every dtype).
SPECS: dict[str, tuple[type, dict]] = {
    "adalomo": (AdaLomo, dict(lr=2**-5)),
    "lomo": (Lomo, dict(lr=2**-5)),
    # relative_step=True: rho_t = min(group lr, 1/sqrt(t)), the group's lr (1e-2) is the cap
    "adafactor": (Adafactor, dict()),
    "adafactor-lr": (Adafactor, dict(lr=2**-4, relative_step=False, scale_parameter=False, beta1=0.5)),
    "adapm": (AdaPM, dict(lr=2**-5, rank=2, momentum_policy="low_rank")),
    "adapm-relative": (AdaPM, dict(lr=2**-5, rank=2, momentum_policy="low_rank", second_moment="factored",
                                   relative_lr=True, decay_rate=-0.8)),
}
NAMES = list(SPECS)
#: the rows whose constructor takes an lr (Adafactor refuses one with relative_step=True, as transformers does)
EXPLICIT_LR = [n for n in NAMES if "lr" in SPECS[n][1]]
MODES = pytest.mark.parametrize("fused", [False, True], ids=["classic", "fused"])
SHAPES = {"0d": (), "1d": (5,), "2d": (4, 6), "odd": (7, 13), "3d": (2, 3, 5), "empty": (0, 4)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
#: a model with every kind of shape, for the tests that are not per shape
MIXED = [(4, 6), (5,), (), (2, 3, 5), (0, 4)]


def make_opt(name: str, params, fused: bool = False, **overrides):
    cls, kwargs = SPECS[name]
    return cls(params, **{**kwargs, **overrides}, fused=fused)


class Bag(nn.Module):
    """Free parameters ``w0, w1, ...`` of the given shapes. ``loss(t)`` is sum(w * x_t) + 0.1 sum(w^2) with data x_t
    drawn from the seed ``t``, so the gradient x_t + 0.2 w depends on the weights."""

    def __init__(self, shapes, dtype=torch.float32, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for i, s in enumerate(shapes):
            self.register_parameter(f"w{i}", nn.Parameter(torch.randn(s, generator=g).to(dtype)))

    def loss(self, t: int) -> Tensor:
        g = torch.Generator().manual_seed(1000 + t)
        total = 0
        for p in self.parameters():
            x = torch.randn(p.shape, generator=g).to(p.dtype)
            total = total + (p * x).sum() + 0.1 * (p * p).sum()
        return total


def train(model: Bag, opt, steps: int, start: int = 0, sched=None) -> None:
    """The plain loop: backward, step, zero_grad (the same code in both modes)."""
    for t in range(start, start + steps):
        model.loss(t).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()


def params_of(opt) -> list[Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def snapshot(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a, b) -> None:
    """Bit for bit, same dtypes."""
    a, b = list(a), list(b)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=0, atol=0)


def assert_all_changed(before, model) -> None:
    for b, p in zip(before, model.parameters()):
        if p.numel():
            assert not torch.equal(b, p.detach()), f"a parameter of shape {tuple(p.shape)} was not updated"


def assert_same_tree(a, b, where: str = "state_dict") -> None:
    """Two state dicts are equal: same keys, tensors bit for bit with the same dtype."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def run(name: str, fused: bool, dtype, shapes, steps: int = 2, **overrides):
    model = Bag(shapes, dtype)
    opt = make_opt(name, model.parameters(), fused, **overrides)
    train(model, opt, steps)
    return model, opt


# ------------------------------------------------------------------ every dtype and shape
@pytest.mark.filterwarnings("error::RuntimeWarning")  # e.g. a spurious non-finite report
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@MODES
@pytest.mark.parametrize("name", NAMES)
def test_step_updates_and_stays_finite(name, fused, dtype, shape):
    model = Bag([SHAPES[shape]], DTYPES[dtype])
    opt = make_opt(name, model.parameters(), fused)
    for t in range(2):
        before = snapshot(model)
        train(model, opt, 1, start=t)
        assert_all_changed(before, model)
    for p in model.parameters():
        assert p.dtype == DTYPES[dtype] and p.grad is None
        assert torch.isfinite(p).all()
    assert all(torch.isfinite(v).all() for st in opt.state.values() for v in st.values() if isinstance(v, Tensor))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_fused_equals_classic(name, dtype, shape):
    classic, _ = run(name, False, DTYPES[dtype], [SHAPES[shape]], steps=3)
    fused, _ = run(name, True, DTYPES[dtype], [SHAPES[shape]], steps=3)
    assert_same(fused.parameters(), classic.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_fp64_parameters_keep_fp64_state(name):
    _, opt = run(name, False, torch.float64, MIXED, steps=1)
    for st in opt.state.values():
        for k, v in st.items():
            if k != "step" and v.is_floating_point():
                assert v.dtype == torch.float64, f"state {k!r} of an fp64 parameter is {v.dtype}"


@MODES
@pytest.mark.parametrize("shape", ["0d", "1d", "2d", "odd", "3d"])
@pytest.mark.parametrize("name", ["adalomo", "adafactor"])
def test_fp64_maths_match_the_float64_reference(name, shape, fused):
    """fp64 parameters get fp64 maths: three steps equal tests/reference.py to ~1e-12."""
    model = Bag([SHAPES[shape]], torch.float64)
    ref = RefFactored(model.w0)
    opt = make_opt(name, model.parameters(), fused)
    for t in range(3):
        (g,) = torch.autograd.grad(model.loss(t), [model.w0])  # the gradient the optimizer is about to see
        if name == "adalomo":
            ref.adalomo_step(g, lr=SPECS[name][1]["lr"])
        else:
            ref.adafactor_step(g)
        train(model, opt, 1, start=t)
        torch.testing.assert_close(model.w0.detach(), ref.p, rtol=1e-12, atol=1e-14)


@MODES
@pytest.mark.parametrize("cls", [AdaLomo, Adafactor])
def test_float64_parameter_snippet(cls, fused):
    """The report's reproduction: an fp64 parameter, a gradient, a step."""
    p = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    o = cls([p], fused=fused)
    before = p.detach().clone()
    if fused:
        (p * torch.randn_like(p)).sum().backward()
    else:
        p.grad = torch.randn_like(p)
    o.step()
    assert p.dtype == torch.float64 and torch.isfinite(p).all() and not torch.equal(p.detach(), before)


# ------------------------------------------------------------------ checkpoints and copies
@pytest.mark.parametrize("dtype", DTYPES)
@MODES
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_and_bit_identical_resume(name, fused, dtype):
    dtype = DTYPES[dtype]
    full, _ = run(name, fused, dtype, MIXED, steps=4)

    part, opt = run(name, fused, dtype, MIXED, steps=2)
    buf = io.BytesIO()
    torch.save({"model": part.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)

    resumed = Bag(MIXED, dtype, seed=1)  # other weights, overwritten by the checkpoint
    resumed.load_state_dict(ck["model"])
    opt2 = make_opt(name, resumed.parameters(), fused)
    opt2.load_state_dict(ck["opt"])
    assert_same_tree(opt2.state_dict(), ck["opt"])
    train(resumed, opt2, 2, start=2)
    assert_same(resumed.parameters(), full.parameters())


COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda obj: pickle.loads(pickle.dumps(obj))}


@pytest.mark.parametrize("how", COPIES)
@pytest.mark.parametrize("name", NAMES)
def test_copy_of_an_optimizer_can_step(name, how):
    """A deep-copied or pickled classic optimizer has its own parameters and state, and steps like the original."""
    model, opt = run(name, False, torch.float32, MIXED)
    clone = COPIES[how](opt)
    assert not clone.fused
    assert_same_tree(clone.state_dict(), opt.state_dict())
    mine, theirs = params_of(opt), params_of(clone)
    assert all(a is not b for a, b in zip(mine, theirs))
    g = torch.Generator().manual_seed(7)
    for a, b in zip(mine, theirs):
        a.grad = torch.randn(a.shape, generator=g)
        b.grad = a.grad.clone()
    opt.step()
    clone.step()
    assert_same(theirs, mine)
    assert_same_tree(clone.state_dict(), opt.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_of_model_and_fused_optimizer(name):
    """``copy.deepcopy((model, opt))`` of a fused optimizer: a fused optimizer of the copied model, which updates
    the copy inside backward and leaves the original alone; the original keeps working."""
    model, opt = run(name, True, torch.float32, MIXED, steps=1)
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.fused
    assert all(a is b for a, b in zip(params_of(opt2), model2.parameters()))
    original, original_state = snapshot(model), copy.deepcopy(opt.state_dict())
    before = snapshot(model2)
    model2.loss(1).backward()
    assert_all_changed(before, model2)  # inside backward, before step()
    assert all(p.grad is None for p in model2.parameters())
    opt2.step()
    assert_same(model.parameters(), original)
    assert_same_tree(opt.state_dict(), original_state)
    train(model, opt, 1, start=1)
    assert_same(model.parameters(), model2.parameters())


# ------------------------------------------------------------------ how parameters are passed
def _split(pairs):
    return pairs[:2], pairs[2:]


FORMS = {  # form -> (named, plain): the same parameters, with names and without
    "named_parameters": lambda m: (m.named_parameters(), m.parameters()),
    "named_groups": lambda m: ([{"params": part} for part in _split(list(m.named_parameters()))],
                               [{"params": [p for _, p in part]} for part in _split(list(m.named_parameters()))]),
    "module": lambda m: (m, m.parameters()),
}


@pytest.mark.parametrize("form", FORMS)
@MODES
@pytest.mark.parametrize("name", NAMES)
def test_named_parameters_work_like_parameters(name, fused, form):
    """``Opt(model.named_parameters())``, groups of (name, tensor) pairs, and a module (lomo-optim's
    ``AdaLomo(model)``) work like ``model.parameters()`` and keep the names in ``param_groups[i]["param_names"]``."""
    named_model, plain_model = Bag(MIXED), Bag(MIXED)
    named, _ = FORMS[form](named_model)
    _, plain = FORMS[form](plain_model)
    opt = make_opt(name, named, fused)
    ref = make_opt(name, plain, fused)
    names = [n for g in opt.param_groups for n in g["param_names"]]
    assert names == [n for n, _ in named_model.named_parameters()]
    assert [g["param_names"] for g in opt.state_dict()["param_groups"]] == [g["param_names"] for g in opt.param_groups]
    train(named_model, opt, 2)
    train(plain_model, ref, 2)
    assert_same(named_model.parameters(), plain_model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_parameter_unfrozen_later_is_updated(name):
    """Progressive unfreezing: a parameter frozen at construction and unfrozen later is updated from then on, in
    both modes, with the same values (fused mode may apply its first update at the end of backward or in step())."""
    results = []
    for fused in (False, True):
        model = Bag([(4, 6), (5,)])
        model.w0.requires_grad_(False)
        opt = make_opt(name, model.parameters(), fused)
        frozen = model.w0.detach().clone()
        train(model, opt, 1)
        assert torch.equal(model.w0, frozen)
        model.w0.requires_grad_(True)
        snapshots = []
        for t in (1, 2):
            before = snapshot(model)
            train(model, opt, 1, start=t)
            assert_all_changed(before, model)
            snapshots += snapshot(model)
        results.append(snapshots)
    assert_same(results[1], results[0])


@MODES
@pytest.mark.parametrize("name", NAMES)
def test_all_parameters_frozen_at_construction(name, fused):
    """torch accepts an optimizer whose parameters are all frozen (a warning is allowed); it works once unfrozen."""
    model = Bag(MIXED).requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make_opt(name, model.parameters(), fused)
    model.requires_grad_(True)
    before = snapshot(model)
    train(model, opt, 1)
    assert_all_changed(before, model)


@MODES
@pytest.mark.parametrize("name", NAMES)
def test_param_group_added_later_is_updated(name, fused):
    model = Bag([(4, 6), (5,)])
    opt = make_opt(name, [model.w0], fused)
    train(model, opt, 1)
    model.zero_grad(set_to_none=True)  # w1's gradient of the step before it joined
    opt.add_param_group({"params": [model.w1]})
    before = snapshot(model)
    train(model, opt, 1, start=1)
    assert_all_changed(before, model)
    assert float(opt.state[model.w1]["step"]) == 1 and float(opt.state[model.w0]["step"]) == 2


# ------------------------------------------------------------------ step()
@MODES
@pytest.mark.parametrize("name", NAMES)
def test_step_with_closure_returns_the_loss(name, fused):
    model, ref = Bag(MIXED), Bag(MIXED)
    opt = make_opt(name, model.parameters(), fused)
    losses = []

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = model.loss(0)
        loss.backward()
        losses.append(loss)
        return loss

    assert opt.step(closure) is losses[0]
    train(ref, make_opt(name, ref.parameters(), fused), 1)
    assert_same(model.parameters(), ref.parameters())


@MODES
@pytest.mark.parametrize("name", EXPLICIT_LR)
def test_tensor_lr_equals_float_lr(name, fused):
    lr = SPECS[name][1]["lr"]
    tensor_lr, _ = run(name, fused, torch.float32, MIXED, lr=torch.tensor(lr))
    float_lr, _ = run(name, fused, torch.float32, MIXED, lr=lr)
    assert_same(tensor_lr.parameters(), float_lr.parameters())


@MODES
@pytest.mark.parametrize("name", NAMES)
def test_lr_scheduler_scales_the_update(name, fused):
    """A LambdaLR that halves the lr after two steps halves the third update (same state, same gradient). For
    Adafactor's relative step the group lr is the cap of rho_t = min(cap, 1/sqrt(t)), which binds at t = 3."""
    a, b = Bag([(4, 6), (5,)]), Bag([(4, 6), (5,)])
    opt_a, opt_b = make_opt(name, a.parameters(), fused), make_opt(name, b.parameters(), fused)
    sched = LambdaLR(opt_b, lambda epoch: 1.0 if epoch < 2 else 0.5)
    train(a, opt_a, 2)
    train(b, opt_b, 2, sched=sched)
    assert_same(b.parameters(), a.parameters())
    assert opt_b.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"] / 2
    before = snapshot(a)
    train(a, opt_a, 1, start=2)
    train(b, opt_b, 1, start=2)
    for p0, pa, pb in zip(before, a.parameters(), b.parameters()):
        torch.testing.assert_close(pb.detach() - p0, (pa.detach() - p0) / 2, rtol=1e-4, atol=1e-6)


@MODES
@pytest.mark.parametrize("name", NAMES)
def test_step_without_gradients_is_a_noop(name, fused):
    model, opt = run(name, fused, torch.float32, MIXED)
    before, state = snapshot(model), copy.deepcopy(opt.state_dict())
    opt.zero_grad(set_to_none=True)
    opt.step()
    assert_same(model.parameters(), before)
    assert_same_tree(opt.state_dict(), state)


# ------------------------------------------------------------------ settings and hooks
@MODES
@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_takes_edited_group_settings(name, fused):
    """A checkpoint whose group settings were edited (lr, weight_decay) loads with the edited values, and the next
    step uses them exactly as if they had been set on the running optimizer."""
    a, opt_a = run(name, fused, torch.float32, MIXED)
    edits = {"lr": opt_a.param_groups[0]["lr"] / 4, "weight_decay": 0.125}
    sd = copy.deepcopy(opt_a.state_dict())
    sd["param_groups"][0].update(edits)
    b = Bag(MIXED)
    b.load_state_dict(a.state_dict())
    opt_b = make_opt(name, b.parameters(), fused)
    opt_b.load_state_dict(sd)
    assert {k: opt_b.param_groups[0][k] for k in edits} == edits
    opt_a.param_groups[0].update(edits)
    train(a, opt_a, 1, start=2)
    train(b, opt_b, 1, start=2)
    assert_same(b.parameters(), a.parameters())


@MODES
@pytest.mark.parametrize("name", NAMES)
def test_step_hooks_fire(name, fused):
    model = Bag(MIXED)
    opt = make_opt(name, model.parameters(), fused)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o)))
    train(model, opt, 2)
    assert calls == [("pre", opt), ("post", opt)] * 2


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_hooks_fire(name):
    model, opt = run(name, False, torch.float32, MIXED, steps=1)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("save pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "note": "post hook"})
    sd = opt.state_dict()
    assert calls == ["save pre"] and sd["note"] == "post hook"
    del sd["note"]

    def edit(o, sd):  # a load pre-hook may return a changed state dict
        sd = copy.deepcopy(sd)
        sd["param_groups"][0]["weight_decay"] = 0.25
        return sd

    opt2 = make_opt(name, Bag(MIXED).parameters())
    opt2.register_load_state_dict_pre_hook(edit)
    opt2.register_load_state_dict_post_hook(lambda o: calls.append("load post"))
    opt2.load_state_dict(sd)
    assert calls == ["save pre", "load post"] and opt2.param_groups[0]["weight_decay"] == 0.25


# ------------------------------------------------------------------ zero-size tensors
@pytest.mark.parametrize("nonfinite", ["warn", "raise"])
@MODES
@pytest.mark.parametrize("name", NAMES)
def test_zero_size_tensor_is_not_reported_nonfinite(name, fused, nonfinite):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _, opt = run(name, fused, torch.float32, [(0, 4), (4, 6)], nonfinite=nonfinite)
        opt.state_dict()  # "warn" mode reports flags still in flight here at the latest


@MODES
@pytest.mark.parametrize("name", NAMES)
def test_zero_size_tensor_keeps_the_loss_scale(name, fused):
    scaler = DynamicLossScaler(init_scale=2.0**8, growth_interval=1000)
    model = Bag([(0, 4), (4, 6)])
    opt = make_opt(name, model.parameters(), fused, loss_scaler=scaler)
    for t in range(2):
        opt.scale_loss(model.loss(t)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert float(scaler.scale) == 2.0**8
