"""Packaging for megatron-eplb.

The top-level ``patches/`` folder (the only code that knows Megatron-core and DeepSpeed internals) is
installed as the subpackage ``megatron_eplb.patches``.  From a source checkout the same import works
because ``megatron_eplb/__init__.py`` registers ``patches/`` under that name when it is not installed.
"""

from setuptools import setup

setup(
    name="megatron-eplb",
    version="0.1.0",
    description="Expert-parallel load balancing for Megatron-core MoE under DeepSpeed (training and inference)",
    python_requires=">=3.10",
    packages=[
        "megatron_eplb",
        "megatron_eplb.policy",
        "megatron_eplb.transfer",
        "megatron_eplb.patches",
        "megatron_eplb.patches.deepspeed",
        "megatron_eplb.patches.deepspeed_moe",
        "megatron_eplb.patches.megatron",
        "megatron_eplb.patches.megatron.experts",
    ],
    package_dir={"megatron_eplb.patches": "patches"},
    install_requires=["torch>=2.4", "numpy", "pyyaml", "tqdm"],
    extras_require={
        "train": ["megatron-core>=0.16", "deepspeed>=0.16"],
        "monitor": ["wandb", "tensorboard", "matplotlib"],
    },
    entry_points={"console_scripts": ["megatron-eplb=megatron_eplb.cli:main"]},
)
