"""Training-step cost of BitFit against full fine-tuning, through BitFitTrainer and a plain loop.

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296 \
        python benchmarks/train_step.py --shape bert-base --batch 16 --seq 128 --repeats 5
    python benchmarks/train_step.py --device cuda --precision bf16 --configs full bitfit lean lora --paths trainer
    python benchmarks/train_step.py --shape llama-1024 --batch 4 --seq 256 --configs full bitfit beft lora lean \
        --paths trainer --repeats 3
    python benchmarks/train_step.py --shape llama-1024 --batch 4 --seq 256 --paths trainer --repeats 3 \
        --configs bitfit-4bit qlora beft-4bit bitfit bitfit-bf16 lean full

Side by side in one process, interleaved (each round runs every configuration once), after a
warm-up round: median step time, peak heap in use during the step (glibc mallinfo2 sampled every
millisecond, minus the heap in use before the step: activations, gradients, temporaries), the total
peak (that plus what is held between steps: parameters, buffers, optimizer state), bytes saved
for backward, and the CPU seconds the process used in the step (all threads; on a machine shared
with other work it moves less than the wall time does). Configurations:
full, bitfit (all biases), bitfit qm2, frozen, and lean bitfit (bf16 frozen weights + autocast +
bool dropout masks), each through ``BitFitTrainer.training_step`` and a plain
forward/backward/AdamW loop; and two PEFT methods (the `bench` extra), through transformers' own
Trainer and the same loop: LoRA (r=8 on the query and value projections) and BEFT (a zero-initialised
bias vector added to every Linear layer of the backbone, ``target_modules="all-linear"``). Both train
the task head too (PEFT's ``SEQ_CLS`` setup). Ratios are to full fine-tuning on the same path.
``--precision bf16`` runs every forward under bf16 autocast (lean always does).

On a 4-bit base (the `quant` extra; trainer path only): ``bitfit-4bit`` (BitFitTrainer, all biases), ``qlora``
(LoRA r=8 on the query and value projections: QLoRA) and ``beft-4bit`` (BEFT on every Linear layer), each on the
shape's weights saved once and loaded back with bitsandbytes NF4 (compute in fp32 on a CPU, bf16 on a GPU), the
head left in floating point; the 4-bit scales count in the held bytes. ``bitfit-bf16`` is BitFit under bf16
autocast whatever ``--precision`` says. QLoRA here is PEFT's LoRA on the 4-bit model through Trainer, without
``prepare_model_for_kbit_training`` (which would add activation checkpointing to one side only).

``--shape llama-1024`` is a Llama-shaped decoder (hidden 1024, 8 layers, 16 heads, MLP 2816, vocab
32000, sequence-classification head reading the last token), random weights. Llama is built without
biases: BitFit's ``bitfit`` preset adds zero-initialised ones to its seven Linear layers per block
(q, k, v, o, gate, up, down; its RMSNorms have no bias term), the same vectors BEFT adds on
``all-linear``, so the two differ only in how the bias enters the layer.

On a GPU (``--device cuda``) the step is timed between ``torch.cuda.synchronize()`` calls and the
memory is ``torch.cuda.max_memory_allocated`` during the step (the step's peak, and the total
peak with what is held between steps); page faults and bytes saved for backward are CPU columns.

Without the GLIBC_TUNABLES above, glibc returns large freed blocks to the OS and faults them back
in on every step; full fine-tuning (more and larger temporaries) pays far more page faults than
BitFit and looks slower than it is. Page faults per step are printed so that can be checked.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import statistics
import tempfile
import threading
import time
import warnings

import torch
from torch.utils.data import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    Trainer,
    TrainingArguments,
)

from bitfit_tasks import BitFitConfig, BitFitTrainer, prepare_model
from bitfit_tasks.core.lean import cpu_bf16_capability, make_lean
from bitfit_tasks.tasks.arguments import demo_model_path

CONFIGS = {
    "full": BitFitConfig(mode="full"),
    "bitfit": BitFitConfig(),
    "qm2": BitFitConfig(bias_terms=["qm2"]),
    "frozen": BitFitConfig(mode="frozen"),
    "lean": BitFitConfig(lean=True),
    "lora": None,  # PEFT LoRA r=8 on query/value (plus the head), not a BitFit mode
    "beft": None,  # PEFT BEFT on all Linear layers (plus the head), not a BitFit mode
    # On a 4-bit NF4 base (bitsandbytes; the `quant` extra), the task head kept in floating point; trainer path only.
    "bitfit-4bit": BitFitConfig(),
    "qlora": None,  # LoRA r=8 on query/value on the 4-bit base: QLoRA
    "beft-4bit": None,
    "bitfit-bf16": BitFitConfig(),  # every forward under bf16 autocast, whatever --precision says
}
#: Configurations on a 4-bit base, and the PEFT method of each one that is not BitFit.
QUANTIZED = {"bitfit-4bit": None, "qlora": "lora", "beft-4bit": "beft"}

#: A Llama-shaped decoder of ~136M parameters (103M in the blocks), built without biases.
LLAMA_1024 = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=16, intermediate_size=2816, max_position_embeddings=2048, attention_dropout=0.0,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)  # the head reads the last non-pad token


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _Mallinfo2


def heap_in_use() -> int:
    m = _libc.mallinfo2()
    return m.uordblks + m.hblkhd  # malloc'd bytes in arenas + mmapped chunks


class PeakSampler:
    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.base = heap_in_use()
        self.peak = self.base
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, heap_in_use())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, heap_in_use())


class Batches(Dataset):
    def __init__(self, batch: int, seq: int, vocab: int):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1000, vocab, (batch, seq), generator=g)
        self.y = torch.randint(0, 2, (batch,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.y[i]}


def build(shape: str, model_path: str | None = None):
    torch.manual_seed(0)
    if shape == "bert-base":
        return BertForSequenceClassification(BertConfig(num_labels=2))  # 110M, random weights
    if shape == "llama-1024":
        return LlamaForSequenceClassification(LlamaConfig(num_labels=2, **LLAMA_1024))
    if shape == "tiny":  # a 2-layer BERT for dry runs of this script
        return BertForSequenceClassification(BertConfig(num_labels=2, hidden_size=64, num_hidden_layers=2,
                                                        num_attention_heads=2, intermediate_size=128))
    return AutoModelForSequenceClassification.from_pretrained(model_path or demo_model_path(), num_labels=2)


def build_4bit(shape: str, model_path: str | None, folder: str, device: str):
    """The shape's model saved once to ``folder`` and loaded back in 4-bit NF4 (QLoRA's storage; compute in bf16 on
    a GPU, fp32 on a CPU), its classifier left in floating point."""
    from transformers import BitsAndBytesConfig

    if not os.path.exists(os.path.join(folder, "config.json")):
        build(shape, model_path).save_pretrained(folder)
    head = "score" if shape == "llama-1024" else "classifier"
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=[head],
                               bnb_4bit_compute_dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    place = {"device_map": {"": 0}} if device == "cuda" else {}
    return AutoModelForSequenceClassification.from_pretrained(folder, quantization_config=quant, **place)


def peft_model(name: str, model):
    """A PEFT method on ``model``, the task head trained too (PEFT's own ``SEQ_CLS`` setup): LoRA r=8
    on the query and value projections, or BEFT on every Linear layer of the backbone."""
    try:
        import peft
    except ImportError:
        raise SystemExit(f"the {name} configuration needs peft: pip install 'bitfit-tasks[bench]'") from None
    if name == "lora":
        targets = ["q_proj", "v_proj"] if model.config.model_type == "llama" else ["query", "value"]
        cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=targets, task_type="SEQ_CLS")
        return peft.get_peft_model(model, cfg)
    if not hasattr(peft, "BeftConfig"):
        raise SystemExit(f"the beft configuration needs peft >= 0.20 (BeftConfig); this is peft {peft.__version__}: "
                         "pip install -U 'bitfit-tasks[bench]'")
    with warnings.catch_warnings():  # "cannot merge" on bias-free layers: a merge note, nothing to do with cost
        warnings.filterwarnings("ignore", message="Detected that the base layer has no bias term")
        return peft.get_peft_model(model, peft.BeftConfig(target_modules="all-linear", task_type="SEQ_CLS"))


class Runner:
    """One configuration on one path, ready to run single steps."""

    def __init__(self, a: argparse.Namespace, name: str, path: str, data: Batches, tmp: str):
        self.name, self.path, self.device = name, path, a.device
        cfg = CONFIGS[name]
        if name in QUANTIZED:
            if path != "trainer":
                raise SystemExit(f"{name} runs on the trainer path only (--paths trainer)")
            model = build_4bit(a.shape, a.model_path, os.path.join(tmp, "base"), a.device).train()
        else:
            model = build(a.shape, a.model_path).train()
        if cfg is None:
            model = peft_model(QUANTIZED.get(name) or name, model)
        self.inputs = {"input_ids": data.ids, "attention_mask": torch.ones_like(data.ids), "labels": data.y}
        bf16 = a.precision == "bf16" or name == "bitfit-bf16"
        if path == "trainer":
            args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=len(data), learning_rate=1e-4,
                                     report_to=[], use_cpu=a.device == "cpu", save_strategy="no", max_steps=10,
                                     bf16=bf16)
            if cfg is None:  # LoRA, BEFT: transformers' own Trainer, as PEFT users run it
                self.trainer = Trainer(model=model, args=args, train_dataset=data)
            else:
                self.trainer = BitFitTrainer(model=model, args=args, train_dataset=data, bitfit_config=cfg)
            self.trainer.create_optimizer_and_scheduler(num_training_steps=10)
            self.trainer.current_gradient_accumulation_steps = 1  # set by train() otherwise
            # train() hands the model to accelerate, whose wrapper runs the forward under --bf16's autocast;
            # without it training_step would run fp32 whatever --precision says.
            model = self.trainer.accelerator.prepare_model(self.trainer.model)
            self.inputs = {k: v.to(self.trainer.args.device) for k, v in self.inputs.items()}
            self.autocast = self.trainer.args.bf16
        else:
            if cfg is not None:
                prepare_model(model, cfg)
                if cfg.lean:
                    make_lean(model)
            model.to(a.device)
            self.inputs = {k: v.to(a.device) for k, v in self.inputs.items()}
            self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            self.autocast = bf16 or (cfg is not None and cfg.lean)
        self.model = model

    def forward(self):
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
            return self.model(**self.inputs).loss

    def step(self) -> None:
        if self.path == "trainer":
            self.trainer.training_step(self.model, dict(self.inputs))
            self.trainer.optimizer.step()
            self.trainer.optimizer.zero_grad(set_to_none=True)
            return
        loss = self.forward()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def persistent_bytes(self) -> int:
        """Bytes held between steps: parameters, buffers and optimizer state (Adam moments)."""
        opt = self.trainer.optimizer if self.path == "trainer" else self.opt
        tensors = [*self.model.parameters(), *self.model.buffers()]
        tensors += [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]
        # A 4-bit weight's per-block scales live beside its packed codes, in its quant_state.
        tensors += [p.quant_state.absmax for p in self.model.parameters() if getattr(p, "quant_state", None)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())

    def saved_bytes(self) -> int:
        seen: dict[tuple, int] = {}

        def pack(t: torch.Tensor):
            try:
                key = (t.untyped_storage().data_ptr(), t.dtype)
                seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
            except (RuntimeError, NotImplementedError):
                pass
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.forward()
        del loss
        # Frozen weights saved by reference are not activations: leave parameters out.
        params = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        return sum(v for (ptr, _), v in seen.items() if ptr not in params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["bert-base", "llama-1024", "minilm", "tiny"], default="bert-base",
                    help="bert-base: 110M random weights; llama-1024: a Llama-shaped decoder, 136M random weights, "
                    "no biases; minilm: the real pretrained model (--model_path, else the demo package's); tiny: a "
                    "2-layer BERT for dry runs")
    ap.add_argument("--model_path", help="the pretrained model folder for --shape minilm")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: every forward under bf16 autocast (Trainer's --bf16); lean is bf16 either way")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--configs", nargs="+", default=["full", "bitfit", "qm2", "frozen", "lean", "lora"],
                    choices=list(CONFIGS), help="default: full bitfit qm2 frozen lean lora (the bert-base records "
                    "above were taken with these)")
    ap.add_argument("--paths", nargs="+", default=["trainer", "loop"], choices=["trainer", "loop"])
    ap.add_argument("--json", help="write the measurements here")
    a = ap.parse_args()
    vocab = LLAMA_1024["vocab_size"] if a.shape == "llama-1024" else 30522
    data = Batches(a.batch, a.seq, vocab)
    tmp = tempfile.mkdtemp()
    runners = [Runner(a, c, p, data, tmp) for p in a.paths for c in a.configs]
    cuda = a.device == "cuda"
    times: dict[tuple, list[float]] = {(r.name, r.path): [] for r in runners}
    peaks: dict[tuple, list[int]] = {(r.name, r.path): [] for r in runners}
    faults: dict[tuple, list[int]] = {(r.name, r.path): [] for r in runners}
    # CPU seconds the process used in the step (all its threads): less sensitive than wall time to other
    # processes taking the cores of a shared machine.
    cpu: dict[tuple, list[float]] = {(r.name, r.path): [] for r in runners}
    for rnd in range(a.repeats + 1):  # round 0 is the warm-up
        for r in runners:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            c0 = time.process_time()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t = time.perf_counter()
                r.step()
                torch.cuda.synchronize()
                dt = time.perf_counter() - t
                step_peak = torch.cuda.max_memory_allocated() - base
            else:
                with PeakSampler() as s:
                    t = time.perf_counter()
                    r.step()
                    dt = time.perf_counter() - t
                step_peak = s.peak - s.base
            if rnd:
                cpu[(r.name, r.path)].append(time.process_time() - c0)
                times[(r.name, r.path)].append(dt)
                peaks[(r.name, r.path)].append(step_peak)
                faults[(r.name, r.path)].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    saved = {(r.name, r.path): r.saved_bytes() for r in runners}
    held = {(r.name, r.path): r.persistent_bytes() for r in runners}
    where = torch.cuda.get_device_name() if cuda else f"{torch.get_num_threads()} threads, " \
        f"{platform.processor() or platform.machine()}"
    print(f"{a.shape}, batch {a.batch} x seq {a.seq}, {a.precision}, {where}, torch {torch.__version__}; "
          f"median of {a.repeats} interleaved steps after 1 warm-up")
    caps = cpu_bf16_capability()
    if not cuda:
        verdict = "native" if any(caps.values()) else \
            "EMULATED (lean is >50x slower here; BitFitTrainer falls back to fp32 for --lean)"
        print(f"CPU bf16 matmuls: {caps} -> {verdict}")
    print("| path | config | step s | vs full | step peak MiB | vs full | total peak MiB | vs full "
          "| saved-for-backward MiB | vs full | page faults/step | CPU s | vs full |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    out: dict = {"cpu_bf16": caps, "device": where, "torch": torch.__version__, "shape": a.shape, "batch": a.batch,
                 "seq": a.seq, "precision": a.precision, "repeats": a.repeats,
                 "model_config": LLAMA_1024 if a.shape == "llama-1024" else None,
                 "params": {f"{r.path}/{r.name}": sum(p.numel() for p in r.model.parameters()) for r in runners},
                 "trainable": {f"{r.path}/{r.name}": sum(p.numel() for p in r.model.parameters() if p.requires_grad)
                               for r in runners}}
    for path in a.paths:
        base: tuple = (None,) * 5
        if "full" in a.configs:
            f = ("full", path)
            full_peak = statistics.median(peaks[f])
            base = (statistics.median(times[f]), full_peak, full_peak + held[f], saved[f], statistics.median(cpu[f]))
        for c in a.configs:
            k = (c, path)
            st, pk, cs = statistics.median(times[k]), statistics.median(peaks[k]), statistics.median(cpu[k])
            sv = saved[k]
            total = pk + held[k]  # what the process needs at the step's peak, weights and Adam state included
            ratio = [f"{x / b:.2f}" if b else "-" for x, b in zip((st, pk, total, sv, cs), base, strict=True)]
            print(f"| {path} | {c} | {st:.3f} | {ratio[0]} | {pk / 2**20:.0f} | {ratio[1]} | {total / 2**20:.0f} | "
                  f"{ratio[2]} | {sv / 2**20:.0f} | {ratio[3]} | {statistics.median(faults[k]):.0f} | {cs:.3f} | "
                  f"{ratio[4]} |")
            out[f"{path}/{c}"] = {"step_s": st, "peak_bytes": pk, "persistent_bytes": held[k],
                                  "total_peak_bytes": total, "saved_bytes": sv, "times": times[k], "cpu_s": cs,
                                  "cpu_times": cpu[k]}
    if "trainer" in a.paths and "loop" in a.paths:
        for c in a.configs:
            t, lp = statistics.median(times[(c, "trainer")]), statistics.median(times[(c, "loop")])
            print(f"Trainer overhead over the plain loop, {c}: {100 * (t / lp - 1):+.1f}%")
    if a.json:  # written whole or not at all
        tmp_json = f"{a.json}.tmp"
        with open(tmp_json, "w") as f:
            json.dump(out, f, indent=2)
        os.replace(tmp_json, a.json)


if __name__ == "__main__":
    main()
