"""The one dataclass of BitFit options, parsed by ``HfArgumentParser`` beside ``TrainingArguments``."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UsageError
from .selection import resolve_terms

MODES: tuple[str, ...] = ("bitfit", "full", "frozen", "rand_uniform", "rand_row_col")
BIAS_TERM_MODES: tuple[str, ...] = ("bitfit", "rand_uniform", "rand_row_col")  # modes --bias_terms selects for


@dataclass
class BitFitConfig:
    mode: str = field(
        default="bitfit",
        metadata={
            "help": "What to train. 'bitfit': the chosen bias terms + head; 'full': full fine-tuning as "
            "Trainer does it (every parameter the model leaves trainable); 'frozen': the head only; "
            "'rand_uniform' / 'rand_row_col': as many randomly drawn backbone weights (single entries / whole "
            "rows or columns) as BitFit's --bias_terms would train, the paper's Table 3 baselines.",
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
    train_head: bool = field(
        default=True,
        metadata={"help": "Train the task head (classifier / qa_outputs); --train_head false "
                  "keeps the head frozen too."},
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
        if self.mode in ("full", "frozen") and list(self.bias_terms) != ["bitfit"]:
            what = "trains every parameter" if self.mode == "full" else "trains the head only"
            raise UsageError(f"--bias_terms {' '.join(self.bias_terms)} has no effect with --mode {self.mode}, which "
                             f"{what}; bias terms choose what modes {list(BIAS_TERM_MODES)} train. Drop "
                             "--bias_terms, or use --mode bitfit.")
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
