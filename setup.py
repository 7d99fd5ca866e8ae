"""unclip_jax: unCLIP (DALL-E 2 / Karlo) in JAX and Flax."""

from setuptools import find_packages, setup

setup(
    name="unclip_jax",
    version="0.1.0",
    description="unCLIP (DALL-E 2, Kakao Brain Karlo) in JAX/Flax: models, jitted sampling, sharded training",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["unclip_jax", "unclip_jax.*"]),
    include_package_data=True,
    # The demo model (diffusers layout, a few MB): `unclip-jax sample` works out of the box, offline.
    package_data={"unclip_jax.demo": ["model/*.json", "model/*/*.json", "model/*/*.safetensors", "model/*/*.txt"]},
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "transformers>=5.0",
        "tokenizers>=0.20",
        "tensorflow-datasets>=4.9",
        "ml_collections>=1.0",
        "numpy>=1.26",
        "ml_dtypes>=0.4",
        "pillow>=10",
        "safetensors>=0.4",
        "huggingface_hub>=0.25",
        "tqdm>=4.66",
        "absl-py>=2.0",
        "tensorboardX>=2.6",
    ],
    entry_points={"console_scripts": ["unclip-jax=unclip_jax.cli:main"]},
    extras_require={
        # The PyTorch reference for parity tests (torch pinned: an unpinned torch pulls a multi-GB CUDA build),
        # and what the tests run the notebooks with.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "diffusers>=0.35", "accelerate>=1.0",
                 "nbclient", "nbformat", "ipykernel"],
    },
)
