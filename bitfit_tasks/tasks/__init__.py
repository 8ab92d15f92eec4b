"""The paper's tasks as runners: what every runner shares (arguments, recipes, the run's prologue and
epilogue, results.json, callbacks, resume, metrics, sampling, caches, hub data) and one sub-package per
task (``glue``, ``pos``, ``squad``) with its runner, data and task logic. Imports ``training``,
``serving``, ``peft_interop``, ``delta``, ``core`` and ``utils``."""
