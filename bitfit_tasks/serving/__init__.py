"""Using trained deltas: many tasks on one backbone (``MultiTaskBitFit``) and the ``bitfit-delta``
command (inspect, merge, export to PEFT). Imports ``peft_interop``, ``delta``, ``core`` and ``utils``."""
