"""Training recipes: the one place that decides a run's default learning rate, schedule, batch size
and epochs for each mode and task. A flag the user passes always wins over the recipe.

* ``linear``: linear decay to zero, batch 16, 3 epochs (the HF examples' schedule), bias rate 1e-3
  for every task. Full fine-tuning's recipe, with 2e-5.
* ``official``: the BitFit authors' code (github.com/benzakenelad/BitFit): a *constant* learning
  rate, batch 8, up to 20 epochs, the best epoch's dev score reported. A bias-only run has few
  parameters to move and moves them slowly; decaying the rate to zero over a few epochs starves it.

* ``lora``: LoRA's GLUE recipe (Hu et al., 2021, arXiv 2106.09685, Appendix D, Table 9, RoBERTa-base):
  AdamW, linear decay after a linear warmup over 6% of the steps, batch 16, rate 4e-4 (their MRPC, STS-B,
  CoLA and QNLI rate; 5e-4 for MNLI, SST-2, QQP, RTE), r = alpha = 8 on W_q and W_v. Their 30-80 epochs
  are not taken: epochs stay the linear recipe's 3, so a comparison gives every method the same epoch budget.

``--recipe auto`` (the default) gives LoRA runs ``lora``, BEFT runs the bias recipe (a BEFT run trains bias
vectors like BitFit, so it gets BitFit's measured rate and schedule; the BEFT paper, Huang et al., 2025, arXiv
2509.15974, searches its rate per model and task), bias-only modes the recipe of :data:`AUTO_BIAS_RECIPES` for
the runner (``official`` for GLUE and tagging, ``linear`` for SQuAD) and full fine-tuning
``linear``; see benchmarks/RESULTS.md ("BitFit's recipe") for the evidence: on all-MiniLM-L6-v2
the constant-rate recipe beat the linear one on STS-B, CoLA (given its epochs) and POS and tied
on MRPC; it was not run on SQuAD, whose measured curve uses ``linear``. The bias
rate is 1e-3 for every task, not the paper's per-task BERT-base rates (Table 6: 1e-4 for STS-B,
MNLI, QNLI; 4e-4 SST-2, QQP; 7e-4 MRPC, CoLA): on all-MiniLM-L6-v2, 1e-3 scored best of
{1e-4, 4e-4, 1e-3} on MRPC, STS-B and CoLA over 3 seeds (STS-B 72.3 at 1e-4 against 84.3 at
1e-3; CoLA MCC 0 below 1e-3), and tied on RTE.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

# The paper's grids (Appendix A.2): bias-only runs and full fine-tuning use different ranges.
PAPER_BIAS_LRS: tuple[float, ...] = (1e-4, 4e-4, 7e-4, 1e-3)
PAPER_FULL_LRS: tuple[float, ...] = (1e-5, 2e-5, 3e-5, 5e-5)
# The sweep's default bias grid under the constant-rate recipe, per runner. The committed scan
# (benchmarks/results/recipe-official, all-MiniLM-L6-v2, 3 epochs) collapsed GLUE runs at 3e-3 (MRPC,
# CoLA) and 1e-2 (MRPC, STS-B): the model stops seeing its input and predicts the label prior. GLUE
# keeps 1e-3 (the best measured rate) and its lower neighbour. POS tagging trained at all three
# (94.3 / 94.4 / 93.5 word accuracy), so it keeps them. SQuAD was not scanned under this recipe: it
# gets GLUE's conservative grid.
OFFICIAL_BIAS_LRS: dict[str, tuple[float, ...]] = {
    "glue": (3e-4, 1e-3),
    "pos": (1e-3, 3e-3, 1e-2),
    "squad": (3e-4, 1e-3),
}
DEFAULT_FULL_LR = 2e-5
DEFAULT_BIAS_LR = 1e-3
DEFAULT_LORA_LR = 4e-4
#: The sweep's LoRA grid: the LoRA paper's two GLUE rates for RoBERTa-base (Table 9).
LORA_LRS: tuple[float, ...] = (4e-4, 5e-4)


@dataclass(frozen=True)
class Recipe:
    name: str
    lr_scheduler_type: str
    per_device_train_batch_size: int
    num_train_epochs: float
    bias_lr: float  # default learning rate of bias-only modes
    warmup_steps: float = 0.0  # Trainer's --warmup_steps: a float in [0, 1) is a fraction of the steps


RECIPES: dict[str, Recipe] = {
    "linear": Recipe("linear", "linear", 16, 3.0, DEFAULT_BIAS_LR),
    "official": Recipe("official", "constant", 8, 20.0, DEFAULT_BIAS_LR),
    "lora": Recipe("lora", "linear", 16, 3.0, DEFAULT_BIAS_LR, warmup_steps=0.06),
}
RECIPE_CHOICES = ("auto", *RECIPES)
#: What ``--recipe auto`` gives bias-only modes, per runner.
AUTO_BIAS_RECIPES: dict[str, str] = {"glue": "official", "pos": "official", "squad": "linear"}
FULL_RECIPE = "linear"
#: Modes whose ``--recipe auto`` is not the bias recipe of the runner.
AUTO_RECIPES: dict[str, str] = {"full": FULL_RECIPE, "lora": "lora"}


def default_lr(mode: str, recipe: Recipe) -> float:
    """A run's rate when none is given: full fine-tuning's, LoRA's (any recipe), else the recipe's bias rate."""
    return {"full": DEFAULT_FULL_LR, "lora": DEFAULT_LORA_LR}.get(mode, recipe.bias_lr)


def recipe_for(requested: str, mode: str, runner: str = "glue") -> Recipe:
    if requested == "auto":
        return RECIPES[AUTO_RECIPES.get(mode, AUTO_BIAS_RECIPES[runner])]
    if requested not in RECIPES:
        raise ValueError(f"unknown --recipe {requested!r}; choose one of {list(RECIPE_CHOICES)}.")
    return RECIPES[requested]


def apply_recipe(training_args: Any, mode: str, requested: str = "auto",
                 explicit: Collection[str] | None = None, runner: str = "glue") -> dict[str, Any]:
    """Fill the recipe's values into ``training_args`` wherever the user did not set them.

    ``explicit``: the argument names the user passed (command line or JSON file). ``None`` means
    unknown (arguments built in Python): then only an unset (NaN) learning rate is filled, and the
    batch size, schedule and epochs are left as given. Returns what was decided, for results.json."""
    from transformers.trainer_utils import SchedulerType

    recipe = recipe_for(requested, mode, runner)
    applied: dict[str, Any] = {}
    if math.isnan(training_args.learning_rate):  # the runners' "not given" value
        training_args.learning_rate = applied["learning_rate"] = default_lr(mode, recipe)
    # Warmup only where the recipe has one (Trainer's default is none): older runs' records stay as they were.
    names = ("lr_scheduler_type", "per_device_train_batch_size", "num_train_epochs") + (
        ("warmup_steps",) if recipe.warmup_steps else ())
    for name in names:
        if explicit is not None and name not in explicit:
            applied[name] = getattr(recipe, name)
            setattr(training_args, name, SchedulerType(applied[name]) if name == "lr_scheduler_type" else applied[name])
    return {"recipe": recipe.name, "recipe_applied": applied}
