"""Distil a sequence classifier with kdistill.hf.DistillationTrainer.

Offline by default: a synthetic three-class task (which of three marker-token groups occurs most
often in a sequence of noise tokens), a tiny GPT-2 classifier teacher built from a config and
trained on it, then distilled into a narrower student. The script prints held-out accuracy of
the teacher and of the student before and after distillation (and, with ``--baseline``, of the
same student trained on the labels alone).

Run it as is (well under a minute on two CPU cores)::

    python examples/distill_sequence_classifier.py --threads 1 --baseline

The same on real checkpoints saved in local directories (any model that loads with
``AutoModelForSequenceClassification``; teacher and student share the tokenizer and the number of
labels) and a tab-separated file of ``text<TAB>label`` lines::

    python examples/distill_sequence_classifier.py \\
        --teacher ./teacher-dir --student ./student-dir --train-file train.tsv \\
        --eval-file dev.tsv --max-length 128 --batch-size 32 --max-steps 2000 \\
        --temperature 4.0 --alpha 0.9 --output-dir runs/distilled-classifier
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2ForSequenceClassification,
    Trainer,
    TrainingArguments,
)

from kdistill.hf import DistillationTrainer, DistillationTrainingArguments

NUM_LABELS = 3
VOCAB = 24  # 0 = padding, 1..9 = three marker groups of three tokens, the rest noise
LENGTH = 16


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", help="local directory of a fine-tuned classifier teacher")
    parser.add_argument("--student", help="local directory of the student to start from")
    parser.add_argument("--train-file", help="TSV of text<TAB>label (default: synthetic task)")
    parser.add_argument("--eval-file", help="TSV of text<TAB>label for the held-out accuracy")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per text (TSV input)")
    parser.add_argument("--examples", type=int, default=1200, help="synthetic examples")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--teacher-steps", type=int, default=300, help="offline teacher training")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the soft loss")
    parser.add_argument(
        "--divergence", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"]
    )
    parser.add_argument("--beta", type=float, default=0.5, help="JSD skew")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--output-dir", default="runs/distill_sequence_classifier")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: all)")
    parser.add_argument(
        "--baseline", action="store_true", help="also train the student on the labels alone"
    )
    return parser.parse_args()


def synthetic_examples(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Label = the marker group (tokens 1-3, 4-6 or 7-9) that occurs most often."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    while len(examples) < count:
        ids = torch.randint(10, VOCAB, (LENGTH,), generator=generator)
        markers = torch.randint(1, 10, (int(torch.randint(3, 8, (1,), generator=generator)),))
        positions = torch.randperm(LENGTH, generator=generator)[: len(markers)]
        ids[positions] = markers
        counts = torch.bincount((markers - 1) // 3, minlength=NUM_LABELS)
        if (counts == counts.max()).sum() > 1:
            continue  # ties have no label
        examples.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones(LENGTH, dtype=torch.long),
                "labels": counts.argmax(),
            }
        )
    return examples


def tsv_examples(path: str, tokenizer, max_length: int) -> list[dict[str, torch.Tensor]]:
    examples = []
    with open(path) as handle:
        for line in handle:
            text, label = line.rstrip("\n").rsplit("\t", 1)
            encoded = tokenizer(text, truncation=True, max_length=max_length, padding="max_length")
            examples.append(
                {
                    "input_ids": torch.tensor(encoded["input_ids"]),
                    "attention_mask": torch.tensor(encoded["attention_mask"]),
                    "labels": torch.tensor(int(label)),
                }
            )
    return examples


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}


def tiny_classifier(width: int) -> GPT2ForSequenceClassification:
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=LENGTH,
        n_embd=width,
        n_layer=2,
        n_head=4,
        num_labels=NUM_LABELS,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return GPT2ForSequenceClassification(config)


@torch.no_grad()
def accuracy(model, examples, device, batch_size=256) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size]).items()}
        labels = batch.pop("labels")
        correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    return correct / len(examples)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    common = dict(
        report_to="none",
        save_strategy="no",
        logging_steps=25,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=args.seed,
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        lr_scheduler_type="cosine",
        warmup_steps=10,
    )

    if args.teacher:
        tokenizer = AutoTokenizer.from_pretrained(args.teacher)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        train = tsv_examples(args.train_file, tokenizer, args.max_length)
        held_out = tsv_examples(args.eval_file or args.train_file, tokenizer, args.max_length)
        teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher)
    else:
        examples = synthetic_examples(args.examples, args.seed)
        held_out = examples[: len(examples) // 5]
        train = examples[len(held_out) :]
        teacher = tiny_classifier(width=64)
    print(f"{len(train)} training and {len(held_out)} held-out examples")

    if not args.teacher:
        start = time.perf_counter()
        Trainer(
            model=teacher,
            args=TrainingArguments(
                output_dir=f"{args.output_dir}/teacher",
                max_steps=args.teacher_steps,
                per_device_train_batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                **common,
            ),
            train_dataset=train,
            data_collator=collate,
        ).train()
        print(
            f"teacher trained for {args.teacher_steps} steps in {time.perf_counter() - start:.1f} s"
        )

    def new_student() -> torch.nn.Module:
        torch.manual_seed(args.seed + 1)
        if args.student:
            return AutoModelForSequenceClassification.from_pretrained(args.student)
        return tiny_classifier(width=16)

    def distill(student: torch.nn.Module, alpha: float, output_dir: str) -> DistillationTrainer:
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=DistillationTrainingArguments(
                output_dir=output_dir,
                max_steps=args.max_steps,
                per_device_train_batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                temperature=args.temperature,
                alpha=alpha,
                divergence=args.divergence,
                beta=args.beta,
                **common,
            ),
            train_dataset=train,
            data_collator=collate,
        )
        trainer.train()
        return trainer

    student = new_student()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher_accuracy = accuracy(teacher.to(device), held_out, device)
    before = accuracy(student.to(device), held_out, device)
    start = time.perf_counter()
    trainer = distill(student, args.alpha, args.output_dir)
    seconds = time.perf_counter() - start
    after = accuracy(student, held_out, device)

    print(f"distilled for {args.max_steps} steps in {seconds:.1f} s")
    print(f"held-out accuracy, teacher:        {teacher_accuracy:.3f}")
    print(f"held-out accuracy, student before: {before:.3f}")
    print(f"held-out accuracy, student after:  {after:.3f}")
    trainer.save_model(args.output_dir)
    print(f"student saved to {args.output_dir}")

    if args.baseline:
        # The same student, steps and schedule, trained on the labels alone (alpha = 0).
        baseline = new_student()
        distill(baseline, 0.0, f"{args.output_dir}/baseline")
        baseline_accuracy = accuracy(baseline, held_out, device)
        print(f"held-out accuracy, student trained on labels only: {baseline_accuracy:.3f}")


if __name__ == "__main__":
    main()
