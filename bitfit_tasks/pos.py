"""Token tagging (run_pos.py): POS tagging, chunking and BIO NER. Data, first-sub-token alignment,
word accuracy for POS tags, seqeval span precision/recall/F1 for BIO tag sets."""

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

from .arguments import ModelArguments, RunArguments
from .callbacks import add_train_sample_eval
from .config import BitFitConfig
from .errors import check_positive
from .fileio import atomic_write_lines
from .metrics import is_bio_tag_set, seqeval_metrics
from .pos_data import FORMATS, Sentence, read_file, read_token_tag_dataset, read_treebank_splits
from .runner import ensure_pad_token, parse_and_run, start_run, train_and_record
from .sampling import EVAL_SAMPLE_SEED, sample_list
from .trainer import BitFitTrainer

logger = logging.getLogger("bitfit_tasks")
IGNORE = -100


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
            raise ValueError("give exactly one data source: --treebank, --train_file/--validation_file, or "
                             "--dataset_name.")
        if self.train_file is not None and self.validation_file is None:
            raise ValueError("--train_file needs --validation_file too.")


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
            raise ValueError(f"the {name} split is empty; check the data source.")
    return {k: v for k, v in splits.items() if v}


def tag_set(train: list[Sentence]) -> list[str]:
    return sorted({t for s in train for t in s["tags"]})


def check_tags(split: str, sentences: list[Sentence], known: set[str], policy: str) -> int:
    unknown = Counter(t for s in sentences for t in s["tags"] if t not in known)
    if unknown and policy == "error":
        raise ValueError(f"{split} data has tags the training data never shows: {dict(unknown.most_common(10))}. "
                         "Add them to the training data, or pass --unknown_tags count_wrong to score those "
                         "words as errors.")
    return sum(unknown.values())


def align_labels(word_ids: list[int | None], word_labels: list[int]) -> list[int]:
    """First sub-token of each word gets the word's label; other sub-tokens and specials -100."""
    out, prev = [], None
    for wid in word_ids:
        out.append(word_labels[wid] if wid is not None and wid != prev else IGNORE)
        prev = wid if wid is not None else prev
    return out


def word_accuracy_metrics(pred_ids: np.ndarray, label_ids: np.ndarray, id2tag: dict[int, str],
                          extra_wrong: int = 0, top_confusions: int = 5) -> dict[str, Any]:
    """Word-level accuracy (the POS headline) from first-sub-token positions, plus per-tag
    precision/recall and the most frequent confusions. ``extra_wrong`` words (truncated or with an
    unseen tag) count in the denominator as errors."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    mask = label_ids != IGNORE
    gold, pred = label_ids[mask], pred_ids[mask]
    correct = int((gold == pred).sum())
    total = int(mask.sum()) + extra_wrong
    out: dict[str, Any] = {"accuracy": correct / total if total else 0.0, "n_words": total}
    present = sorted(set(gold.tolist()) | set(pred.tolist()))  # tags seen in gold or predictions
    if not present:
        return {**out, "per_tag": {}, "confusions": []}
    precision, recall, _, support = precision_recall_fscore_support(gold, pred, labels=present, zero_division=0)
    out["per_tag"] = {id2tag[i]: {"precision": float(p), "recall": float(r), "support": int(n)}
                      for i, p, r, n in zip(present, precision, recall, support, strict=True)}
    conf = confusion_matrix(gold, pred, labels=present)
    np.fill_diagonal(conf, 0)
    g_idx, p_idx = np.nonzero(conf)
    order = sorted(zip(g_idx, p_idx, strict=True), key=lambda gp: -conf[gp])[:top_confusions]
    out["confusions"] = [f"{id2tag[present[g]]}->{id2tag[present[p]]}: {conf[g, p]}" for g, p in order]
    return out


def token_loss(outputs, labels, num_items_in_batch=None):
    """Cross-entropy summed over labelled sub-tokens / the labelled count of the *global* batch.

    Trainer counts labels across processes and accumulation steps (``num_items_in_batch``), so N
    processes with batch B give exactly the gradient of one process with batch N*B; the models'
    own per-process mean would weight sentences by their process's token count instead.
    """
    import torch.nn.functional as F

    logits = outputs["logits"]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    n = num_items_in_batch if num_items_in_batch is not None else (labels != IGNORE).sum()
    return loss / n


# This runner's argument dataclass and its defaults beyond RUNNER_DEFAULTS (the sweep parses with them).
ARGUMENTS = PosArguments
DEFAULTS: dict[str, Any] = {}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    return parse_and_run(run, ARGUMENTS, argv, defaults=DEFAULTS)


def run(model_args: ModelArguments, data_args: PosArguments, bitfit: BitFitConfig,
        training_args: TrainingArguments, run_args: RunArguments | None = None) -> dict[str, Any]:

    seed = start_run(training_args, bitfit, run_args, runner="pos")
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

    base_type = AutoConfig.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir).model_type
    # Byte-level BPE tokenizers need a prefix space to tokenise pre-split words like running text.
    byte_level = ("roberta", "longformer", "deberta", "gpt2", "opt", "bloom", "gpt_neox")
    extra = {"add_prefix_space": True} if base_type in byte_level else {}
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir, **extra)
    if not tokenizer.is_fast:
        raise ValueError(f"{model_args.model_name_or_path}: POS tagging needs a fast tokenizer (word_ids for "
                         "sub-token alignment); this one is slow. Use a model with tokenizer.json.")
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, num_labels=len(tags), id2label=id2tag,
                                        label2id=tag2id, finetuning_task=data_args.task_name,
                                        cache_dir=model_args.cache_dir)
    ensure_pad_token(tokenizer, config)
    model = AutoModelForTokenClassification.from_pretrained(
        model_args.model_name_or_path, config=config, cache_dir=model_args.cache_dir,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes)

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


POS_CACHE_VERSION = 1


def encode_sentences(sentences: list[Sentence], tokenizer, tag2id: dict[str, int], max_len: int):
    """Sub-token features of ``sentences`` (first sub-token of each word labelled, the rest -100) as a
    memory-mapped ``datasets.Dataset`` built by ``map(batched=True)`` into a content-keyed Arrow
    file, plus per sentence the words lost to truncation (``n_lost``) and the ``word_ids`` (-1 for
    special tokens) that the prediction files read."""
    import datasets

    from .cache import cache_file, content_digest, tokenizer_digest

    key = [POS_CACHE_VERSION, content_digest(sentences, ("tokens", "tags")), tokenizer_digest(tokenizer),
           sorted(tag2id.items()), max_len]
    path = cache_file("pos", "features", key)
    if Path(path).exists():
        return datasets.Dataset.from_file(path)

    def encode(batch):
        enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_len)
        labels, lost, wids = [], [], []
        for i, (words, tags) in enumerate(zip(batch["tokens"], batch["tags"], strict=True)):
            ids = enc.word_ids(i)
            labels.append(align_labels(ids, [tag2id.get(t, IGNORE) for t in tags]))
            lost.append(len(words) - len({w for w in ids if w is not None}))
            wids.append([-1 if w is None else w for w in ids])
        return {**enc, "labels": labels, "n_lost": lost, "word_ids": wids}

    source = datasets.Dataset.from_dict({"tokens": [s["tokens"] for s in sentences],
                                         "tags": [s["tags"] for s in sentences]})
    return source.map(encode, batched=True, batch_size=1000, remove_columns=source.column_names,
                      cache_file_name=path, desc="POS features")


def word_level_predictions(sentences: list[Sentence], word_ids: list[list[int | None]], pred_ids: np.ndarray,
                           id2tag: dict[int, str]) -> list[list[str | None]]:
    """Per sentence, each word's predicted tag: its first sub-token's, ``None`` for words cut off by
    --max_seq_length."""
    out = []
    for i, s in enumerate(sentences):
        pred: list[str | None] = [None] * len(s["tokens"])
        prev = None
        for pos, wid in enumerate(word_ids[i]):
            if wid is not None and wid != prev and pos < pred_ids.shape[1]:
                pred[wid] = id2tag[int(pred_ids[i, pos])]
            prev = wid if wid is not None else prev
        out.append(pred)
    return out


def resolve_tag_scheme(requested: str, tags: list[str]) -> str:
    """--tag_scheme auto -> 'bio' for span tag sets (O, B-X, I-X...), else 'pos'; 'bio' on tags that
    are not BIO is refused (seqeval would silently score nonsense)."""
    if requested == "bio" and not is_bio_tag_set(tags):
        odd = [t for t in tags if not is_bio_tag_set([t, "B-X"])][:5]
        raise ValueError(f"--tag_scheme bio: the training tags are not BIO (e.g. {odd}); BIO tags are O or "
                         "B-/I-/E-/S-TYPE. Pick the chunk/NER column with --tag_column/--tag_field, or use "
                         "--tag_scheme pos (word accuracy).")
    if requested == "auto":
        return "bio" if is_bio_tag_set(tags) else "pos"
    return requested


def word_predictions(sentences: list[Sentence], word_ids: list[list[int | None]], pred_ids: np.ndarray,
                     id2tag: dict[int, str]):
    """One JSON line per sentence: ``{"tokens", "gold", "predicted"}`` (``null`` for a truncated word)."""
    import json

    for s, pred in zip(sentences, word_level_predictions(sentences, word_ids, pred_ids, id2tag), strict=True):
        yield json.dumps({"tokens": s["tokens"], "gold": s["tags"], "predicted": pred})
