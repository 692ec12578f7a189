"""Balcony distillation pipeline: frozen decoder LM + self-distilled early exits.

torch is deliberately a loose range: on CPU machines `make setup` installs the local
CPU build (torch==2.13.0) first; a GPU cluster keeps the torch it already has.
"""
from setuptools import find_packages, setup

setup(
    name="balcony-pipeline",
    version="0.1.0",
    description="Balcony early-exit self-distillation pipeline (tokenize, teacher-logits, train-exits, evaluate)",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*", "embedded"]),
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.19.2,<0.20",  # 0.16-0.19.1 cast rotary inv_freq buffers to bf16 (wrong positions)
        "transformers>=5.24,<5.25",
        "datasets>=4.0,<6",
        "webdataset>=1.0,<1.1",
        "mlflow>=3.0,<4",
        "pyyaml>=6.0,<7",
        "gguf>=0.10,<1",
        "numpy>=1.26,<3",
        "safetensors>=0.4,<1",
        "accelerate>=1.0,<2",
        "tqdm>=4.66,<5",
        "matplotlib>=3.7,<4",
        "lm-eval>=0.4.13,<0.5",
    ],
    extras_require={
        # pytest 9 keeps a node id that xdist 3.x cannot suffix: its --dist loadgroup then ignores groups
        "test": ["pytest>=8.3,<9", "pytest-timeout>=2.3", "pytest-xdist>=3.5,<4",
                 "scipy>=1.10"],  # the speculative sampling test's chi-square
    },
)
