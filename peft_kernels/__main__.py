"""``python -m peft_kernels`` = the ``peft-kernels`` command."""
import sys

from .cli import main

sys.exit(main())
