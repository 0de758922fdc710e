"""DistillationTrainer on tiny randomly initialised Transformers models built from configs."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    TrainingArguments,
)

from kdistill.hf import (  # noqa: E402
    IGNORE_INDEX,
    DistillationTrainer,
    DistillationTrainingArguments,
)

VOCAB = 37
LENGTH = 12
PAD = 0


def gpt2_config(width: int, vocab: int = VOCAB, **extra) -> GPT2Config:
    return GPT2Config(
        vocab_size=vocab,
        n_positions=32,
        n_embd=width,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=1,
        **extra,
    )


def causal_lm(width: int, seed: int, vocab: int = VOCAB) -> GPT2LMHeadModel:
    # A wide initialisation gives the random models peaked, distinct next-token distributions.
    torch.manual_seed(seed)
    return GPT2LMHeadModel(gpt2_config(width, vocab, initializer_range=0.2))


def causal_examples(valid_lengths: list[int], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Right-padded sequences; the first two tokens are a prompt left out of the loss."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for length in valid_lengths:
        ids = torch.randint(1, VOCAB, (LENGTH,), generator=generator)
        ids[length:] = PAD
        mask = torch.zeros(LENGTH, dtype=torch.long)
        mask[:length] = 1
        labels = ids.clone()
        labels[length:] = IGNORE_INDEX
        labels[:2] = IGNORE_INDEX
        examples.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return examples


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}


def training_args(tmp_path, **overrides) -> DistillationTrainingArguments:
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=0.0,
        weight_decay=0.0,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        data_seed=0,
        temperature=2.0,
        alpha=0.5,
    )
    settings.update(overrides)
    return DistillationTrainingArguments(**settings)


def reference_causal_loss(student, teacher, batch, temperature, alpha):
    """Shifted per-token KD + CE written out with plain torch, normalised by valid targets."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    s = student(**inputs).logits[:, :-1].float()
    with torch.no_grad():
        t = teacher(**inputs).logits[:, :-1].float()
    y = batch["labels"][:, 1:]
    valid = y.ne(IGNORE_INDEX)
    log_ps = torch.log_softmax(s[valid] / temperature, dim=-1)
    log_pt = torch.log_softmax(t[valid] / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum()
    ce = torch.nn.functional.cross_entropy(s[valid], y[valid], reduction="sum")
    n = valid.sum()
    return alpha * temperature**2 * kl / n + (1 - alpha) * ce / n


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Four optimizer steps of pure distillation of a wider teacher into a narrow student."""
    teacher = causal_lm(width=32, seed=1)
    student = causal_lm(width=16, seed=2)
    teacher_before = copy.deepcopy(teacher.state_dict())
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=training_args(
            tmp_path_factory.mktemp("trained"), max_steps=6, alpha=1.0, learning_rate=3e-2
        ),
        train_dataset=causal_examples([12, 10, 8, 12]),
        data_collator=collate,
    )
    trainer.train()
    return trainer, teacher, teacher_before


def test_kd_loss_decreases_over_training(trained):
    trainer, _, _ = trained
    kd = [entry["kd_loss"] for entry in trainer.state.log_history if "kd_loss" in entry]
    assert len(kd) == 6
    assert kd[-1] < 0.7 * kd[0], kd


def test_teacher_weights_never_change_and_teacher_stays_frozen(trained):
    _, teacher, teacher_before = trained
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())


def test_causal_lm_loss_shifts_labels_and_matches_reference(tmp_path):
    teacher, student = causal_lm(32, seed=1), causal_lm(16, seed=2)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=training_args(tmp_path, temperature=3.0, alpha=0.3),
    )
    batch = collate(causal_examples([12, 7, 5]))
    student.eval()
    loss = trainer.compute_loss(student, batch)
    expected = reference_causal_loss(student, teacher, batch, temperature=3.0, alpha=0.3)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_masked_positions_do_not_affect_the_loss(tmp_path):
    teacher, student = causal_lm(32, seed=1), causal_lm(16, seed=2)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=training_args(tmp_path)
    )
    batch = collate(causal_examples([12, 7, 5]))
    student.eval()
    loss = trainer.compute_loss(student, batch)

    # Scramble the tokens at every padded (label -100, attention 0) position.
    changed = {k: v.clone() for k, v in batch.items()}
    padded = changed["attention_mask"] == 0
    scramble = torch.randint(1, VOCAB, changed["input_ids"].shape, generator=torch.Generator())
    changed["input_ids"][padded] = scramble[padded]
    assert not torch.equal(changed["input_ids"], batch["input_ids"])
    torch.testing.assert_close(trainer.compute_loss(student, changed), loss, rtol=0, atol=1e-6)

    # Unmasking those positions does change it: the check above can fail.
    unmasked = {k: v.clone() for k, v in changed.items()}
    unmasked["labels"][padded] = unmasked["input_ids"][padded]
    assert abs(trainer.compute_loss(student, unmasked).item() - loss.item()) > 1e-3


class _PerMicroBatchMean(DistillationTrainer):
    """The common mistake: each micro-batch normalised by its own count."""

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        return batches, None


def _one_step_weights(trainer_class, tmp_path, batch_size, accumulation):
    teacher, student = causal_lm(32, seed=1), causal_lm(16, seed=2)
    trainer = trainer_class(
        model=student,
        teacher_model=teacher,
        args=training_args(
            tmp_path,
            max_steps=1,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            learning_rate=1.0,
        ),
        # Valid target counts 9, 1 | 1, 2: micro-batch halves hold 10 and 3 targets.
        train_dataset=causal_examples([12, 4, 4, 5]),
        data_collator=collate,
    )
    trainer._get_train_sampler = lambda *args, **kwargs: torch.utils.data.SequentialSampler(
        trainer.train_dataset
    )
    trainer.train()
    return {k: v.detach().clone() for k, v in student.named_parameters()}


def test_gradient_accumulation_matches_one_full_batch(tmp_path):
    full = _one_step_weights(DistillationTrainer, tmp_path, batch_size=4, accumulation=1)
    accumulated = _one_step_weights(DistillationTrainer, tmp_path, batch_size=2, accumulation=2)
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=1e-5, atol=1e-6)

    # A per-micro-batch mean over the same uneven halves lands somewhere else.
    naive = _one_step_weights(_PerMicroBatchMean, tmp_path, batch_size=2, accumulation=2)
    gap = max((naive[name] - full[name]).abs().max().item() for name in full)
    assert gap > 1e-3


def test_sequence_classifier_distillation(tmp_path):
    torch.manual_seed(1)
    teacher = GPT2ForSequenceClassification(gpt2_config(32, num_labels=3, initializer_range=0.2))
    torch.manual_seed(2)
    student = GPT2ForSequenceClassification(gpt2_config(16, num_labels=3, initializer_range=0.2))
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, VOCAB, (8, LENGTH), generator=generator)
    with torch.no_grad():
        teacher_choice = teacher(input_ids=input_ids).logits.argmax(-1)
    # Hard labels the teacher mostly agrees with, one of them flipped.
    labels = teacher_choice.clone()
    labels[0] = (labels[0] + 1) % 3
    examples = [
        {"input_ids": ids, "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": y}
        for ids, y in zip(input_ids, labels, strict=True)
    ]
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=training_args(
            tmp_path,
            max_steps=6,
            per_device_train_batch_size=8,  # the same batch at every step
            temperature=2.0,
            alpha=0.5,
            learning_rate=1e-2,
        ),
        train_dataset=examples,
        data_collator=collate,
    )
    assert trainer.task == "sequence_classification"

    batch = collate(examples[:4])
    student.eval()
    loss = trainer.compute_loss(student, batch)
    s = student(input_ids=batch["input_ids"]).logits
    t = teacher(input_ids=batch["input_ids"]).logits
    log_ps, log_pt = torch.log_softmax(s / 2.0, -1), torch.log_softmax(t / 2.0, -1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum() / 4
    ce = torch.nn.functional.cross_entropy(s, batch["labels"])
    torch.testing.assert_close(loss, 0.5 * 4.0 * kl + 0.5 * ce, rtol=1e-5, atol=1e-6)

    trainer.train()
    kd = [entry["kd_loss"] for entry in trainer.state.log_history if "kd_loss" in entry]
    assert len(kd) == 6
    assert kd[-1] < 0.5 * kd[0], kd
    assert trainer.state.log_history[-2]["loss"] < trainer.state.log_history[0]["loss"]


def test_vocabulary_mismatch_is_rejected_at_construction(tmp_path):
    with pytest.raises(ValueError, match="vocabulary size is 41 but student vocabulary size is 37"):
        DistillationTrainer(
            model=causal_lm(16, seed=2),
            teacher_model=causal_lm(16, seed=1, vocab=41),
            args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
        )
    with pytest.raises(ValueError, match="number of labels is 4 but student number of labels is 3"):
        DistillationTrainer(
            model=GPT2ForSequenceClassification(gpt2_config(16, num_labels=3)),
            teacher_model=GPT2ForSequenceClassification(gpt2_config(16, num_labels=4)),
            args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
        )
    with pytest.raises(ValueError, match="causal_lm model but teacher"):
        DistillationTrainer(
            model=causal_lm(16, seed=2),
            teacher_model=GPT2ForSequenceClassification(gpt2_config(16, num_labels=3)),
            args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
        )


def test_plain_training_arguments_take_distillation_keywords(tmp_path):
    trainer = DistillationTrainer(
        model=causal_lm(16, seed=2),
        teacher_model=causal_lm(32, seed=1),
        args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
        temperature=4.0,
        alpha=0.25,
        divergence="jsd",
        beta=0.3,
    )
    assert (trainer.temperature, trainer.alpha, trainer.divergence, trainer.beta) == (
        4.0,
        0.25,
        "jsd",
        0.3,
    )
    with pytest.raises(ValueError, match="label_smoothing_factor is not supported"):
        DistillationTrainer(
            model=causal_lm(16, seed=2),
            teacher_model=causal_lm(32, seed=1),
            args=training_args(tmp_path, label_smoothing_factor=0.1),
        )
    with pytest.raises(ValueError, match="divergence must be one of"):
        DistillationTrainer(
            model=causal_lm(16, seed=2),
            teacher_model=causal_lm(32, seed=1),
            args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
            divergence="kl",
        )


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_fused_linear_path_matches_logits_path(tmp_path, divergence):
    if importlib.util.find_spec("kdistill.fused_linear") is None:
        pytest.skip("kdistill.fused_linear is not available")
    teacher, student = causal_lm(32, seed=1), causal_lm(16, seed=2)
    batch = collate(causal_examples([12, 7, 5]))
    losses, grads = [], []
    for fused in (False, True):
        student.zero_grad()
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=training_args(tmp_path, alpha=0.5, divergence=divergence),
            fused_linear=fused,
            fused_chunk_size=5,
        )
        loss = trainer.compute_loss(student, batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append({k: p.grad.clone() for k, p in student.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_importing_kdistill_does_not_import_transformers():
    code = (
        "import sys, kdistill, kdistill.losses\n"
        "for name in ('kdistill.trainer', 'kdistill.cli', 'kdistill.distributed'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ImportError:\n"
        "        pass\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
        "assert 'accelerate' not in sys.modules, 'accelerate was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def _load_example(name: str):
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("distill_causal_lm", ["--fused-linear"]),
        ("distill_sequence_classifier", ["--examples", "40", "--baseline"]),
    ],
)
def test_examples_run_offline_end_to_end(tmp_path, monkeypatch, capsys, name, extra):
    example = _load_example(name)
    argv = [name, "--max-steps", "2", "--teacher-steps", "2", "--output-dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [*argv, *extra])
    example.main()
    printed = capsys.readouterr().out
    assert "student after" in printed
    assert (tmp_path / "model.safetensors").is_file()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: a second thread only adds synchronisation cost."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
