"""Drop-in ``nn.Module``s wrapping a frozen ``nn.Linear``; no kernel code lives here.

Every module follows one protocol (used by ``peft_kernels.adapters``):
``from_linear(linear, **options)``, ``base_layer`` (the frozen linear),
``merge(keep_original=False)``, ``unmerge()``, ``merged``, ``to_linear()``, ``adapter_config()``
and the class attribute ``family``.
"""
