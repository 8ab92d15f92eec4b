"""BitFit on a model: the options (``BitFitConfig``), the per-architecture bias maps and the selection
over them, the model's preparation (freeze, select, add missing biases, mask), lean mode, the base
signature and the meta-device skeleton. Imports only ``utils``."""
