"""Distil a causal language model with kdistill.hf.DistillationTrainer.

Offline by default: a tiny GPT-2 teacher is built from a config, trained briefly on a small
corpus written into this script (byte-level tokens), then distilled into a narrower student.
The script prints the held-out cross-entropy of each model and the student's KL to the teacher
before and after distillation.

Run it as is (about half a minute on two CPU cores)::

    python examples/distill_causal_lm.py

The same on real checkpoints saved in local directories (any causal LM that loads with
``AutoModelForCausalLM`` and shares the teacher's tokenizer), with your own text file::

    python examples/distill_causal_lm.py --teacher ./teacher-dir --student ./student-dir \\
        --train-file corpus.txt --seq-len 512 --batch-size 8 --grad-accum 4 --max-steps 1000 \\
        --temperature 2.0 --alpha 0.5 --bf16 --fused-linear --output-dir runs/distilled

Several GPUs: ``torchrun --nproc_per_node=4 examples/distill_causal_lm.py ...`` (the Trainer
picks up the distributed environment; the loss is normalised by the token count of all ranks).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
)

from kdistill.hf import IGNORE_INDEX, DistillationTrainer, DistillationTrainingArguments

CORPUS = """\
The lighthouse keeper climbed the stairs each evening and lit the lamp before the sun went down.
Ships passed the rocks in the dark and the keeper wrote their names in a thick book by the window.
In winter the sea was grey and loud, and the wind pushed salt against the glass until morning.
In summer the water was calm and blue, and children from the village came to count the boats.
A student learns from a teacher by copying not only the answers but also how sure the teacher is.
When the teacher is unsure between two words, the student learns that both words are plausible.
The temperature softens the teacher's distribution so that small probabilities still carry signal.
A garden needs water, light and patience; the gardener plants seeds in spring and waits for rain.
Bread rises slowly in a warm kitchen, and the baker shapes the loaves before the ovens are hot.
The river runs past the mill, under the old stone bridge, and out across the fields to the sea.
Every morning the baker opened the shop, the gardener watered the beans, and the keeper slept.
The book by the window held a hundred names of ships, each written in the same careful hand.
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", help="local directory of a pretrained causal LM teacher")
    parser.add_argument("--student", help="local directory of the student to start from")
    parser.add_argument("--train-file", help="plain-text training corpus (default: built in)")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=120)
    parser.add_argument("--teacher-steps", type=int, default=200, help="offline teacher training")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the soft loss")
    parser.add_argument(
        "--divergence", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"]
    )
    parser.add_argument("--beta", type=float, default=0.5, help="JSD skew")
    parser.add_argument("--fused-linear", action="store_true", help="never build full logits")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--output-dir", default="runs/distill_causal_lm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--baseline", action="store_true", help="also train the student on the labels alone"
    )
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: all)")
    return parser.parse_args()


class ByteTokenizer:
    """Bytes as tokens, shifted by one so that 0 is padding."""

    vocab_size = 257
    pad_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]


def blocks(ids: list[int], seq_len: int) -> list[dict[str, torch.Tensor]]:
    """Cut a token stream into fixed-length language-modelling examples."""
    examples = []
    for start in range(0, len(ids) - seq_len, seq_len // 2):
        chunk = torch.tensor(ids[start : start + seq_len])
        examples.append(
            {"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "labels": chunk.clone()}
        )
    return examples


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}


def tiny_gpt2(vocab_size: int, width: int, layers: int, seq_len: int) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=seq_len,
        n_embd=width,
        n_layer=layers,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config)


@torch.no_grad()
def evaluate(student, teacher, examples, device) -> dict[str, float]:
    """Per-token cross-entropy of both models and KL(teacher || student) at temperature 1."""
    student.eval()
    batch = {k: v.to(device) for k, v in collate(examples).items()}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = batch["labels"][:, 1:]
    valid = targets.ne(IGNORE_INDEX)
    s = student(**inputs).logits[:, :-1][valid].float()
    t = teacher(**inputs).logits[:, :-1][valid].float()
    y = targets[valid]
    log_ps, log_pt = s.log_softmax(-1), t.log_softmax(-1)
    return {
        "student_ce": torch.nn.functional.cross_entropy(s, y).item(),
        "teacher_ce": torch.nn.functional.cross_entropy(t, y).item(),
        "kl": (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean().item(),
    }


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    common = dict(
        report_to="none",
        save_strategy="no",
        logging_steps=20,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        seed=args.seed,
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        lr_scheduler_type="cosine",
        warmup_steps=10,
    )

    text = open(args.train_file).read() if args.train_file else CORPUS
    if args.teacher:
        tokenizer = AutoTokenizer.from_pretrained(args.teacher)
        ids = tokenizer(text)["input_ids"]
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher)
    else:
        tokenizer = ByteTokenizer()
        ids = tokenizer.encode(text)
        teacher = tiny_gpt2(tokenizer.vocab_size, width=64, layers=2, seq_len=args.seq_len)
    examples = blocks(ids, args.seq_len)
    held_out = examples[-max(1, len(examples) // 10) :]
    train = examples[: len(examples) - len(held_out)]
    print(f"{len(train)} training and {len(held_out)} held-out blocks of {args.seq_len} tokens")

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
            return AutoModelForCausalLM.from_pretrained(args.student)
        return tiny_gpt2(teacher.config.vocab_size, width=16, layers=2, seq_len=args.seq_len)

    student = new_student()

    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=DistillationTrainingArguments(
            output_dir=args.output_dir,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum,
            learning_rate=args.learning_rate,
            temperature=args.temperature,
            alpha=args.alpha,
            divergence=args.divergence,
            beta=args.beta,
            fused_linear=args.fused_linear,
            **common,
        ),
        train_dataset=train,
        data_collator=collate,
    )
    device = trainer.args.device
    before = evaluate(student, teacher, held_out, device)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    after = evaluate(student, teacher, held_out, device)

    print(f"distilled for {args.max_steps} steps in {seconds:.1f} s")
    print(f"held-out cross-entropy, teacher:        {before['teacher_ce']:.3f} nats/token")
    print(
        f"held-out cross-entropy, student before: {before['student_ce']:.3f}  "
        f"(perplexity {math.exp(before['student_ce']):.1f})"
    )
    print(
        f"held-out cross-entropy, student after:  {after['student_ce']:.3f}  "
        f"(perplexity {math.exp(after['student_ce']):.1f})"
    )
    print(f"KL(teacher || student) per token: {before['kl']:.3f} -> {after['kl']:.3f}")
    trainer.save_model(args.output_dir)
    print(f"student saved to {args.output_dir}")

    if args.baseline:
        # The same student, steps and schedule, trained on the labels alone (alpha = 0).
        baseline = new_student()
        DistillationTrainer(
            model=baseline,
            teacher_model=teacher,
            args=DistillationTrainingArguments(
                output_dir=f"{args.output_dir}/baseline",
                max_steps=args.max_steps,
                per_device_train_batch_size=args.batch_size,
                gradient_accumulation_steps=args.grad_accum,
                learning_rate=args.learning_rate,
                alpha=0.0,
                **common,
            ),
            train_dataset=train,
            data_collator=collate,
        ).train()
        result = evaluate(baseline, teacher, held_out, device)
        print(f"held-out cross-entropy, student trained on labels only: {result['student_ce']:.3f}")


if __name__ == "__main__":
    main()
