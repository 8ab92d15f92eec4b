"""Training: ``BitFitTrainer`` (a drop-in ``transformers.Trainer``) and the best-epoch keeper. Imports
``peft_interop``, ``delta``, ``core`` and ``utils``."""
