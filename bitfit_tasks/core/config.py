"""The one dataclass of BitFit options, parsed by ``HfArgumentParser`` beside ``TrainingArguments``."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..utils.errors import UsageError
from .bias_maps import resolve_terms

MODES: tuple[str, ...] = ("bitfit", "full", "frozen", "rand_uniform", "rand_row_col", "lora", "beft")
BIAS_TERM_MODES: tuple[str, ...] = ("bitfit", "rand_uniform", "rand_row_col")  # modes --bias_terms selects for
#: Modes trained through the ``peft`` library (an optional extra): the model is wrapped in a PeftModel.
PEFT_MODES: tuple[str, ...] = ("lora", "beft")
#: What each PEFT mode adapts by default, in the paper's notation: LoRA's W_q and W_v (Hu et al., 2021,
#: Sec. 7.1 and the GLUE runs of Appendix D), BEFT's value-projection bias b_v (Huang et al., 2025).
DEFAULT_PEFT_TARGETS: dict[str, tuple[str, ...]] = {"lora": ("q", "v"), "beft": ("v",)}
#: LoRA's options and their defaults (the LoRA paper's GLUE setting for RoBERTa-base; dropout: PEFT's default).
LORA_DEFAULTS: dict[str, float] = {"lora_r": 8, "lora_alpha": 8.0, "lora_dropout": 0.0}
#: Terms a PEFT target can name: the Linear layers of a transformer layer (PEFT adapts modules, not LayerNorms).
PEFT_TARGET_TERMS: tuple[str, ...] = ("q", "k", "v", "qkv", "m1", "m2", "m3")


@dataclass
class BitFitConfig:
    mode: str = field(
        default="bitfit",
        metadata={
            "help": "What to train. 'bitfit': the chosen bias terms + head; 'full': full fine-tuning as "
            "Trainer does it (every parameter the model leaves trainable); 'frozen': the head only; "
            "'rand_uniform' / 'rand_row_col': as many randomly drawn backbone weights (single entries / whole "
            "rows or columns) as BitFit's --bias_terms would train, the paper's Table 3 baselines; 'lora' / "
            "'beft': LoRA / BEFT adapters through the peft library (pip install 'bitfit-tasks[peft]') on "
            "--peft_targets, plus the head, saved as a PEFT adapter folder.",
            "choices": list(MODES),
        },
    )
    bias_terms: list[str] = field(
        default_factory=lambda: ["bitfit"],
        metadata={
            "help": "Bias terms in the paper's notation: q k v m1 LN1 m2 m3 LN2 emb pool (qkv: a fused "
            "query/key/value projection, final: the LayerNorm after the last layer, in decoder families), or a "
            "preset: bitfit/all (every bias, incl. embedding LayerNorm and pooler), layers "
            "(the 8 per-layer terms), qm2 (query + intermediate, the paper's 0.04 percent), attention, "
            "mlp. Space- or comma-separated.",
            "nargs": "+",
        },
    )
    add_missing_biases: bool = field(
        default=True,
        metadata={"help": "Where a selected term has no bias (Llama, Mistral, Qwen3, Gemma, Phi-3, ModernBERT are "
                  "built without them), add a zero-initialised bias there and train it (outputs at initialisation are "
                  "unchanged). --add_missing_biases false trains only the biases the model has, and refuses a "
                  "model that has none."},
    )
    peft_targets: list[str] | None = field(
        default=None,
        metadata={"help": "--mode lora / beft: the Linear layers to adapt, in the paper's notation (q k v qkv m1 m2 "
                  "m3), mapped to each architecture's module names. Default: q v for LoRA (its paper's W_q, W_v), "
                  "v for BEFT (its paper's b_v); a fused query/key/value projection (ModernBERT, Phi-3, GPT-2) is "
                  "adapted whole.",
                  "nargs": "+"},
    )
    lora_r: int = field(default=int(LORA_DEFAULTS["lora_r"]),
                        metadata={"help": "--mode lora: the rank r (LoRA paper, GLUE: 8)."})
    lora_alpha: float = field(
        default=LORA_DEFAULTS["lora_alpha"],
        metadata={"help": "--mode lora: the scale alpha (the update is alpha/r * BA; LoRA paper, RoBERTa-base "
                  "GLUE: 8)."})
    lora_dropout: float = field(default=LORA_DEFAULTS["lora_dropout"],
                                metadata={"help": "--mode lora: dropout on the adapter's input."})
    train_head: bool = field(
        default=True,
        metadata={"help": "Train the task head (classifier / qa_outputs); --train_head false "
                  "keeps the head frozen too."},
    )
    train_lm_head: bool = field(
        default=False,
        metadata={"help": "A language model (causal or masked LM): train its pretrained output head (lm_head) too, "
                  "and store it in the delta. By default it is part of the frozen base, like the embeddings "
                  "(at the Llama-3-8B shape: 525M values, 6.5 percent of the model)."},
    )
    head_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Separate learning rate for the task head (default: --learning_rate)."},
    )
    lean: bool = field(
        default=False,
        metadata={"help": "Bias-only modes: store the frozen weights once in bf16, train under bf16 autocast, "
                  "keep dropout masks as 1-byte booleans (biases and head stay fp32). Less memory and "
                  "time; results differ from fp32 by bf16 rounding."},
    )
    mask_seed: int | None = field(
        default=None,
        metadata={"help": "Seed for the random baselines' parameter draw (default: --seed)."},
    )

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"unknown mode {self.mode!r}; choose one of {list(MODES)}.")
        if isinstance(self.bias_terms, str):
            self.bias_terms = [self.bias_terms]
        resolve_terms(self.bias_terms)  # raises with the allowed choices
        if self.mode in ("full", "frozen", *PEFT_MODES) and list(self.bias_terms) != ["bitfit"]:
            what = {"full": "trains every parameter", "frozen": "trains the head only"}.get(
                self.mode, "trains adapters on --peft_targets")
            raise UsageError(f"--bias_terms {' '.join(self.bias_terms)} has no effect with --mode {self.mode}, which "
                             f"{what}; bias terms choose what modes {list(BIAS_TERM_MODES)} train. Drop "
                             "--bias_terms, or use --mode bitfit.")
        self._check_peft_options()
        if self.head_learning_rate is not None and not self.head_learning_rate > 0:
            raise UsageError(
                f"head_learning_rate must be > 0, got {self.head_learning_rate}; leave it unset "
                "to use --learning_rate."
            )
        if self.lean and self.mode not in ("bitfit", "frozen"):
            raise UsageError(f"lean=True stores frozen weights in bf16, which only bias-only modes allow "
                             f"(bitfit, frozen); mode {self.mode!r} updates weights. Drop --lean.")
        if self.mode == "frozen" and not self.train_head:
            raise UsageError(
                "mode 'frozen' with train_head=False leaves nothing trainable; use "
                "train_head=True or another mode."
            )

    def _check_peft_options(self) -> None:
        if isinstance(self.peft_targets, str):
            self.peft_targets = self.peft_targets.replace(",", " ").split()
        if self.peft_targets is not None and self.mode not in PEFT_MODES:
            raise UsageError(f"--peft_targets {' '.join(self.peft_targets)} is for --mode {' / '.join(PEFT_MODES)}, "
                             f"not {self.mode!r}; drop it (BitFit chooses its biases with --bias_terms).")
        changed = [f"--{f}" for f, default in LORA_DEFAULTS.items() if getattr(self, f) != default]
        if changed and self.mode != "lora":
            raise UsageError(f"{' '.join(changed)} set LoRA's adapters, and --mode {self.mode} trains none; drop "
                             f"{'them' if len(changed) > 1 else 'it'}, or use --mode lora.")
        if self.mode not in PEFT_MODES:
            return
        if self.peft_targets is not None:
            bad = [t for t in self.peft_targets if t not in PEFT_TARGET_TERMS]
            if bad or not self.peft_targets:
                raise UsageError(f"--peft_targets {' '.join(bad) or '(none)'}: a {self.mode} target is a Linear layer "
                                 f"of each transformer layer; choose from {list(PEFT_TARGET_TERMS)}.")
        if self.lora_r < 1:
            raise UsageError(f"--lora_r must be >= 1, got {self.lora_r}.")
        if not self.lora_alpha > 0:
            raise UsageError(f"--lora_alpha must be > 0, got {self.lora_alpha}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UsageError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")

    @property
    def targets(self) -> list[str]:
        """The PEFT modes' targets: the given ones, else the method's default."""
        return list(self.peft_targets or DEFAULT_PEFT_TARGETS.get(self.mode, ()))
