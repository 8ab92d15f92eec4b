"""run_pos.py: token tagging (POS tagging, chunking, BIO NER) with BitFit, full fine-tuning,
LoRA or BEFT; word accuracy for POS tags, seqeval span precision/recall/F1 for BIO tag sets. Reading: pos_data.py;
encoding and word-level scoring: tagging.py."""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel
from transformers import (
    AutoConfig,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForTokenClassification,
    TrainingArguments,
)

from ...core.config import BitFitConfig
from ...training.trainer import BitFitTrainer
from ...utils.errors import UsageError, check_positive, load_pretrained
from ...utils.fileio import atomic_write_lines
from ..arguments import ModelArguments, RunArguments, model_load_kwargs
from ..callbacks import add_train_sample_eval
from ..metrics import seqeval_metrics
from ..runner import check_terms_before_loading, ensure_pad_token, parse_and_run, start_run, train_and_record
from ..sampling import EVAL_SAMPLE_SEED, sample_list
from .data import FORMATS, Sentence, read_file, read_token_tag_dataset, read_treebank_splits
from .tagging import (
    encode_sentences,
    resolve_tag_scheme,
    token_loss,
    word_accuracy_metrics,
    word_level_predictions,
    word_predictions,
)

logger = logging.getLogger("bitfit_tasks")


@dataclass
class PosArguments:
    task_name: str = field(default="pos", metadata={"help": "A label for this dataset in results/sweeps."})
    treebank: str | None = field(
        default=None, metadata={"help": "One WSJ treebank (folder or zip of .mrg, e.g. NLTK's treebank.zip), "
                                "split by section 00-18/19-21/22-24, or for the NLTK sample by file "
                                "wsj_0001-0159/0160-0179/0180-0199."})
    train_file: str | None = field(default=None, metadata={"help": "Training data: .mrg/folder/zip of trees, "
                                   "CoNLL columns (.txt), .conllu, jsonl/parquet with tokens+pos_tags, or "
                                   "archive.zip::member."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation data (any format above)."})
    test_file: str | None = field(default=None, metadata={"help": "Optional test data, scored at the end."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset with tokens + a tag column "
                                     "(e.g. batterydata/pos_tagging, conll2003 with --tag_field ner_tags)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset config."})
    data_format: str = field(default="auto", metadata={"help": f"One of {list(FORMATS)}.", "choices": list(FORMATS)})
    word_column: int = field(default=0, metadata={"help": "CoNLL column of the word (0-based)."})
    tag_column: int = field(default=1, metadata={"help": "CoNLL column of the tag (0-based). CoNLL-2000: 1 = POS, "
                            "2 = chunk (B-NP/I-NP/...); CoNLL-2003: 3 = NER."})
    tag_field: str = field(default="pos_tags", metadata={"help": "jsonl/parquet/hub column of the tags: pos_tags, "
                           "chunk_tags, ner_tags..."})
    tag_scheme: str = field(
        default="auto", metadata={"help": "How tags are scored. 'pos': word accuracy; 'bio': span precision/recall/F1 "
                                  "(seqeval, per type and overall; headline F1) plus word accuracy; 'auto': 'bio' when "
                                  "every training tag is O or B-/I-/E-/S-TYPE, else 'pos'.",
                                  "choices": ["auto", "pos", "bio"]})
    conllu_tag_field: str = field(default="xpos", metadata={"help": "CoNLL-U tag: xpos (PTB tags) or upos.",
                                                            "choices": ["xpos", "upos"]})
    unknown_tags: str = field(
        default="error", metadata={"help": "A tag in evaluation data that training never saw: 'error' (stop and "
                                   "list them) or 'count_wrong' (keep the words, scored as errors).",
                                   "choices": ["error", "count_wrong"]})
    max_seq_length: int = field(default=256, metadata={"help": "Sub-token limit; words past it count as errors."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Seeded random subset of sentences."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Random subset of evaluation sentences, "
                                         "drawn with the fixed seed 1234 (the same for every method and seed)."})
    save_full_model: bool = field(default=False, metadata={"help": "With --mode full, save the whole model."})

    def __post_init__(self) -> None:
        check_positive(self, "max_seq_length", "max_train_samples", "max_eval_samples")
        sources = [self.treebank is not None, self.train_file is not None, self.dataset_name is not None]
        if sum(sources) != 1:
            raise UsageError("give exactly one data source: --treebank, --train_file/--validation_file, or "
                             "--dataset_name.")
        if self.train_file is not None and self.validation_file is None:
            raise UsageError("--train_file needs --validation_file too.")


def load_splits(a: PosArguments) -> dict[str, list[Sentence]]:
    if a.treebank:
        splits = read_treebank_splits(a.treebank)
    elif a.dataset_name:
        splits = {s: read_token_tag_dataset(a.dataset_name, s, a.dataset_config_name, a.tag_field)
                  for s in ("train", "validation")}
    else:
        kw = dict(word_column=a.word_column, tag_column=a.tag_column, conllu_tag_field=a.conllu_tag_field,
                  tag_field=a.tag_field)
        splits = {"train": read_file(a.train_file, a.data_format, **kw),
                  "validation": read_file(a.validation_file, a.data_format, **kw)}
        if a.test_file:
            splits["test"] = read_file(a.test_file, a.data_format, **kw)
    for name in ("train", "validation"):
        if not splits.get(name):
            raise UsageError(f"the {name} split is empty; check the data source.")
    return {k: v for k, v in splits.items() if v}


def tag_set(train: list[Sentence]) -> list[str]:
    return sorted({t for s in train for t in s["tags"]})


def check_tags(split: str, sentences: list[Sentence], known: set[str], policy: str) -> int:
    unknown = Counter(t for s in sentences for t in s["tags"] if t not in known)
    if unknown and policy == "error":
        raise UsageError(f"{split} data has tags the training data never shows: {dict(unknown.most_common(10))}. "
                         "Add them to the training data, or pass --unknown_tags count_wrong to score those "
                         "words as errors.")
    return sum(unknown.values())


# This runner's argument dataclass and its defaults beyond RUNNER_DEFAULTS (the sweep parses with them).
ARGUMENTS = PosArguments
DEFAULTS: dict[str, Any] = {}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    return parse_and_run(run, ARGUMENTS, argv, defaults=DEFAULTS)


def run(model_args: ModelArguments, data_args: PosArguments, bitfit: BitFitConfig,
        training_args: TrainingArguments, run_args: RunArguments | None = None) -> dict[str, Any]:

    seed = start_run(training_args, bitfit, run_args, runner="pos")
    load_kwargs = model_load_kwargs(model_args, bitfit, training_args)  # refused before any data is read
    splits = load_splits(data_args)
    splits["train"] = sample_list(splits["train"], seed, k=data_args.max_train_samples)
    for s in ("validation", "test"):  # the same evaluation sentences for every method and seed
        if s in splits:
            splits[s] = sample_list(splits[s], EVAL_SAMPLE_SEED, k=data_args.max_eval_samples)
    # The label map is a datasets ClassLabel over the training tags (sorted: the same ids every run).
    tag_feature = ClassLabel(names=tag_set(splits["train"]))
    tags = tag_feature.names
    tag2id = {t: tag_feature.str2int(t) for t in tags}
    id2tag = {i: tag_feature.int2str(i) for i in range(tag_feature.num_classes)}
    scheme = resolve_tag_scheme(data_args.tag_scheme, tags)
    unseen = {s: check_tags(s, v, set(tags), data_args.unknown_tags) for s, v in splits.items() if s != "train"}

    base_type = load_pretrained(AutoConfig, model_args.model_name_or_path, cache_dir=model_args.cache_dir).model_type
    # Byte-level BPE tokenizers need a prefix space to tokenise pre-split words like running text.
    byte_level = ("roberta", "longformer", "deberta", "gpt2", "opt", "bloom", "gpt_neox")
    extra = {"add_prefix_space": True} if base_type in byte_level else {}
    tokenizer = load_pretrained(AutoTokenizer, model_args.model_name_or_path, cache_dir=model_args.cache_dir, **extra)
    if not tokenizer.is_fast:
        raise UsageError(f"{model_args.model_name_or_path}: POS tagging needs a fast tokenizer (word_ids for "
                         "sub-token alignment); this one is slow. Use a model with tokenizer.json.")
    config = load_pretrained(AutoConfig, model_args.model_name_or_path, num_labels=len(tags), id2label=id2tag,
                             label2id=tag2id, finetuning_task=data_args.task_name, cache_dir=model_args.cache_dir)
    ensure_pad_token(tokenizer, config)
    check_terms_before_loading(AutoModelForTokenClassification, config, bitfit, load_kwargs)
    model = load_pretrained(
        AutoModelForTokenClassification, model_args.model_name_or_path, config=config, cache_dir=model_args.cache_dir,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **load_kwargs)

    truncated: dict[str, int] = {}
    word_ids: dict[str, list[list[int | None]]] = {}
    evals = {}
    with training_args.main_process_first(desc="POS features"):
        for name in ("train", "validation", "test"):
            if name not in splits:
                continue
            ds = encode_sentences(splits[name], tokenizer, tag2id, data_args.max_seq_length)
            truncated[name] = int(sum(ds["n_lost"]))
            if truncated[name]:
                logger.warning("%s: %d words lie past --max_seq_length %d; they count as errors.", name,
                               truncated[name], data_args.max_seq_length)
            word_ids[name] = [[None if w < 0 else w for w in row] for row in ds["word_ids"]]
            ds = ds.remove_columns(["n_lost", "word_ids"])
            if name == "train":
                train = ds
            else:
                evals[name] = ds

    def metrics_for(split: str):
        def compute(p):
            pred_ids = np.argmax(p.predictions, -1)
            m = word_accuracy_metrics(pred_ids, p.label_ids, id2tag,
                                      extra_wrong=truncated.get(split, 0) + unseen.get(split, 0))
            logger.info("%s confusions (gold->pred): %s", split, ", ".join(m["confusions"]))
            out = {"accuracy": m["accuracy"], "n_words": m["n_words"],
                   "per_tag": m["per_tag"], "confusions": m["confusions"]}
            if scheme == "bio":  # spans scored on the words, as conlleval does
                pred = word_level_predictions(splits[split], word_ids[split], pred_ids, id2tag)
                out.update(seqeval_metrics([s["tags"] for s in splits[split]], pred))
            return out
        return compute

    trainer = BitFitTrainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=evals["validation"],
        processing_class=tokenizer, data_collator=DataCollatorForTokenClassification(tokenizer),
        compute_metrics=metrics_for("validation"), bitfit_config=bitfit,
        compute_loss_func=token_loss,
    )

    # The training sample is scored by word accuracy (the fit diagnostic), for POS and BIO tags alike.
    add_train_sample_eval(trainer, train, run_args, compute_metrics=lambda p: {
        "accuracy": word_accuracy_metrics(np.argmax(p.predictions, -1), p.label_ids, id2tag)["accuracy"]})

    def score_and_predict(trainer: BitFitTrainer) -> dict[str, Any]:
        """Score the test split (if any) and write per-word predictions for every eval split."""
        extra: dict[str, Any] = {"prediction_files": {}}
        for split, ds in evals.items():
            trainer.compute_metrics = metrics_for(split)
            out = trainer.predict(ds, metric_key_prefix=split if split == "test" else "predict")
            if split == "test":
                keys = ("accuracy", "n_words") + (("precision", "recall", "f1", "per_type") if scheme == "bio" else ())
                extra.update({f"test_{k}": out.metrics[f"test_{k}"] for k in keys})
                logger.info("test %s %.4f", "span F1" if scheme == "bio" else "word accuracy",
                            out.metrics["test_f1" if scheme == "bio" else "test_accuracy"])
            if trainer.is_world_process_zero():
                path = Path(training_args.output_dir) / f"predictions_{split}.jsonl"
                pred_ids = np.argmax(out.predictions, -1)
                atomic_write_lines(path, word_predictions(splits[split], word_ids[split], pred_ids, id2tag))
                extra["prediction_files"][split] = str(path)
        trainer.compute_metrics = metrics_for("validation")
        return extra

    return train_and_record(
        trainer, metric_key="eval_f1" if scheme == "bio" else "eval_accuracy", bitfit=bitfit,
        save_full_model=data_args.save_full_model,
        info={"task": data_args.task_name, "metric": "span F1 (seqeval)" if scheme == "bio" else "word accuracy",
              "tag_scheme": scheme, "train_examples": len(train),
              "n_tags": len(tags), "model": model_args.model_name_or_path, "truncated_words": truncated},
        after_training=score_and_predict,
        keep=getattr(run_args, "keep", "best"),
    )
