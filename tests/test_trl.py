"""TRL's SFTTrainer (a Trainer subclass) with the adalomo mixin, on a tiny LLaMA and a tokenizer built here."""

from __future__ import annotations

import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from test_integrations import USE_CPU, max_diff, tiny_model  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from adalomo.integrations.transformers import AdaLomoTrainerMixin  # noqa: E402


class AdaLomoSFTTrainer(AdaLomoTrainerMixin, trl.SFTTrainer):
    pass


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Words w0..w125 of the tiny model's 128-token vocabulary, then [PAD] and [EOS] (nothing downloaded)."""
    vocab = {f"w{i}": i for i in range(126)} | {"[PAD]": 126, "[EOS]": 127}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]")


def sft(out, **adalomo_kwargs):
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 126, (32,), generator=g).tolist()
    strides = torch.randint(1, 5, (32,), generator=g).tolist()
    texts = [" ".join(f"w{(s + k * i) % 126}" for i in range(12)) for s, k in zip(starts, strides)]
    args = trl.SFTConfig(output_dir=str(out), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         learning_rate=1e-2, max_grad_norm=0.0, max_length=32, logging_steps=1, save_strategy="no",
                         report_to="none", use_cpu=USE_CPU, disable_tqdm=True, seed=0)
    data = datasets.Dataset.from_dict({"text": texts})
    trainer = AdaLomoSFTTrainer(model=tiny_model(), args=args, train_dataset=data, processing_class=word_tokenizer(),
                                adalomo_kwargs=adalomo_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer


def test_sft_trainer_fused_with_accumulation_equals_classic(tmp_path):
    fused = sft(tmp_path / "f")
    classic = sft(tmp_path / "c", fused=False)
    opt = fused.optimizer.optimizer
    assert opt.fused and fused.state.global_step == 3
    assert all(float(s["step"]) == 3 for s in opt.state.values())
    assert max_diff(fused.model, classic.model) == 0.0
