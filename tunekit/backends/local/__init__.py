"""Local GPU/CPU backend. Heavy modules (torch, transformers, peft, trl) are imported only inside functions:
importing this package, ``peft_config`` or ``memory`` stays cheap (used by `plan`)."""
