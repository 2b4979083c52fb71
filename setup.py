"""Installs the engine, kernels and handlers packages (pip install -c constraints.txt -e .[dev])."""
from setuptools import find_packages, setup

setup(
    name="torchserve-llm",
    version="0.1.0",
    description="Continuous batching, paged KV cache and Triton attention for LLMs in TorchServe",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*",
                                    "handlers", "handlers.*"]),
    package_data={"kernels": ["cpu/*.cpp", "cpu/*.h"]},     # compiled at first use on CPU
    install_requires=[
        "torch>=2.5,<2.14",
        "transformers>=4.56,<6",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "numpy>=1.26",
        "pydantic>=2.6,<3",
        "tqdm>=4.66",
        "psutil>=5.9",
        "ninja>=1.11",          # torch.utils.cpp_extension builds the CPU kernels with it
        "xgrammar>=0.2,<0.3",       # structured output (engine/structured_output*.py)
        "jsonschema>=4.18",
    ],
    extras_require={
        "triton": ["triton>=3.1"],
        "serve": ["torchserve==0.12.0", "torch-model-archiver==0.12.0", "requests>=2.31",
                  "gguf>=0.17", "accelerate>=1.0"],
        "gguf": ["gguf>=0.17", "accelerate>=1.0"],      # scripts/import_gguf.py
        "bench": ["matplotlib>=3.8", "requests>=2.31", "gguf>=0.17"],   # gguf: bench/llama_cpp.py
        "dev": ["triton>=3.1", "torchserve==0.12.0", "torch-model-archiver==0.12.0",
                "requests>=2.31", "gguf>=0.17", "accelerate>=1.0", "matplotlib>=3.8", "pytest>=8",
                "hypothesis>=6.100", "openai>=1.40",
                "langchain-openai>=1.0"],      # tests/handlers/test_langchain.py
        # tests/handlers/test_lm_eval.py (skipped without it): heavy (datasets, pyarrow,
        # scikit-learn, ...), so not in dev
        "eval": ["lm-eval[api]>=0.4.13,<0.5"],
    },
)
