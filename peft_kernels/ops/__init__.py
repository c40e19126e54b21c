"""Kernels per family: ``lora``, ``monarch``, ``sparse``, ``lily``.

Each module reads top to bottom: constants, ``@triton.jit`` kernels, launchers (check,
allocate, launch), the ``autograd.Function``, and a public ``<family>_linear`` that dispatches
between Triton, the native extension and the torch reference. Import the family module you
need; importing this package imports nothing heavy.
"""
