"""Distillation for Hugging Face Transformers models through ``transformers.Trainer``.

:class:`DistillationTrainer` is a :class:`transformers.Trainer` whose loss is kdistill's
distillation loss between a frozen teacher and the student being trained:

.. math::

    \\mathcal{L} = \\alpha \\, T^2 \\frac{1}{N} \\sum_{i \\,\\text{valid}}
        D\\big(p_T(x_i / T),\\, p_S(x_i / T)\\big)
        + (1 - \\alpha) \\frac{1}{N} \\sum_{i \\,\\text{valid}} \\mathrm{CE}(x_i, y_i)

where ``D`` is forward KL, reverse KL or the beta-skewed Jensen-Shannon divergence, a position is
valid when its label is not ``-100``, and ``N`` is the number of valid positions in the whole
optimizer step: over every gradient-accumulation micro-batch and every data-parallel process.
That global count makes ``k`` accumulated micro-batches (or ``k`` processes) produce exactly the
gradient of one batch ``k`` times as large, whatever the number of valid tokens in each part; a
per-micro-batch mean would weigh tokens of short micro-batches more.

Two heads are understood:

* causal language models (``...ForCausalLM``, ``GPT2LMHeadModel``): the logits at position ``t``
  are compared with the label at ``t + 1``, exactly as the model's own loss does;
* sequence classifiers (``...ForSequenceClassification``): one position per example.

This module imports ``transformers``; the rest of kdistill never does.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Trainer, TrainingArguments
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

from kdistill.losses import DistillationLoss

logger = logging.getLogger(__name__)

__all__ = ["DistillationTrainer", "DistillationTrainingArguments", "IGNORE_INDEX", "infer_task"]

IGNORE_INDEX = -100
"""Label value that marks a position as left out (the Hugging Face convention)."""

TASKS = ("causal_lm", "sequence_classification")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class DistillationTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the distillation settings added.

    Args:
        temperature: Softmax temperature ``T`` applied to teacher and student logits for the soft
            loss (> 0).
        alpha: Weight of the soft (distillation) loss; ``1 - alpha`` weighs the hard-label
            cross-entropy. ``alpha=1`` is pure distillation.
        divergence: ``"forward_kl"`` (KL(teacher || student)), ``"reverse_kl"``
            (KL(student || teacher)) or ``"jsd"`` (beta-skewed Jensen-Shannon).
        beta: Skew of the JSD in [0, 1]; 0 gives forward KL, 1 reverse KL.
        t_squared: Multiply the soft loss by ``T**2`` so its gradient scale does not shrink with
            the temperature.
        fused_linear: For causal LMs, compute the soft loss with
            :func:`kdistill.fused_linear_kd_loss` from the final hidden states and the
            ``lm_head`` weights, so the full ``(batch, length, vocab)`` logits are never built.
        fused_chunk_size: Rows per chunk for the fused path (``None``: its default).

    Example:
        >>> args = DistillationTrainingArguments(  # doctest: +SKIP
        ...     output_dir="out", temperature=2.0, alpha=0.9, divergence="jsd", beta=0.5)
    """

    temperature: float = field(default=2.0, metadata={"help": "Distillation temperature (> 0)."})
    alpha: float = field(default=0.5, metadata={"help": "Weight of the soft loss in [0, 1]."})
    divergence: str = field(
        default="forward_kl", metadata={"help": "forward_kl, reverse_kl or jsd."}
    )
    beta: float = field(default=0.5, metadata={"help": "JSD skew in [0, 1]."})
    t_squared: bool = field(default=True, metadata={"help": "Scale the soft loss by T^2."})
    fused_linear: bool = field(
        default=False, metadata={"help": "Causal LM: fused hidden-state loss, no full logits."}
    )
    fused_chunk_size: int | None = field(
        default=None, metadata={"help": "Rows per chunk for the fused path."}
    )


_SETTING_DEFAULTS: dict[str, Any] = {
    "temperature": 2.0,
    "alpha": 0.5,
    "divergence": "forward_kl",
    "beta": 0.5,
    "t_squared": True,
    "fused_linear": False,
    "fused_chunk_size": None,
}


def infer_task(model: nn.Module) -> str:
    """Tell which head a Transformers model carries.

    Args:
        model: A Transformers model (a ``PreTrainedModel`` subclass).

    Returns:
        ``"causal_lm"`` or ``"sequence_classification"``.

    Raises:
        ValueError: If the class is neither a causal LM nor a sequence classifier.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel  # doctest: +SKIP
        >>> infer_task(GPT2LMHeadModel(GPT2Config(n_layer=1)))  # doctest: +SKIP
        'causal_lm'
    """
    name = type(model).__name__
    if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() or name.endswith("ForCausalLM"):
        return "causal_lm"
    if name in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values() or name.endswith(
        "ForSequenceClassification"
    ):
        return "sequence_classification"
    raise ValueError(
        f"cannot tell the task of {name}: expected a causal LM or a sequence classifier; "
        f"pass task= one of {TASKS}"
    )


def _output_size(model: nn.Module, task: str) -> int:
    """Number of classes the model scores at each position (vocabulary or labels)."""
    if task == "causal_lm":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None and getattr(head, "weight", None) is not None:
            return int(head.weight.shape[0])
        return int(model.config.vocab_size)
    return int(model.config.num_labels)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, chunk by chunk.

    Each chunk's logits are recomputed in the backward pass instead of stored, so at most
    ``chunk_size x vocab`` logits exist at a time.
    """

    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = nn.functional.linear(h, weight, bias).float()
        return nn.functional.cross_entropy(logits, y, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        stop = start + chunk_size
        total = total + checkpoint(
            chunk_loss, hidden[start:stop], labels[start:stop], use_reentrant=False
        )
    return total


class DistillationTrainer(Trainer):
    """A ``transformers.Trainer`` that distils a frozen teacher into the model it trains.

    The teacher is put in eval mode, its parameters get ``requires_grad=False``, and it is moved
    to the student's device (unless it was loaded with a ``device_map``). Gradient accumulation,
    data-parallel processes (``torchrun`` / ``accelerate launch``), bf16 autocast, logging and
    checkpoints are the Trainer's own; the loss is normalised by the number of valid positions in
    the whole optimizer step across micro-batches and processes (see the module docstring).
    Logs gain ``kd_loss`` (the soft part) and ``hard_loss`` next to the Trainer's ``loss``.

    Distillation settings are read from ``args`` when it is a
    :class:`DistillationTrainingArguments`; the keyword arguments below override them.

    Args:
        model: The student, a Transformers causal LM or sequence classifier.
        teacher_model: The teacher, same kind of head and same vocabulary (or number of labels).
        args: ``TrainingArguments`` or :class:`DistillationTrainingArguments`.
        temperature: See :class:`DistillationTrainingArguments`.
        alpha: See :class:`DistillationTrainingArguments`.
        divergence: See :class:`DistillationTrainingArguments`.
        beta: See :class:`DistillationTrainingArguments`.
        t_squared: See :class:`DistillationTrainingArguments`.
        fused_linear: See :class:`DistillationTrainingArguments`.
        fused_chunk_size: See :class:`DistillationTrainingArguments`.
        task: ``"causal_lm"`` or ``"sequence_classification"``; inferred from the student's
            class when ``None``.
        **kwargs: Passed on to ``transformers.Trainer`` (``train_dataset``, ``data_collator``,
            ``eval_dataset``, ``callbacks``, ...).

    Raises:
        ValueError: If the teacher is missing, the settings are out of range, the two models
            carry different heads, or their vocabularies (numbers of labels) differ; also for
            a ``compute_loss_func`` or ``label_smoothing_factor``, which would be ignored.

    Example:
        >>> trainer = DistillationTrainer(  # doctest: +SKIP
        ...     model=student, teacher_model=teacher,
        ...     args=DistillationTrainingArguments(output_dir="out", temperature=2.0, alpha=0.5),
        ...     train_dataset=dataset)
        >>> trainer.train()  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher_model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        *,
        temperature: float | None = None,
        alpha: float | None = None,
        divergence: str | None = None,
        beta: float | None = None,
        t_squared: bool | None = None,
        fused_linear: bool | None = None,
        fused_chunk_size: int | None = None,
        task: str | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None or teacher_model is None:
            raise ValueError("DistillationTrainer needs both model (the student) and teacher_model")

        overrides = {
            "temperature": temperature,
            "alpha": alpha,
            "divergence": divergence,
            "beta": beta,
            "t_squared": t_squared,
            "fused_linear": fused_linear,
            "fused_chunk_size": fused_chunk_size,
        }
        settings = {
            name: overrides[name] if overrides[name] is not None else getattr(args, name, default)
            for name, default in _SETTING_DEFAULTS.items()
        }
        self._check_settings(settings)

        self.task = task if task is not None else infer_task(model)
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        teacher_task = infer_task(teacher_model) if task is None else task
        if teacher_task != self.task:
            raise ValueError(
                f"student {type(model).__name__} is a {self.task} model but teacher "
                f"{type(teacher_model).__name__} is a {teacher_task} model"
            )
        student_size = _output_size(model, self.task)
        teacher_size = _output_size(teacher_model, self.task)
        if student_size != teacher_size:
            what = "vocabulary size" if self.task == "causal_lm" else "number of labels"
            raise ValueError(
                f"teacher and student must score the same classes: teacher {what} is "
                f"{teacher_size} but student {what} is {student_size}"
            )
        if self.task == "sequence_classification" and student_size < 2:
            raise ValueError(
                "distillation needs a classifier with at least 2 labels, got "
                f"num_labels={student_size} (regression heads are not supported)"
            )
        if settings["fused_linear"]:
            if self.task != "causal_lm":
                raise ValueError("fused_linear=True applies to causal LMs only")
            for role, m in (("student", model), ("teacher", teacher_model)):
                if not _accepts_logits_to_keep(m):
                    raise ValueError(
                        f"fused_linear=True needs a {role} whose forward takes logits_to_keep; "
                        f"{type(m).__name__} does not"
                    )

        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("DistillationTrainer computes its own loss; drop compute_loss_func")
        if getattr(args, "label_smoothing_factor", 0.0):
            # The hard-label term is plain cross-entropy; smoothing would silently be ignored.
            raise ValueError(
                "label_smoothing_factor is not supported by DistillationTrainer, got "
                f"{args.label_smoothing_factor}; the teacher's soft targets play that part"
            )

        super().__init__(model=model, args=args, **kwargs)

        self.temperature = float(settings["temperature"])
        self.alpha = float(settings["alpha"])
        self.divergence = str(settings["divergence"])
        self.beta = float(settings["beta"])
        self.t_squared = bool(settings["t_squared"])
        self.fused_linear = bool(settings["fused_linear"])
        self.fused_chunk_size = settings["fused_chunk_size"]
        self.distillation_loss = DistillationLoss(
            temperature=self.temperature,
            alpha=self.alpha,
            axis=-1,
            ignore_index=IGNORE_INDEX,
            normalization="valid",
            t_squared=self.t_squared,
            divergence=self.divergence,
            beta=self.beta,
        )

        # Trainers that predate loss_is_scaled_for_ga read this flag instead: the loss below
        # is already normalised over the accumulated batch whenever the global count is given.
        self.model_accepts_loss_kwargs = True

        self.teacher_model = teacher_model
        if getattr(teacher_model, "hf_device_map", None) is None:
            teacher_model.to(self.args.device)
        teacher_model.eval()
        teacher_model.requires_grad_(False)

        self._parts_since_log = torch.zeros(2, dtype=torch.float32, device=self.args.device)
        self._step_last_logged = 0

    @staticmethod
    def _check_settings(settings: dict[str, Any]) -> None:
        temperature = settings["temperature"]
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)) or (
            temperature <= 0
        ):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if not 0.0 <= float(settings["alpha"]) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {settings['alpha']!r}")
        if settings["divergence"] not in DIVERGENCES:
            raise ValueError(
                f"divergence must be one of {DIVERGENCES}, got {settings['divergence']!r}"
            )
        if not 0.0 <= float(settings["beta"]) <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {settings['beta']!r}")
        chunk = settings["fused_chunk_size"]
        if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"fused_chunk_size must be a positive int or None, got {chunk!r}")

    # ---- counting valid positions -------------------------------------------------------------

    def _target_labels(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Labels aligned with the positions the loss is taken over (shifted for causal LMs)."""
        labels = inputs.get("labels")
        if self.task == "sequence_classification":
            if labels is None:
                raise ValueError("sequence classification batches need a 'labels' entry")
            return labels.reshape(-1)
        if labels is None:
            # Pure distillation on raw text: every non-padding token is a target.
            labels = inputs["input_ids"]
            mask = inputs.get("attention_mask")
            if mask is not None:
                labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
        return labels[:, 1:]

    def count_valid_positions(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Number of positions of one batch that enter the loss (labels other than -100).

        Args:
            inputs: A collated batch as the model receives it.

        Returns:
            A 0-dim int64 tensor.
        """
        return self._target_labels(inputs).ne(IGNORE_INDEX).sum()

    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device | None = None
    ) -> tuple[list, torch.Tensor | None]:
        """Fetch the micro-batches of one optimizer step and count their valid positions.

        The count is summed over the micro-batches and over all processes, and reaches
        :meth:`compute_loss` as ``num_items_in_batch``.
        """
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break

        device = device if device is not None else self.args.device
        count = torch.zeros((), dtype=torch.int64, device=device)
        for batch in batch_samples:
            count = count + self.count_valid_positions(batch).to(device)
        if self.accelerator.num_processes > 1:
            count = self.accelerator.gather(count.reshape(1)).sum()
        return batch_samples, count

    # ---- the loss -----------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Distillation loss of one micro-batch, normalised by the step's global count.

        Args:
            model: The (possibly wrapped) student.
            inputs: The collated batch; ``labels`` holds the hard targets (-100 = left out).
            return_outputs: Also return the student's outputs.
            num_items_in_batch: Valid positions in the whole optimizer step over all processes,
                as counted by :meth:`get_batch_samples`. Without it (evaluation, or a direct
                call) the batch's own count is used.

        Returns:
            The loss, or ``(loss, student_outputs)``.
        """
        targets = self._target_labels(inputs)
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}

        global_count = num_items_in_batch is not None and model.training
        if global_count:
            normalizer = torch.as_tensor(num_items_in_batch, device=targets.device).float()
            # Data-parallel gradients are averaged over processes; scaling by their number turns
            # that average into sum_over_processes / global_count.
            scale = float(self.accelerator.num_processes)
        else:
            normalizer = targets.ne(IGNORE_INDEX).sum().float()
            scale = 1.0
        normalizer = normalizer.clamp_min(1.0)
        # Tell training_step whether to divide by the accumulation steps itself.
        self.loss_is_scaled_for_ga = global_count

        if self.fused_linear:
            loss, soft, hard, outputs = self._fused_causal_lm_loss(
                model, model_inputs, targets, normalizer
            )
        else:
            loss, soft, hard, outputs = self._logits_loss(model, model_inputs, targets, normalizer)

        if scale != 1.0:
            loss, soft, hard = loss * scale, soft * scale, hard * scale
        if model.training:
            self._parts_since_log += torch.stack([soft.detach(), hard.detach()]).float()
        return (loss, outputs) if return_outputs else loss

    def _teacher_forward(self, model_inputs: dict[str, Any], **extra: Any) -> Any:
        if self.teacher_model.training:
            self.teacher_model.eval()
        with torch.no_grad(), self.accelerator.autocast():
            return self.teacher_model(**model_inputs, **extra)

    def _logits_loss(
        self,
        model: nn.Module,
        model_inputs: dict[str, Any],
        targets: torch.Tensor,
        normalizer: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        outputs = model(**model_inputs)
        teacher_logits = self._teacher_forward(model_inputs).logits
        student_logits = outputs.logits
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"teacher logits have shape {tuple(teacher_logits.shape)} but student logits have "
                f"shape {tuple(student_logits.shape)}"
            )
        if self.task == "causal_lm":
            student_logits = student_logits[:, :-1]
            teacher_logits = teacher_logits[:, :-1]
        total, soft, hard = self.distillation_loss(
            student_logits.float(),
            teacher_logits.float(),
            targets,
            normalizer=normalizer,
            return_parts=True,
        )
        return total, soft, hard, outputs

    def _fused_causal_lm_loss(
        self,
        model: nn.Module,
        model_inputs: dict[str, Any],
        targets: torch.Tensor,
        normalizer: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        from kdistill.fused_linear import fused_linear_kd_loss

        # An empty logits_to_keep makes the model skip its lm_head; the loss below applies the
        # head weights chunk by chunk instead.
        no_logits = torch.empty(0, dtype=torch.long, device=targets.device)
        outputs = model(**model_inputs, output_hidden_states=True, logits_to_keep=no_logits)
        teacher_outputs = self._teacher_forward(
            model_inputs, output_hidden_states=True, logits_to_keep=no_logits
        )

        valid = targets.ne(IGNORE_INDEX)
        student_hidden = outputs.hidden_states[-1][:, :-1][valid]
        teacher_hidden = teacher_outputs.hidden_states[-1][:, :-1][valid]
        student_head = self.accelerator.unwrap_model(model).get_output_embeddings()
        teacher_head = self.teacher_model.get_output_embeddings()

        soft = fused_linear_kd_loss(
            student_hidden,
            student_head.weight,
            teacher_hidden.to(teacher_head.weight.dtype),
            teacher_head.weight,
            student_bias=student_head.bias,
            teacher_bias=teacher_head.bias,
            temperature=self.temperature,
            t_squared=self.t_squared,
            chunk_size=self.fused_chunk_size,
            divergence=self.divergence,
            beta=self.beta,
            normalizer=normalizer,
        ).float()
        if self.alpha < 1.0:
            hard_sum = _linear_cross_entropy_sum(
                student_hidden,
                student_head.weight,
                student_head.bias,
                targets[valid],
                chunk_size=self.fused_chunk_size or 1024,
            )
            hard = hard_sum / normalizer
        else:
            hard = soft.new_zeros(())
        total = self.alpha * soft + (1.0 - self.alpha) * hard
        return total, soft, hard, outputs

    # ---- logging ------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the soft (``kd_loss``) and hard (``hard_loss``) parts to the training logs."""
        if "loss" in logs and self.state.global_step > self._step_last_logged:
            parts = self._parts_since_log
            if self.accelerator.num_processes > 1:
                parts = self.accelerator.reduce(parts.clone(), reduction="mean")
            steps = self.state.global_step - self._step_last_logged
            logs["kd_loss"] = float(parts[0]) / steps
            logs["hard_loss"] = float(parts[1]) / steps
            self._parts_since_log.zero_()
            self._step_last_logged = self.state.global_step
        super().log(logs, start_time)
