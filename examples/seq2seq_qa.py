"""Generative question answering with T5 and Seq2SeqTrainer, BitFit swapped in (HF's run_seq2seq_qa.py recipe).

    python examples/seq2seq_qa.py --model_name_or_path google/flan-t5-small --learning_rate 1e-3 \
        --train_file tests/fixtures/squad/flat.jsonl --validation_file tests/fixtures/squad/flat.jsonl \
        --num_train_epochs 3 --output_dir out/t5-qa

Data: flat SQuAD rows (``question``, ``context``, ``answers`` with ``text``), one JSON object per line, as in
tests/fixtures/squad/flat.jsonl (the hub's ``rajpurkar/squad`` rows have this shape; the official nested
v1.1 JSON that run_squad.py also reads does not). Pass a learning rate: Seq2SeqTrainingArguments' default
(5e-5) suits full fine-tuning; BitFit's biases want about 1e-3 (the runners' recipes). The model reads
``question: ... context: ...`` and writes the answer; it is scored by SQuAD's exact match and F1 on generated
answers. T5 is built without biases: BitFit adds zero-initialised ones to the attention (self and cross), and
MLP projections of encoder and decoder and trains only those; the pretrained lm_head stays frozen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets import load_dataset
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
)

from bitfit_tasks import BitFitConfig, BitFitTrainer
from bitfit_tasks.tasks.metrics import squad_metrics


class BitFitSeq2SeqTrainer(BitFitTrainer, Seq2SeqTrainer):
    """BitFitTrainer first, so its hooks wrap Seq2SeqTrainer's (generation in evaluate/predict stays its own)."""


@dataclass
class Arguments:
    model_name_or_path: str = field(metadata={"help": "A T5 / mT5 / Flan-T5 checkpoint (hub id or folder)."})
    train_file: str = field(metadata={"help": "SQuAD rows, .jsonl"})
    validation_file: str = field(metadata={"help": "SQuAD rows, .jsonl"})
    max_source_length: int = 384
    max_answer_length: int = 30


def main() -> None:
    parser = HfArgumentParser((Arguments, BitFitConfig, Seq2SeqTrainingArguments))
    args, bitfit, training_args = parser.parse_args_into_dataclasses()
    training_args.predict_with_generate = True
    training_args.generation_max_length = args.max_answer_length
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForSeq2SeqLM.from_pretrained(args.model_name_or_path)
    raw = load_dataset("json", data_files={"train": args.train_file, "validation": args.validation_file})

    def encode(batch):
        pairs = zip(batch["question"], batch["context"], strict=True)
        sources = [f"question: {q.strip()} context: {c.strip()}" for q, c in pairs]
        inputs = tokenizer(sources, max_length=args.max_source_length, truncation=True)
        answers = [a["text"][0] if a["text"] else "" for a in batch["answers"]]
        labels = tokenizer(text_target=answers, max_length=args.max_answer_length, truncation=True)
        inputs["labels"] = labels["input_ids"]
        return inputs

    data = raw.map(encode, batched=True, remove_columns=raw["train"].column_names)
    golds = {str(i): list(a["text"]) for i, a in enumerate(raw["validation"]["answers"])}

    def compute_metrics(p):
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        preds = [[t if t >= 0 else tokenizer.pad_token_id for t in row] for row in preds]
        texts = tokenizer.batch_decode(preds, skip_special_tokens=True)
        return squad_metrics({str(i): t.strip() for i, t in enumerate(texts)}, golds)

    trainer = BitFitSeq2SeqTrainer(                      # was: Seq2SeqTrainer(
        model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["validation"],
        processing_class=tokenizer, data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
        compute_metrics=compute_metrics, bitfit_config=bitfit,
    )
    trainer.print_trainable_parameters()
    trainer.train()
    print(trainer.evaluate())
    trainer.save_model(training_args.output_dir)       # the biases only: a delta for load_task_model


if __name__ == "__main__":
    main()
