"""Package metadata for vlm_jax.

Lower bounds are the versions the test suite was run with; there are no upper
pins (none has been forced by a real incompatibility yet).
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2",  # CPU wheels; install jax[tpu] / jax[cuda12] yourself on accelerators
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "grain>=0.2.18",
    "sentencepiece>=0.2.3",
    "ml-collections>=1.1.0",
    "tensorflow-datasets>=4.9.10",
    "array-record>=0.8.6",
    "pillow>=13.0.0",
    "msgpack>=1.2.4",
    "absl-py>=2.5.1",
    "numpy>=2.4",
    "tensorboardX>=2.6.5",
    "tqdm>=4.70",
    "pycocoevalcap>=1.2",  # CIDEr and BLEU for captioning evaluation (its Java tokenizer is not used)
    "matplotlib>=3.11.2",  # the run report's curves (Agg backend, no display needed)
    "scikit-learn>=1.9.1",  # its handwritten digits: few-shot episodes on real images (data_pipelines/real_images.py)
    "scikit-image>=0.26",  # its sample photos (files of the package): few-shot episodes on real images
]

EXTRAS = {
    "test": ["pytest>=9.0"],
    # PyTorch references, only for parity tests and checkpoint import.
    # Install torch first with `pip install torch==2.13.0` to get the CPU build, and timm and
    # open_flamingo separately with `pip install --no-deps timm==1.0.31 open-flamingo==2.0.1
    # einops-exts==0.0.4` (their dependencies would pull a CUDA torchvision and open_clip,
    # which the parity tests do not need).
    "interop": ["torch>=2.13.0", "transformers>=5.23.0", "safetensors>=0.4"],
}

setup(
    name="vlm_jax",
    version="0.1.0",
    description="Pure-functional JAX/Flax vision-language models, sharded over device meshes.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["vlm_jax", "vlm_jax.*", "data_pipelines", "data_pipelines.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["vlm-jax=vlm_jax.cli:main"]},
)
