"""fastrlhf.inject(model) inside training: a trainer no one here wrote (`transformers.Trainer`)
trains an injected tiny Llama exactly like the plain one, and with the triton backend (the
interpreter on the CPU) the loss and every parameter gradient equal HF's."""
import copy

import pytest
import torch
import transformers
from packaging.version import Version

import fastrlhf
from fastrlhf import ops
from conftest import left_padded_batch


pytestmark = pytest.mark.usefixtures("one_thread")
# transformers < 4.54 has no attention interface to inject into: inject refuses the attention
# there (tested in test_inject.py), so on those releases these tests train with the norms only
ATTENTION = Version(Version(transformers.__version__).base_version) >= Version("4.54")


def _inject(model):
    return fastrlhf.inject(model, attention=ATTENTION)


@pytest.fixture(scope="module")
def models(tiny_models):
    return tiny_models


class _Tokens(torch.utils.data.Dataset):
    """Fixed random token rows (labels = inputs: the causal-LM loss)."""

    def __init__(self, n=40, length=8, vocab=96):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(4, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def _trainer_losses(model, out_dir, cpu=True):
    from transformers import Trainer, TrainingArguments
    args = TrainingArguments(output_dir=str(out_dir), max_steps=20, per_device_train_batch_size=2,
                             learning_rate=3e-3, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=cpu, seed=0, data_seed=0, dataloader_num_workers=0,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens())
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_hf_trainer_trains_an_injected_model_like_the_plain_one(models, tmp_path):
    ops.set_backend("torch")
    try:
        plain = _trainer_losses(copy.deepcopy(models["llama"]).train(), tmp_path / "plain")
        injected_model = _inject(copy.deepcopy(models["llama"]).train())
        assert injected_model.config._attn_implementation == ("fastrlhf" if ATTENTION else "sdpa")
        assert any(type(m).__name__ == "FastRMSNorm" for m in injected_model.modules())
        injected = _trainer_losses(injected_model, tmp_path / "injected")
    finally:
        ops.set_backend(None)
    assert len(plain) == len(injected) == 20
    assert plain[-1] < plain[0] - 0.1, "the run did not learn"
    assert injected == pytest.approx(plain, rel=1e-4)


def test_injected_triton_loss_and_every_gradient_equal_hf(models, monkeypatch):
    """Needs the triton backward of attention_prefill and rms_norm (issue 11, part A)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ref = copy.deepcopy(models["llama"]).train()
    fast = _inject(copy.deepcopy(models["llama"]).train())
    ids, mask = left_padded_batch([7, 12, 4], seed=31)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    labels = ids.masked_fill(mask == 0, -100)
    loss_ref = ref(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels).loss
    loss_ref.backward()
    ops.set_backend("triton")
    try:
        assert ops.resolve("attention_prefill", ids.device)[0] == "triton"
        loss = fast(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels).loss
        loss.backward()
    finally:
        ops.set_backend(None)
    assert loss.item() == pytest.approx(loss_ref.item(), rel=2e-5)
    grads_ref = dict(ref.named_parameters())
    total = torch.sqrt(sum(p.grad.norm() ** 2 for p in ref.parameters()))
    for n, p in fast.named_parameters():
        g_ref = grads_ref[n].grad
        assert p.grad is not None, f"no gradient reached {n}"
        assert (p.grad - g_ref).norm() <= 1e-4 * g_ref.norm() + 1e-6 * total, n


@pytest.mark.gpu
def test_hf_trainer_with_the_triton_backend_on_a_gpu(models, tmp_path):
    """The GPU suite's version: the injected model's attention and norms (forward and backward) on
    the triton kernels, fp32, the same 20 losses as the plain model."""
    plain = _trainer_losses(copy.deepcopy(models["llama"]).cuda().train(), tmp_path / "plain", cpu=False)
    ops.set_backend("triton")
    try:
        model = _inject(copy.deepcopy(models["llama"]).cuda().train())
        assert ops.resolve("attention_prefill", torch.device("cuda"))[0] == "triton"
        injected = _trainer_losses(model, tmp_path / "injected", cpu=False)
    finally:
        ops.set_backend(None)
    assert injected == pytest.approx(plain, rel=1e-3)
