"""The bad-input battery: every case is one clear message naming the value and the fix, raised before
any model is loaded (model loading is patched to fail, so a case that got that far would show it).

``python tests/test_bad_input.py > docs/bad-input.md`` regenerates the table (input -> message)."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from conftest import FIXTURES, tiny_model  # noqa: E402

GLUE = os.path.join(FIXTURES, "glue")
SQ = os.path.join(FIXTURES, "squad")
POS = os.path.join(FIXTURES, "pos")
CASES: list[tuple[str, str, Callable[[Path], object], str]] = []


def case(cid: str, what: str, pattern: str):
    def register(fn):
        CASES.append((cid, what, fn, pattern))
        return fn
    return register


@contextmanager
def no_model_loading():
    """A case that reaches model loading has passed validation: make that fail loudly."""
    def boom(*a, **k):
        raise AssertionError("model loaded: validation did not stop this input up front")
    with mock.patch("transformers.AutoConfig.from_pretrained", boom), \
            mock.patch("transformers.AutoTokenizer.from_pretrained", boom):
        yield


def glue(d: Path, *args: str):
    from bitfit_tasks.tasks.glue.run import main

    return main(["--model_name_or_path", "unused", "--output_dir", str(d / "out"), "--use_cpu", "true", *args])


def glue_json(d: Path):
    from bitfit_tasks.tasks.glue.run import main

    return main([str(d / "a.json")])


def squad(d: Path, *args: str, train: str | None = None, dev: str | None = None):
    from bitfit_tasks.tasks.squad.run import main

    return main(["--model_name_or_path", "unused", "--output_dir", str(d / "out"), "--use_cpu", "true",
                 "--train_file", train or f"{SQ}/official.json", "--validation_file", dev or f"{SQ}/flat.jsonl", *args])


def pos(d: Path, *args: str):
    from bitfit_tasks.tasks.pos.run import main

    return main(["--model_name_or_path", "unused", "--output_dir", str(d / "out"), "--use_cpu", "true", *args])


def rows(d: Path, name: str, items: list[dict]) -> str:
    path = d / name
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return str(path)


def pair(label) -> dict:
    return {"sentence1": "a cat", "sentence2": "a dog", "label": label}


def squad_rows(d: Path, name: str, **answer) -> str:
    row = {"id": "q1", "context": "The cat sat on the mat.", "question": "Where did the cat sit?",
           "answers": {"text": ["the mat"], "answer_start": [15]}}
    row["answers"] = {**row["answers"], **answer}
    return rows(d, name, [row, {**row, "id": "q2"}])


# ---- GLUE runner -----------------------------------------------------------------------------

case("glue-task", "`--task_name mnli2`", r"unknown GLUE task 'mnli2'; choose one of \['cola'")(
    lambda d: glue(d, "--task_name", "mnli2"))
case("glue-seq0", "`--max_seq_length 0`", r"--max_seq_length must be a positive whole number, got 0")(
    lambda d: glue(d, "--task_name", "rte", "--data_dir", GLUE, "--max_seq_length", "0"))
case("glue-seq-neg", "`--max_seq_length -5`", r"--max_seq_length must be a positive whole number, got -5")(
    lambda d: glue(d, "--task_name", "rte", "--data_dir", GLUE, "--max_seq_length", "-5"))
case("glue-samples0", "`--max_train_samples 0`", r"--max_train_samples must be a positive whole number, got 0")(
    lambda d: glue(d, "--task_name", "rte", "--data_dir", GLUE, "--max_train_samples", "0"))
case("glue-one-file", "`--train_file` without `--validation_file`", r"give both --train_file and --validation_file")(
    lambda d: glue(d, "--task_name", "rte", "--train_file", f"{GLUE}/rte/train.jsonl"))
case("glue-ext", "a `.txt` data file", r"unsupported data file '.*a\.txt'; use one of \['\.csv'")(
    lambda d: glue(d, "--task_name", "rte", "--train_file", "a.txt", "--validation_file", "b.txt"))
case("glue-data-dir", "`--data_dir` without the task's folder", r"no train file for task 'qqp' in .*; check --data_dir")(
    lambda d: glue(d, "--task_name", "qqp", "--data_dir", str(d)))
case("glue-float-label", "class label `0.6` (RTE)",
     r"train file '.*t\.jsonl', row 1: label 0\.6 is not a class id; allowed: one of \['entailment', "
     r"'not_entailment'\] or ids 0\.\.1")(
    lambda d: glue(d, "--task_name", "rte", "--train_file", rows(d, "t.jsonl", [pair(1), pair(0.6)]),
                   "--validation_file", rows(d, "v.jsonl", [pair(0)])))
case("glue-stsb-high", "STS-B score `7.5`", r"row 0: score 7\.5 is outside 0\.\.5 \(STS-B similarity\)")(
    lambda d: glue(d, "--task_name", "stsb", "--train_file", rows(d, "t.jsonl", [pair(7.5)]),
                   "--validation_file", rows(d, "v.jsonl", [pair(1.0), pair(2.0)])))
case("glue-stsb-neg", "STS-B score `-2`", r"row 1: score -2 is outside 0\.\.5")(
    lambda d: glue(d, "--task_name", "stsb", "--train_file", rows(d, "t.jsonl", [pair(1), pair(-2)]),
                   "--validation_file", rows(d, "v.jsonl", [pair(1.0), pair(2.0)])))
case("glue-range", "label `3` for a 2-class task", r"row 0: label 3 out of range 0\.\.1")(
    lambda d: glue(d, "--task_name", "rte", "--train_file", rows(d, "t.jsonl", [pair(3)]),
                   "--validation_file", rows(d, "v.jsonl", [pair(0)])))
case("glue-test-split", "label `-1` (GLUE test split)", r"label -1 out of range 0\.\.1 \(-1 marks the unlabelled GLUE")(
    lambda d: glue(d, "--task_name", "rte", "--train_file", rows(d, "t.jsonl", [pair(0)]),
                   "--validation_file", rows(d, "v.jsonl", [pair(-1)])))
case("glue-label-name", "label name `maybe`", r"unknown label 'maybe'; allowed: one of \['entailment'")(
    lambda d: glue(d, "--task_name", "rte", "--train_file", rows(d, "t.jsonl", [pair("maybe")]),
                   "--validation_file", rows(d, "v.jsonl", [pair(0)])))
case("glue-null-text", "a row whose sentence is `null`",
     r"row 0: column 'sentence2' is None, not text; every row needs its sentence\(s\)")(
    lambda d: glue(d, "--task_name", "rte", "--train_file",
                   rows(d, "t.jsonl", [{"sentence1": "a", "sentence2": None, "label": 0}]),
                   "--validation_file", rows(d, "v.jsonl", [pair(0)])))
case("glue-columns", "columns named otherwise", r"lacks column\(s\) \['sentence1', 'sentence2'\] for this task; it has "
     r"\['text', 'label'\]\. Rename columns")(
    lambda d: glue(d, "--task_name", "rte", "--train_file", rows(d, "t.jsonl", [{"text": "x", "label": 0}]),
                   "--validation_file", rows(d, "v.jsonl", [pair(0)])))
case("glue-broken-jsonl", "a truncated jsonl file", r"t\.jsonl:1: not a JSON line \(Expecting property name .*\); a "
     r"\.jsonl file holds one JSON object per line")(
    lambda d: (d / "t.jsonl").write_text('{"sentence1": "x", \n') and
    glue(d, "--task_name", "rte", "--train_file", str(d / "t.jsonl"), "--validation_file", rows(d, "v.jsonl", [pair(0)])))
case("glue-tsv-as-csv", "a tab-separated file named `.csv`", r"train file '.*t\.csv' was read as one column "
     r"'sentence1\\tsentence2\\tlabel'; its header line is tab-separated, but a \.csv file is read as "
     r"comma-separated: rename it to \.tsv")(
    lambda d: (d / "t.csv").write_text("sentence1\tsentence2\tlabel\na cat\ta dog\t1\n") and
    glue(d, "--task_name", "rte", "--train_file", str(d / "t.csv"), "--validation_file", str(d / "t.csv")))
case("glue-null-row", "a jsonl file whose first line is `null` (crashed pyarrow)", r"t\.jsonl:1: 'null' is a JSON null, "
     r"not an object \{\.\.\.\}; a \.jsonl file holds one object per line")(
    lambda d: (d / "t.jsonl").write_text('null\n{"sentence1": "a", "sentence2": "b", "label": 1}\n') and
    glue(d, "--task_name", "rte", "--train_file", str(d / "t.jsonl"), "--validation_file", str(d / "t.jsonl")))
case("glue-latin1", "a Latin-1 (non-UTF-8) jsonl file", r".*t\.jsonl is not UTF-8 text \(byte 0xe9 on line 1\); re-save "
     r"it as UTF-8")(
    lambda d: (d / "t.jsonl").write_bytes(b'{"sentence1": "caf\xe9", "sentence2": "x", "label": 0}\n') and
    glue(d, "--task_name", "rte", "--train_file", str(d / "t.jsonl"), "--validation_file", rows(d, "v.jsonl", [pair(0)])))
case("glue-stsb-one-row", "an STS-B dev file of one row",
     r"the validation data has 1 row\(s\); spearmanr needs at least 2")(
    lambda d: glue(d, "--task_name", "stsb", "--train_file", rows(d, "t.jsonl", [pair(1.0), pair(2.0)]),
                   "--validation_file", rows(d, "v.jsonl", [pair(1.0)])))
case("glue-mismatched", "`--validation_mismatched_file` for RTE", r"--validation_mismatched_file is for --task_name mnli")(
    lambda d: glue(d, "--task_name", "rte", "--data_dir", GLUE, "--validation_mismatched_file", "x.jsonl"))

# ---- argument files, resume, output folders --------------------------------------------------

case("json-args-syntax", "`run_glue.py args.json` with a syntax error", r"argument file '.*a\.json' is not valid JSON")(
    lambda d: (d / "a.json").write_text("{task_name: rte}") and glue_json(d))
case("json-args-unknown", "an argument file with a misspelt name",
     r"argument file '.*a\.json': unknown argument\(s\) \['bias_term'\]; see --help")(
    lambda d: (d / "a.json").write_text('{"bias_term": ["q"]}') and glue_json(d))
case("json-args-list", "an argument file holding a list", r"must hold one JSON object of argument names to values, got a list")(
    lambda d: (d / "a.json").write_text("[1]") and glue_json(d))
case("resume-none", "`--resume_from_checkpoint true` with no checkpoint",
     r"--resume_from_checkpoint true: no complete checkpoint-\* folder in --output_dir '.*out'; train with "
     r"--save_strategy epoch")(
    lambda d: glue(d, "--task_name", "rte", "--data_dir", GLUE, "--resume_from_checkpoint", "true"))
case("resume-missing", "`--resume_from_checkpoint` a missing folder",
     r"--resume_from_checkpoint '.*nowhere' is not a folder; pass a checkpoint-N folder or 'true'")(
    lambda d: glue(d, "--task_name", "rte", "--data_dir", GLUE, "--resume_from_checkpoint", str(d / "nowhere")))
case("resume-incomplete", "`--resume_from_checkpoint` a half-saved checkpoint",
     r"has no trainer_state\.json, so it is not a complete Trainer checkpoint")(
    lambda d: (d / "checkpoint-3").mkdir() or
    glue(d, "--task_name", "rte", "--data_dir", GLUE, "--resume_from_checkpoint", str(d / "checkpoint-3")))


def damaged_checkpoint(d: Path) -> Path:
    """A checkpoint with a trainer state and a delta whose JSON was cut to 0 bytes."""
    ck = d / "out" / "checkpoint-4"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text("{}")
    (ck / "bitfit_delta.safetensors").write_bytes(b"")
    (ck / "bitfit_delta.json").write_text("")
    return ck


case("quant-full", "`--load_in_4bit true --mode full`",
     r"--load_in_4bit with --mode full: a quantized base's weights are packed 4/8-bit codes, which --mode full would "
     r"have to train; use --mode bitfit")(
    lambda d: glue(d, "--task_name", "rte", "--data_dir", GLUE, "--load_in_4bit", "true", "--mode", "full"))
case("quant-random", "`--load_in_8bit true --mode rand_uniform`", r"--load_in_8bit with --mode rand_uniform")(
    lambda d: glue(d, "--task_name", "rte", "--data_dir", GLUE, "--load_in_8bit", "true", "--mode", "rand_uniform"))
case("quant-lean", "`--load_in_4bit true --lean true`", r"--load_in_4bit with --lean: .*drop --lean")(
    lambda d: glue(d, "--task_name", "rte", "--data_dir", GLUE, "--load_in_4bit", "true", "--lean", "true"))
case("quant-both", "`--load_in_4bit true --load_in_8bit true`",
     r"--load_in_4bit and --load_in_8bit both set; choose one")(
    lambda d: glue(d, "--task_name", "rte", "--data_dir", GLUE, "--load_in_4bit", "true", "--load_in_8bit", "true"))
case("quant-type-alone", "`--bnb_4bit_quant_type fp4` without `--load_in_4bit`",
     r"--bnb_4bit_quant_type / --use_bnb_nested_quant set how a 4-bit base is stored, and --load_in_4bit is not set")(
    lambda d: glue(d, "--task_name", "rte", "--data_dir", GLUE, "--bnb_4bit_quant_type", "fp4"))
case("resume-damaged", "`--resume_from_checkpoint` a checkpoint whose delta is damaged",
     r"--resume_from_checkpoint .*checkpoint-4: .*bitfit_delta\.json is not valid JSON .*; pass another checkpoint "
     r"or 'true' for the newest intact one")(
    lambda d: glue(d, "--task_name", "rte", "--data_dir", GLUE, "--resume_from_checkpoint",
                   str(damaged_checkpoint(d))))
case("output-finished", "`--output_dir` of a finished run",
     r"--output_dir .*out holds a finished run \(results\.json\); resume it with --resume_from_checkpoint true, "
     r"replace it with --overwrite_output_dir true, or pick another --output_dir")(
    lambda d: (d / "out").mkdir() or (d / "out" / "results.json").write_text("{}") and
    glue(d, "--task_name", "rte", "--data_dir", GLUE))
case("output-unfinished", "`--output_dir` holding checkpoints of a killed run",
     r"--output_dir .*out holds checkpoints of an unfinished run \(checkpoint-8\)")(
    lambda d: (d / "out" / "checkpoint-8").mkdir(parents=True) or glue(d, "--task_name", "rte", "--data_dir", GLUE))

# ---- BitFit options ---------------------------------------------------------------------------

case("term", "`--bias_terms zz`", r"unknown bias term or preset 'zz'; terms are \['q', 'k'")(
    lambda d: glue(d, "--task_name", "rte", "--data_dir", GLUE, "--bias_terms", "zz"))
case("mode", "`--mode prefix`", r"invalid choice: 'prefix'|unknown mode 'prefix'")(
    lambda d: __import__("bitfit_tasks").BitFitConfig(mode="prefix"))
case("lean-full", "`--lean true --mode full`", r"lean=True stores frozen weights in bf16, which only bias-only modes allow")(
    lambda d: glue(d, "--task_name", "rte", "--data_dir", GLUE, "--mode", "full", "--lean", "true"))
case("head-lr", "`--head_learning_rate 0`", r"head_learning_rate must be > 0, got 0\.0")(
    lambda d: glue(d, "--task_name", "rte", "--data_dir", GLUE, "--head_learning_rate", "0"))
case("frozen-no-head", "`--mode frozen --train_head false`", r"mode 'frozen' with train_head=False leaves nothing trainable")(
    lambda d: glue(d, "--task_name", "rte", "--data_dir", GLUE, "--mode", "frozen", "--train_head", "false"))
case("full-terms", "`--mode full --bias_terms q`", r"--bias_terms q has no effect with --mode full, which trains "
     r"every parameter.* Drop --bias_terms, or use --mode bitfit")(
    lambda d: glue(d, "--task_name", "rte", "--data_dir", GLUE, "--mode", "full", "--bias_terms", "q"))
case("frozen-terms", "`--mode frozen --bias_terms m2`", r"--bias_terms m2 has no effect with --mode frozen, which "
     r"trains the head only")(
    lambda d: glue(d, "--task_name", "rte", "--data_dir", GLUE, "--mode", "frozen", "--bias_terms", "m2"))
case("keep-last-best", "`--keep last --load_best_model_at_end true`", r"--keep last contradicts "
     r"--load_best_model_at_end true")(
    lambda d: glue(d, "--task_name", "rte", "--data_dir", GLUE, "--keep", "last", "--load_best_model_at_end", "true",
                   "--save_strategy", "epoch", "--metric_for_best_model", "accuracy"))
case("term-missing", "`--bias_terms pool` on RoBERTa", r"bias term 'pool' matches no parameter of "
     r"RobertaForSequenceClassification .* the terms this model has are")(
    lambda d: __import__("bitfit_tasks").select_bias_parameters(tiny_model("roberta"), ["q", "pool"]))
case("no-biases", "a Llama model (built without biases) with `--add_missing_biases false`",
     r"LlamaForCausalLM has no bias parameters in its backbone \(model_type 'llama' is built without them\) and "
     r"add_missing_biases is off")(
    lambda d: __import__("bitfit_tasks").prepare_model(_llama(), __import__("bitfit_tasks").BitFitConfig(
        add_missing_biases=False)))
case("rmsnorm-term", "`--bias_terms q LN1` on Llama (LN1 is an RMSNorm)",
     r"bias term 'LN1' is a norm without a bias \(LlamaRMSNorm\).*Drop 'LN1' from --bias_terms")(
    lambda d: __import__("bitfit_tasks").prepare_model(_llama(), __import__("bitfit_tasks").BitFitConfig(
        bias_terms=["q", "LN1"])))
case("peft-target-mode", "`--peft_targets q` with `--mode bitfit`",
     r"--peft_targets q is for --mode lora / beft, not 'bitfit'; drop it")(
    lambda d: glue(d, "--task_name", "rte", "--data_dir", GLUE, "--peft_targets", "q"))
case("peft-target-norm", "`--mode lora --peft_targets LN1`",
     r"--peft_targets LN1: a lora target is a Linear layer of each transformer layer; choose from \['q'")(
    lambda d: glue(d, "--task_name", "rte", "--data_dir", GLUE, "--mode", "lora", "--peft_targets", "LN1"))
case("peft-target-missing", "`--mode beft --peft_targets m2` on Qwen2 (biases on q, k, v only)",
     r"--peft_targets m2: Qwen2ForSequenceClassification has no such layer; its beft targets are \['q', 'k', 'v'\]")(
    lambda d: __import__("bitfit_tasks").BitFitTrainer(
        model=__import__("conftest").tiny_model("qwen2"), args=__import__("transformers").TrainingArguments(
            output_dir=str(d), report_to=[], use_cpu=True),
        bitfit_config=__import__("bitfit_tasks").BitFitConfig(mode="beft", peft_targets=["m2"])))
case("lora-rank", "`--mode lora --lora_r 0`", r"--lora_r must be >= 1, got 0")(
    lambda d: glue(d, "--task_name", "rte", "--data_dir", GLUE, "--mode", "lora", "--lora_r", "0"))


def _llama():
    import transformers

    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2))


# ---- SQuAD runner -----------------------------------------------------------------------------

case("squad-shifted", "an `answer_start` shifted by 2",
     r"train file .*t\.jsonl: question 'q1': answer_start 13 points at 'n the m', not at its answer 'the mat' "
     r"\(and 1 more\); fix the answers")(
    lambda d: squad(d, train=squad_rows(d, "t.jsonl", answer_start=[13])))
case("squad-past", "an `answer_start` past the context", r"answer_start 500 is not an offset inside its 23-character context")(
    lambda d: squad(d, train=squad_rows(d, "t.jsonl", answer_start=[500])))
case("squad-no-answer", "a training question without answers", r"question 'q1' has no answer \(SQuAD v1\.1 questions all "
     r"have one; v2\.0's unanswerable questions are not supported\)")(
    lambda d: squad(d, train=squad_rows(d, "t.jsonl", text=[], answer_start=[])))
case("squad-dev-no-answer", "a dev question without answers", r"validation file .*v\.jsonl: question 'q1' has no answer")(
    lambda d: squad(d, dev=squad_rows(d, "v.jsonl", text=[], answer_start=[])))
case("squad-json", "a SQuAD file that is not JSON", r".*t\.json: not valid JSON \(Expecting value at line 1, column 1\)")(
    lambda d: (d / "t.json").write_text("no json") and squad(d, train=str(d / "t.json")))
case("squad-jsonl", "a jsonl SQuAD file with a broken line", r".*t\.jsonl:2: not a JSON line")(
    lambda d: (d / "t.jsonl").write_text('{"id": "1"}\n{oops\n') and squad(d, train=str(d / "t.jsonl")))
case("squad-fields", "rows without answers", r"row 0 needs \['answers', 'context', 'id', 'question'\]; it has "
     r"\['id', 'question'\]")(
    lambda d: squad(d, train=rows(d, "t.jsonl", [{"id": "1", "question": "q"}])))
case("squad-layout", "nested JSON that is not SQuAD's", r"not the official SQuAD format \(no top-level 'data' list\)")(
    lambda d: (d / "t.json").write_text('{"version": "1.1"}') and squad(d, train=str(d / "t.json")))
case("squad-stride", "`--doc_stride 400` with `--max_seq_length 384`", r"--doc_stride 400 must be smaller than "
     r"--max_seq_length 384")(lambda d: squad(d, "--doc_stride", "400"))
case("squad-fraction", "`--train_fraction 1.5`", r"--train_fraction must be in \(0, 1\], got 1\.5")(
    lambda d: squad(d, "--train_fraction", "1.5"))
case("squad-nbest", "`--n_best_size 0`", r"--n_best_size must be a positive whole number, got 0")(
    lambda d: squad(d, "--n_best_size", "0"))
case("squad-latin1", "a Latin-1 SQuAD file", r".*t\.json is not UTF-8 text \(byte 0xe9 on line 1\)")(
    lambda d: (d / "t.json").write_bytes(b'{"data": "caf\xe9"}') and squad(d, train=str(d / "t.json")))

# ---- POS runner -------------------------------------------------------------------------------

case("pos-latin1", "a Latin-1 `.mrg` tree", r"wsj_0001\.mrg is not UTF-8 text \(byte 0xe9 on line 1\)")(
    lambda d: (d / "wsj_0001.mrg").write_bytes(b"( (S (NP (NNP Caf\xe9)) (. .)) )\n") and
    pos(d, "--treebank", str(d / "wsj_0001.mrg")))
case("pos-two-sources", "`--treebank` and `--train_file` together", r"give exactly one data source: --treebank, "
     r"--train_file/--validation_file, or --dataset_name")(
    lambda d: pos(d, "--treebank", f"{POS}/treebank", "--train_file", "x.txt"))
case("pos-no-dev", "`--train_file` without `--validation_file`", r"--train_file needs --validation_file too")(
    lambda d: pos(d, "--train_file", f"{POS}/conll2000.txt"))
case("pos-columns", "`--tag_column 5` on 3-column CoNLL", r"conll2000\.txt:1: 3 column\(s\) but --word_column 0 and "
     r"--tag_column 5 need 6")(
    lambda d: pos(d, "--train_file", f"{POS}/conll2000.txt", "--validation_file", f"{POS}/conll2000.txt",
                  "--tag_column", "5"))
case("pos-format", "a file of unknown format", r"cannot tell the format of '.*data\.xyz'; pass --data_format")(
    lambda d: (d / "data.xyz").write_text("x") and pos(d, "--train_file", str(d / "data.xyz"),
                                                       "--validation_file", str(d / "data.xyz")))
case("pos-unseen-tag", "a dev tag the training data never shows", r"validation data has tags the training data never "
     r"shows: \{'ZZ': 1\}\. Add them .* or pass --unknown_tags count_wrong")(
    lambda d: (d / "t.txt").write_text("a DT\n") and (d / "v.txt").write_text("a ZZ\n") and
    pos(d, "--train_file", str(d / "t.txt"), "--validation_file", str(d / "v.txt")))
case("pos-zip-member", "`archive.zip::member` naming no member", r"has no member 'nope\.txt'; give archive\.zip::path")(
    lambda d: __import__("zipfile").ZipFile(d / "c.zip", "w").close() or
    pos(d, "--train_file", f"{d}/c.zip::nope.txt", "--validation_file", f"{d}/c.zip::nope.txt"))
case("pos-tag-count", "a tagging jsonl row with fewer tags than tokens", r"t\.jsonl, row 2: 3 tokens but 2 pos_tags; "
     r"every token needs exactly one tag")(
    lambda d: pos(d, "--train_file", rows(d, "t.jsonl", [{"tokens": ["a"], "pos_tags": ["DT"]},
                                                          {"tokens": ["a", "b", "c"], "pos_tags": ["DT", "NN"]}]),
                  "--validation_file", f"{POS}/tagged.jsonl"))
case("pos-null-tokens", "a tagging jsonl row whose tokens are `null`", r"t\.jsonl, row 1: 'tokens' must be a list of "
     r"words \(strings\), got None")(
    lambda d: pos(d, "--train_file", rows(d, "t.jsonl", [{"tokens": None, "pos_tags": ["DT"]}]),
                  "--validation_file", f"{POS}/tagged.jsonl"))
case("pos-seq", "`--max_seq_length 0` for POS", r"--max_seq_length must be a positive whole number, got 0")(
    lambda d: pos(d, "--treebank", f"{POS}/treebank", "--max_seq_length", "0"))

case("tag-scheme-bio", "`--tag_scheme bio` on POS tags", r"--tag_scheme bio: the training tags are not BIO \(e\.g\. "
     r"\[.*\]\); BIO tags are O or B-/I-/E-/S-TYPE")(
    lambda d: pos(d, "--train_file", f"{POS}/chunk_train.txt", "--validation_file", f"{POS}/chunk_test.txt",
                  "--tag_scheme", "bio", "--unknown_tags", "count_wrong"))
case("tag-field", "a jsonl without the `--tag_field` column", r"ner\.jsonl: needs columns tokens and pos_tags; missing "
     r"\['pos_tags'\], has \['tokens', 'ner_tags'\] \(pick the tag column with --tag_field, e\.g\. ner_tags\)")(
    lambda d: pos(d, "--train_file", f"{POS}/ner.jsonl", "--validation_file", f"{POS}/ner.jsonl"))
case("train-eval-samples", "`--train_eval_samples -1`", r"--train_eval_samples must be >= 0 \(0 turns it off\), got -1")(
    lambda d: glue(d, "--task_name", "rte", "--data_dir", GLUE, "--train_eval_samples", "-1"))

# ---- deltas and bitfit-delta ------------------------------------------------------------------


def saved_delta(d: Path) -> Path:
    from bitfit_tasks import save_delta

    model = tiny_model("bert")
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith(".bias"))
    return save_delta(model, d / "delta")


def edit_json(path: Path, fn) -> None:
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def flip_byte(d: Path) -> Path:
    p = saved_delta(d)
    f = p / "bitfit_delta.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x40  # one byte of the last tensor's values
    f.write_bytes(bytes(data))
    return p


case("delta-flipped", "a delta with one flipped tensor byte", r"bitfit_delta\.safetensors does not match its checksum "
     r"in bitfit_delta\.json .* the file was changed or damaged")(
    lambda d: __import__("bitfit_tasks").Delta.load(flip_byte(d)))
case("delta-no-fingerprint", "a delta JSON without `base_fingerprint`",
     r"bitfit_delta\.json lacks the field 'base_fingerprint'")(
    lambda d: edit_json(saved_delta(d) / "bitfit_delta.json", lambda m: m.pop("base_fingerprint")) or
    __import__("bitfit_tasks").Delta.load(d / "delta"))
case("delta-shapes", "a delta JSON whose `shapes` disagree with the tensors",
     r"JSON field 'shapes' gives bert\.embeddings\.LayerNorm\.bias as \[17\] but the tensor is \[16\]")(
    lambda d: edit_json(saved_delta(d) / "bitfit_delta.json",
                        lambda m: m["shapes"].__setitem__("bert.embeddings.LayerNorm.bias", [17])) or
    __import__("bitfit_tasks").Delta.load(d / "delta"))
case("delta-json", "a delta JSON that is not JSON", r"bitfit_delta\.json is not valid JSON .* the delta is damaged")(
    lambda d: (saved_delta(d) / "bitfit_delta.json").write_text("{") and __import__("bitfit_tasks").Delta.load(d / "delta"))
case("delta-missing", "a delta path that does not exist", r"delta folder '.*/nope' does not exist \(and it is not a "
     r"Hub id, which looks like user/name\)")(lambda d: __import__("bitfit_tasks").Delta.from_pretrained(d / "nope"))
case("delta-hub-offline", "a Hub delta id that cannot be fetched", r"delta 'user/no-such-delta': not a local folder, "
     r"and the Hub download failed .*; pass a local delta folder, or check the id, --revision, HF_TOKEN")(
    lambda d: __import__("bitfit_tasks").Delta.from_pretrained("user/no-such-delta", cache_dir=str(d),
                                                               local_files_only=True))
case("delta-dir", "a folder that is not a delta", r"is not a BitFit delta: expected bitfit_delta\.safetensors and "
     r"bitfit_delta\.json in it")(lambda d: __import__("bitfit_tasks").Delta.load(d))
case("delta-base", "a delta applied to another base", r"was trained on a different base model \(bert\..*: its bf16-rounded values differ \(hash "
     r"[0-9a-f]{12}, recorded [0-9a-f]{12}\); fingerprint sig-")(
    lambda d: __import__("bitfit_tasks").apply_delta(tiny_model("bert", seed=1), saved_delta(d)))
case("export-file", "`bitfit-delta export --output` an existing file", r"--output .*taken is a file; give a new or "
     r"empty folder")(
    lambda d: (d / "taken").write_text("x") and
    __import__("bitfit_tasks.serving.cli").serving.cli.main(["export", str(saved_delta(d)), "--base", "x", "--output", str(d / "taken")]))
case("export-dir", "`bitfit-delta export --output` a non-empty folder", r"is a folder that is not empty")(
    lambda d: (d / "full").mkdir() or (d / "full" / "x").write_text("x") and
    __import__("bitfit_tasks.serving.cli").serving.cli.main(["export", str(saved_delta(d)), "--base", "x", "--output", str(d / "full")]))
case("export-peft-dir", "`bitfit-delta export-peft DELTA OUT` into a non-empty folder",
     r"^the output .*/peft is a folder that is not empty; give a new or empty folder for the PEFT adapter\.$")(
    lambda d: (d / "peft").mkdir() or (d / "peft" / "x").write_text("x") and
    __import__("bitfit_tasks.serving.cli").serving.cli.main(["export-peft", str(saved_delta(d)), str(d / "peft"), "--base", "x"]))

case("delta-head-name", "`bitfit-delta info` on a delta whose JSON `head` names a missing tensor",
     r"bitfit_delta\.json: field 'head' names tensor\(s\) \['classifier\.nope'\] that bitfit_delta\.safetensors "
     r"lacks")(
    lambda d: edit_json(saved_delta(d) / "bitfit_delta.json", lambda m: m["head"].append("classifier.nope")) or
    __import__("bitfit_tasks.serving.cli").serving.cli.main(["info", str(d / "delta")]))
case("delta-task-class", "a delta JSON whose `task_class` is not a model class", r"task_class 'os' is not a "
     r"transformers model class \(e\.g\. BertForSequenceClassification\)")(
    lambda d: edit_json(saved_delta(d) / "bitfit_delta.json", lambda m: m.__setitem__("task_class", "os")) or
    __import__("bitfit_tasks").load_task_model("unused", d / "delta"))
case("delta-task-class-name", "a delta JSON whose `task_class` is not a class name", r"bitfit_delta\.json: task_class "
     r"'os\.system\(1\)' is not a class name; the JSON was edited or damaged")(
    lambda d: edit_json(saved_delta(d) / "bitfit_delta.json", lambda m: m.__setitem__("task_class", "os.system(1)"))
    or __import__("bitfit_tasks").Delta.load(d / "delta"))

# ---- sweeps -------------------------------------------------------------------------------------

case("sweep-seed", "`--seed` after `--` in a sweep", r"runner argument --seed after '--' collides with the grid, which "
     r"sets it for every run; use the sweep's --seeds instead")(
    lambda d: __import__("bitfit_tasks.experiments.sweep").experiments.sweep.main(["--tasks", "rte", "--output_dir", str(d), "--dry_run",
                                                          "--", "--seed", "3"]))
case("sweep-method", "`--methods adapter`", r"unknown method 'adapter': use one of \['full', 'bitfit'")(
    lambda d: __import__("bitfit_tasks.experiments.sweep").experiments.sweep.main(["--tasks", "rte", "--methods", "adapter", "--output_dir", str(d)]))
case("sweep-epochs", "`--fraction_epochs` of the wrong length", r"--fraction_epochs needs one value per fraction: got 1 "
     r"for 2 fractions")(
    lambda d: __import__("bitfit_tasks.experiments.sweep").experiments.sweep.fraction_task_args([0.1, 0.3], [3]))
case("sweep-shard", "`--shard 3/2`", r"--shard '3/2': need 0 <= i < n")(
    lambda d: __import__("bitfit_tasks.experiments.sweep").experiments.sweep._parse_shard("3/2"))


def message_of(fn: Callable[[Path], object], d: Path) -> str:
    with no_model_loading():
        try:
            fn(d)
        except (ValueError, OSError) as err:  # UsageError, FileNotFoundError included
            return str(err)
        except SystemExit as err:  # argparse choices: the message went to stderr
            return f"(argparse exit {err.code})"
    raise AssertionError("no error raised")


@pytest.mark.parametrize("cid, what, fn, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_message(cid, what, fn, pattern, tmp_path):
    msg = message_of(fn, tmp_path)
    assert re.search(pattern, msg), f"{cid}: {msg}"
    assert "\n" not in msg.strip() and "Traceback" not in msg and "model loaded" not in msg


def test_battery_size():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


if __name__ == "__main__":  # the table in docs/bad-input.md
    print("# Bad input: what each case prints\n")
    print("Generated by `python tests/test_bad_input.py > docs/bad-input.md` from the cases that "
          "`tests/test_bad_input.py` asserts (every one raised before a model is loaded). The runners print the "
          "message as one line, `run_glue.py: error: <message>`, exit code 1; `BITFIT_DEBUG=1` adds the "
          "traceback. Temporary paths are shortened to `…/`.\n")
    print("| case | input | message |\n|---|---|---|")
    for cid, what, fn, _ in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            msg = message_of(fn, Path(tmp)).replace(tmp, "…").replace(FIXTURES, "tests/fixtures").replace("|", "\\|")
        print(f"| {cid} | {what} | {msg} |")
