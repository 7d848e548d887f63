"""fastrlhf: one import namespace assembled from three source folders.

`package_dir` maps python/fastrlhf -> fastrlhf, kernels/ -> fastrlhf.kernels, hybrid_engine/ ->
fastrlhf.hybrid_engine (and csrc/ -> fastrlhf.csrc, CUDA sources as data), so each folder is that
package in an editable install and in a wheel alike; the bundled tasks' files are package data.
FASTRLHF_BUILD_OPS=1 builds the CUDA extension ahead of time.
"""
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


def _packages():
    pkgs = ["fastrlhf" + ("." + p if p else "") for p in [""] + find_packages("python/fastrlhf")]
    pkgs += ["fastrlhf.kernels" + ("." + p if p else "") for p in [""] + find_packages("kernels")]
    pkgs += ["fastrlhf.hybrid_engine" + ("." + p if p else "") for p in [""] + find_packages("hybrid_engine")]
    pkgs += ["fastrlhf.csrc"]
    return pkgs


def _package_dir():
    d = {"fastrlhf": "python/fastrlhf", "fastrlhf.kernels": "kernels",
         "fastrlhf.hybrid_engine": "hybrid_engine", "fastrlhf.csrc": "csrc"}
    return d


class BuildPyWithOps(build_py):
    """Optionally JIT-build the CUDA extension at install time (FASTRLHF_BUILD_OPS=1)."""

    def run(self):
        super().run()
        if os.environ.get("FASTRLHF_BUILD_OPS") == "1":
            import sys
            sys.path.insert(0, os.path.abspath("python"))
            from fastrlhf.ops import cuda_build  # noqa: E402
            cuda_build.build(verbose=True, src_dir=os.path.abspath("csrc"))


setup(
    name="fastrlhf",
    version="0.1.0",
    description="Fast RLHF (SFT -> reward model -> PPO) with a hybrid engine on DeepSpeed",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=_packages(),
    package_dir=_package_dir(),
    package_data={"fastrlhf.csrc": ["*.cu", "*.cuh", "*.cpp", "*.h"],
                  "fastrlhf.ops.tables": ["*.json"],  # backend preference tables per GPU model
                  # the bundled tasks' data, tokenizers and model configs (fastrlhf.tasks)
                  "fastrlhf": ["tasks/default/*", "tasks/default/**/*", "tasks/arithmetic/*",
                               "tasks/calculator/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "transformers>=4.45,<6",
        "deepspeed>=0.15",
        "peft>=0.13",
        "datasets>=2.20",
        "tokenizers>=0.19",
        "safetensors",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "ninja",
        "numpy",
    ],
    extras_require={
        # Tested: triton 3.6 (the GPU machine; also the sm_90 compile tests on a CPU) and 3.8
        # (the CPU suite: interpreter and sm_90 compile tests; 3.6's interpreter cannot take a
        # loaded scalar as a loop bound under numpy 2). kernels/_launch.py relies on how the
        # interpreter patches triton.language: widen the range once tests/ops and tests/gpu pass.
        "triton": ["triton>=3.6,<3.9"],
        # experiment trackers for --report_to (tensorboard is always installed)
        "wandb": ["wandb"],
        "mlflow": ["mlflow-skinny"],
        # the trackers too: tests/cli/test_trackers.py logs to the real packages (offline, a local file store)
        "test": ["pytest>=7", "pytest-timeout", "wandb", "mlflow-skinny"],
        # benchmarks/peers.py: TRL's GRPOTrainer side by side (generation on transformers, no vLLM)
        "peers": ["trl>=1.16"],
    },
    entry_points={"console_scripts": ["fastrlhf=fastrlhf.cli:main"]},
    cmdclass={"build_py": BuildPyWithOps},
)
