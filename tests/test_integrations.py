"""transformers Trainer and accelerate integrations, on tiny randomly initialised LLaMA / GPT-2 models (CPU)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    get_scheduler,
)

from adalomo import Adafactor, AdaLomo, AdaPM, Lomo  # noqa: E402
from adalomo.integrations import accelerate as adalomo_accelerate  # noqa: E402
from adalomo.integrations.transformers import (  # noqa: E402
    AdaLomoTrainer,
    check_training_args,
    create_optimizer,
    parameter_groups,
)

VOCAB = 128
# ADALOMO_TEST_DEVICE=cuda runs the same tests on a GPU (model, optimizer state and checkpoints on the device)
USE_CPU = os.environ.get("ADALOMO_TEST_DEVICE", "cpu") == "cpu"


class ToyLM(torch.utils.data.Dataset):
    """Arithmetic sequences mod VOCAB: learnable, deterministic, in memory."""

    def __init__(self, n: int = 48, length: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        stride = torch.randint(1, 5, (n, 1), generator=g)
        self.x = (start + stride * torch.arange(length)) % VOCAB

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def tiny_model(kind: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = LlamaForCausalLM(cfg)
    else:  # GPT-2: biases, LayerNorms, lm_head tied to the token embedding
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                         eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
    return model.to(dtype)


def targs(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), use_cpu=USE_CPU, report_to="none", per_device_train_batch_size=4, max_steps=6,
                learning_rate=1e-2, warmup_steps=2, weight_decay=0.1, max_grad_norm=0.0, logging_steps=1,
                save_strategy="no", disable_tqdm=True, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def max_diff(a, b) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


def train(model, args, trainer_cls=AdaLomoTrainer, resume=None, **kw):
    trainer = trainer_cls(model=model, args=args, train_dataset=ToyLM(), **kw)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(autouse=True)
def _quiet_and_single_threaded():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and the CI machine is shared
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- Trainer


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_fused_trainer_equals_classic_and_logs(tmp_path, kind):
    fused = train(tiny_model(kind), targs(tmp_path / "f"))
    classic = train(tiny_model(kind), targs(tmp_path / "c"), adalomo_kwargs={"fused": False})
    opt = fused.optimizer.optimizer  # accelerate's AcceleratedOptimizer wraps ours
    assert isinstance(opt, AdaLomo) and opt.fused and not classic.optimizer.optimizer.fused
    assert max_diff(fused.model, classic.model) == 0.0
    assert all(p.grad is None for p in fused.model.parameters())
    # the Trainer's weight-decay groups: nothing named bias/norm decays
    names = {id(p): n for n, p in fused.model.named_parameters()}
    decayed = [names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert decayed and not any("bias" in n or "norm" in n or n.startswith("ln_") or ".ln_" in n for n in decayed)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.1, 0.0}
    # loss and the scheduled lr are logged; a fused step logs no (meaningless) grad_norm
    logs = [h for h in fused.state.log_history if "loss" in h]
    assert len(logs) == 6 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert [h["learning_rate"] for h in logs] == pytest.approx([0.0, 5e-3, 1e-2, 7.5e-3, 5e-3, 2.5e-3])
    assert not any("grad_norm" in h for h in logs)
    assert all("grad_norm" in h for h in classic.state.log_history if "loss" in h)


@pytest.mark.parametrize("kind,dtype", [("llama", torch.float32), ("gpt2", torch.float32), ("llama", torch.bfloat16)])
def test_resume_continues_identically(tmp_path, kind, dtype):
    """6 steps == 3 steps + checkpoint + resume in a new process state + 3 steps (two-pass clipping on)."""
    args = dict(save_strategy="steps", save_steps=3, max_grad_norm=0.5, bf16=dtype == torch.bfloat16)
    kw = {"adalomo_kwargs": {"clip_grad_norm": 0.5}}
    full = train(tiny_model(kind, dtype=dtype), targs(tmp_path, **args), **kw)
    ckpt = tmp_path / "checkpoint-3"
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "scheduler.pt").is_file()
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert all(float(s["step"]) == 3 for s in saved["state"].values())
    resumed = train(tiny_model(kind, seed=1, dtype=dtype), targs(tmp_path, **args), resume=str(ckpt), **kw)
    assert max_diff(full.model, resumed.model) == 0.0
    opt = resumed.optimizer.optimizer
    assert all(float(opt.state[p]["step"]) == 6 for p in resumed.model.parameters())
    # the statistics stay fp32 when restored into bf16 parameters too
    assert all(v.dtype == torch.float32 for s in opt.state.values() for k, v in s.items() if k != "step")
    norms = [h["grad_norm"] for h in resumed.state.log_history if "grad_norm" in h]
    assert len(norms) == 6 and all(n > 0.5 for n in norms)  # logged (3 restored + 3 new), clipping active


def test_two_pass_clipping_matches_trainer_clipping(tmp_path):
    fused = train(tiny_model(), targs(tmp_path / "f", max_grad_norm=0.5), adalomo_kwargs={"clip_grad_norm": 0.5})
    classic = train(tiny_model(), targs(tmp_path / "c", max_grad_norm=0.5), adalomo_kwargs={"fused": False})
    assert max_diff(fused.model, classic.model) < 1e-6
    nf = [h["grad_norm"] for h in fused.state.log_history if "grad_norm" in h]
    nc = [h["grad_norm"] for h in classic.state.log_history if "grad_norm" in h]
    assert nf == pytest.approx(nc, rel=1e-5) and min(nf) > 0.5
    # max_grad_norm=0 with clip_grad_norm set: still clips (and logs the norm)
    again = train(tiny_model(), targs(tmp_path / "g"), adalomo_kwargs={"clip_grad_norm": 0.5})
    assert max_diff(fused.model, again.model) == 0.0


@pytest.mark.parametrize("ckpt_kwargs", [None, {"preserve_rng_state": True}, {"use_reentrant": True}])
def test_gradient_checkpointing(tmp_path, ckpt_kwargs):
    clip = dict(max_grad_norm=0.5)  # the two-pass norm backward goes through the checkpointed graph as well
    ref = train(tiny_model(), targs(tmp_path / "ref", **clip), adalomo_kwargs={"clip_grad_norm": 0.5})
    args = targs(tmp_path / "gc", gradient_checkpointing=True, gradient_checkpointing_kwargs=ckpt_kwargs, **clip)
    gc = train(tiny_model(), args, adalomo_kwargs={"clip_grad_norm": 0.5})
    assert gc.model.is_gradient_checkpointing
    if ckpt_kwargs and "use_reentrant" not in ckpt_kwargs:
        used = getattr(gc.args, "activation_checkpointing_kwargs", None) or gc.args.gradient_checkpointing_kwargs
        assert used["use_reentrant"] is False  # made safe for fused hooks (transformers < 5.2x: the old name)
    # reentrant is exact here too (no weight is used both inside and outside a checkpointed layer; when one is,
    # the double firing raises, see tests/test_fused.py)
    assert max_diff(ref.model, gc.model) == 0.0


def test_bf16_autocast(tmp_path):
    fused = train(tiny_model(), targs(tmp_path / "f", bf16=True))
    assert fused.accelerator.mixed_precision == "bf16"
    classic = train(tiny_model(), targs(tmp_path / "c", bf16=True), adalomo_kwargs={"fused": False})
    assert max_diff(fused.model, classic.model) == 0.0
    assert all(p.dtype == torch.float32 for p in fused.model.parameters())


def test_loss_decreases(tmp_path):
    trainer = train(tiny_model(), targs(tmp_path, max_steps=30, learning_rate=3e-2, warmup_steps=3,
                                        num_train_epochs=3))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1


@pytest.mark.parametrize("name,cls", [("adalomo", AdaLomo), ("adafactor", Adafactor), ("lomo", Lomo),
                                      ("adapm", AdaPM)])
def test_optimizer_names(tmp_path, name, cls):
    # args.optim="adalomo"/"adafactor" selects ours (the Trainer would otherwise pass learning_rate to backward)
    if name in ("lomo", "adapm"):
        trainer = train(tiny_model(), targs(tmp_path, max_steps=2), adalomo_optimizer=name)
    else:
        trainer = train(tiny_model(), targs(tmp_path, max_steps=2, optim=name))
    opt = trainer.optimizer.optimizer
    assert type(opt) is cls and opt.fused and trainer.state.global_step == 2
    if cls is Adafactor:  # like the Trainer's optim="adafactor": explicit, scheduled lr
        assert not opt.param_groups[0]["relative_step"] and not opt.param_groups[0]["scale_parameter"]
    if cls is AdaPM:  # named parameters for its momentum policy, the Trainer's Adam betas
        assert "param_names" in opt.param_groups[0] and opt.param_groups[0]["betas"] == (0.9, 0.999)
        assert opt.momentum_kind(trainer.model.model.layers[0].self_attn.o_proj.weight) == "none"


def test_stock_trainer_with_factory(tmp_path):
    args = targs(tmp_path / "stock")
    model = tiny_model()  # built on the CPU: accelerate moves the optimizer state with the model
    stock = train(model, args, trainer_cls=Trainer, optimizers=(create_optimizer(model, args), None))
    ours = train(tiny_model(), targs(tmp_path / "ours"))
    assert max_diff(stock.model, ours.model) == 0.0
    assert all(v.device == p.device for p, s in stock.optimizer.state.items() for v in s.values() if v.dim())
    # two-pass clipping needs AdaLomoTrainer: with the stock training_step it fails loudly on the first step
    model, args = tiny_model(), targs(tmp_path / "clip", max_grad_norm=1.0)
    opt = create_optimizer(model, args, clip_grad_norm=1.0)
    with pytest.raises(RuntimeError, match="grad_norm"):
        train(model, args, trainer_cls=Trainer, optimizers=(opt, None))


@pytest.mark.skipif(not torch.cuda.is_available() or USE_CPU, reason="GradScaler needs CUDA")
def test_fp16_gradscaler_classic_works_fused_refused(tmp_path):
    trainer = train(tiny_model(), targs(tmp_path, fp16=True, max_grad_norm=1.0), adalomo_kwargs={"fused": False})
    assert trainer.accelerator.scaler is not None
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    with pytest.raises(ValueError, match="GradScaler"):
        AdaLomoTrainer(model=tiny_model(), args=targs(tmp_path, fp16=True), train_dataset=ToyLM())


@pytest.mark.parametrize("kw,adalomo_kwargs,match", [
    ({"max_grad_norm": 1.0}, {}, "max_grad_norm=0"),
    ({"max_grad_norm": 1.0}, {"clip_grad_norm": 0.5}, "disagree"),
    ({"fp16": True}, {}, "bf16"),
    ({"max_grad_norm": 1.0}, {"fused": False, "clip_grad_norm": 1.0}, "clipped twice"),
])
def test_settings_that_would_be_silently_wrong_raise(tmp_path, kw, adalomo_kwargs, match):
    try:
        args = targs(tmp_path, **kw)
    except (ValueError, ImportError) as e:  # e.g. fp16 refused on this machine by transformers itself
        pytest.skip(f"TrainingArguments({kw}) not constructible here: {e}")
    with pytest.raises(ValueError, match=match):
        AdaLomoTrainer(model=tiny_model(), args=args, train_dataset=ToyLM(), adalomo_kwargs=adalomo_kwargs)
    model = tiny_model()
    with pytest.raises(ValueError, match=match):
        create_optimizer(model, args, **adalomo_kwargs)
    AdaLomo(model.parameters(), fused=True)  # the failed factory left no hooks behind


def test_what_cannot_run_on_several_processes_says_what_to_do():
    """DeepSpeed names the FSDP2 arguments; FSDP1 asks for version 2; a fused optimizer built on the unsharded model
    of a multi-process run (the stock Trainer would wrap it in DDP) points to AdaLomoTrainer."""
    from types import SimpleNamespace

    args = dict(max_grad_norm=0.0, world_size=1, n_gpu=1, fsdp_plugin_args=None)
    with pytest.raises(ValueError, match=r'fsdp_config=\{"version": 2\}'):
        check_training_args(SimpleNamespace(**{**args, "deepspeed": "ds.json"}), fused=True)
    check_training_args(SimpleNamespace(**{**args, "deepspeed": "ds.json"}), fused=False)  # classic: DeepSpeed's own
    for fused in (True, False):
        with pytest.raises(ValueError, match="FSDP1 flattens"):
            check_training_args(SimpleNamespace(**{**args, "fsdp_plugin_args": {"fsdp_version": 1}}), fused=fused)
    model = tiny_model()
    two = SimpleNamespace(**{**args, "world_size": 2}, learning_rate=1e-3, weight_decay=0.0,
                          gradient_accumulation_steps=1)
    with pytest.raises(ValueError, match="AdaLomoTrainer"):
        create_optimizer(model, two)
    create_optimizer(model, two, fused=False)  # classic under DDP: fine


def test_args_changed_after_init_are_checked(tmp_path):
    trainer = AdaLomoTrainer(model=tiny_model(), args=targs(tmp_path), train_dataset=ToyLM())
    trainer.args.max_grad_norm = 1.0
    with pytest.raises(ValueError, match="max_grad_norm=1"):
        trainer.train()


def test_classic_mode_keeps_trainer_features(tmp_path):
    # gradient accumulation + the Trainer's own clipping work in classic mode
    trainer = train(tiny_model(), targs(tmp_path, gradient_accumulation_steps=2, max_grad_norm=1.0, max_steps=2),
                    adalomo_kwargs={"fused": False})
    assert trainer.state.global_step == 2
    assert all(float(s["step"]) == 2 for s in trainer.optimizer.optimizer.state.values())


@pytest.mark.parametrize("name", ["adalomo", "adafactor", "lomo", "adapm"])
def test_gradient_accumulation_in_the_trainer(tmp_path, name):
    """gradient_accumulation_steps=4 in fused mode: classic mode's weights bit for bit, and one step on the 4x larger
    batch (the same samples: the Trainer's micro-batches are consecutive slices of its order) to fp32 rounding."""
    common = dict(max_steps=3, warmup_steps=1)
    fused = train(tiny_model(), targs(tmp_path / "f", per_device_train_batch_size=2, gradient_accumulation_steps=4,
                                      **common), adalomo_optimizer=name)
    classic = train(tiny_model(), targs(tmp_path / "c", per_device_train_batch_size=2, gradient_accumulation_steps=4,
                                        **common), adalomo_optimizer=name, adalomo_kwargs={"fused": False})
    big = train(tiny_model(), targs(tmp_path / "b", per_device_train_batch_size=8, **common), adalomo_optimizer=name)
    assert max_diff(fused.model, classic.model) == 0.0
    assert max_diff(fused.model, big.model) < 1e-6
    opt = fused.optimizer.optimizer
    assert opt.fused and all(float(s["step"]) == 3 for s in opt.state.values())
    assert all(p.grad is None for p in fused.model.parameters())
    assert [h["loss"] for h in fused.state.log_history if "loss" in h] == \
        pytest.approx([h["loss"] for h in big.state.log_history if "loss" in h], rel=1e-6)


def test_gradient_accumulation_with_clipping_and_a_short_last_window(tmp_path):
    """With clipping the window accumulates and step() clips its sum (the Trainer's own clipping in classic mode);
    an epoch of 6 micro-batches with gradient_accumulation_steps=4 ends with a window of 2, applied by step()."""
    kw = dict(max_grad_norm=0.5, per_device_train_batch_size=8, gradient_accumulation_steps=4, num_train_epochs=2,
              max_steps=-1, warmup_steps=1)
    fused = train(tiny_model(), targs(tmp_path / "f", **kw), adalomo_kwargs={"clip_grad_norm": 0.5})
    classic = train(tiny_model(), targs(tmp_path / "c", **kw), adalomo_kwargs={"fused": False})
    assert fused.state.global_step == classic.state.global_step == 4
    assert max_diff(fused.model, classic.model) < 1e-6
    nf = [h["grad_norm"] for h in fused.state.log_history if "grad_norm" in h]
    nc = [h["grad_norm"] for h in classic.state.log_history if "grad_norm" in h]
    assert len(nf) == 4 and nf == pytest.approx(nc, rel=1e-5) and min(nf) > 0.5


def test_stock_trainer_accumulates_with_the_factory(tmp_path):
    """create_optimizer(model, args) takes accumulation_steps from args: the stock Trainer's loop (K backwards, then
    step()) accumulates exactly in fused mode too."""
    args = targs(tmp_path / "stock", per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=3)
    model = tiny_model()
    opt = create_optimizer(model, args)
    assert opt.accumulation_steps == 4
    stock = train(model, args, trainer_cls=Trainer, optimizers=(opt, None))
    ours = train(tiny_model(), targs(tmp_path / "ours", per_device_train_batch_size=2, gradient_accumulation_steps=4,
                                     max_steps=3))
    assert max_diff(stock.model, ours.model) == 0.0


def test_factory_details():
    model = tiny_model("gpt2")
    groups = parameter_groups(model, 0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))  # tied weight once
    with pytest.warns(UserWarning, match="relative to the weight RMS"):
        opt = create_optimizer(model, lr=2e-5)  # an AdamW-style lr for AdaLomo
    opt.remove_hooks()
    opt = create_optimizer(model, name="adafactor", relative_step=True, fused=False)
    assert opt.param_groups[0]["relative_step"]
    with pytest.raises(ValueError, match="unknown optimizer"):
        create_optimizer(model, name="adamw")
    check_training_args(targs("/tmp/unused"), fused=True)  # max_grad_norm=0: fine


# ----------------------------------------------------------------------------------------- accelerate


def _reset_accelerate():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _accelerate_run(steps, *, clip=None, ckpt_dir=None, save_at=None, resume=None, ga=1, fused=True):
    _reset_accelerate()
    accelerator = Accelerator(cpu=USE_CPU, gradient_accumulation_steps=ga)
    torch.manual_seed(0)
    model = tiny_model(seed=1 if resume else 0).to(accelerator.device)
    opt = AdaLomo(parameter_groups(model, 0.1), lr=1e-2, fused=fused, clip_grad_norm=clip)
    sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=steps)
    loader = torch.utils.data.DataLoader(ToyLM(), batch_size=4 // ga, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    start = 0
    if resume:
        accelerator.load_state(resume)
        start = save_at
        loader = accelerator.skip_first_batches(loader, start)
    norms, step = [], start
    for batch in loader:
        if step == steps:
            break
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            norm = adalomo_accelerate.backward(accelerator, opt, loss)
            opt.step()  # accelerate calls ours at the end of each window only; no-ops in fused mode
            sched.step()
            opt.zero_grad()
        if not accelerator.sync_gradients:
            continue
        norms.append(norm)
        step += 1
        if step == save_at and ckpt_dir and not resume:
            accelerator.save_state(ckpt_dir)
    _reset_accelerate()
    return model, opt, norms


def test_accelerate_loop_resume_and_clipping(tmp_path):
    full, opt, norms = _accelerate_run(6, clip=0.5, ckpt_dir=tmp_path / "state", save_at=3)
    assert isinstance(opt, accelerate.optimizer.AcceleratedOptimizer)
    assert len(norms) == 6 and all(n is not None and n > 0 for n in norms)
    assert os.path.isfile(tmp_path / "state" / "optimizer.bin")
    resumed, opt2, _ = _accelerate_run(6, clip=0.5, ckpt_dir=tmp_path / "state", save_at=3,
                                       resume=tmp_path / "state")
    assert max_diff(full, resumed) == 0.0
    assert all(float(s["step"]) == 6 for s in opt2.optimizer.state.values())
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


def test_accelerate_gradient_accumulation():
    """accelerator.accumulate with gradient_accumulation_steps=2 (micro-batches of 2): fused equals classic bit for bit
    and one step on micro-batches of 4 to fp32 rounding."""
    fused, opt, _ = _accelerate_run(4, ga=2)
    classic, _, _ = _accelerate_run(4, ga=2, fused=False)
    big, _, _ = _accelerate_run(4)
    assert max_diff(fused, classic) == 0.0
    assert max_diff(fused, big) < 1e-6
    assert all(float(s["step"]) == 4 for s in opt.optimizer.state.values())


def test_accelerate_checks():
    from types import SimpleNamespace

    model = tiny_model()
    opt = AdaLomo(model.parameters(), fused=True)
    with pytest.raises(TypeError):
        adalomo_accelerate.check_accelerator(SimpleNamespace(distributed_type="NO"), torch.optim.SGD(
            model.parameters(), lr=0.1))
    cases = [(dict(distributed_type="FSDP", is_fsdp2=False), "FSDP2"),
             (dict(distributed_type="FSDP", is_fsdp2=True), "build the optimizer from the prepared"),
             (dict(distributed_type="DEEPSPEED", num_processes=2), "FSDP2"),
             (dict(distributed_type="MULTI_GPU", num_processes=2), "DDP"),
             (dict(distributed_type="NO", scaler=object()), "GradScaler")]
    for fake, match in cases:
        with pytest.raises(ValueError, match=match):
            adalomo_accelerate.check_accelerator(SimpleNamespace(**fake), opt)
    opt.remove_hooks()  # classic mode: only the FSDP checks apply
    adalomo_accelerate.check_accelerator(SimpleNamespace(distributed_type="MULTI_GPU", num_processes=2), opt)
