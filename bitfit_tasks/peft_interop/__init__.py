"""PEFT beside BitFit: LoRA and BEFT as modes of the trainer and the runners (``modes``), and deltas to
and from PEFT adapter folders (``convert``). Imports ``delta``, ``core`` and ``utils``; ``peft`` itself
only when used (the ``peft`` extra)."""
