"""``BitFitTrainer``: a drop-in ``transformers.Trainer`` that trains only what BitFit selects."""

from __future__ import annotations

import logging

from transformers import Trainer

from .config import BitFitConfig
from .core import BitFitState, prepare_model
from .selection import BiasMap

logger = logging.getLogger("bitfit_tasks")


class BitFitTrainer(Trainer):
    """``Trainer`` plus BitFit: swap the class, pass ``bitfit_config=BitFitConfig(...)``.

    The model is frozen in place at construction (``requires_grad=False`` outside the selection),
    so the optimizer built by ``Trainer`` -- any ``--optim`` -- sees only the selected biases and
    the head. Everything else is the parent's: arguments, callbacks, evaluation, distribution.
    """

    def __init__(
        self,
        *args,
        bitfit_config: BitFitConfig | None = None,
        bias_map: BiasMap | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.bitfit_config = bitfit_config or BitFitConfig()
        self.bitfit_state: BitFitState = prepare_model(
            self.model, self.bitfit_config, bias_map=bias_map, seed=self.args.seed
        )
        summary = self.bitfit_state.summary()
        # Only the main process logs, so N processes don't print N copies.
        if self.args.process_index == 0:
            logger.info("BitFit mode %r\n%s", self.bitfit_config.mode, summary)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        head_lr = self.bitfit_config.head_learning_rate
        if head_lr is not None and self.bitfit_state.head:
            self._split_head_groups(optimizer, head_lr)
        if self.bitfit_state.masks:
            # Runs after every real step of whichever optimizer --optim chose.
            optimizer.register_step_post_hook(
                lambda *_: self.bitfit_state.restore_frozen_entries(self.model)
            )
        return optimizer

    def _split_head_groups(self, optimizer, head_lr: float) -> None:
        """Give the head its own learning rate, keeping each group's other settings."""
        head_ids = {id(p) for n, p in self.model.named_parameters() if n in set(self.bitfit_state.head)}
        groups = list(optimizer.param_groups)
        optimizer.param_groups.clear()
        for group in groups:
            body = [p for p in group["params"] if id(p) not in head_ids]
            head = [p for p in group["params"] if id(p) in head_ids]
            for params, lr in ((body, group["lr"]), (head, head_lr)):
                if params:
                    optimizer.add_param_group({**group, "params": params, "lr": lr})
